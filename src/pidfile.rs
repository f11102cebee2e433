//! The master's pid file: written atomically (temp file + rename, so a reader never sees it
//! half written), removed on exit only if it still holds our pid.

use std::io;
use std::path::{Path, PathBuf};

pub struct Pidfile {
    path: PathBuf,
    pid: u32,
}

impl Pidfile {
    pub fn create(path: &Path) -> io::Result<Pidfile> {
        let pid = std::process::id();
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

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours =
            std::fs::read_to_string(&self.path).is_ok_and(|s| s.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
