//! The contract between the master and its workers, on one screen: exit codes, worker states,
//! why workers are replaced, and the layout of a scoreboard slot. The master maps the slots in
//! shared memory (the master's `scoreboard` module); a worker only ever writes its own slot,
//! and both sides go through the accessors below, which fix each field's memory ordering once.
//! (The server-wide counters that share the mapping are in `shared_metrics`.)

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Exit code of a worker that could not finish booting (runtime, warm-up). Same number as
/// gunicorn's `WORKER_BOOT_ERROR`, so ops reading exit codes see familiar values.
pub const WORKER_BOOT_ERROR: i32 = 3;
/// Exit code of a worker whose model failed its warm-up inference (gunicorn's `APP_LOAD_ERROR`).
pub const APP_LOAD_ERROR: i32 = 4;

/// Where a worker is in its life. Stored as a `u32` in its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    /// The slot belongs to no process.
    Free = 0,
    /// Forked; building its runtime and running the warm-up inference. Watched by `boot_timeout`.
    Booting = 1,
    /// Accepting and serving. Watched by the heartbeat `timeout`.
    Ready = 2,
    /// Reached `max_requests` (or its memory limit): still serving, waiting for the master to
    /// bring its replacement up.
    Retiring = 3,
    /// Stopped accepting; finishing in-flight requests, then exits.
    Draining = 4,
}

impl WorkerState {
    pub fn from_u32(v: u32) -> WorkerState {
        match v {
            1 => WorkerState::Booting,
            2 => WorkerState::Ready,
            3 => WorkerState::Retiring,
            4 => WorkerState::Draining,
            _ => WorkerState::Free,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Free => "free",
            WorkerState::Booting => "booting",
            WorkerState::Ready => "ready",
            WorkerState::Retiring => "retiring",
            WorkerState::Draining => "draining",
        }
    }
}

/// Why the master replaced a worker, as `/metrics` counts it
/// (`forkserve_worker_restarts_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum RestartReason {
    MaxRequests,
    Memory,
    Reload,
    Timeout,
    BootFailure,
    Crash,
    ScaleDown,
}

impl RestartReason {
    pub const ALL: [RestartReason; 7] = [
        RestartReason::MaxRequests,
        RestartReason::Memory,
        RestartReason::Reload,
        RestartReason::Timeout,
        RestartReason::BootFailure,
        RestartReason::Crash,
        RestartReason::ScaleDown,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            RestartReason::MaxRequests => "max_requests",
            RestartReason::Memory => "memory",
            RestartReason::Reload => "reload",
            RestartReason::Timeout => "timeout",
            RestartReason::BootFailure => "boot_failure",
            RestartReason::Crash => "crash",
            RestartReason::ScaleDown => "scale_down",
        }
    }
}

/// One worker's row of the scoreboard. `repr(C)` and made only of atomics, so that two processes
/// mapping the same page agree on the layout and can read and write it without locks. Aligned to
/// a cache line so that two workers' heartbeats never share one.
#[repr(C, align(64))]
#[derive(Default)]
pub struct WorkerSlot {
    /// Pid of the process owning the slot; 0 when free.
    pid: AtomicI32,
    /// A `WorkerState` as `u32`.
    state: AtomicU32,
    /// Last sign of life from the worker's I/O loop, in `monotonic_ms()`.
    heartbeat_ms: AtomicU64,
    /// When the computation in progress last made progress (started, or finished a pass), in
    /// `monotonic_ms()`; 0 when idle. Lets the master kill a worker stuck inside one computation
    /// even though its I/O loop still ticks.
    busy_since_ms: AtomicU64,
    /// Requests answered by this worker so far.
    requests: AtomicU64,
    /// Requests being handled right now.
    in_flight: AtomicU32,
    /// Open client connections right now.
    connections: AtomicU32,
    /// Requests waiting for (or in) the compute thread right now, `max_queue` at most.
    queued: AtomicU32,
    /// Private memory (USS) as last sampled by the master, in bytes.
    private_bytes: AtomicU64,
}

/// Move a gauge of the slot up or down by `delta`.
fn add(gauge: &AtomicU32, delta: i32, order: Ordering) {
    match delta >= 0 {
        true => gauge.fetch_add(delta as u32, order),
        false => gauge.fetch_sub(delta.unsigned_abs(), order),
    };
}

// State changes publish (Release) and are read with Acquire, so whoever sees a state also sees
// what the writer did before it. The counters are statistics: Relaxed.
impl WorkerSlot {
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u32, Ordering::Release);
    }

    /// Move from `from` to `to` only if the slot is still in `from` (a worker must not turn a
    /// `Draining` slot back into `Retiring`, for example).
    pub fn transition(&self, from: WorkerState, to: WorkerState) -> bool {
        self.state
            .compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }

    pub fn set_pid(&self, pid: i32) {
        self.pid.store(pid, Ordering::Release);
    }

    /// The worker's I/O loop is alive.
    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Release);
    }

    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms.load(Ordering::Acquire)
    }

    /// A computation starts (or makes progress): `Some(now)`; it ended: `None`.
    pub fn set_busy_since(&self, since_ms: Option<u64>) {
        self.busy_since_ms
            .store(since_ms.unwrap_or(0), Ordering::Release);
    }

    pub fn busy_since_ms(&self) -> Option<u64> {
        match self.busy_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Count one answered request; returns the count so far.
    pub fn count_request(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A request starts (+1) or ends (-1).
    pub fn add_in_flight(&self, delta: i32) {
        add(&self.in_flight, delta, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A connection opens (+1) or closes (-1).
    pub fn add_connections(&self, delta: i32) {
        add(&self.connections, delta, Ordering::AcqRel);
    }

    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// A request joins (+1) or leaves (-1) the compute queue.
    pub fn add_queued(&self, delta: i32) {
        add(&self.queued, delta, Ordering::Relaxed);
    }

    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn set_private_bytes(&self, bytes: u64) {
        self.private_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn private_bytes(&self) -> u64 {
        self.private_bytes.load(Ordering::Relaxed)
    }

    /// Clear everything for a new owner. Called by the master before it forks.
    pub fn reset(&self, now_ms: u64) {
        self.pid.store(0, Ordering::Relaxed);
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        self.busy_since_ms.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.queued.store(0, Ordering::Relaxed);
        self.private_bytes.store(0, Ordering::Relaxed);
        self.state
            .store(WorkerState::Booting as u32, Ordering::Release);
    }

    /// Give the slot back (the master, after reaping its worker).
    pub fn free(&self) {
        self.pid.store(0, Ordering::Relaxed);
        self.set_state(WorkerState::Free);
    }
}

/// Milliseconds on `CLOCK_MONOTONIC`. The same clock in every process of the machine, which is
/// what lets a worker write a heartbeat that the master can compare with its own "now".
/// `std::time::Instant` cannot be shared between processes, so we read the clock directly.
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000,
        // CLOCK_MONOTONIC cannot fail on Linux; a zero would only make a worker look idle.
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<WorkerSlot>(), 64);
    }

    #[test]
    fn states_round_trip() {
        for s in [
            WorkerState::Free,
            WorkerState::Booting,
            WorkerState::Ready,
            WorkerState::Retiring,
            WorkerState::Draining,
        ] {
            assert_eq!(WorkerState::from_u32(s as u32), s);
        }
    }

    #[test]
    fn restart_reasons_are_listed_once() {
        let names: std::collections::BTreeSet<_> =
            RestartReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), RestartReason::ALL.len());
    }

    #[test]
    fn busy_since_zero_means_idle() {
        let slot = WorkerSlot::default();
        assert_eq!(slot.busy_since_ms(), None);
        slot.set_busy_since(Some(7));
        assert_eq!(slot.busy_since_ms(), Some(7));
        slot.set_busy_since(None);
        assert_eq!(slot.busy_since_ms(), None);
    }

    #[test]
    fn transition_only_from_expected_state() {
        let slot = WorkerSlot::default();
        slot.reset(1);
        assert!(!slot.transition(WorkerState::Ready, WorkerState::Retiring));
        assert!(slot.transition(WorkerState::Booting, WorkerState::Ready));
        assert_eq!(slot.state(), WorkerState::Ready);
    }
}
