//! Signals for the master, read from a signalfd: no handler runs at interrupt time, so the loop
//! that reads them can log, allocate and fork freely. The signals are blocked for normal
//! delivery; workers unblock them after fork.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Signals the master acts on (gunicorn's set).
pub const HANDLED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
    Signal::SIGWINCH,
];

pub struct SignalQueue {
    fd: SignalFd,
}

impl SignalQueue {
    /// Block the handled signals and open a signalfd for them. Must run before any thread
    /// exists, or a thread that does not block them could receive them instead.
    pub fn open() -> nix::Result<SignalQueue> {
        let mask = handled_set();
        mask.thread_block()?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(SignalQueue { fd })
    }

    /// The next pending signal, if any.
    pub fn next(&mut self) -> Option<Signal> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(sig) => return Some(sig),
                    Err(_) => continue,
                },
                Ok(None) => return None,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the signalfd failed");
                    return None;
                }
            }
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for &sig in HANDLED {
        set.add(sig);
    }
    set
}
