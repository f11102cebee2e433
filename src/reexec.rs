//! USR2: start a new master from the binary on disk (possibly a new version), handing it the
//! listening sockets, as gunicorn and Unicorn do. The new master is forked from this one and
//! exec'd; it finds its sockets in `FORKSERVE_FDS`.

use std::ffi::{CString, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sockets::INHERITED_FDS_ENV;

/// How this master was started, captured before anything changes (cwd, PATH).
pub struct Invocation {
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
}

impl Invocation {
    pub fn capture() -> Invocation {
        let args: Vec<OsString> = std::env::args_os().collect();
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let program = args
            .first()
            .and_then(|a0| resolve_program(Path::new(a0), &cwd))
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("forkserve"));
        Invocation { program, args, cwd }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// In a freshly forked child: exec the program with `fds` inherited. Returns only if the
    /// exec failed.
    pub fn exec(&self, fds: &[RawFd]) -> String {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        for &fd in fds {
            if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())) {
                return format!("cannot pass fd {fd}: {e}");
            }
        }
        let list: Vec<String> = fds.iter().map(|fd| fd.to_string()).collect();
        // Sound: the child has a single thread.
        std::env::set_var(INHERITED_FDS_ENV, list.join(","));
        // The signal mask survives exec; the new master sets up its own.
        let _ = nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        );
        if let Err(e) = std::env::set_current_dir(&self.cwd) {
            return format!("cannot enter {}: {e}", self.cwd.display());
        }
        let to_c = |s: &[u8]| CString::new(s).map_err(|e| e.to_string());
        let program = match to_c(self.program.as_os_str().as_bytes()) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let args: Result<Vec<CString>, String> =
            self.args.iter().map(|a| to_c(a.as_bytes())).collect();
        match args {
            Ok(args) => match nix::unistd::execv(&program, &args) {
                Ok(never) => match never {},
                Err(e) => format!("exec {}: {e}", self.program.display()),
            },
            Err(e) => e,
        }
    }
}

/// argv[0] as the shell would find it: a path (relative to the start directory) or a name on
/// PATH. Resolved at start, so a binary replaced on disk is the one a USR2 runs.
fn resolve_program(arg0: &Path, cwd: &Path) -> Option<PathBuf> {
    if arg0.as_os_str().as_bytes().contains(&b'/') {
        return Some(cwd.join(arg0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(arg0))
        .find(|candidate| candidate.is_file())
}
