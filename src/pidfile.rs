//! The master's pid file: written atomically (temp file + rename, so a reader never sees it
//! half written), removed on exit only if it still holds our pid.

use std::io;
use std::path::{Path, PathBuf};

pub struct Pidfile {
    path: PathBuf,
    pid: u32,
}

impl Pidfile {
    /// Write our pid to `path`, unless the file names another live forkserve master (then
    /// `AlreadyExists`, naming it). A file naming a dead process, or a process that is not
    /// forkserve (its pid reused), is stale and replaced.
    pub fn create(path: &Path) -> io::Result<Pidfile> {
        let pid = std::process::id();
        if let Some(other) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 0 && p as u32 != pid && is_forkserve(p))
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("held by pid {other}, a running forkserve; stop it or use another pidfile"),
            ));
        }
        let tmp = path.with_extension(format!("tmp.{pid}"));
        std::fs::write(&tmp, format!("{pid}\n"))?;
        std::fs::rename(&tmp, path)?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            pid,
        })
    }
}

impl Pidfile {
    /// A master started by USR2 writes `<pidfile>.2` while the old master lives, then takes
    /// the real name when the old one is gone.
    pub fn upgrade_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".2");
        PathBuf::from(name)
    }

    /// Move to `path` (atomically).
    pub fn promote(&mut self, path: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, path)?;
        self.path = path.to_path_buf();
        Ok(())
    }
}

/// Whether `pid` is a live process whose command line is forkserve's.
fn is_forkserve(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("forkserve"))
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours =
            std::fs::read_to_string(&self.path).is_ok_and(|s| s.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
