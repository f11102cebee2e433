//! The master's loop, after gunicorn's `Arbiter` and Unicorn's `join`: wait for a signal, a
//! worker's nudge or the next deadline; handle queued signals; then `reap_workers`,
//! `murder_workers`, `manage_workers`. Nothing here runs in a signal handler.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkserve_worker::listener::ListenSocket;
use forkserve_worker::model::ModelIdentity;
use forkserve_worker::protocol::{
    monotonic_ms, RestartReason, WorkerSlot, WorkerState, APP_LOAD_ERROR, WORKER_BOOT_ERROR,
};
use forkserve_worker::{Embedder, SentenceEncoder, WorkerContext};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::config::{secs, Config, ConfigSource};
use crate::reexec::Upgrade;
use crate::scoreboard::Scoreboard;
use crate::signals::SignalQueue;
use crate::sockets::Binding;
use crate::systemd::{Notifier, PoolStatus};

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
/// A worker asked to stop gets this much beyond `graceful_timeout` before SIGKILL, so one that
/// drains on time exits by itself rather than being killed at the same instant.
const KILL_MARGIN: Duration = Duration::from_millis(500);

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
            StopReason::Timeout => {
                "killed after timeout (no heartbeat, or one computation too long)"
            }
            StopReason::BootTimeout => "killed after boot_timeout",
            StopReason::Shutdown => "stopped for shutdown",
        }
    }

    /// How `/metrics` counts the replacement; a shutdown replaces nothing.
    fn restart(self) -> Option<RestartReason> {
        match self {
            StopReason::MaxRequests => Some(RestartReason::MaxRequests),
            StopReason::Memory => Some(RestartReason::Memory),
            StopReason::Reload => Some(RestartReason::Reload),
            StopReason::ScaleDown => Some(RestartReason::ScaleDown),
            StopReason::Timeout => Some(RestartReason::Timeout),
            StopReason::BootTimeout => Some(RestartReason::BootFailure),
            StopReason::Shutdown => None,
        }
    }
}

/// Where a worker is in its life, as the master drives it. (The worker's own view, which the
/// master reads, is the `WorkerState` in its slot.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Forked, not ready yet: watched by `boot_timeout`.
    Booting,
    /// Ready and serving: watched by the heartbeat `timeout`. It may have marked itself
    /// retiring (`max_requests`) in its slot.
    Serving,
    /// Serving, but marked by the master for replacement (`max_worker_memory`) once its
    /// replacement is ready.
    Replacing(StopReason),
    /// Asked to stop (SIGTERM, or SIGQUIT in a fast shutdown); SIGKILL at `kill_at`.
    Stopping {
        reason: StopReason,
        kill_at: Instant,
    },
    /// Sent SIGKILL; waiting to be reaped.
    Killed(StopReason),
}

impl Phase {
    /// Why the master wants it gone, if it does.
    fn stop_reason(self) -> Option<StopReason> {
        match self {
            Phase::Stopping { reason, .. } | Phase::Killed(reason) => Some(reason),
            Phase::Booting | Phase::Serving | Phase::Replacing(_) => None,
        }
    }
}

/// The master's view of one worker.
struct Worker {
    slot: usize,
    spawned_at: Instant,
    max_requests: u64,
    /// Configuration generation it was forked with; a reload starts a new one.
    generation: u64,
    /// Consecutive memory samples over `max_worker_memory`.
    memory_strikes: u32,
    phase: Phase,
}

/// Why a worker must be killed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overdue {
    /// No heartbeat for longer than `timeout` (the worker's I/O loop is stuck): for how long, in ms.
    Silent(u64),
    /// One computation (a forward pass or a job) running for longer than `timeout`, while the
    /// I/O loop still beats: for how long, in ms.
    Stuck(u64),
    /// Not ready within `boot_timeout`.
    NeverBooted,
    /// Asked to stop and still there at its kill deadline.
    Late(StopReason),
}

/// Every worker's deadlines at one instant: those already passed, and the time until the
/// next one. The one place heartbeat, computation, boot and kill deadlines are computed, for
/// both the loop's sleep and `murder_workers` (Unicorn's `murder_lazy_workers` does both).
struct Deadlines {
    overdue: Vec<(Pid, Overdue)>,
    next: Option<Duration>,
}

/// The pipe workers write a byte to when their state changes, so the master reacts at once.
struct Nudges {
    read: File,
    write: OwnedFd,
}

/// Failed boots in a row, and when the next spawn may happen.
struct BootBackoff {
    failures: u32,
    next_spawn_at: Instant,
}

struct Shutdown {
    graceful: bool,
    exit_code: i32,
}

pub struct Arbiter {
    config: Config,
    /// Where the config came from, to read it again on HUP.
    source: ConfigSource,
    bindings: Vec<Binding>,
    /// The sockets came from systemd (LISTEN_FDS): a reload never binds.
    socket_activated: bool,
    embedder: Arc<dyn Embedder>,
    /// The model's files as loaded, to notice new ones on HUP.
    model_identity: Option<ModelIdentity>,
    /// Seconds a forward pass takes per token here (the serving model's probe): whether a new
    /// `max_batch_tokens` or `timeout` can be honoured.
    seconds_per_token: f64,
    /// Bumped by every successful reload; workers of older generations are rolled out.
    generation: u64,
    scoreboard: Scoreboard,
    signals: SignalQueue,
    nudges: Nudges,
    workers: BTreeMap<Pid, Worker>,
    backoff: BootBackoff,
    shutdown: Option<Shutdown>,
    pid: i32,
    upgrade: Upgrade,
    last_memory_sample: Instant,
    systemd: Notifier,
}

/// What the master needs besides its configuration.
pub struct MasterParts {
    pub source: ConfigSource,
    pub bindings: Vec<Binding>,
    pub model: SentenceEncoder,
    pub model_identity: Option<ModelIdentity>,
    /// Seconds a forward pass takes per token here, as the model's probe measured it.
    pub seconds_per_token: f64,
    pub scoreboard: Scoreboard,
    pub signals: SignalQueue,
    /// The listeners came from systemd (LISTEN_FDS): a reload never binds.
    pub socket_activated: bool,
    pub upgrade: Upgrade,
}

impl Arbiter {
    pub fn new(config: Config, parts: MasterParts) -> nix::Result<Arbiter> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        let systemd = Notifier::from_env(parts.upgrade.replacing());
        Ok(Arbiter {
            config,
            source: parts.source,
            bindings: parts.bindings,
            socket_activated: parts.socket_activated,
            embedder: Arc::new(parts.model),
            model_identity: parts.model_identity,
            seconds_per_token: parts.seconds_per_token,
            generation: 0,
            scoreboard: parts.scoreboard,
            signals: parts.signals,
            nudges: Nudges {
                read: File::from(read),
                write,
            },
            workers: BTreeMap::new(),
            backoff: BootBackoff {
                failures: 0,
                next_spawn_at: Instant::now(),
            },
            shutdown: None,
            pid: std::process::id() as i32,
            upgrade: parts.upgrade,
            last_memory_sample: Instant::now(),
            systemd,
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
            if let Some(code) = self.shutdown_complete() {
                self.remove_socket_files();
                return code;
            }
            self.note_ready_workers();
            self.announce_ready();
            self.upgrade
                .check_old_master(self.config.pidfile.as_deref());
            self.murder_workers();
            self.sample_memory();
            self.manage_workers();
            self.report_to_systemd();
        }
    }

    /// On the way out: our unix sockets' files, unless systemd owns them (socket activation)
    /// or a new master started by USR2 serves on them now.
    fn remove_socket_files(&self) {
        if self.socket_activated || self.upgrade.started().is_some() {
            return;
        }
        for b in &self.bindings {
            b.remove_socket_file();
        }
    }

    fn handle_signal(&mut self, sig: Signal) {
        match sig {
            Signal::SIGCHLD => {} // reap_workers runs on every turn of the loop
            Signal::SIGTERM => {
                tracing::info!("handling SIGTERM: graceful stop");
                self.begin_shutdown(true, 0);
            }
            Signal::SIGINT | Signal::SIGQUIT => match self.upgrade.started() {
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
            Signal::SIGUSR2 => {
                let fds: Vec<i32> = self.bindings.iter().map(Binding::raw_fd).collect();
                self.upgrade.start(&fds);
            }
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
            Err(e) => return self.reload_failed(&e.to_string(), "configuration"),
        };
        let bindings = match self.rebind(&new) {
            Ok(b) => b,
            Err(e) => return self.reload_failed(&format!("bind: {e}"), "configuration"),
        };
        let identity = ModelIdentity::of(&new.model.path);
        let changed = crate::config::changed_keys(&self.config, &new);
        let mut model_changed = false;
        let new_model = new.model.path != self.config.model.path
            || new.model.backend != self.config.model.backend
            || new.model.precision != self.config.model.precision
            || new.model.sha256 != self.config.model.sha256
            || identity != self.model_identity;
        if !new_model {
            if let Err(e) = crate::model_probe::check_step_time(
                new.max_batch_tokens,
                new.timeout,
                self.embedder.info(),
                self.seconds_per_token,
            ) {
                return self.reload_failed(&e, "configuration");
            }
        }
        if new_model {
            let started = Instant::now();
            if let Err(e) = crate::config::check_model_pin(&new.model) {
                return self.reload_failed(&e, "model and configuration");
            }
            let loaded =
                SentenceEncoder::load_with(&new.model.path, new.model.backend, new.model.precision)
                    .map_err(|e| e.to_string())
                    .and_then(|model| {
                        crate::model_probe::check(&model, secs(new.boot_timeout))
                            .map(|rate| (model, rate))
                            .map_err(|e| format!("{}: {e}", new.model.path.display()))
                    });
            match loaded {
                Ok((model, rate)) => {
                    if let Err(e) = crate::model_probe::check_step_time(
                        new.max_batch_tokens,
                        new.timeout,
                        model.info(),
                        rate,
                    ) {
                        return self.reload_failed(&e, "model and configuration");
                    }
                    self.seconds_per_token = rate;
                    tracing::info!(
                        path = %new.model.path.display(),
                        load_ms = started.elapsed().as_millis() as u64,
                        "model changed on disk: new model loaded in the master"
                    );
                    self.embedder = Arc::new(model);
                    self.model_identity = identity;
                    model_changed = true;
                }
                Err(e) => {
                    return self
                        .reload_failed(&format!("model.path: {e}"), "model and configuration")
                }
            }
        }
        if new.log.level != self.config.log.level {
            forkserve_worker::logging::set_level(new.log.level);
        }
        if new.proc_name() != self.config.proc_name() {
            forkserve_worker::proctitle::set(&format!("forkserve: master [{}]", new.proc_name()));
        }
        self.bindings = bindings;
        self.config = new;
        self.backoff.failures = 0;
        self.backoff.next_spawn_at = Instant::now();
        // READY=1 again once the configured workers are all ready (announce_ready).
        self.systemd.reload_applied();
        let changed_text = match (changed.is_empty(), model_changed) {
            (true, false) => "nothing".to_string(),
            (_, true) => {
                let mut all = vec!["the model (on disk)".to_string()];
                all.extend(changed.iter().cloned());
                all.join(", ")
            }
            (false, false) => changed.join(", "),
        };
        let workers_use_it = model_changed
            || changed
                .iter()
                .any(|k| !crate::config::MASTER_ONLY.contains(&k.as_str()));
        if workers_use_it {
            self.generation += 1;
            tracing::info!(
                generation = self.generation,
                workers = self.config.workers,
                "configuration reloaded (changed: {changed_text}); rolling the workers (new ones first)"
            );
        } else {
            tracing::info!(
                workers = self.config.workers,
                "configuration reloaded (changed: {changed_text}); nothing the workers use changed: they keep running"
            );
        }
    }

    /// A reload that changed nothing: say why, in the log and in systemd's status. `kept`: what
    /// still serves ("configuration", or "model and configuration").
    fn reload_failed(&mut self, why: &str, kept: &str) {
        match kept {
            "configuration" => {
                tracing::error!("reload failed: {why}; still running on the previous configuration")
            }
            _ => tracing::error!("reload failed: {why}; still serving the previous {kept}"),
        }
        self.systemd.reload_refused(why);
        self.report_to_systemd();
    }

    /// The sockets for a new configuration: sockets already bound for an address are kept
    /// (binding them again would fail while they listen); new addresses are bound. Sockets
    /// from systemd are kept whatever `bind` says: the socket unit owns the addresses.
    fn rebind(&mut self, new: &Config) -> std::io::Result<Vec<Binding>> {
        if self.socket_activated && new.bind != self.config.bind {
            tracing::warn!("bind changed, but the sockets come from systemd: edit the .socket unit instead; keeping them");
        }
        if new.bind == self.config.bind || self.socket_activated {
            return self.bindings.iter().map(Binding::try_clone).collect();
        }
        let mut out = Vec::new();
        for addr in &new.bind {
            let kept = self
                .bindings
                .iter()
                .filter(|b| b.spec == *addr)
                .map(Binding::try_clone)
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
        for &pid in self.workers.keys() {
            signal_worker(pid, Signal::SIGUSR1);
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

    /// Wait for a signal, a worker's nudge, or `timeout`.
    fn sleep(&mut self, timeout: Duration) {
        let mut fds = [
            PollFd::new(self.signals.fd(), PollFlags::POLLIN),
            PollFd::new(self.nudges.read.as_fd(), PollFlags::POLLIN),
        ];
        let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => tracing::error!(error = %e, "poll failed"),
        }
        // Empty the pipe: the nudges only say "look at the scoreboard".
        let mut buf = [0u8; 64];
        while matches!(self.nudges.read.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The time until the next thing to do: a worker's deadline, the watchdog, a spawn.
    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        let mut next = MAX_SLEEP;
        let candidates = [
            self.deadlines().next,
            self.systemd.until_keep_alive(),
            (self.shutdown.is_none() && self.backoff.next_spawn_at > now)
                .then(|| self.backoff.next_spawn_at - now),
        ];
        for d in candidates.into_iter().flatten() {
            next = next.min(d);
        }
        // Never spin: a deadline just passed is handled on this turn.
        next.max(Duration::from_millis(5))
    }

    /// Every worker's deadlines now (see `Deadlines`).
    fn deadlines(&self) -> Deadlines {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let timeout_ms = (self.config.timeout * 1000.0) as u64;
        let boot_timeout = secs(self.config.boot_timeout);
        let mut out = Deadlines {
            overdue: Vec::new(),
            next: None,
        };
        for (&pid, w) in &self.workers {
            let slot = self.scoreboard.slot(w.slot);
            // (when it falls due, in ms from now, or 0 if past; what is overdue then)
            let mut due: Vec<(u64, Overdue)> = Vec::new();
            match w.phase {
                Phase::Killed(_) => continue, // waiting to be reaped
                Phase::Stopping { reason, kill_at } => due.push((
                    kill_at.saturating_duration_since(now).as_millis() as u64,
                    Overdue::Late(reason),
                )),
                _ => {}
            }
            match slot.state() {
                WorkerState::Free => {}
                WorkerState::Booting => due.push((
                    (w.spawned_at + boot_timeout)
                        .saturating_duration_since(now)
                        .as_millis() as u64,
                    Overdue::NeverBooted,
                )),
                // timeout = 0: no heartbeat deadline (gunicorn's meaning).
                _ if timeout_ms == 0 => {}
                _ => {
                    let beat = slot.heartbeat_ms();
                    due.push((
                        hung_in(beat, timeout_ms, now_ms),
                        Overdue::Silent(now_ms.saturating_sub(beat)),
                    ));
                    if let Some(busy) = slot.busy_since_ms() {
                        due.push((
                            hung_in(busy, timeout_ms, now_ms),
                            Overdue::Stuck(now_ms.saturating_sub(busy)),
                        ));
                    }
                }
            }
            if let Some(&(_, why)) = due.iter().find(|(ms, _)| *ms == 0) {
                out.overdue.push((pid, why));
            } else if let Some(ms) = due.iter().map(|(ms, _)| *ms).min() {
                let d = Duration::from_millis(ms);
                out.next = Some(out.next.map_or(d, |n| n.min(d)));
            }
        }
        out
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
            if self.upgrade.reaped(pid, &how) {
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
        let pid = pid.as_raw();
        match (worker.phase, self.shutdown.is_some()) {
            // Counted as a failed boot when it was killed (see murder_workers).
            (Phase::Killed(StopReason::BootTimeout), _) => {
                tracing::info!(pid, %how, "worker that never booted is gone")
            }
            (Phase::Stopping { reason, .. } | Phase::Killed(reason), _) => {
                // The counters live in the scoreboard (for /metrics); the log shows the total.
                let count = reason
                    .restart()
                    .map(|r| self.scoreboard.metrics().count_restart(r));
                // `reason` as /metrics labels it (`scale_down`), so a log search and a
                // query use the same word.
                let label = reason.restart().map_or("shutdown", RestartReason::name);
                if reason == StopReason::Timeout {
                    tracing::error!(pid, %how, reason = label, "worker timed out and was killed (WORKER TIMEOUT)");
                } else {
                    let lived = worker.spawned_at.elapsed().as_secs_f64();
                    tracing::info!(pid, %how, reason = label, lived_s = format!("{lived:.1}"), count, "worker {}", reason.describe());
                }
            }
            (_, true) => tracing::info!(pid, %how, "worker exited during shutdown"),
            (Phase::Booting, false) => {
                let why = match how {
                    Exit::Code(WORKER_BOOT_ERROR) => "worker boot error (exit code 3)".to_string(),
                    Exit::Code(APP_LOAD_ERROR) => {
                        "model failed its warm-up (exit code 4)".to_string()
                    }
                    other => format!("{other} before it was ready"),
                };
                self.boot_failed(pid, &why);
            }
            // It was serving and nobody asked it to stop: a crash. Replaced at once.
            (Phase::Serving | Phase::Replacing(_), false) => {
                let hint = match how {
                    Exit::Signal(Signal::SIGKILL) => " (perhaps out of memory)",
                    _ => "",
                };
                self.scoreboard
                    .metrics()
                    .count_restart(RestartReason::Crash);
                tracing::error!(pid, %how, "worker died unexpectedly{hint}; replacing it");
            }
        }
    }

    fn boot_failed(&mut self, pid: i32, why: &str) {
        self.backoff.failures += 1;
        let failures = self.backoff.failures;
        self.scoreboard
            .metrics()
            .count_restart(RestartReason::BootFailure);
        let max = self.config.max_boot_failures;
        if failures >= max {
            tracing::error!(
                pid,
                failures,
                "worker failed to boot: {why}; {max} failed boots in a row, giving up"
            );
            self.begin_shutdown(false, EXIT_BOOT_FAILURES);
            return;
        }
        let backoff = BOOT_BACKOFF_START
            .saturating_mul(1 << (failures - 1).min(16))
            .min(BOOT_BACKOFF_CAP);
        tracing::error!(
            pid,
            failures,
            retry_in_ms = backoff.as_millis() as u64,
            "worker failed to boot: {why}"
        );
        self.backoff.next_spawn_at = Instant::now() + backoff;
    }

    /// Tell systemd we serve, once the configured workers are all ready (not before any
    /// exists, as gunicorn does). A master started by USR2 also says it is the main process now.
    fn announce_ready(&mut self) {
        if self.systemd.is_ready_sent() || self.shutdown.is_some() {
            return;
        }
        let ready = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation)
            .filter(|w| matches!(w.phase, Phase::Serving | Phase::Replacing(_)))
            .count();
        if ready < self.config.workers {
            return;
        }
        let main_pid = self.upgrade.replacing().map(|_| self.pid);
        if self.systemd.ready(main_pid) {
            tracing::info!(
                workers = ready,
                generation = self.generation,
                "all workers ready"
            );
        }
    }

    /// The watchdog ping, and STATUS= with live worker counts and requests served (what
    /// `systemctl status` shows).
    fn report_to_systemd(&mut self) {
        let mut pool = PoolStatus {
            ready: 0,
            booting: 0,
            stopping: 0,
            target: self.config.workers,
            requests_served: self.scoreboard.metrics().total_requests(),
            shutting_down: self.shutdown.as_ref().map(|s| s.graceful),
        };
        for w in self.workers.values() {
            match w.phase {
                Phase::Booting => pool.booting += 1,
                Phase::Serving | Phase::Replacing(_) => pool.ready += 1,
                Phase::Stopping { .. } | Phase::Killed(_) => pool.stopping += 1,
            }
        }
        self.systemd.report(&pool);
    }

    /// Move workers whose slot says ready (or beyond) from `Booting` to `Serving`.
    fn note_ready_workers(&mut self) {
        for (pid, w) in self.workers.iter_mut() {
            if w.phase == Phase::Booting
                && self.scoreboard.slot(w.slot).state() != WorkerState::Booting
            {
                w.phase = Phase::Serving;
                self.backoff.failures = 0;
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
        for (pid, overdue) in self.deadlines().overdue {
            let Some(w) = self.workers.get_mut(&pid) else {
                continue;
            };
            let reason = match overdue {
                Overdue::Late(reason) => reason,
                Overdue::Silent(_) | Overdue::Stuck(_) => StopReason::Timeout,
                Overdue::NeverBooted => StopReason::BootTimeout,
            };
            match overdue {
                Overdue::Late(_) => tracing::warn!(
                    pid = pid.as_raw(),
                    "worker did not stop within graceful_timeout; killing it"
                ),
                // Which rule fired, and by how much: a worker whose /health answers at once
                // can still be killed for one computation that does not end.
                Overdue::Silent(ms) => tracing::error!(
                    pid = pid.as_raw(),
                    silent_ms = ms,
                    timeout_s = self.config.timeout,
                    "killing worker: no heartbeat for longer than timeout (its I/O loop is stuck)"
                ),
                Overdue::Stuck(ms) => tracing::error!(
                    pid = pid.as_raw(),
                    busy_ms = ms,
                    timeout_s = self.config.timeout,
                    "killing worker: one computation has run longer than timeout"
                ),
                Overdue::NeverBooted => tracing::error!(
                    pid = pid.as_raw(),
                    reason = reason.describe(),
                    "killing worker"
                ),
            }
            w.phase = Phase::Killed(reason);
            signal_worker(pid, Signal::SIGKILL);
            if overdue == Overdue::NeverBooted {
                // Count it now, not when it is reaped: the backoff (or giving up) must apply
                // before manage_workers forks a replacement on this same turn.
                self.boot_failed(pid.as_raw(), "not ready within boot_timeout");
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
        let mut stale = Vec::new();
        let mut pool = Vec::new();
        let mut ready = 0;
        let mut outgoing: Vec<(Instant, Pid, StopReason)> = Vec::new();
        for (&pid, w) in &self.workers {
            let state = slots[w.slot].state();
            match (w.phase, state) {
                (Phase::Stopping { .. } | Phase::Killed(_), _) => {}
                // A worker of an older generation still booting would never join the pool.
                (Phase::Booting, _) if w.generation < current => stale.push(pid),
                (Phase::Booting, _) => pool.push((w.spawned_at, pid)),
                // Workers on their way out keep serving until their replacements are ready.
                (_, WorkerState::Ready | WorkerState::Retiring) if w.generation < current => {
                    outgoing.push((w.spawned_at, pid, StopReason::Reload))
                }
                (Phase::Replacing(reason), WorkerState::Retiring) => {
                    outgoing.push((w.spawned_at, pid, reason))
                }
                (Phase::Serving, WorkerState::Retiring) => {
                    outgoing.push((w.spawned_at, pid, StopReason::MaxRequests))
                }
                (Phase::Serving, WorkerState::Ready) => {
                    pool.push((w.spawned_at, pid));
                    ready += 1;
                }
                // Draining by itself (its master looked gone), or already freed: leave it.
                _ => {}
            }
        }
        for pid in stale {
            self.stop_worker(pid, StopReason::Reload);
        }
        if pool.len() < target && Instant::now() >= self.backoff.next_spawn_at {
            for _ in pool.len()..target {
                if !self.spawn_worker() {
                    break;
                }
            }
        } else if pool.len() > target {
            // Stop the oldest first, like gunicorn.
            pool.sort();
            let surplus = pool.len() - target;
            for (_, pid) in pool.into_iter().take(surplus) {
                self.stop_worker(pid, StopReason::ScaleDown);
            }
        }
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
            slot.set_private_bytes(uss);
            if limit == 0 || w.phase != Phase::Serving || slot.state() != WorkerState::Ready {
                continue;
            }
            w.memory_strikes = if uss > limit { w.memory_strikes + 1 } else { 0 };
            if w.memory_strikes >= MEMORY_STRIKES
                && slot.transition(WorkerState::Ready, WorkerState::Retiring)
            {
                w.phase = Phase::Replacing(StopReason::Memory);
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
                let code = self.become_worker(self.scoreboard.slot(slot), max_requests);
                std::process::exit(code);
            }
            Ok(ForkResult::Parent { child }) => {
                self.scoreboard.slot(slot).set_pid(child.as_raw());
                let worker = Worker {
                    slot,
                    spawned_at: Instant::now(),
                    max_requests,
                    generation: self.generation,
                    memory_strikes: 0,
                    phase: Phase::Booting,
                };
                self.workers.insert(child, worker);
                tracing::info!(pid = child.as_raw(), "booting worker");
                true
            }
            Err(e) => {
                self.scoreboard.release(slot);
                tracing::error!(error = %e, "fork failed");
                self.backoff.next_spawn_at = Instant::now() + BOOT_BACKOFF_START;
                false
            }
        }
    }

    /// In the child: hand over what the worker needs and run it.
    fn become_worker(&self, slot: &'static WorkerSlot, max_requests: u64) -> i32 {
        let listeners: Result<Vec<ListenSocket>, _> =
            self.bindings.iter().map(|b| b.socket.try_clone()).collect();
        let wake = self.nudges.write.try_clone().map(File::from);
        let (listeners, wake) = match (listeners, wake) {
            (Ok(l), Ok(w)) => (l, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot hand the sockets to the worker");
                return WORKER_BOOT_ERROR;
            }
        };
        forkserve_worker::run(WorkerContext {
            listeners,
            slot,
            board: self.scoreboard.board(),
            embedder: self.embedder.clone(),
            settings: self.config.worker_settings(max_requests),
            master_pid: self.pid,
            wake_master: wake,
        })
    }

    /// Ask a worker to finish its in-flight requests and exit; SIGKILL after graceful_timeout.
    fn stop_worker(&mut self, pid: Pid, reason: StopReason) {
        let kill_at = Instant::now() + secs(self.config.graceful_timeout) + KILL_MARGIN;
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if w.phase.stop_reason().is_some() {
            return;
        }
        w.phase = Phase::Stopping { reason, kill_at };
        tracing::info!(
            pid = pid.as_raw(),
            reason = reason.describe(),
            "stopping worker"
        );
        signal_worker(pid, Signal::SIGTERM);
    }

    /// Stop every worker: SIGTERM (graceful) or SIGQUIT (fast); the deadline rule kills the
    /// ones still there after graceful_timeout.
    fn begin_shutdown(&mut self, graceful: bool, exit_code: i32) {
        let escalate = match &self.shutdown {
            None => true,
            // A fast stop during a graceful one speeds it up; nothing else changes it.
            Some(s) => s.graceful && !graceful,
        };
        if !escalate {
            return;
        }
        let kill_at = Instant::now() + secs(self.config.graceful_timeout) + KILL_MARGIN;
        let exit_code = self
            .shutdown
            .as_ref()
            .map_or(exit_code, |s| s.exit_code.max(exit_code));
        self.shutdown = Some(Shutdown {
            graceful,
            exit_code,
        });
        self.systemd.notify("STOPPING=1");
        let sig = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGQUIT
        };
        for (&pid, w) in self.workers.iter_mut() {
            w.phase = match w.phase {
                Phase::Killed(_) => continue,
                // Already stopping gracefully: a graceful shutdown changes nothing for it.
                Phase::Stopping { .. } if graceful => w.phase,
                Phase::Stopping { reason, .. } => Phase::Stopping { reason, kill_at },
                _ => Phase::Stopping {
                    reason: StopReason::Shutdown,
                    kill_at,
                },
            };
            signal_worker(pid, sig);
        }
    }

    /// During shutdown, once every worker is gone: the exit code.
    fn shutdown_complete(&self) -> Option<i32> {
        let shutdown = self.shutdown.as_ref()?;
        if !self.workers.is_empty() {
            return None;
        }
        tracing::info!("shutting down: all workers stopped");
        Some(shutdown.exit_code)
    }
}

/// Milliseconds until a worker whose last sign of progress was at `since_ms` counts as hung;
/// 0 once it does.
fn hung_in(since_ms: u64, timeout_ms: u64, now_ms: u64) -> u64 {
    // Hung when silent for more than timeout: due one millisecond after the timeout.
    (since_ms + timeout_ms + 1).saturating_sub(now_ms)
}

fn signal_worker(pid: Pid, sig: Signal) {
    match kill(pid, sig) {
        // Already gone: it will be reaped.
        Ok(()) | Err(nix::Error::ESRCH) => {}
        Err(e) => tracing::error!(pid = pid.as_raw(), signal = %sig, error = %e, "kill failed"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hung_one_millisecond_after_the_timeout() {
        assert_eq!(hung_in(1_000, 500, 1_200), 301);
        assert_eq!(hung_in(1_000, 500, 1_500), 1);
        assert_eq!(hung_in(1_000, 500, 1_501), 0);
        assert_eq!(hung_in(1_000, 500, 9_000), 0);
    }

    #[test]
    fn a_shutdown_replaces_nothing() {
        assert_eq!(StopReason::Shutdown.restart(), None);
        assert_eq!(
            StopReason::BootTimeout.restart(),
            Some(RestartReason::BootFailure)
        );
    }
}
