//! Configuration: TOML file, then `FORKSERVE_<KEY>` environment variables, then command-line
//! flags, each overriding the one before; validated as a whole before anything starts. Every
//! error names the key (or the file) and the reason.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkserve_worker::model::Backend;
use forkserve_worker::settings::{ClusterDefaults, HttpLimits, WorkerSettings};
use serde::{Deserialize, Deserializer, Serialize};

/// Where the master looks for its config when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "conf/forkserve.toml";
/// Worker slots in the scoreboard; bounds `workers` (a rolling restart needs up to twice it).
pub const MAX_WORKERS: usize = 128;
/// Prefix of the environment variables that override config keys.
const ENV_PREFIX: &str = "FORKSERVE_";
/// Environment variables with our prefix that are not config keys (set by forkserve itself).
const ENV_RESERVED: &[&str] = &["FORKSERVE_FDS"];

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses to listen on: `HOST:PORT`, `[V6]:PORT`, or `unix:/path`.
    #[serde(deserialize_with = "one_or_many")]
    pub bind: Vec<String>,
    /// Pending connections the kernel queues for us (listen(2) backlog).
    pub backlog: u32,
    /// Worker processes. Default: the number of CPUs.
    pub workers: usize,
    /// Compute threads per worker.
    pub threads: usize,
    /// Requests after which a worker is replaced (0 = never).
    pub max_requests: u64,
    /// A random 0..=jitter added per worker, so workers do not all recycle at once.
    pub max_requests_jitter: u64,
    /// Seconds without a heartbeat (or inside one computation) before a worker is killed.
    pub timeout: f64,
    /// Seconds a new worker has to become ready (separate from `timeout`).
    pub boot_timeout: f64,
    /// Consecutive failed boots after which the master gives up (exit code 3).
    pub max_boot_failures: u32,
    /// Seconds a stopping worker has to finish in-flight requests before SIGKILL.
    pub graceful_timeout: f64,
    /// Seconds an idle keep-alive connection stays open.
    pub keepalive: f64,
    /// Seconds a client has to send a request's headers (slow-loris guard).
    pub header_timeout: f64,
    /// Longest request line (method, target, version) accepted, in bytes (400 above).
    pub limit_request_line: usize,
    /// Most header fields in a request (431 above).
    pub limit_request_fields: usize,
    /// Longest header field (name and value), in bytes (431 above).
    pub limit_request_field_size: usize,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most sentences in one request.
    pub max_sentences: usize,
    /// Padded tokens per forward pass when a request's sentences are batched.
    pub max_batch_tokens: usize,
    /// Requests waiting per worker before new ones get 503 + Retry-After.
    pub max_queue: usize,
    /// Replace a worker whose private memory (USS, never RSS) stays above this for 3 samples
    /// in a row: bytes, or a string such as "256MiB". 0 = no limit.
    pub max_worker_memory: ByteSize,
    /// File the master writes its pid to (atomically), removed on exit.
    pub pidfile: Option<PathBuf>,
    /// User (name or uid) the workers run as. Unset while the master runs as root: `nobody`,
    /// unless `allow_root`.
    pub user: Option<String>,
    /// Group (name or gid) the workers run as. Default: the user's primary group.
    pub group: Option<String>,
    /// Let workers run as root when the master does and no `user` is set.
    pub allow_root: bool,
    /// umask of the master (and so of the unix socket, pidfile and log file), e.g. 0o027.
    pub umask: Option<u32>,
    /// Permissions of unix sockets from `bind`, e.g. 0o660. Unset: as created (umask).
    pub socket_mode: Option<u32>,
    pub model: ModelConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
    pub testing: TestingConfig,
    /// (uid, gid) for the workers, resolved from `user`/`group` when the config is loaded, so
    /// that spawning a worker never looks up a user.
    #[serde(skip)]
    pub run_as: Option<(u32, u32)>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Directory with model.safetensors, tokenizer.json, config.json.
    pub path: PathBuf,
    /// Name in /info and /v1/embeddings. Unset: the directory's name.
    pub name: Option<String>,
    /// Forward pass: "fast" (forkserve's, no padding) or "candle" (candle-transformers').
    pub backend: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub threshold: f32,
    pub min_cluster_size: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// trace, debug, info, warn or error.
    pub level: String,
    /// Error log file (reopened on USR1). Unset: stderr.
    pub file: Option<PathBuf>,
    /// "text" or "json" (one JSON object per line).
    pub format: String,
    /// One line per request (gunicorn's fields).
    pub access_log: bool,
}

/// Settings that exist only so tests can provoke failures. Never set them in production.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TestingConfig {
    /// Seconds each worker sleeps during boot, to exercise `boot_timeout`.
    pub boot_delay: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: vec!["127.0.0.1:8000".into()],
            backlog: 2048,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: 1,
            max_requests: 0,
            max_requests_jitter: 0,
            timeout: 30.0,
            boot_timeout: 60.0,
            max_boot_failures: 5,
            graceful_timeout: 30.0,
            keepalive: 5.0,
            header_timeout: 10.0,
            limit_request_line: 4094,
            limit_request_fields: 100,
            limit_request_field_size: 8190,
            max_body_bytes: 1024 * 1024,
            max_sentences: 512,
            max_batch_tokens: 8192,
            max_queue: 64,
            max_worker_memory: ByteSize(0),
            pidfile: None,
            user: None,
            group: None,
            allow_root: false,
            umask: None,
            socket_mode: None,
            model: ModelConfig::default(),
            cluster: ClusterConfig::default(),
            log: LogConfig::default(),
            testing: TestingConfig::default(),
            run_as: None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::from("models/all-MiniLM-L6-v2"),
            name: None,
            backend: "fast".into(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let d = ClusterDefaults::default();
        ClusterConfig {
            threshold: d.threshold,
            min_cluster_size: d.min_cluster_size,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            file: None,
            format: "text".into(),
            access_log: true,
        }
    }
}

/// A size in bytes, written as an integer or as a string with a unit ("256MiB", "1.5GB").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(into = "u64")]
pub struct ByteSize(pub u64);

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size (e.g. 268435456, \"256MiB\", \"1GB\")"))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        Ok(ByteSize((number * scale) as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A configuration problem; `key` is the TOML key, an environment variable, or a file path.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Where the configuration comes from, kept so that HUP can read it again the same way.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.path.as_deref(), self.env.clone(), &self.overrides)
    }
}

/// Values given on the command line; `None` leaves the file's (or the default) value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub bind: Vec<String>,
    pub workers: Option<usize>,
    pub threads: Option<usize>,
    pub model: Option<PathBuf>,
    pub max_requests: Option<u64>,
    pub max_requests_jitter: Option<u64>,
    pub timeout: Option<f64>,
    pub boot_timeout: Option<f64>,
    pub graceful_timeout: Option<f64>,
    pub log_level: Option<String>,
}

impl Config {
    /// Read the file (if any), apply environment and command-line overrides, and validate.
    /// `path` None means the default path if it exists, else built-in defaults.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let table = match path {
            Some(p) => read_table(p)?,
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => {
                read_table(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => toml::Table::new(),
        };
        let origin = path.map_or(DEFAULT_CONFIG_PATH.to_string(), |p| p.display().to_string());
        Config::from_table(table, &origin, env, overrides)
    }

    /// `load` on a file's text (`origin` names it in errors). The master reads files; this is
    /// for the config fuzz target (fuzz/fuzz_targets/config.rs) and the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn from_text(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let table = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::new(origin, e.to_string()))?;
        Config::from_table(table, origin, env, overrides)
    }

    fn from_table(
        mut table: toml::Table,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        apply_env(&mut table, env)?;
        let origin = origin.to_string();
        // serde_path_to_error names the key that failed ("workers", "model.path"); a key
        // unknown at the top level has no path, so the file is named instead.
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let key = if path == "." { origin } else { path };
                ConfigError::new(key, e.into_inner().message().to_string())
            })?;
        config.apply(overrides);
        config.validate()?;
        config.run_as = crate::privileges::resolve(&config)
            .map_err(|(key, reason)| ConfigError::new(key, reason))?;
        Ok(config)
    }

    #[cfg(test)]
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::new("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if !o.bind.is_empty() {
            self.bind = o.bind.clone();
        }
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {
                $(if let Some(v) = &o.$field { $target = v.clone(); })*
            };
        }
        set!(
            workers => self.workers,
            threads => self.threads,
            model => self.model.path,
            max_requests => self.max_requests,
            max_requests_jitter => self.max_requests_jitter,
            timeout => self.timeout,
            boot_timeout => self.boot_timeout,
            graceful_timeout => self.graceful_timeout,
            log_level => self.log.level,
        );
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range<T: PartialOrd + fmt::Display>(
            key: &str,
            v: T,
            lo: T,
            hi: T,
        ) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(ConfigError::new(
                    key,
                    format!("must be between {lo} and {hi}, got {v}"),
                ));
            }
            Ok(())
        }
        fn seconds(key: &str, v: f64, allow_zero: bool) -> Result<(), ConfigError> {
            let ok = v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0)) && v <= 86_400.0;
            if !ok {
                let what = if allow_zero {
                    "0 or more"
                } else {
                    "more than 0"
                };
                return Err(ConfigError::new(
                    key,
                    format!("must be a number of seconds, {what} and at most 86400, got {v}"),
                ));
            }
            Ok(())
        }

        if self.bind.is_empty() {
            return Err(ConfigError::new("bind", "at least one address is needed"));
        }
        for addr in &self.bind {
            crate::sockets::BindAddress::parse(addr)
                .map_err(|reason| ConfigError::new("bind", format!("{addr:?}: {reason}")))?;
        }
        range("backlog", self.backlog, 1, 65_535)?;
        range("workers", self.workers, 1, MAX_WORKERS)?;
        range("threads", self.threads, 1, 256)?;
        seconds("timeout", self.timeout, false)?;
        seconds("boot_timeout", self.boot_timeout, false)?;
        range("max_boot_failures", self.max_boot_failures, 1, 1000)?;
        seconds("graceful_timeout", self.graceful_timeout, true)?;
        seconds("keepalive", self.keepalive, false)?;
        seconds("header_timeout", self.header_timeout, false)?;
        range("limit_request_line", self.limit_request_line, 1, 65_536)?;
        range("limit_request_fields", self.limit_request_fields, 1, 32_768)?;
        range(
            "limit_request_field_size",
            self.limit_request_field_size,
            1,
            65_536,
        )?;
        range("max_body_bytes", self.max_body_bytes, 64, 1 << 30)?;
        range("max_sentences", self.max_sentences, 1, 100_000)?;
        range("max_batch_tokens", self.max_batch_tokens, 1, 1 << 20)?;
        range("max_queue", self.max_queue, 1, 100_000)?;
        if !(self.cluster.threshold > 0.0 && self.cluster.threshold <= 1.0) {
            return Err(ConfigError::new(
                "cluster.threshold",
                format!("must be in (0, 1], got {}", self.cluster.threshold),
            ));
        }
        range(
            "cluster.min_cluster_size",
            self.cluster.min_cluster_size,
            1,
            100_000,
        )?;
        if !["trace", "debug", "info", "warn", "error"].contains(&self.log.level.as_str()) {
            return Err(ConfigError::new(
                "log.level",
                format!(
                    "must be one of trace, debug, info, warn, error; got {:?}",
                    self.log.level
                ),
            ));
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(ConfigError::new(
                "log.format",
                format!("must be \"text\" or \"json\"; got {:?}", self.log.format),
            ));
        }
        seconds("testing.boot_delay", self.testing.boot_delay, true)?;
        if let Some(mask) = self.umask {
            range("umask", mask, 0, 0o777)?;
        }
        if let Some(mode) = self.socket_mode {
            range("socket_mode", mode, 0, 0o777)?;
        }

        if Backend::parse(&self.model.backend).is_none() {
            return Err(ConfigError::new(
                "model.backend",
                format!(
                    "must be \"fast\" or \"candle\"; got {:?}",
                    self.model.backend
                ),
            ));
        }
        if self.model.path.as_os_str().is_empty() {
            return Err(ConfigError::new("model.path", "must not be empty"));
        }
        Ok(())
    }

    /// The part of the configuration a worker needs; `max_requests` with this worker's jitter.
    pub fn worker_settings(&self, max_requests: u64) -> WorkerSettings {
        WorkerSettings {
            threads: self.threads,
            max_requests,
            timeout: secs(self.timeout),
            graceful_timeout: secs(self.graceful_timeout),
            keepalive: secs(self.keepalive),
            header_timeout: secs(self.header_timeout),
            limits: HttpLimits {
                request_line: self.limit_request_line,
                fields: self.limit_request_fields,
                field_size: self.limit_request_field_size,
            },
            max_body_bytes: self.max_body_bytes,
            max_sentences: self.max_sentences,
            max_batch_tokens: self.max_batch_tokens,
            max_queue: self.max_queue,
            cluster: ClusterDefaults {
                threshold: self.cluster.threshold,
                min_cluster_size: self.cluster.min_cluster_size,
            },
            boot_delay: secs(self.testing.boot_delay),
            run_as: self.run_as,
            model_name: self.model_name(),
            access_log: self.log.access_log,
        }
    }

    pub fn backend(&self) -> Backend {
        Backend::parse(&self.model.backend).unwrap_or(Backend::Fast)
    }

    /// The model's public name: `model.name`, or the model directory's name.
    pub fn model_name(&self) -> String {
        self.model.name.clone().unwrap_or_else(|| {
            self.model
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// Seconds from a validated config value.
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let key = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&key, e.to_string()))?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::new(key, e.to_string()))
}

/// `FORKSERVE_MAX_REQUESTS=50` sets `max_requests`; `FORKSERVE_MODEL_PATH=/m` sets
/// `model.path`. Values are read as TOML (`8`, `true`, `["a", "b"]`), or else as a string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default())
        .map_err(|e| ConfigError::new("config", e.to_string()))?;
    for (name, raw) in env {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_RESERVED.contains(&name.as_str()) {
            continue;
        }
        let key = key.to_ascii_lowercase();
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if is_known_key(&defaults, &key) || key == "pidfile" {
            table.insert(key, value);
            continue;
        }
        let section = defaults.keys().find(|section| {
            key.strip_prefix(section.as_str())
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|rest| {
                    defaults
                        .get(section.as_str())
                        .and_then(toml::Value::as_table)
                        .is_some_and(|t| t.contains_key(rest))
                })
        });
        match section {
            Some(section) => {
                let rest = key[section.len() + 1..].to_string();
                let entry = table
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry.as_table_mut() {
                    Some(t) => {
                        t.insert(rest, value);
                    }
                    None => {
                        return Err(ConfigError::new(
                            name,
                            format!("{section} in the file is not a table"),
                        ))
                    }
                }
            }
            None => return Err(ConfigError::new(name, "not a configuration key")),
        }
    }
    Ok(())
}

fn is_known_key(defaults: &toml::Table, key: &str) -> bool {
    defaults.get(key).is_some_and(|v| !v.is_table())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text, "test.toml", env(&[]), &Overrides::default())
    }

    /// A file goes through the same path as text.
    #[test]
    fn a_file_and_its_text_load_the_same() {
        let path = std::env::temp_dir().join(format!(
            "forkserve-config-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let text = "workers = 3\n[cluster]\nthreshold = 0.6\n";
        std::fs::write(&path, text).unwrap();
        let from_file = Config::load(Some(&path), env(&[]), &Overrides::default());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            from_file.unwrap().to_toml(),
            from_str(text).unwrap().to_toml()
        );
        let e = from_str("workers = ").unwrap_err();
        assert_eq!(e.key, "test.toml", "{e}");
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        Config::load(Some(&path), env(&[]), &Overrides::default()).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = from_str("wrokers = 2\n").unwrap_err();
        assert!(e.reason.contains("wrokers"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = from_str("workers = \"two\"\n").unwrap_err();
        assert_eq!(e.key, "workers", "{e}");
        let e = from_str("[model]\npath = 3\n").unwrap_err();
        assert_eq!(e.key, "model.path", "{e}");
    }

    #[test]
    fn impossible_values_are_named() {
        for (text, key) in [
            ("workers = 0", "workers"),
            ("timeout = -1", "timeout"),
            ("boot_timeout = 0", "boot_timeout"),
            ("threads = 0", "threads"),
            ("bind = []", "bind"),
            ("bind = \"nohost\"", "bind"),
            ("[cluster]\nthreshold = 1.5", "cluster.threshold"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[log]\nformat = \"xml\"", "log.format"),
        ] {
            let e = from_str(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
    }

    #[test]
    fn bind_accepts_one_or_many() {
        assert_eq!(
            from_str("bind = \"127.0.0.1:9\"").unwrap().bind,
            vec!["127.0.0.1:9"]
        );
        assert_eq!(
            from_str("bind = [\"127.0.0.1:9\", \"unix:/tmp/x.sock\"]")
                .unwrap()
                .bind
                .len(),
            2
        );
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let path = std::env::temp_dir().join(format!("forkserve-prec-{}", std::process::id()));
        std::fs::write(&path, "workers = 3\nmax_requests = 10\ntimeout = 5\n").unwrap();
        let overrides = Overrides {
            workers: Some(4),
            ..Overrides::default()
        };
        let c = Config::load(
            Some(&path),
            env(&[
                ("FORKSERVE_WORKERS", "5"),
                ("FORKSERVE_MAX_REQUESTS", "20"),
                ("FORKSERVE_MODEL_PATH", "/srv/model"),
                ("FORKSERVE_CLUSTER_THRESHOLD", "0.6"),
                ("FORKSERVE_FDS", "3,4"),
                ("OTHER", "x"),
            ]),
            &overrides,
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.max_requests, 20);
        assert_eq!(c.timeout, 5.0);
        assert_eq!(c.model.path, PathBuf::from("/srv/model"));
        assert_eq!(c.cluster.threshold, 0.6);
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = Config::load(
            Some(Path::new("/dev/null")),
            env(&[("FORKSERVE_WROKERS", "2")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(e.key, "FORKSERVE_WROKERS");
    }

    #[test]
    fn sizes_read_as_ops_write_them() {
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1GB"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("3 parsecs").is_err());
        assert_eq!(
            from_str("max_worker_memory = \"2 MiB\"")
                .unwrap()
                .max_worker_memory,
            ByteSize(2 << 20)
        );
        assert_eq!(
            from_str("max_worker_memory = 1000")
                .unwrap()
                .max_worker_memory,
            ByteSize(1000)
        );
        assert_eq!(
            from_str("max_worker_memory = \"x\"").unwrap_err().key,
            "max_worker_memory"
        );
    }

    #[test]
    fn printed_config_reads_back() {
        let c = Config::default();
        assert_eq!(Config::from_toml_str(&c.to_toml()).unwrap(), c);
    }
}
