//! Configuration: the defaults of the settings registry (`registry.rs`), then the TOML file,
//! then `FORKSERVE_<KEY>` environment variables, then `FORKSERVE_CMD_ARGS`, then command-line
//! flags, each overriding the one before; `PORT` and `WEB_CONCURRENCY` (what gunicorn and
//! container platforms set) fill `bind` and `workers` when nothing else did. Every value is
//! checked against its setting as it is read, so every error names the key (and the file and
//! line, or the variable, it came from) and the reason.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use forkserve_worker::logging;
use forkserve_worker::model::{Backend, Precision};
use forkserve_worker::settings::{ClusterDefaults, HttpLimits, WorkerSettings};
use serde::{Deserialize, Deserializer, Serialize};

use crate::registry::{self, Kind, Setting, SETTINGS};

/// Where the master looks for its config when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "conf/forkserve.toml";
/// Worker slots in the scoreboard; bounds `workers` (a rolling restart needs up to twice it).
pub const MAX_WORKERS: usize = 128;
/// Prefix of the environment variables that override config keys.
const ENV_PREFIX: &str = "FORKSERVE_";
/// Environment variables with our prefix that are not config keys (set by forkserve itself,
/// or read apart).
const ENV_RESERVED: &[&str] = &["FORKSERVE_FDS", "FORKSERVE_CMD_ARGS"];

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bind: Vec<String>,
    pub backlog: u32,
    pub workers: usize,
    pub threads: usize,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Seconds; 0 turns the heartbeat timeout off.
    pub timeout: f64,
    pub boot_timeout: f64,
    pub max_boot_failures: u32,
    pub graceful_timeout: f64,
    /// Seconds; 0 turns keep-alive off.
    pub keepalive: f64,
    pub header_timeout: f64,
    pub limit_request_line: usize,
    pub limit_request_fields: usize,
    pub limit_request_field_size: usize,
    pub max_body_bytes: usize,
    pub max_sentences: usize,
    pub max_batch_tokens: usize,
    pub max_queue: usize,
    pub max_worker_memory: ByteSize,
    pub pidfile: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub allow_root: bool,
    pub umask: Option<u32>,
    pub socket_mode: Option<u32>,
    pub proc_name: Option<String>,
    pub api_key: Option<String>,
    pub metrics_public: bool,
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
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub name: Option<String>,
    pub sha256: Option<String>,
    pub backend: Backend,
    pub precision: Precision,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub threshold: f32,
    pub min_cluster_size: usize,
    pub max_sentences: usize,
    pub max_body_bytes: usize,
    pub max_agglomerative_sentences: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: logging::Level,
    pub file: Option<PathBuf>,
    pub format: logging::Format,
    pub access_log: bool,
    pub access_log_file: Option<PathBuf>,
    pub access_log_format: Option<String>,
}

/// Settings that exist only so tests can provoke failures. Never set them in production.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    pub boot_delay: f64,
    pub compute_stall: f64,
}

impl Default for Config {
    /// Every setting at its registry default.
    fn default() -> Self {
        Config::from_table(Layers::defaults().table).expect("the registry's defaults are valid")
    }
}

/// A size in bytes, written as an integer or as a string with a unit ("256MiB", "1.5GB").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(into = "u64")]
pub struct ByteSize(pub u64);

/// The smallest `max_worker_memory` accepted (other than 0): a few times a worker's idle USS
/// (5-6 MiB for either bundled model, `bench/results/bench*.md`).
const MIN_WORKER_MEMORY: u64 = 32 << 20;

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

/// A configuration problem: the key, where the bad value came from (a file and line, an
/// environment variable, a flag), and the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub origin: Option<String>,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            origin: None,
            reason: reason.into(),
        }
    }

    fn at(mut self, origin: impl Into<String>) -> ConfigError {
        self.origin = Some(origin.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{origin}: {}: {}", self.key, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A value given for a setting on the command line (or in `FORKSERVE_CMD_ARGS`).
#[derive(Debug, Clone)]
pub struct Given {
    pub setting: &'static Setting,
    /// The flag as written (`-w`, `--workers`), for messages.
    pub flag: String,
    pub value: String,
}

/// Where the configuration comes from, kept so that HUP can read it again the same way.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub flags: Vec<Given>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.path.as_deref(), self.env.clone(), &self.flags)
    }
}

/// The merged values as a TOML table, and which settings were given by anything other than
/// the defaults (so that `PORT` and `WEB_CONCURRENCY` only fill what nobody set).
struct Layers {
    table: toml::Table,
    given: Vec<&'static str>,
}

impl Layers {
    fn defaults() -> Layers {
        let mut table = toml::Table::new();
        for setting in SETTINGS {
            let value = match setting.default {
                registry::Default::Int(n) => toml::Value::Integer(n),
                registry::Default::Float(x) => toml::Value::Float(x),
                registry::Default::Bool(b) => toml::Value::Boolean(b),
                registry::Default::Text(t) => toml::Value::String(t.into()),
                registry::Default::Binds(list) => toml::Value::Array(
                    list.iter()
                        .map(|a| toml::Value::String((*a).into()))
                        .collect(),
                ),
                registry::Default::Cpus => toml::Value::Integer(available_cpus() as i64),
                registry::Default::Unset => continue,
            };
            put(&mut table, setting, value);
        }
        for section in registry::sections() {
            table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
        Layers {
            table,
            given: Vec::new(),
        }
    }

    fn set(&mut self, setting: &'static Setting, value: toml::Value) {
        put(&mut self.table, setting, value);
        self.given.push(setting.key);
    }

    /// A TOML file: every key must be a setting, every value of its kind.
    fn apply_file(
        &mut self,
        file: &toml::Table,
        text: &str,
        origin: &str,
    ) -> Result<(), ConfigError> {
        for (key, value) in file {
            match value {
                toml::Value::Table(inner) if registry::sections().contains(&key.as_str()) => {
                    for (name, value) in inner {
                        let full = format!("{key}.{name}");
                        self.apply_file_value(&full, value, text, origin)?;
                    }
                }
                _ => self.apply_file_value(key, value, text, origin)?,
            }
        }
        Ok(())
    }

    fn apply_file_value(
        &mut self,
        key: &str,
        value: &toml::Value,
        text: &str,
        origin: &str,
    ) -> Result<(), ConfigError> {
        let at = || format!("{origin}:{}", line_of(text, key));
        let Some(setting) = registry::find(key) else {
            return Err(ConfigError::new(key, "not a configuration key").at(at()));
        };
        let value = coerce(setting, Input::Toml(value))
            .map_err(|reason| ConfigError::new(key, reason).at(at()))?;
        self.set(setting, value);
        Ok(())
    }

    /// `FORKSERVE_MAX_REQUESTS=50` sets `max_requests`, `FORKSERVE_MODEL_PATH=/m` sets
    /// `model.path`.
    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        for (name, raw) in env {
            if !name.starts_with(ENV_PREFIX) || ENV_RESERVED.contains(&name.as_str()) {
                continue;
            }
            match SETTINGS.iter().find(|s| s.env_var() == *name) {
                Some(setting) => {
                    let value = coerce(setting, Input::Text(raw))
                        .map_err(|reason| ConfigError::new(setting.key, reason).at(name.clone()))?;
                    self.set(setting, value);
                }
                // Kubernetes injects FORKSERVE_SERVICE_HOST, FORKSERVE_PORT=tcp://... for a
                // Service named forkserve; they are not meant for us.
                None if is_service_link(name, raw) => {
                    tracing::debug!(variable = %name, "ignored: a Kubernetes service-link variable");
                }
                None => {
                    return Err(ConfigError::new(
                        name.clone(),
                        "not a configuration key; see --help for the FORKSERVE_* variables",
                    ))
                }
            }
        }
        Ok(())
    }

    fn apply_flags(&mut self, flags: &[Given], origin: &str) -> Result<(), ConfigError> {
        // A repeated --bind collects every address; any other flag given twice: the last wins.
        let mut binds: Vec<toml::Value> = Vec::new();
        for given in flags {
            let value = coerce(given.setting, Input::Text(&given.value)).map_err(|reason| {
                ConfigError::new(given.setting.key, reason).at(format!("{origin} {}", given.flag))
            })?;
            match (given.setting.kind, value) {
                (Kind::Binds, toml::Value::Array(items)) => binds.extend(items),
                (_, value) => self.set(given.setting, value),
            }
        }
        if !binds.is_empty() {
            let setting = registry::find("bind").expect("bind is a setting");
            self.set(setting, toml::Value::Array(binds));
        }
        Ok(())
    }

    /// gunicorn's and container platforms' variables, where nothing else set the value.
    fn apply_platform(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        if !self.given.contains(&"bind") {
            if let Some(port) = var("PORT") {
                let setting = registry::find("bind").expect("bind is a setting");
                let value = coerce(setting, Input::Text(&format!("0.0.0.0:{port}")))
                    .map_err(|reason| ConfigError::new("bind", reason).at("PORT"))?;
                self.set(setting, value);
            }
        }
        if !self.given.contains(&"workers") {
            if let Some(n) = var("WEB_CONCURRENCY") {
                let setting = registry::find("workers").expect("workers is a setting");
                let value = coerce(setting, Input::Text(&n))
                    .map_err(|reason| ConfigError::new("workers", reason).at("WEB_CONCURRENCY"))?;
                self.set(setting, value);
            }
        }
        Ok(())
    }
}

/// Kubernetes' service-link variables for a Service named `forkserve`:
/// `FORKSERVE_SERVICE_HOST`, `FORKSERVE_SERVICE_PORT[_NAME]`, and `FORKSERVE_PORT` /
/// `FORKSERVE_PORT_8000_TCP[_PROTO|_PORT|_ADDR]` shaped like `tcp://10.0.0.1:8000`, a port
/// number, a protocol or an address.
fn is_service_link(name: &str, value: &str) -> bool {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    if rest.starts_with("SERVICE_") {
        return true;
    }
    if rest == "PORT" || rest.starts_with("PORT_") {
        let v = value.trim();
        return v.starts_with("tcp://")
            || v.starts_with("udp://")
            || v.starts_with("sctp://")
            || v.parse::<u16>().is_ok()
            || matches!(v, "tcp" | "udp" | "sctp")
            || v.parse::<std::net::IpAddr>().is_ok();
    }
    false
}

fn put(table: &mut toml::Table, setting: &Setting, value: toml::Value) {
    match setting.split() {
        (None, name) => {
            table.insert(name.to_string(), value);
        }
        (Some(section), name) => {
            let inner = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = inner {
                t.insert(name.to_string(), value);
            }
        }
    }
}

/// A value as read: typed from a TOML file, or text from the environment or a flag.
enum Input<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl Input<'_> {
    fn describe(&self) -> String {
        match self {
            Input::Text(t) => format!("{t:?}"),
            Input::Toml(v) => v.to_string(),
        }
    }
}

/// Check a value against its setting and give it the type `Config` reads.
fn coerce(setting: &Setting, input: Input) -> Result<toml::Value, String> {
    let got = input.describe();
    let text = match &input {
        // A variable written as a TOML string ("\"/srv/m\"") means the string inside.
        Input::Text(t)
            if t.trim().len() >= 2 && t.trim().starts_with('"') && t.trim().ends_with('"') =>
        {
            format!("v = {}", t.trim())
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut v| v.remove("v"))
                .and_then(|v| v.as_str().map(str::to_string))
                .or_else(|| Some(t.trim().to_string()))
        }
        Input::Text(t) => Some(t.trim().to_string()),
        Input::Toml(toml::Value::String(s)) => Some(s.clone()),
        Input::Toml(_) => None,
    };
    let number = || -> Option<f64> {
        match &input {
            Input::Toml(toml::Value::Integer(n)) => Some(*n as f64),
            Input::Toml(toml::Value::Float(x)) => Some(*x),
            Input::Text(t) => t.trim().parse::<f64>().ok(),
            _ => None,
        }
    };
    match setting.kind {
        Kind::Int { min, max } => {
            let n = match &input {
                Input::Toml(toml::Value::Integer(n)) => Some(*n),
                Input::Text(t) => t.trim().parse::<i64>().ok(),
                _ => None,
            };
            match n {
                Some(n) if (min..=max).contains(&n) => Ok(toml::Value::Integer(n)),
                _ if max == i64::MAX => Err(format!("expected an integer >= {min}, got {got}")),
                _ => Err(format!(
                    "expected an integer from {min} to {max}, got {got}"
                )),
            }
        }
        Kind::Float { min, max, open_min } => match number() {
            Some(x) if x.is_finite() && (x > min || (!open_min && x == min)) && x <= max => {
                Ok(toml::Value::Float(x))
            }
            _ => {
                let low = if open_min { "(" } else { "[" };
                Err(format!(
                    "expected a number in {low}{min}, {max}], got {got}"
                ))
            }
        },
        Kind::Seconds { zero } => match number() {
            Some(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => Ok(toml::Value::Float(x)),
            Some(x) if x == 0.0 && zero.is_some() => Ok(toml::Value::Float(0.0)),
            _ => Err(match zero {
                Some(meaning) => {
                    format!("expected a number of seconds from 0 ({meaning}) to 86400, got {got}")
                }
                None => {
                    format!("expected a number of seconds above 0 and at most 86400, got {got}")
                }
            }),
        },
        Kind::Bool => {
            let b = match &input {
                Input::Toml(toml::Value::Boolean(b)) => Some(*b),
                Input::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => Some(true),
                    "false" | "0" | "no" | "off" => Some(false),
                    _ => None,
                },
                _ => None,
            };
            b.map(toml::Value::Boolean)
                .ok_or_else(|| format!("expected true or false, got {got}"))
        }
        Kind::Text => match text {
            Some(t) => Ok(toml::Value::String(t)),
            None => Err(format!("expected a string, got {got}")),
        },
        Kind::Path => match text {
            Some(t) if !t.is_empty() => Ok(toml::Value::String(t)),
            _ => Err(format!("expected a path, got {got}")),
        },
        Kind::Choice(words) => {
            match text
                .as_deref()
                .and_then(|t| words.iter().find(|w| w.eq_ignore_ascii_case(t)))
            {
                Some(w) => Ok(toml::Value::String(w.to_string())),
                None => Err(format!("expected one of {}, got {got}", words.join(", "))),
            }
        }
        Kind::Size => {
            let bytes = match &input {
                Input::Toml(toml::Value::Integer(n)) if *n >= 0 => Ok(ByteSize(*n as u64)),
                Input::Toml(toml::Value::String(s)) => ByteSize::parse(s),
                Input::Text(t) => ByteSize::parse(t),
                _ => Err(format!("expected a size such as \"256MiB\", got {got}")),
            }?;
            i64::try_from(bytes.0)
                .map(toml::Value::Integer)
                .map_err(|_| format!("{got} is too large"))
        }
        Kind::Binds => {
            // A variable may hold a TOML list: FORKSERVE_BIND='["0.0.0.0:8000", "unix:/s"]'.
            let listed = match &input {
                Input::Text(t) if t.trim_start().starts_with('[') => Some(
                    format!("v = {t}")
                        .parse::<toml::Table>()
                        .ok()
                        .and_then(|mut t| t.remove("v"))
                        .ok_or_else(|| format!("expected a TOML list of addresses, got {got}"))?,
                ),
                _ => None,
            };
            let input = match &listed {
                Some(value) => Input::Toml(value),
                None => input,
            };
            let items: Vec<String> = match &input {
                Input::Text(t) => vec![t.trim().to_string()],
                Input::Toml(toml::Value::String(s)) => vec![s.clone()],
                Input::Toml(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| format!("expected strings, got {v}"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(format!(
                        "expected an address or a list of addresses, got {got}"
                    ))
                }
            };
            if items.is_empty() {
                return Err("at least one address is needed".into());
            }
            let mut out = Vec::new();
            for item in items {
                let normal = crate::sockets::BindAddress::normalize(&item)
                    .map_err(|reason| format!("{item:?}: {reason}"))?;
                out.push(toml::Value::String(normal));
            }
            Ok(toml::Value::Array(out))
        }
        Kind::Mode => {
            let n = match &input {
                Input::Toml(toml::Value::Integer(n)) => Some(*n),
                _ => text.as_deref().and_then(parse_mode),
            };
            match n {
                Some(n) if (0..=0o777).contains(&n) => Ok(toml::Value::Integer(n)),
                _ => Err(format!(
                    "expected permission bits such as 0o027 (at most 0o777), got {got}"
                )),
            }
        }
    }
}

/// Permission bits as people write them: `0o027`, `027` (octal, as umask(1) prints), or a
/// decimal integer without a leading zero.
fn parse_mode(text: &str) -> Option<i64> {
    let t = text.trim();
    if let Some(oct) = t.strip_prefix("0o").or_else(|| t.strip_prefix("0O")) {
        return i64::from_str_radix(oct, 8).ok();
    }
    if t.len() > 1 && t.starts_with('0') {
        return i64::from_str_radix(&t[1..], 8).ok();
    }
    t.parse().ok()
}

/// The line of `key` in a TOML file's text (1 if it cannot be found): `model.path` is `path`
/// under `[model]`.
fn line_of(text: &str, key: &str) -> usize {
    let (section, name) = match key.split_once('.') {
        Some((s, n)) => (Some(s), n),
        None => (None, key),
    };
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(header.trim().to_string());
            continue;
        }
        let defines = line
            .split_once('=')
            .is_some_and(|(k, _)| k.trim().trim_matches('"') == name);
        if defines && current.as_deref() == section {
            return i + 1;
        }
    }
    1
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Config {
    /// Read the file (if any), apply the environment and the command-line flags, and validate.
    /// `path` None means the default path if it exists, else the defaults alone.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[Given],
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (read_file(p)?, p.display().to_string()),
            None if Path::new(DEFAULT_CONFIG_PATH).is_file() => (
                read_file(Path::new(DEFAULT_CONFIG_PATH))?,
                DEFAULT_CONFIG_PATH.to_string(),
            ),
            None => (String::new(), DEFAULT_CONFIG_PATH.to_string()),
        };
        Config::from_text(&text, &origin, env, flags)
    }

    /// `load` on a file's text (`origin` names it in errors). The master reads files; this is
    /// also the config fuzz target's entry (fuzz/fuzz_targets/config.rs).
    pub fn from_text(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[Given],
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let file = text.parse::<toml::Table>().map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(1);
            ConfigError::new(origin, e.message().to_string()).at(format!("{origin}:{line}"))
        })?;
        let mut layers = Layers::defaults();
        layers.apply_file(&file, text, origin)?;
        layers.apply_env(&env)?;
        if let Some((_, args)) = env.iter().find(|(k, _)| k == "FORKSERVE_CMD_ARGS") {
            let given = crate::cli::settings_in(args)
                .map_err(|reason| ConfigError::new("FORKSERVE_CMD_ARGS", reason))?;
            layers.apply_flags(&given, "FORKSERVE_CMD_ARGS")?;
        }
        layers.apply_flags(flags, "command line")?;
        layers.apply_platform(&env)?;
        let mut config = Config::from_table(layers.table)?;
        config.validate()?;
        config.run_as = crate::privileges::resolve(&config)
            .map_err(|(key, reason)| ConfigError::new(key, reason))?;
        Ok(config)
    }

    /// The typed view of checked values (every setting is present, by its default at least).
    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::new(e.path().to_string(), e.into_inner().message().to_string())
        })
    }

    /// What no single setting can check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.path.as_os_str().is_empty() {
            return Err(ConfigError::new("model.path", "must not be empty"));
        }
        if self.model.precision != Precision::F32 && self.model.backend != Backend::Fast {
            return Err(ConfigError::new(
                "model.precision",
                format!(
                    "\"{}\" needs model.backend = \"fast\" (candle's models keep f32 weights)",
                    self.model.precision.name()
                ),
            ));
        }
        if self.model.precision == Precision::Bf16 {
            forkserve_worker::model::enable_bf16_tiles().map_err(|why| {
                ConfigError::new("model.precision", format!("\"bf16\" needs AMX: {why}"))
            })?;
        }
        if let Some(format) = &self.log.access_log_format {
            forkserve_worker::access_log::Format::parse(format)
                .map_err(|reason| ConfigError::new("log.access_log_format", reason))?;
        }
        let memory = self.max_worker_memory.0;
        if memory != 0 && memory < MIN_WORKER_MEMORY {
            return Err(ConfigError::new(
                "max_worker_memory",
                format!(
                    "{memory} bytes is below what a worker holds when idle (5-6 MiB measured, \
                     more after its first requests): every worker would be replaced every few \
                     seconds; use 0 (no limit) or at least {} MiB",
                    MIN_WORKER_MEMORY >> 20
                ),
            ));
        }
        Ok(())
    }

    /// `log.access_log_format`, or gunicorn's default line.
    pub fn access_log_format(&self) -> forkserve_worker::access_log::Format {
        use forkserve_worker::access_log::Format;
        self.log
            .access_log_format
            .as_deref()
            .and_then(|f| Format::parse(f).ok())
            .unwrap_or_else(Format::gunicorn)
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
                max_sentences: self.cluster.max_sentences,
                max_body_bytes: self.cluster.max_body_bytes,
                max_agglomerative_sentences: self.cluster.max_agglomerative_sentences,
            },
            boot_delay: secs(self.testing.boot_delay),
            compute_stall: secs(self.testing.compute_stall),
            run_as: self.run_as,
            model_name: self.model_name(),
            proc_name: self.proc_name(),
            api_key: self.api_key.clone(),
            metrics_public: self.metrics_public,
            access_log: self.log.access_log,
            access_log_format: self
                .log
                .access_log_file
                .as_ref()
                .map(|_| self.access_log_format()),
        }
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

    /// The name in the process titles: `proc_name`, or the model's name.
    pub fn proc_name(&self) -> String {
        self.proc_name.clone().unwrap_or_else(|| self.model_name())
    }

    /// The merged configuration as TOML, each key with its doc, in the registry's order;
    /// secrets are not shown.
    pub fn to_toml(&self) -> String {
        let table = match toml::Table::try_from(self) {
            Ok(t) => t,
            Err(e) => return format!("# cannot print: {e}\n"),
        };
        let value_of = |setting: &Setting| -> Option<toml::Value> {
            match setting.split() {
                (None, name) => table.get(name).cloned(),
                (Some(section), name) => table.get(section)?.get(name).cloned(),
            }
        };
        render(|setting| {
            if setting.secret {
                return Line::Hidden(value_of(setting).is_some());
            }
            match value_of(setting) {
                Some(v) => Line::Value(v),
                None => Line::Unset,
            }
        })
    }
}

/// One key's line in a printed configuration.
enum Line {
    Value(toml::Value),
    Unset,
    /// A secret, set or not.
    Hidden(bool),
}

/// TOML text in the registry's order, every key after its doc.
fn render(line: impl Fn(&Setting) -> Line) -> String {
    let mut out = String::new();
    let mut section = None;
    for setting in SETTINGS {
        let (sec, name) = setting.split();
        if sec != section {
            out.push_str(&format!("\n[{}]\n", sec.unwrap_or("")));
            section = sec;
        }
        out.push('\n');
        for doc_line in wrap(setting.doc, 96) {
            out.push_str(&format!("# {doc_line}\n"));
        }
        out.push_str(&format!(
            "# flags: {}; environment: {}\n",
            setting.flags.join(", "),
            setting.env_var()
        ));
        match line(setting) {
            Line::Value(v) => out.push_str(&format!("{name} = {v}\n")),
            Line::Unset => out.push_str(&format!("# {name} =\n")),
            Line::Hidden(true) => out.push_str(&format!("# {name} = (set, not shown)\n")),
            Line::Hidden(false) => out.push_str(&format!("# {name} =\n")),
        }
    }
    out
}

/// The commented default configuration: `conf/forkserve.toml` is exactly this text
/// (`forkserve --print-default-config > conf/forkserve.toml`; a test checks it).
pub fn default_config_file() -> String {
    let header = "# forkserve's configuration, every setting with its default, written by\n\
                  # `forkserve --print-default-config` from the settings registry (src/registry.rs).\n\
                  # Precedence: this file, then FORKSERVE_* variables, then FORKSERVE_CMD_ARGS, then\n\
                  # command-line flags; PORT and WEB_CONCURRENCY fill bind and workers when nothing\n\
                  # else set them.\n";
    let body = render(|setting| match setting.default {
        registry::Default::Unset => Line::Unset,
        // Machine-dependent: left to the default.
        registry::Default::Cpus => Line::Unset,
        _ => {
            let defaults = Layers::defaults().table;
            let v = match setting.split() {
                (None, name) => defaults.get(name).cloned(),
                (Some(section), name) => defaults.get(section).and_then(|s| s.get(name)).cloned(),
            };
            v.map_or(Line::Unset, Line::Value)
        }
    });
    format!("{header}{body}")
}

/// The README's table of settings (`forkserve --print-settings-table`; a test checks that the
/// README holds it).
pub fn settings_table() -> String {
    let mut out = String::from(
        "| key | flags | environment | default | what |\n| --- | --- | --- | --- | --- |\n",
    );
    let defaults = Layers::defaults().table;
    for setting in SETTINGS.iter().filter(|s| !s.key.starts_with("testing.")) {
        let default = match setting.default {
            registry::Default::Unset => "unset".to_string(),
            registry::Default::Cpus => "the CPUs".to_string(),
            _ => match setting.split() {
                (None, name) => defaults.get(name),
                (Some(section), name) => defaults.get(section).and_then(|s| s.get(name)),
            }
            .map_or("unset".to_string(), |v| format!("`{v}`")),
        };
        let flags: Vec<String> = setting.flags.iter().map(|f| format!("`{f}`")).collect();
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} |\n",
            setting.key,
            flags.join(" "),
            setting.env_var(),
            default,
            setting.doc.replace('|', "\\|")
        ));
    }
    out
}

/// `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// The settings whose values differ between two configurations, as dotted keys
/// (`model.path`), in key order. Secrets are compared but never shown otherwise.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = match prefix {
                        "" => k.clone(),
                        p => format!("{p}.{k}"),
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let table = |c: &Config| {
        let mut out = BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(c) {
            flatten("", &v, &mut out);
        }
        out
    };
    let (a, b) = (table(old), table(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Settings only the master uses: a reload that changes nothing else keeps the workers
/// (`workers` itself adds or stops workers without touching the others).
pub const MASTER_ONLY: &[&str] = &[
    "workers",
    "boot_timeout",
    "max_boot_failures",
    "max_worker_memory",
    "pidfile",
    "umask",
];

/// `model.sha256`, if set: the weights file must have that digest.
pub fn check_model_pin(model: &ModelConfig) -> Result<(), String> {
    let Some(want) = &model.sha256 else {
        return Ok(());
    };
    let got = forkserve_worker::model::weights_sha256(&model.path)
        .map_err(|e| format!("model.sha256: {e}"))?;
    if !got.eq_ignore_ascii_case(want.trim()) {
        return Err(format!(
            "model.sha256: the weights of {} have sha256 {got}, not {want}: a different or \
             damaged file",
            model.path.display()
        ));
    }
    Ok(())
}

/// Seconds from a validated config value.
pub fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v)
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))
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
        Config::from_text(text, "test.toml", env(&[]), &[])
    }

    fn flags(words: &[&str]) -> Vec<Given> {
        crate::cli::settings_in(&words.join(" ")).unwrap()
    }

    /// bf16 is taken where this CPU and kernel run AMX's tiles, and refused, naming the key
    /// and why, where they do not.
    #[test]
    fn bf16_is_taken_only_where_amx_runs() {
        let parsed = from_str("[model]\nprecision = \"bf16\"");
        match forkserve_worker::model::enable_bf16_tiles() {
            Ok(()) => assert_eq!(parsed.unwrap().model.precision, Precision::Bf16),
            Err(why) => {
                let e = parsed.unwrap_err();
                assert_eq!(e.key, "model.precision");
                assert!(e.reason.contains(&why), "{e}");
            }
        }
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
        let from_file = Config::load(Some(&path), env(&[]), &[]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(from_file.unwrap(), from_str(text).unwrap());
        let e = from_str("workers = ").unwrap_err();
        assert_eq!(e.origin.as_deref(), Some("test.toml:1"), "{e}");
    }

    #[test]
    fn the_shipped_config_is_the_registrys_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let shipped = std::fs::read_to_string(&path).unwrap();
        assert!(
            shipped == default_config_file(),
            "conf/forkserve.toml differs from the registry: regenerate it with \
             `target/release/forkserve --print-default-config > conf/forkserve.toml`"
        );
        let loaded = Config::load(Some(&path), env(&[]), &[]).unwrap();
        assert_eq!(
            loaded,
            Config {
                run_as: loaded.run_as,
                ..Config::default()
            }
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = from_str("workers = 2\nwrokers = 2\n").unwrap_err();
        assert_eq!(e.key, "wrokers");
        assert_eq!(e.origin.as_deref(), Some("test.toml:2"));
    }

    #[test]
    fn wrong_type_is_named_with_file_and_line() {
        let e = from_str("# workers\n\nworkers = \"four\"\n").unwrap_err();
        assert_eq!(e.key, "workers", "{e}");
        assert_eq!(
            e.to_string(),
            "test.toml:3: workers: expected an integer from 1 to 128, got \"four\""
        );
        let e = from_str("[model]\npath = 3\n").unwrap_err();
        assert_eq!(e.key, "model.path", "{e}");
        assert_eq!(e.origin.as_deref(), Some("test.toml:2"));
    }

    #[test]
    fn impossible_values_are_named() {
        for (text, key) in [
            ("workers = 0", "workers"),
            ("timeout = -1", "timeout"),
            ("boot_timeout = 0", "boot_timeout"),
            ("threads = 0", "threads"),
            ("bind = []", "bind"),
            ("bind = \"host:http\"", "bind"),
            ("[cluster]\nthreshold = 1.5", "cluster.threshold"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("umask = \"0o999\"", "umask"),
            ("[model]\nprecision = \"int8\"", "model.precision"),
            (
                "[model]\nprecision = \"f16\"\nbackend = \"candle\"",
                "model.precision",
            ),
        ] {
            let e = from_str(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        let e = from_str("bind = \"127.0.0.1:99999\"").unwrap_err();
        assert!(e.reason.contains("port 99999 is out of range"), "{e}");
    }

    #[test]
    fn gunicorns_values_are_taken() {
        let c = from_str("bind = [\":8001\", \"unix:/tmp/x.sock\"]\ntimeout = 0\nkeepalive = 0\numask = \"027\"\n[log]\nlevel = \"warning\"").unwrap();
        assert_eq!(c.bind, ["0.0.0.0:8001", "unix:/tmp/x.sock"]);
        assert_eq!((c.timeout, c.keepalive), (0.0, 0.0));
        assert_eq!(c.umask, Some(0o27));
        assert_eq!(c.log.level, logging::Level::Warning);
        assert!(
            from_str("boot_timeout = 0").is_err(),
            "0 has no meaning for boot_timeout"
        );
    }

    #[test]
    fn precedence_is_file_then_env_then_cmd_args_then_flags() {
        let c = Config::from_text(
            "workers = 3\nmax_requests = 10\ntimeout = 5\nthreads = 1\n",
            "test.toml",
            env(&[
                ("FORKSERVE_WORKERS", "5"),
                ("FORKSERVE_MAX_REQUESTS", "20"),
                ("FORKSERVE_THREADS", "2"),
                ("FORKSERVE_MODEL_PATH", "/srv/model"),
                ("FORKSERVE_CLUSTER_THRESHOLD", "0.6"),
                ("FORKSERVE_CMD_ARGS", "--max-requests 30 -w 6"),
                ("FORKSERVE_FDS", "3,4"),
                ("OTHER", "x"),
            ]),
            &flags(&["-w", "4"]),
        )
        .unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.max_requests, 30);
        assert_eq!(c.threads, 2);
        assert_eq!(c.timeout, 5.0);
        assert_eq!(c.model.path, PathBuf::from("/srv/model"));
        assert_eq!(c.cluster.threshold, 0.6);
    }

    #[test]
    fn port_and_web_concurrency_fill_only_what_nobody_set() {
        let platform = env(&[("PORT", "9090"), ("WEB_CONCURRENCY", "3")]);
        let c = Config::from_text("", "t", platform.clone(), &[]).unwrap();
        assert_eq!(c.bind, ["0.0.0.0:9090"]);
        assert_eq!(c.workers, 3);
        let c = Config::from_text(
            "bind = \"127.0.0.1:1\"",
            "t",
            platform.clone(),
            &flags(&["-w", "2"]),
        )
        .unwrap();
        assert_eq!(c.bind, ["127.0.0.1:1"]);
        assert_eq!(c.workers, 2);
    }

    #[test]
    fn unknown_env_key_is_named_but_kubernetes_service_links_are_not() {
        let e = Config::from_text("", "t", env(&[("FORKSERVE_WROKERS", "2")]), &[]).unwrap_err();
        assert_eq!(e.key, "FORKSERVE_WROKERS");
        let links = env(&[
            ("FORKSERVE_SERVICE_HOST", "10.0.0.7"),
            ("FORKSERVE_SERVICE_PORT", "8000"),
            ("FORKSERVE_SERVICE_PORT_HTTP", "8000"),
            ("FORKSERVE_PORT", "tcp://10.0.0.7:8000"),
            ("FORKSERVE_PORT_8000_TCP", "tcp://10.0.0.7:8000"),
            ("FORKSERVE_PORT_8000_TCP_PROTO", "tcp"),
            ("FORKSERVE_PORT_8000_TCP_PORT", "8000"),
            ("FORKSERVE_PORT_8000_TCP_ADDR", "10.0.0.7"),
        ]);
        assert!(Config::from_text("", "t", links, &[]).is_ok());
        let e = Config::from_text("", "t", env(&[("FORKSERVE_PORT", "lots")]), &[]).unwrap_err();
        assert_eq!(e.key, "FORKSERVE_PORT");
    }

    #[test]
    fn sizes_read_as_ops_write_them() {
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1GB"), Ok(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("3 parsecs").is_err());
        assert_eq!(
            from_str("max_worker_memory = \"200 MiB\"")
                .unwrap()
                .max_worker_memory,
            ByteSize(200 << 20)
        );
        assert_eq!(
            from_str("max_worker_memory = 100000000")
                .unwrap()
                .max_worker_memory,
            ByteSize(100_000_000)
        );
        // Below a worker's idle memory: every worker would be recycled for ever.
        let e = from_str("max_worker_memory = \"1KiB\"").unwrap_err();
        assert_eq!(e.key, "max_worker_memory");
        assert!(e.reason.contains("1024 bytes"), "{}", e.reason);
        assert_eq!(
            from_str("max_worker_memory = \"x\"").unwrap_err().key,
            "max_worker_memory"
        );
    }

    #[test]
    fn printed_config_reads_back_and_hides_secrets() {
        let c = from_str("api_key = \"s3cret\"\nworkers = 3\n").unwrap();
        let printed = c.to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("# api_key = (set, not shown)"));
        let again = Config::from_text(&printed, "printed", env(&[]), &[]).unwrap();
        assert_eq!(again, Config { api_key: None, ..c });
    }
}
