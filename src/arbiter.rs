//! The master's loop, after gunicorn's `Arbiter` and Unicorn's `join`: wait for a signal, a
//! worker's nudge or the next deadline; handle queued signals; then `reap_workers`,
//! `murder_workers`, `manage_workers`. Nothing here runs in a signal handler.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkserve_worker::listener::BoundSocket;
use forkserve_worker::model::ModelIdentity;
use forkserve_worker::protocol::{monotonic_ms, WorkerState, APP_LOAD_ERROR, WORKER_BOOT_ERROR};
use forkserve_worker::{Embedder, SentenceEncoder, WorkerContext};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::{secs, Config, ConfigSource};
use crate::pidfile::Pidfile;
use crate::reexec::Invocation;
use crate::scoreboard::Scoreboard;
use crate::signals::SignalQueue;
use crate::sockets::Bound;

/// Exit code when workers keep failing to boot (gunicorn's `WORKER_BOOT_ERROR`).
pub const EXIT_BOOT_FAILURES: i32 = 3;
/// The master never sleeps longer than this, so housekeeping runs at least once a second.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// First delay before respawning after a failed boot; doubles per failure up to the cap.
const BOOT_BACKOFF_START: Duration = Duration::from_millis(100);
const BOOT_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often the master reads each worker's private memory for `max_worker_memory`.
const MEMORY_SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// Consecutive samples over `max_worker_memory` before a worker is recycled: one spike (a
/// large request) is not a leak.
const MEMORY_STRIKES: u32 = 3;

/// Why the master asked a worker to stop (or killed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Served `max_requests`; its replacement is ready.
    MaxRequests,
    /// Private memory over `max_worker_memory`; its replacement is ready.
    Memory,
    /// From before a reload (HUP); the new generation is ready.
    Reload,
    /// More workers than configured (TTOU or a lower `workers`).
    ScaleDown,
    /// No heartbeat (or one computation) for longer than `timeout`.
    Timeout,
    /// Not ready within `boot_timeout`.
    BootTimeout,
    /// The master is shutting down.
    Shutdown,
}

impl StopReason {
    fn describe(self) -> &'static str {
        match self {
            StopReason::MaxRequests => "retired after max_requests",
            StopReason::Memory => "retired: private memory over max_worker_memory",
            StopReason::Reload => "retired by a reload",
            StopReason::ScaleDown => "stopped to reduce the worker count",
            StopReason::Timeout => "killed after the heartbeat timeout",
            StopReason::BootTimeout => "killed after boot_timeout",
            StopReason::Shutdown => "stopped for shutdown",
        }
    }

    /// The name under which restarts are counted.
    fn counter(self) -> &'static str {
        match self {
            StopReason::MaxRequests => "max_requests",
            StopReason::Memory => "memory",
            StopReason::Reload => "reload",
            StopReason::ScaleDown => "scale_down",
            StopReason::Timeout => "timeout",
            StopReason::BootTimeout => "boot_failure",
            StopReason::Shutdown => "shutdown",
        }
    }
}

/// The master's view of one worker.
struct Worker {
    slot: usize,
    spawned_at: Instant,
    ready_at: Option<Instant>,
    max_requests: u64,
    /// Configuration generation it was forked with; a reload starts a new one.
    generation: u64,
    /// Consecutive memory samples over `max_worker_memory`.
    memory_strikes: u32,
    /// Why the master marked it retiring, when it was the master (memory) and not the worker.
    retire_reason: Option<StopReason>,
    /// Set once the master has asked it to stop; says why, for the log when it is reaped.
    stopping: Option<StopReason>,
    /// When a worker asked to stop gets SIGKILL if it is still there.
    kill_at: Option<Instant>,
}

struct Shutdown {
    graceful: bool,
    exit_code: i32,
    kill_at: Instant,
}

pub struct Arbiter {
    config: Config,
    /// Where the config came from, to read it again on HUP.
    source: ConfigSource,
    listeners: Vec<Bound>,
    embedder: Arc<dyn Embedder>,
    /// The weights file the model was built from, to notice a new one on HUP.
    model_identity: Option<ModelIdentity>,
    /// Bumped by every successful reload; workers of older generations are rolled out.
    generation: u64,
    scoreboard: Scoreboard,
    signals: SignalQueue,
    /// Workers write a byte here when their state changes, so the master reacts at once.
    wake_read: File,
    wake_write: OwnedFd,
    workers: BTreeMap<Pid, Worker>,
    /// Failed boots in a row; reset when a worker becomes ready.
    boot_failures: u32,
    next_spawn_at: Instant,
    shutdown: Option<Shutdown>,
    pid: i32,
    pidfile: Option<Pidfile>,
    /// Set in a master started by USR2: the old master's pid, until it exits.
    upgraded_from: Option<i32>,
    /// The new master this one started with USR2, while it runs.
    upgrade_child: Option<Pid>,
    invocation: Invocation,
    last_memory_sample: Instant,
    systemd: crate::systemd::Notifier,
    /// READY=1 is sent when the configured workers are first all ready, and again when a
    /// reload's new generation is.
    announced_ready: bool,
    socket_activated: bool,
    /// The worker-count part of the last STATUS=, to send a change of it at once.
    status_counts: String,
    /// Why the last reload was refused, shown in STATUS= until a reload succeeds.
    reload_refused: Option<String>,
}

/// What the master needs besides its configuration.
pub struct MasterParts {
    pub source: ConfigSource,
    pub listeners: Vec<Bound>,
    pub model: SentenceEncoder,
    pub model_identity: Option<ModelIdentity>,
    pub scoreboard: Scoreboard,
    pub signals: SignalQueue,
    pub pidfile: Option<Pidfile>,
    pub upgraded_from: Option<i32>,
    /// The listeners came from systemd (LISTEN_FDS): a reload never binds.
    pub socket_activated: bool,
    pub invocation: Invocation,
}

impl Arbiter {
    pub fn new(config: Config, parts: MasterParts) -> nix::Result<Arbiter> {
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Arbiter {
            config,
            source: parts.source,
            listeners: parts.listeners,
            embedder: Arc::new(parts.model),
            model_identity: parts.model_identity,
            generation: 0,
            scoreboard: parts.scoreboard,
            signals: parts.signals,
            wake_read: File::from(wake_read),
            wake_write,
            workers: BTreeMap::new(),
            boot_failures: 0,
            next_spawn_at: Instant::now(),
            shutdown: None,
            pid: std::process::id() as i32,
            pidfile: parts.pidfile,
            upgraded_from: parts.upgraded_from,
            upgrade_child: None,
            invocation: parts.invocation,
            last_memory_sample: Instant::now(),
            systemd: crate::systemd::Notifier::from_env(parts.upgraded_from),
            announced_ready: false,
            socket_activated: parts.socket_activated,
            status_counts: String::new(),
            reload_refused: None,
        })
    }

    /// Run until shut down; returns the process exit code.
    pub fn run(mut self) -> i32 {
        self.give_log_to_workers();
        self.manage_workers();
        self.report_to_systemd();
        loop {
            self.sleep(self.next_wakeup());
            while let Some(sig) = self.signals.next() {
                self.handle_signal(sig);
            }
            self.reap_workers();
            if let Some(code) = self.finished() {
                return code;
            }
            self.observe_workers();
            self.announce_ready();
            self.check_old_master();
            self.murder_workers();
            self.sample_memory();
            self.manage_workers();
            self.report_to_systemd();
        }
    }

    fn handle_signal(&mut self, sig: Signal) {
        match sig {
            Signal::SIGCHLD => {} // reap_workers runs on every turn of the loop
            Signal::SIGTERM => {
                tracing::info!("handling SIGTERM: graceful stop");
                self.begin_shutdown(true, 0);
            }
            Signal::SIGINT | Signal::SIGQUIT => match self.upgrade_child {
                // After USR2, the old master is told to go once the new one serves: it hands
                // over without dropping the requests its workers are answering.
                Some(child) => {
                    tracing::info!(signal = %sig, new_master = child.as_raw(), "handing over to the new master: graceful stop");
                    self.begin_shutdown(true, 0);
                }
                None => {
                    tracing::info!(signal = %sig, "fast stop");
                    self.begin_shutdown(false, 0);
                }
            },
            Signal::SIGHUP => self.reload(),
            Signal::SIGUSR1 => self.reopen_logs(),
            Signal::SIGUSR2 => self.reexec(),
            Signal::SIGTTIN => {
                self.config.workers = (self.config.workers + 1).min(crate::config::MAX_WORKERS);
                tracing::info!(workers = self.config.workers, "SIGTTIN: one worker more");
            }
            Signal::SIGTTOU => {
                self.config.workers = self.config.workers.saturating_sub(1).max(1);
                tracing::info!(workers = self.config.workers, "SIGTTOU: one worker fewer");
            }
            other => tracing::debug!(signal = %other, "signal ignored"),
        }
    }

    /// HUP: read the configuration again. Invalid, or a model that does not load: keep running
    /// exactly as before and say why. Valid: apply it and roll the workers, new ones first.
    fn reload(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!("handling SIGHUP: reloading the configuration");
        self.systemd.reloading();
        let new = match self.source.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload failed: {e}; still running on the previous configuration");
                self.reload_failed(&e.to_string());
                return;
            }
        };
        let listeners = match self.rebind(&new) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    "reload failed: bind: {e}; still running on the previous configuration"
                );
                self.reload_failed(&format!("bind: {e}"));
                return;
            }
        };
        let identity = ModelIdentity::of(&new.model.path);
        if new.model.path != self.config.model.path
            || new.model.backend != self.config.model.backend
            || identity != self.model_identity
        {
            let started = Instant::now();
            match SentenceEncoder::load_with(&new.model.path, new.backend()) {
                Ok(model) => {
                    tracing::info!(
                        path = %new.model.path.display(),
                        load_ms = started.elapsed().as_millis() as u64,
                        "model changed on disk: new model loaded in the master"
                    );
                    self.embedder = Arc::new(model);
                    self.model_identity = identity;
                }
                Err(e) => {
                    tracing::error!("reload failed: model.path: {e}; still serving the previous model and configuration");
                    self.reload_failed(&format!("model.path: {e}"));
                    return;
                }
            }
        }
        if new.log.level != self.config.log.level {
            forkserve_worker::logging::set_level(&new.log.level);
        }
        if new.proc_name() != self.config.proc_name() {
            forkserve_worker::proctitle::set(&format!("forkserve: master [{}]", new.proc_name()));
        }
        self.listeners = listeners;
        self.config = new;
        self.generation += 1;
        self.boot_failures = 0;
        self.next_spawn_at = Instant::now();
        // READY=1 again once the new generation is all ready (announce_ready).
        self.announced_ready = false;
        self.reload_refused = None;
        tracing::info!(
            generation = self.generation,
            workers = self.config.workers,
            "configuration reloaded; rolling the workers (new ones first)"
        );
    }

    /// A reload that changed nothing: systemd hears READY=1 after the RELOADING=1, and
    /// `systemctl status` shows why until a reload succeeds.
    fn reload_failed(&mut self, why: &str) {
        self.systemd.notify("READY=1");
        self.reload_refused = Some(why.to_string());
        self.status_counts.clear(); // send the new STATUS= at once
        self.report_to_systemd();
    }

    /// The listeners for a new configuration: sockets already bound for an address are kept
    /// (binding them again would fail while they listen); new addresses are bound. Sockets
    /// from systemd are kept whatever `bind` says: the socket unit owns the addresses.
    fn rebind(&mut self, new: &Config) -> std::io::Result<Vec<Bound>> {
        if self.socket_activated && new.bind != self.config.bind {
            tracing::warn!("bind changed, but the sockets come from systemd: edit the .socket unit instead; keeping them");
        }
        if new.bind == self.config.bind || self.socket_activated {
            return self.listeners.iter().map(Bound::try_clone).collect();
        }
        let mut out = Vec::new();
        for addr in &new.bind {
            let kept = self
                .listeners
                .iter()
                .filter(|b| b.spec == *addr)
                .map(Bound::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            if kept.is_empty() {
                out.extend(crate::sockets::bind_all(
                    std::slice::from_ref(addr),
                    new.backlog,
                    new.socket_mode,
                )?);
            } else {
                out.extend(kept);
            }
        }
        for b in &out {
            tracing::info!("listening at: {}", b.name);
        }
        Ok(out)
    }

    /// USR1: reopen the log file here and in every worker (after logrotate).
    fn reopen_logs(&mut self) {
        use forkserve_worker::logging::{reopen, Reopened};
        match reopen() {
            Ok(Reopened::Files(paths)) => {
                let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                tracing::info!(files = %paths.join(", "), "handling SIGUSR1: reopened the log files")
            }
            Ok(Reopened::NoFile) => {
                tracing::info!("handling SIGUSR1: no log file to reopen (logging to stderr/stdout)")
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reopen a log file; keeping the old one")
            }
        }
        self.give_log_to_workers();
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.kill_worker(pid, Signal::SIGUSR1);
        }
    }

    /// Workers reopen the log file themselves, after dropping their privileges: it must be
    /// theirs.
    pub fn give_log_to_workers(&self) {
        if let Some((uid, gid)) = self.config.run_as {
            if let Err(e) = forkserve_worker::logging::chown_file(uid, gid) {
                tracing::warn!(error = %e, "cannot give the log file to the workers' user; they cannot reopen it on USR1");
            }
        }
    }

    /// USR2: fork and exec the binary again with our listening sockets. Both masters serve
    /// until this one is told to stop (QUIT or TERM).
    fn reexec(&mut self) {
        if let Some(child) = self.upgrade_child {
            tracing::warn!(
                new_master = child.as_raw(),
                "USR2 ignored: an upgrade is already running"
            );
            return;
        }
        if self.upgraded_from.is_some() {
            tracing::warn!("USR2 ignored: this master's own upgrade is not finished (the old master still runs)");
            return;
        }
        let fds: Vec<i32> = self
            .listeners
            .iter()
            .map(|b| std::os::fd::AsRawFd::as_raw_fd(&b.socket))
            .collect();
        // SAFETY: single-threaded master (the loop never starts threads); the child only
        // prepares its fds and environment and calls exec.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let error = self.invocation.exec(&fds);
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
                self.upgrade_child = Some(child);
            }
            Err(e) => tracing::error!(error = %e, "USR2: fork failed"),
        }
    }

    /// In a master started by USR2: once the old master has exited (we were re-parented), take
    /// over the pidfile's real name.
    fn check_old_master(&mut self) {
        let Some(old) = self.upgraded_from else {
            return;
        };
        if nix::unistd::getppid().as_raw() == old {
            return;
        }
        self.upgraded_from = None;
        tracing::info!(
            old_master = old,
            "the old master has exited; this master takes over"
        );
        if let (Some(pidfile), Some(path)) = (self.pidfile.as_mut(), self.config.pidfile.as_ref()) {
            if let Err(e) = pidfile.promote(path) {
                tracing::error!(error = %e, "cannot rename the pidfile to {}", path.display());
            }
        }
    }

    /// Wait for a signal, a worker's nudge, or `timeout`.
    fn sleep(&mut self, timeout: Duration) {
        let mut fds = [
            PollFd::new(self.signals.fd(), PollFlags::POLLIN),
            PollFd::new(self.wake_read.as_fd(), PollFlags::POLLIN),
        ];
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => tracing::error!(error = %e, "poll failed"),
        }
        // Empty the pipe: the nudges only say "look at the scoreboard".
        let mut buf = [0u8; 64];
        while matches!(self.wake_read.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The time until the next deadline: a heartbeat or boot expiring, a kill, a spawn.
    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let timeout_ms = (self.config.timeout * 1000.0) as u64;
        let boot_timeout = secs(self.config.boot_timeout);
        let mut next = MAX_SLEEP;
        let mut consider = |d: Duration| next = next.min(d);
        for w in self.workers.values() {
            let slot = self.scoreboard.slot(w.slot);
            if let Some(kill_at) = w.kill_at {
                consider(kill_at.saturating_duration_since(now));
            }
            match slot.state() {
                WorkerState::Booting => {
                    consider((w.spawned_at + boot_timeout).saturating_duration_since(now))
                }
                // timeout = 0: no heartbeat deadline (gunicorn's meaning).
                _ if timeout_ms == 0 => {}
                _ => {
                    let beat = slot.heartbeat_ms.load(std::sync::atomic::Ordering::Acquire);
                    consider(Duration::from_millis(
                        (beat + timeout_ms).saturating_sub(now_ms),
                    ))
                }
            }
        }
        if let Some(d) = self.systemd.until_keep_alive() {
            consider(d);
        }
        if let Some(s) = &self.shutdown {
            consider(s.kill_at.saturating_duration_since(now));
        } else if self.next_spawn_at > now {
            consider(self.next_spawn_at - now);
        }
        // Never spin: a deadline just passed is handled on this turn.
        next.max(Duration::from_millis(5))
    }

    /// Collect every exited worker, say why it went, and free its slot.
    fn reap_workers(&mut self) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return,
                Ok(status) => status,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "waitpid failed");
                    return;
                }
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig)),
                _ => continue,
            };
            if self.upgrade_child == Some(pid) {
                self.upgrade_child = None;
                tracing::error!(new_master = pid.as_raw(), %how, "the new master started by USR2 exited; this master keeps serving");
                continue;
            }
            let Some(worker) = self.workers.remove(&pid) else {
                continue;
            };
            self.scoreboard.release(worker.slot);
            self.log_exit(pid, &worker, how);
        }
    }

    fn log_exit(&mut self, pid: Pid, worker: &Worker, how: Exit) {
        let lived = worker.spawned_at.elapsed().as_secs_f64();
        if let Some(reason) = worker.stopping {
            if reason == StopReason::BootTimeout {
                // Counted as a failed boot when it was killed (see murder_workers).
                tracing::info!(pid = pid.as_raw(), %how, "worker that never booted is gone");
                return;
            }
            // The counters live in the scoreboard (for /metrics); the log shows the total.
            let count = self.scoreboard.metrics().count_restart(reason.counter());
            if matches!(reason, StopReason::Timeout) {
                tracing::error!(pid = pid.as_raw(), %how, "worker timed out and was killed (WORKER TIMEOUT)");
            } else {
                tracing::info!(
                    pid = pid.as_raw(),
                    %how,
                    lived_s = format!("{lived:.1}"),
                    count,
                    "worker {}",
                    reason.describe()
                );
            }
            return;
        }
        if self.shutdown.is_some() {
            tracing::info!(pid = pid.as_raw(), %how, "worker exited during shutdown");
            return;
        }
        if worker.ready_at.is_none() {
            let why = match how {
                Exit::Code(WORKER_BOOT_ERROR) => "worker boot error (exit code 3)".to_string(),
                Exit::Code(APP_LOAD_ERROR) => "model failed its warm-up (exit code 4)".to_string(),
                other => format!("{other} before it was ready"),
            };
            self.boot_failed(pid, &why);
            return;
        }
        // It was serving and nobody asked it to stop: a crash. Replaced at once.
        let hint = match how {
            Exit::Signal(Signal::SIGKILL) => " (perhaps out of memory)",
            _ => "",
        };
        self.scoreboard.metrics().count_restart("crash");
        tracing::error!(pid = pid.as_raw(), %how, "worker died unexpectedly{hint}; replacing it");
    }

    fn boot_failed(&mut self, pid: Pid, why: &str) {
        self.boot_failures += 1;
        self.scoreboard.metrics().count_restart("boot_failure");
        let max = self.config.max_boot_failures;
        if self.boot_failures >= max {
            tracing::error!(
                pid = pid.as_raw(),
                failures = self.boot_failures,
                "worker failed to boot: {why}; {max} failed boots in a row, giving up"
            );
            self.begin_shutdown(false, EXIT_BOOT_FAILURES);
            return;
        }
        let backoff = BOOT_BACKOFF_START
            .saturating_mul(1 << (self.boot_failures - 1).min(16))
            .min(BOOT_BACKOFF_CAP);
        tracing::error!(
            pid = pid.as_raw(),
            failures = self.boot_failures,
            retry_in_ms = backoff.as_millis() as u64,
            "worker failed to boot: {why}"
        );
        self.next_spawn_at = Instant::now() + backoff;
    }

    /// Tell systemd we serve, once the configured workers are all ready (not before any
    /// exists, as gunicorn does). A master started by USR2 also says it is the main process now.
    fn announce_ready(&mut self) {
        if self.announced_ready || self.shutdown.is_some() {
            return;
        }
        let ready = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && w.ready_at.is_some())
            .count();
        if ready < self.config.workers {
            return;
        }
        self.announced_ready = true;
        if self.upgraded_from.is_some() {
            self.systemd
                .notify(&format!("MAINPID={}\nREADY=1", self.pid));
        } else {
            self.systemd.notify("READY=1");
        }
        tracing::info!(
            workers = ready,
            generation = self.generation,
            "all workers ready"
        );
    }

    /// The watchdog ping, and STATUS= with live worker counts and requests served (what
    /// `systemctl status` shows).
    fn report_to_systemd(&mut self) {
        self.systemd.keep_alive();
        if !self.systemd.is_listening() {
            return; // nothing to format the status for
        }
        let (mut ready, mut booting, mut stopping) = (0, 0, 0);
        for w in self.workers.values() {
            match (w.stopping, self.scoreboard.slot(w.slot).state()) {
                (Some(_), _) => stopping += 1,
                (None, WorkerState::Booting) => booting += 1,
                (None, _) => ready += 1,
            }
        }
        let served = self.scoreboard.metrics().total_requests();
        let state = match &self.shutdown {
            Some(s) if s.graceful => "stopping (graceful); ",
            Some(_) => "stopping; ",
            None => "",
        };
        let mut counts = format!(
            "{state}workers: {ready} ready, {booting} booting, {stopping} stopping (target {})",
            self.config.workers
        );
        if let Some(why) = &self.reload_refused {
            counts = format!("reload failed, previous configuration kept ({why}); {counts}");
        }
        // Worker counts show at once; the request count at most once a second.
        let counts_changed = counts != self.status_counts;
        self.systemd.status(
            &format!("{counts}; requests served: {served}"),
            counts_changed,
        );
        self.status_counts = counts;
    }

    /// Notice workers that became ready since the last turn.
    fn observe_workers(&mut self) {
        for (pid, w) in self.workers.iter_mut() {
            if w.ready_at.is_none() && self.scoreboard.slot(w.slot).state() != WorkerState::Booting
            {
                w.ready_at = Some(Instant::now());
                self.boot_failures = 0;
                tracing::info!(
                    pid = pid.as_raw(),
                    boot_s = format!("{:.3}", w.spawned_at.elapsed().as_secs_f64()),
                    max_requests = w.max_requests,
                    "worker ready"
                );
            }
        }
    }

    /// Kill workers that are overdue: hung (heartbeat or one computation older than
    /// `timeout`), never ready within `boot_timeout`, or past their graceful-stop deadline.
    fn murder_workers(&mut self) {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let timeout_ms = (self.config.timeout * 1000.0) as u64;
        let boot_timeout = secs(self.config.boot_timeout);
        let mut overdue = Vec::new();
        for (&pid, w) in &self.workers {
            if w.kill_at.is_some_and(|t| now >= t) {
                overdue.push((pid, None));
                continue;
            }
            if matches!(
                w.stopping,
                Some(StopReason::Timeout | StopReason::BootTimeout)
            ) {
                continue; // already killed, waiting to be reaped
            }
            let slot = self.scoreboard.slot(w.slot);
            let reason = match slot.state() {
                WorkerState::Booting if now.duration_since(w.spawned_at) > boot_timeout => {
                    Some(StopReason::BootTimeout)
                }
                WorkerState::Booting | WorkerState::Free => None,
                // timeout = 0 turns the heartbeat kill off, as in gunicorn.
                _ if timeout_ms == 0 => None,
                _ => {
                    let beat = slot.heartbeat_ms.load(std::sync::atomic::Ordering::Acquire);
                    let busy = slot
                        .busy_since_ms
                        .load(std::sync::atomic::Ordering::Acquire);
                    let silent = now_ms.saturating_sub(beat) > timeout_ms;
                    let stuck = busy != 0 && now_ms.saturating_sub(busy) > timeout_ms;
                    (silent || stuck).then_some(StopReason::Timeout)
                }
            };
            if let Some(r) = reason {
                overdue.push((pid, Some(r)));
            }
        }
        for (pid, reason) in overdue {
            if let Some(w) = self.workers.get_mut(&pid) {
                if let Some(r) = reason {
                    w.stopping = Some(r);
                    tracing::error!(pid = pid.as_raw(), reason = r.describe(), "killing worker");
                } else {
                    tracing::warn!(
                        pid = pid.as_raw(),
                        "worker did not stop within graceful_timeout; killing it"
                    );
                }
                w.kill_at = None;
            }
            self.kill_worker(pid, Signal::SIGKILL);
            if reason == Some(StopReason::BootTimeout) {
                // Count it now, not when it is reaped: the backoff (or giving up) must apply
                // before manage_workers forks a replacement on this same turn.
                self.boot_failed(pid, "not ready within boot_timeout");
            }
        }
    }

    /// Keep `workers` workers serving: spawn what is missing, stop the surplus, and drain
    /// workers that must go (retiring, or from before a reload) once their replacements are
    /// ready, so capacity never dips.
    fn manage_workers(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        let target = self.config.workers;
        let current = self.generation;
        let slots = self.scoreboard.slots();
        let state = move |w: &Worker| slots[w.slot].state();

        // A worker of an older generation still booting would never join the pool.
        let stale: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.stopping.is_none() && w.generation < current)
            .filter(|(_, w)| state(w) == WorkerState::Booting)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in stale {
            self.stop_worker(pid, StopReason::Reload);
        }

        // Booting and ready workers of this generation not asked to stop: the pool.
        let active: Vec<Pid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.stopping.is_none() && w.generation == current)
            .filter(|(_, w)| matches!(state(w), WorkerState::Booting | WorkerState::Ready))
            .map(|(&pid, _)| pid)
            .collect();
        if active.len() < target && Instant::now() >= self.next_spawn_at {
            for _ in active.len()..target {
                if !self.spawn_worker() {
                    break;
                }
            }
        } else if active.len() > target {
            // Stop the oldest first, like gunicorn.
            let mut by_age = active.clone();
            by_age.sort_by_key(|pid| self.workers[pid].spawned_at);
            for pid in by_age.into_iter().take(active.len() - target) {
                self.stop_worker(pid, StopReason::ScaleDown);
            }
        }

        // Workers on their way out keep serving until enough replacements are ready.
        let ready = self
            .workers
            .values()
            .filter(|w| w.stopping.is_none() && w.generation == current)
            .filter(|w| state(w) == WorkerState::Ready)
            .count();
        let mut outgoing: Vec<(Instant, Pid, StopReason)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.stopping.is_none())
            .filter_map(|(&pid, w)| {
                let reason = match state(w) {
                    WorkerState::Retiring if w.generation == current => {
                        w.retire_reason.unwrap_or(StopReason::MaxRequests)
                    }
                    WorkerState::Ready | WorkerState::Retiring if w.generation < current => {
                        StopReason::Reload
                    }
                    _ => return None,
                };
                Some((w.spawned_at, pid, reason))
            })
            .collect();
        outgoing.sort_by_key(|&(spawned, pid, _)| (spawned, pid));
        let drainable = (ready + outgoing.len()).saturating_sub(target);
        for (_, pid, reason) in outgoing.into_iter().take(drainable) {
            self.stop_worker(pid, reason);
        }
    }

    /// Once a second, read each worker's private memory (USS: Private_Clean + Private_Dirty;
    /// never RSS, which counts the shared weights) into its slot, for /metrics. With
    /// `max_worker_memory`, three samples in a row over the limit mark a worker retiring: it
    /// is replaced the graceful way.
    fn sample_memory(&mut self) {
        if self.last_memory_sample.elapsed() < MEMORY_SAMPLE_PERIOD {
            return;
        }
        self.last_memory_sample = Instant::now();
        let limit = self.config.max_worker_memory.0;
        for (pid, w) in self.workers.iter_mut() {
            let slot = self.scoreboard.slot(w.slot);
            let Some(uss) = crate::memory::private_bytes(pid.as_raw()) else {
                continue;
            };
            slot.private_bytes
                .store(uss, std::sync::atomic::Ordering::Relaxed);
            if limit == 0 || w.stopping.is_some() || slot.state() != WorkerState::Ready {
                continue;
            }
            w.memory_strikes = if uss > limit { w.memory_strikes + 1 } else { 0 };
            if w.memory_strikes >= MEMORY_STRIKES
                && slot.transition(WorkerState::Ready, WorkerState::Retiring)
            {
                w.retire_reason = Some(StopReason::Memory);
                tracing::warn!(
                    pid = pid.as_raw(),
                    private_bytes = uss,
                    limit_bytes = limit,
                    "worker over max_worker_memory for {MEMORY_STRIKES} samples; recycling it"
                );
            }
        }
    }

    /// Fork one worker. Returns false if it could not.
    fn spawn_worker(&mut self) -> bool {
        if let Err(e) = assert_single_threaded() {
            tracing::error!("refusing to fork: {e}");
            self.begin_shutdown(false, 1);
            return false;
        }
        let Some(slot) = self.scoreboard.claim(monotonic_ms()) else {
            tracing::error!("no free scoreboard slot; not spawning");
            return false;
        };
        let jitter = match self.config.max_requests_jitter {
            0 => 0,
            j => fastrand::u64(0..=j),
        };
        let max_requests = match self.config.max_requests {
            0 => 0,
            n => n + jitter,
        };
        // SAFETY: the master is single-threaded (checked just above), so the child gets a
        // consistent copy of every lock and allocator state; it runs the worker and exits
        // without returning into the master's code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let code = self.become_worker(slot, max_requests);
                std::process::exit(code);
            }
            Ok(ForkResult::Parent { child }) => {
                self.scoreboard
                    .slot(slot)
                    .pid
                    .store(child.as_raw(), std::sync::atomic::Ordering::Release);
                self.workers.insert(
                    child,
                    Worker {
                        slot,
                        spawned_at: Instant::now(),
                        ready_at: None,
                        max_requests,
                        generation: self.generation,
                        memory_strikes: 0,
                        retire_reason: None,
                        stopping: None,
                        kill_at: None,
                    },
                );
                tracing::info!(pid = child.as_raw(), "booting worker");
                true
            }
            Err(e) => {
                self.scoreboard.release(slot);
                tracing::error!(error = %e, "fork failed");
                self.next_spawn_at = Instant::now() + BOOT_BACKOFF_START;
                false
            }
        }
    }

    /// In the child: hand over what the worker needs and run it.
    fn become_worker(&self, slot: usize, max_requests: u64) -> i32 {
        let listeners: Result<Vec<BoundSocket>, _> = self
            .listeners
            .iter()
            .map(|b| b.socket.try_clone())
            .collect();
        let wake = self.wake_write.try_clone().map(File::from);
        let (listeners, wake) = match (listeners, wake) {
            (Ok(l), Ok(w)) => (l, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot hand the sockets to the worker");
                return WORKER_BOOT_ERROR;
            }
        };
        forkserve_worker::run(WorkerContext {
            listeners,
            slot: self.scoreboard.slot(slot),
            board: self.scoreboard.board(),
            embedder: self.embedder.clone(),
            settings: self.config.worker_settings(max_requests),
            master_pid: self.pid,
            wake_master: wake,
        })
    }

    /// Ask a worker to finish its in-flight requests and exit; SIGKILL after graceful_timeout.
    fn stop_worker(&mut self, pid: Pid, reason: StopReason) {
        let grace = secs(self.config.graceful_timeout);
        if let Some(w) = self.workers.get_mut(&pid) {
            if w.stopping.is_some() {
                return;
            }
            w.stopping = Some(reason);
            // A little over the worker's own budget, so a worker that drains on time exits by
            // itself rather than being killed at the same instant.
            w.kill_at = Some(Instant::now() + grace + Duration::from_millis(500));
        }
        tracing::info!(
            pid = pid.as_raw(),
            reason = reason.describe(),
            "stopping worker"
        );
        self.kill_worker(pid, Signal::SIGTERM);
    }

    fn kill_worker(&self, pid: Pid, sig: Signal) {
        match kill(pid, sig) {
            // Already gone: it will be reaped.
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(e) => tracing::error!(pid = pid.as_raw(), signal = %sig, error = %e, "kill failed"),
        }
    }

    /// Stop every worker: SIGTERM (graceful) or SIGQUIT (fast), then SIGKILL at the deadline.
    fn begin_shutdown(&mut self, graceful: bool, exit_code: i32) {
        let escalate = match &self.shutdown {
            None => true,
            // A fast stop during a graceful one speeds it up; nothing else changes it.
            Some(s) => s.graceful && !graceful,
        };
        if !escalate {
            return;
        }
        let grace = secs(self.config.graceful_timeout);
        let kill_at = Instant::now() + grace + Duration::from_millis(500);
        let exit_code = self
            .shutdown
            .as_ref()
            .map_or(exit_code, |s| s.exit_code.max(exit_code));
        self.shutdown = Some(Shutdown {
            graceful,
            exit_code,
            kill_at,
        });
        self.systemd.notify("STOPPING=1");
        let sig = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGQUIT
        };
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            if let Some(w) = self.workers.get_mut(&pid) {
                if w.stopping.is_none() || !graceful {
                    w.stopping.get_or_insert(StopReason::Shutdown);
                    w.kill_at = Some(kill_at);
                }
            }
            self.kill_worker(pid, sig);
        }
    }

    /// During shutdown: the exit code once every worker is gone; SIGKILL for the late ones.
    fn finished(&mut self) -> Option<i32> {
        let shutdown = self.shutdown.as_mut()?;
        if self.workers.is_empty() {
            tracing::info!("shutting down: all workers stopped");
            return Some(shutdown.exit_code);
        }
        let now = Instant::now();
        if now >= shutdown.kill_at {
            // Once a second until they are reaped, not on every turn of the loop.
            shutdown.kill_at = now + MAX_SLEEP;
            let pids: Vec<Pid> = self.workers.keys().copied().collect();
            for pid in pids {
                tracing::warn!(
                    pid = pid.as_raw(),
                    "worker still running after graceful_timeout; killing it"
                );
                self.kill_worker(pid, Signal::SIGKILL);
            }
        }
        None
    }
}

#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(Signal),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// The master must have exactly one thread when it forks: a lock held by any other thread
/// would stay locked forever in the child.
pub fn assert_single_threaded() -> Result<(), String> {
    let count = std::fs::read_dir("/proc/self/task")
        .map_err(|e| format!("cannot read /proc/self/task: {e}"))?
        .count();
    if count == 1 {
        Ok(())
    } else {
        Err(format!(
            "the master has {count} threads; it must have 1 before fork"
        ))
    }
}
