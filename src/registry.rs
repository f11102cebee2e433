//! Every setting, declared once, in the spirit of gunicorn's `Setting` classes: its key in the
//! TOML file, its type and bounds, its default, a one-line doc, its command-line flags (with
//! gunicorn's spellings) and its environment variable (`FORKSERVE_` + the key in capitals,
//! `.` as `_`). The CLI, the environment, `--print-config`, the validation and the commented
//! `conf/forkserve.toml` all come from this table; `Config` (config.rs) is the typed view of
//! the merged values.

/// What values a setting takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// An integer in `min..=max`.
    Int {
        min: i64,
        max: i64,
    },
    /// A number in `min..=max`; `open_min` excludes `min`.
    Float {
        min: f64,
        max: f64,
        open_min: bool,
    },
    /// A number of seconds up to a day; `zero` says what 0 means, if it is allowed.
    Seconds {
        zero: Option<&'static str>,
    },
    Bool,
    /// Free text.
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A file or directory.
    Path,
    /// Bytes: an integer or a string with a unit ("256MiB").
    Size,
    /// Listening addresses; the flag may be repeated.
    Binds,
    /// Permission bits, octal ("0o027", "027") or decimal.
    Mode,
}

/// A default value (`Unset` for settings that are absent unless given).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Default {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(&'static str),
    Binds(&'static [&'static str]),
    /// The number of CPUs this process may use (a container's quota included).
    Cpus,
    Unset,
}

#[derive(Debug)]
pub struct Setting {
    /// Key in the TOML file: `workers`, `model.path`.
    pub key: &'static str,
    pub kind: Kind,
    pub default: Default,
    /// One line, for `--help`, the config file and the README.
    pub doc: &'static str,
    /// Command-line spellings; the first long one is canonical.
    pub flags: &'static [&'static str],
    /// Not printed by `--print-config` nor logged (e.g. `api_key`).
    pub secret: bool,
}

impl Setting {
    /// `FORKSERVE_MODEL_PATH` for `model.path`.
    pub fn env_var(&self) -> String {
        format!(
            "FORKSERVE_{}",
            self.key.replace('.', "_").to_ascii_uppercase()
        )
    }

    /// The section (`model` for `model.path`) and the name inside it.
    pub fn split(&self) -> (Option<&'static str>, &'static str) {
        match self.key.split_once('.') {
            Some((section, name)) => (Some(section), name),
            None => (None, self.key),
        }
    }

    /// The long flag without its dashes, used as the clap id.
    pub fn id(&self) -> &'static str {
        self.key
    }
}

const fn setting(
    key: &'static str,
    kind: Kind,
    default: Default,
    doc: &'static str,
    flags: &'static [&'static str],
) -> Setting {
    Setting {
        key,
        kind,
        default,
        doc,
        flags,
        secret: false,
    }
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}

const SECONDS: Kind = Kind::Seconds { zero: None };

pub const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "warn", "error", "critical",
];

/// Every setting, in the order of `conf/forkserve.toml` (top-level keys, then each section).
pub static SETTINGS: &[Setting] = &[
    setting("bind", Kind::Binds, Default::Binds(&["127.0.0.1:8000"]),
        "Addresses to listen on: :PORT, HOST, HOST:PORT, [V6]:PORT, unix:PATH or fd://N (repeat the flag for several). Unset and $PORT set: 0.0.0.0:$PORT.",
        &["-b", "--bind"]),
    setting("backlog", int(1, 65_535), Default::Int(2048),
        "Pending connections the kernel queues (listen(2) backlog).", &["--backlog"]),
    setting("workers", int(1, 128), Default::Cpus,
        "Worker processes (default: the CPUs this process may use; unset and $WEB_CONCURRENCY set: that). Each costs ~5 MiB; keep workers x threads <= cores.",
        &["-w", "--workers"]),
    setting("threads", int(1, 256), Default::Int(1),
        "Compute threads per worker.", &["--threads"]),
    setting("max_requests", int(0, i64::MAX), Default::Int(0),
        "Requests after which a worker is replaced, without dropping any (0 = never).",
        &["--max-requests"]),
    setting("max_requests_jitter", int(0, i64::MAX), Default::Int(0),
        "A random 0..=N added per worker, so that workers do not all recycle at once.",
        &["--max-requests-jitter"]),
    setting("timeout", Kind::Seconds { zero: Some("no heartbeat timeout") }, Default::Float(30.0),
        "Seconds a worker may stay silent (or inside one computation) before it is killed; 0 turns it off, as in gunicorn.",
        &["-t", "--timeout"]),
    setting("boot_timeout", SECONDS, Default::Float(60.0),
        "Seconds a new worker has to become ready (its own clock, apart from timeout).",
        &["--boot-timeout"]),
    setting("max_boot_failures", int(1, 1000), Default::Int(5),
        "Consecutive failed boots after which the master gives up (exit code 3).",
        &["--max-boot-failures"]),
    setting("graceful_timeout", Kind::Seconds { zero: Some("stop at once") }, Default::Float(30.0),
        "Seconds a stopping worker has to finish its requests before SIGKILL.",
        &["--graceful-timeout"]),
    setting("keepalive", Kind::Seconds { zero: Some("keep-alive off") }, Default::Float(5.0),
        "Seconds an idle keep-alive connection stays open; 0 closes every connection after its response, as in gunicorn.",
        &["--keep-alive", "--keepalive"]),
    setting("header_timeout", SECONDS, Default::Float(10.0),
        "Seconds a client has to send a request's headers (slow-loris guard).",
        &["--header-timeout"]),
    setting("limit_request_line", int(1, 65_536), Default::Int(4094),
        "Longest request line in bytes (400 above).", &["--limit-request-line"]),
    setting("limit_request_fields", int(1, 32_768), Default::Int(100),
        "Most header fields in a request (431 above).", &["--limit-request-fields"]),
    setting("limit_request_field_size", int(1, 65_536), Default::Int(8190),
        "Longest header field (name and value) in bytes (431 above).",
        &["--limit-request-field_size", "--limit-request-field-size"]),
    setting("max_body_bytes", int(64, 1 << 30), Default::Int(1 << 20),
        "Largest request body of the embedding routes, in bytes (413 above).",
        &["--max-body-bytes"]),
    setting("max_sentences", int(1, 100_000), Default::Int(512),
        "Most sentences in one embedding request (422 above).", &["--max-sentences"]),
    setting("max_batch_tokens", int(1, 1 << 20), Default::Int(8192),
        "Tokens per forward pass; bounds a worker's activation memory: 4 x 6 x hidden bytes a token, plus one 480-row chunk of the feed-forward block (4 x 480 x intermediate bytes), so 8192 tokens = 75 MiB for all-MiniLM-L6-v2.",
        &["--max-batch-tokens"]),
    setting("max_queue", int(1, 100_000), Default::Int(64),
        "Requests that may wait for a worker's compute thread before new ones get 503 + Retry-After.",
        &["--max-queue"]),
    setting("max_worker_memory", Kind::Size, Default::Int(0),
        "Replace a worker whose private memory (USS, never RSS) stays above this for 3 samples in a row, e.g. \"256MiB\" (0 = no limit).",
        &["--max-worker-memory"]),
    setting("pidfile", Kind::Path, Default::Unset,
        "File the master writes its pid to, removed on exit.", &["-p", "--pid", "--pidfile"]),
    setting("user", Kind::Text, Default::Unset,
        "User (name or uid) the workers run as. Unset while the master runs as root: nobody, unless allow_root.",
        &["-u", "--user"]),
    setting("group", Kind::Text, Default::Unset,
        "Group (name or gid) the workers run as. Unset: the user's primary group.",
        &["-g", "--group"]),
    setting("allow_root", Kind::Bool, Default::Bool(false),
        "Let workers run as root when the master does and no user is set.", &["--allow-root"]),
    setting("umask", Kind::Mode, Default::Unset,
        "umask of the master (so of the unix socket, pidfile and log files), e.g. 0o027.",
        &["-m", "--umask"]),
    setting("socket_mode", Kind::Mode, Default::Unset,
        "Permissions of unix sockets from bind, e.g. 0o660. Unset: as created (umask).",
        &["--socket-mode"]),
    setting("proc_name", Kind::Text, Default::Unset,
        "Name in the process titles: \"forkserve: master [NAME]\", \"forkserve: worker [NAME]\".",
        &["-n", "--name"]),
    Setting {
        secret: true,
        ..setting("api_key", Kind::Text, Default::Unset,
            "Require `Authorization: Bearer <key>` on every route but /health and /ping (never logged nor printed).",
            &["--api-key"])
    },
    setting("metrics_public", Kind::Bool, Default::Bool(false),
        "Serve /metrics without the api_key.", &["--metrics-public"]),
    setting("model.path", Kind::Path, Default::Text("models/all-MiniLM-L6-v2"),
        "A sentence-transformers model directory (or a plain transformers one, served with mean pooling). make model fetches the default one.",
        &["--model"]),
    setting("model.name", Kind::Text, Default::Unset,
        "Name in /info, /v1/models and the OpenAI routes. Unset: the directory's name.",
        &["--model-name"]),
    setting("model.sha256", Kind::Text, Default::Unset,
        "sha256 (hex) the model's weights file (model.safetensors) must have, checked at start and on every reload. Unset: not checked.",
        &["--model-sha256"]),
    setting("model.backend", Kind::Choice(&["fast", "candle"]), Default::Text("fast"),
        "Forward pass: fast (forkserve's own, no padding) or candle (candle-transformers' BERT and XLM-RoBERTa, the reference).",
        &["--backend"]),
    setting("model.precision", Kind::Choice(&["f32", "f16", "bf16"]), Default::Text("f32"),
        "How the encoder's linear layers compute: f32 (the vectors are sentence-transformers' own); f16 (weights kept in half precision: half the memory and memory traffic, computed in f32; all-MiniLM-L6-v2's vectors within cosine 0.9999997 of f32's); bf16 (inputs and weights rounded to bfloat16, multiplied on AMX tiles: ~3x the speed on batches, vectors within cosine 0.99997 of sentence-transformers' on its reference set, close clusterings may move; needs a CPU with AMX-BF16 and Linux 5.16+). fast backend only.",
        &["--precision"]),
    setting("cluster.threshold", Kind::Float { min: 0.0, max: 1.0, open_min: true }, Default::Float(0.5),
        "Default cosine-similarity threshold of POST /cluster (the seed example splits 5/4 from 0.241 to 0.755).",
        &["--cluster-threshold"]),
    setting("cluster.min_cluster_size", int(1, 100_000), Default::Int(1),
        "Default smallest cluster of POST /cluster; smaller groups are reported unclustered.",
        &["--cluster-min-size"]),
    setting("cluster.max_sentences", int(1, 1_000_000), Default::Int(20_000),
        "Most sentences in one POST /cluster (422 above). A worker holds 4 x dimension bytes per sentence while it clusters them (31 MB at 20,000 for all-MiniLM-L6-v2).",
        &["--cluster-max-sentences"]),
    setting("cluster.max_body_bytes", int(64, 1 << 30), Default::Int(16 << 20),
        "Largest POST /cluster body, in bytes (413 above); the embedding routes keep max_body_bytes.",
        &["--cluster-max-body-bytes"]),
    setting("cluster.max_agglomerative_sentences", int(2, 50_000), Default::Int(5_000),
        "Most sentences \"algorithm\": \"agglomerative\" accepts (422 above, suggesting community): it holds every pair's similarity, 4 x n^2 bytes (100 MB at 5,000).",
        &["--cluster-max-agglomerative"]),
    setting("log.level", Kind::Choice(LOG_LEVELS), Default::Text("info"),
        "Error log level: debug, info, warning, error, critical (gunicorn's names; trace and warn too).",
        &["--log-level"]),
    setting("log.file", Kind::Path, Default::Unset,
        "Error log: a file (reopened on USR1), or \"-\" for stderr. Unset: stderr.",
        &["--error-logfile", "--log-file"]),
    setting("log.format", Kind::Choice(&["text", "json"]), Default::Text("text"),
        "Log lines as text or as one JSON object per line.", &["--log-format"]),
    setting("log.access_log", Kind::Bool, Default::Bool(true),
        "Log every request (to access_log_file if set, else to the error log).",
        &["--access-log"]),
    setting("log.access_log_file", Kind::Path, Default::Unset,
        "Access log: a file (reopened on USR1), or \"-\" for stdout.", &["--access-logfile"]),
    setting("log.access_log_format", Kind::Text, Default::Unset,
        "Access log line in gunicorn's atoms, e.g. '%(h)s %(l)s %(u)s %(t)s \"%(r)s\" %(s)s %(b)s \"%(f)s\" \"%(a)s\"' (gunicorn's default, used when unset).",
        &["--access-logformat"]),
    setting("testing.compute_stall", Kind::Seconds { zero: Some("no stall") }, Default::Float(0.0),
        "Testing only: seconds every forward pass hangs first, without progress, to exercise the kill of a stuck computation.",
        &["--testing-compute-stall"]),
    setting("testing.boot_delay", Kind::Seconds { zero: Some("no delay") }, Default::Float(0.0),
        "Testing only: seconds each worker sleeps during boot, to exercise boot_timeout.",
        &["--testing-boot-delay"]),
];

/// The setting of a TOML key.
pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The sections, in order of first appearance.
pub fn sections() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for s in SETTINGS {
        if let (Some(section), _) = s.split() {
            if !out.contains(&section) {
                out.push(section);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_flags_are_unique() {
        let mut keys = std::collections::HashSet::new();
        let mut flags = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(keys.insert(s.key), "{} twice", s.key);
            assert!(!s.flags.is_empty(), "{} has no flag", s.key);
            for f in s.flags {
                assert!(flags.insert(*f), "flag {f} twice");
            }
        }
    }

    #[test]
    fn environment_names() {
        assert_eq!(
            find("model.path").unwrap().env_var(),
            "FORKSERVE_MODEL_PATH"
        );
        assert_eq!(
            find("max_requests").unwrap().env_var(),
            "FORKSERVE_MAX_REQUESTS"
        );
    }
}
