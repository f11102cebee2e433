//! The error log: `tracing` events to stderr or to `log.file`, with a level that a reload can
//! change and a file that USR1 reopens (for logrotate); and the access log, when it has a
//! file of its own (`log.access_log_file`: a path, or `-` for stdout). Set up once in the
//! master; workers inherit both through fork, and reopen the files themselves on USR1.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, Registry};

struct LogState {
    level: reload::Handle<LevelFilter, Registry>,
    /// One JSON object per line (`log.format = "json"`).
    json: bool,
    /// None: stderr.
    file: Mutex<Option<(PathBuf, File)>>,
}

static STATE: OnceLock<LogState> = OnceLock::new();

/// Where access log lines go when they have a destination of their own.
enum AccessSink {
    Stdout,
    File(PathBuf, File),
}

static ACCESS: Mutex<Option<AccessSink>> = Mutex::new(None);

/// Send access log lines to `path` (`-`: stdout) instead of the error log.
pub fn init_access(path: &Path) -> io::Result<()> {
    let sink = match path == Path::new("-") {
        true => AccessSink::Stdout,
        false => AccessSink::File(path.to_path_buf(), open_append(path)?),
    };
    *ACCESS.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    Ok(())
}

/// Write one access log line (a newline is added). False when there is no access log file.
pub fn write_access(line: &str) -> bool {
    let mut guard = ACCESS.lock().unwrap_or_else(|p| p.into_inner());
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    match guard.as_mut() {
        None => false,
        Some(AccessSink::Stdout) => {
            let _ = io::stdout().lock().write_all(&bytes);
            true
        }
        Some(AccessSink::File(_, file)) => {
            let _ = file.write_all(&bytes);
            true
        }
    }
}

/// `log.level`: tracing's names and gunicorn's (`warning`, `critical`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    #[serde(alias = "warn")]
    Warning,
    Error,
    /// gunicorn's highest level; tracing has nothing above error.
    Critical,
}

impl Level {
    fn filter(self) -> LevelFilter {
        match self {
            Level::Trace => LevelFilter::TRACE,
            Level::Debug => LevelFilter::DEBUG,
            Level::Info => LevelFilter::INFO,
            Level::Warning => LevelFilter::WARN,
            Level::Error | Level::Critical => LevelFilter::ERROR,
        }
    }
}

/// `log.format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Install the subscriber. `file` None logs to stderr.
pub fn init(level: Level, file: Option<&Path>, format: Format) -> io::Result<()> {
    let json = format == Format::Json;
    let opened = match file {
        // gunicorn's "-": the standard stream.
        Some(path) if path == Path::new("-") => None,
        Some(path) => Some((path.to_path_buf(), open_append(path)?)),
        None => None,
    };
    let (filter, handle) = reload::Layer::new(level.filter());
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(false)
            .with_writer(LogWriter)
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(LogWriter)
    });
    if STATE
        .set(LogState {
            level: handle,
            json: json.is_some(),
            file: Mutex::new(opened),
        })
        .is_err()
    {
        return Ok(()); // already initialised (tests)
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init();
    Ok(())
}

/// Whether log lines are JSON objects (then every field is a JSON string, escaped by JSON).
pub fn is_json() -> bool {
    STATE.get().is_some_and(|s| s.json)
}

/// Change the level (HUP with a new `log.level`).
pub fn set_level(level: Level) {
    if let Some(state) = STATE.get() {
        let _ = state.level.modify(|f| *f = level.filter());
    }
}

/// What USR1 reopened: the files, or that the logs go to standard streams only.
pub enum Reopened {
    Files(Vec<PathBuf>),
    NoFile,
}

/// Reopen the log files at their paths (USR1, after logrotate moved them). On failure the old
/// file stays in use and the error is returned.
pub fn reopen() -> io::Result<Reopened> {
    let mut reopened = Vec::new();
    if let Some(state) = STATE.get() {
        let mut guard = state.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((path, file)) = guard.as_mut() {
            *file = open_append(path)?;
            reopened.push(path.clone());
        }
    }
    let mut access = ACCESS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(AccessSink::File(path, file)) = access.as_mut() {
        *file = open_append(path)?;
        reopened.push(path.clone());
    }
    Ok(match reopened.is_empty() {
        true => Reopened::NoFile,
        false => Reopened::Files(reopened),
    })
}

/// Give the log file to the workers' user, so that they can reopen it on USR1 after dropping
/// their privileges (gunicorn does the same).
pub fn chown_file(uid: u32, gid: u32) -> io::Result<()> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    let guard = state.file.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, file)) = guard.as_ref() {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    if let Some(AccessSink::File(_, file)) =
        ACCESS.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
    {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

struct LogWriter;

/// One event's bytes, written to the current file (or stderr) in a single write.
struct LogLine;

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(state) = STATE.get() {
            let mut guard = state.file.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, file)) = guard.as_mut() {
                return file.write(buf);
            }
        }
        io::stderr().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogLine;
    fn make_writer(&'a self) -> Self::Writer {
        LogLine
    }
}
