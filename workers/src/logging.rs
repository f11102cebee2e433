//! The error log: `tracing` events to stderr or to `log.file`, with a level that a reload can
//! change and a file that USR1 reopens (for logrotate). Set up once in the master; workers
//! inherit it through fork, and reopen the file themselves on USR1.

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
    /// None: stderr.
    file: Mutex<Option<(PathBuf, File)>>,
}

static STATE: OnceLock<LogState> = OnceLock::new();

pub fn parse_level(level: &str) -> LevelFilter {
    level.parse().unwrap_or(LevelFilter::INFO)
}

/// Install the subscriber. `file` None logs to stderr; `json` writes one JSON object per line.
pub fn init(level: &str, file: Option<&Path>, json: bool) -> io::Result<()> {
    let opened = match file {
        Some(path) => Some((path.to_path_buf(), open_append(path)?)),
        None => None,
    };
    let (filter, handle) = reload::Layer::new(parse_level(level));
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

/// Change the level (HUP with a new `log.level`).
pub fn set_level(level: &str) {
    if let Some(state) = STATE.get() {
        let _ = state.level.modify(|f| *f = parse_level(level));
    }
}

/// Reopen the log file at its path (USR1, after logrotate moved it). On failure the old file
/// stays in use and the error is returned.
pub fn reopen() -> io::Result<()> {
    let Some(state) = STATE.get() else {
        return Ok(());
    };
    let mut guard = state.file.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((path, file)) = guard.as_mut() {
        *file = open_append(path)?;
    }
    Ok(())
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
