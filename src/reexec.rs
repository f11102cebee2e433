//! USR2: start a new master from the binary on disk (possibly a new version), handing it the
//! listening sockets, as gunicorn and Unicorn do. The new master is forked from this one and
//! exec'd; it finds its sockets in `FORKSERVE_FDS`. `Upgrade` is the master's state for both
//! sides of that hand-over: the new master it started, or the old master it replaces.

use std::ffi::{CString, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{fork, ForkResult, Pid};

use crate::pidfile::Pidfile;
use crate::sockets::INHERITED_FDS_ENV;

/// A master's part in an upgrade by USR2.
pub struct Upgrade {
    invocation: Invocation,
    /// In a master started by USR2: the old master's pid, until it exits.
    replacing: Option<i32>,
    /// The new master this one started with USR2, while it runs.
    started: Option<Pid>,
    /// This master's pidfile: `<pidfile>.2` while it is replacing another, then the real name.
    pidfile: Option<Pidfile>,
}

impl Upgrade {
    pub fn new(
        invocation: Invocation,
        replacing: Option<i32>,
        pidfile: Option<Pidfile>,
    ) -> Upgrade {
        Upgrade {
            invocation,
            replacing,
            started: None,
            pidfile,
        }
    }

    /// The old master, while this master (started by USR2) runs beside it.
    pub fn replacing(&self) -> Option<i32> {
        self.replacing
    }

    /// The new master this one started, while it runs.
    pub fn started(&self) -> Option<Pid> {
        self.started
    }

    /// USR2: fork and exec the binary again with `fds`, the listening sockets. Both masters
    /// serve until this one is told to stop (QUIT or TERM).
    pub fn start(&mut self, fds: &[RawFd]) {
        if let Some(child) = self.started {
            tracing::warn!(
                new_master = child.as_raw(),
                "USR2 ignored: an upgrade is already running"
            );
            return;
        }
        if self.replacing.is_some() {
            tracing::warn!("USR2 ignored: this master's own upgrade is not finished (the old master still runs)");
            return;
        }
        // SAFETY: the master is single-threaded (its loop never starts threads); the child
        // only prepares its fds and environment and calls exec.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let error = self.invocation.exec(fds);
                tracing::error!("USR2: {error}");
                // SAFETY: leave the forked copy without running the master's destructors
                // (they would remove the pidfile and unlink sockets that are still in use).
                unsafe { nix::libc::_exit(1) };
            }
            Ok(ForkResult::Parent { child }) => {
                tracing::info!(
                    new_master = child.as_raw(),
                    program = %self.invocation.program().display(),
                    "handling SIGUSR2: started a new master on the same sockets"
                );
                self.started = Some(child);
            }
            Err(e) => tracing::error!(error = %e, "USR2: fork failed"),
        }
    }

    /// A child exited: true if it was the new master (which then failed), handled here.
    pub fn reaped(&mut self, pid: Pid, how: &dyn std::fmt::Display) -> bool {
        if self.started != Some(pid) {
            return false;
        }
        self.started = None;
        tracing::error!(new_master = pid.as_raw(), %how, "the new master started by USR2 exited; this master keeps serving");
        true
    }

    /// In a master started by USR2: once the old master has exited (we were re-parented), take
    /// over the pidfile's real name, `pidfile`.
    pub fn check_old_master(&mut self, pidfile: Option<&Path>) {
        let Some(old) = self.replacing else {
            return;
        };
        if nix::unistd::getppid().as_raw() == old {
            return;
        }
        self.replacing = None;
        tracing::info!(
            old_master = old,
            "the old master has exited; this master takes over"
        );
        if let (Some(file), Some(path)) = (self.pidfile.as_mut(), pidfile) {
            if let Err(e) = file.promote(path) {
                tracing::error!(error = %e, "cannot rename the pidfile to {}", path.display());
            }
        }
    }
}

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
