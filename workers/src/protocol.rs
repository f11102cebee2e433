//! The contract between the master and its workers, in one place: worker states, exit codes and
//! the layout of a scoreboard slot. The master maps the slots in shared memory (see the master's
//! `scoreboard` module); a worker only ever touches its own slot, through these atomics.

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

/// One worker's row of the scoreboard. `repr(C)` and made only of atomics, so that two processes
/// mapping the same page agree on the layout and can read and write it without locks. Aligned to
/// a cache line so that two workers' heartbeats never share one.
#[repr(C, align(64))]
#[derive(Default)]
pub struct WorkerSlot {
    /// Pid of the process owning the slot; 0 when free.
    pub pid: AtomicI32,
    /// A `WorkerState` as `u32`.
    pub state: AtomicU32,
    /// Last sign of life from the worker's I/O loop, in `monotonic_ms()`.
    pub heartbeat_ms: AtomicU64,
    /// When the computation in progress last made progress (started, or finished a batch), in
    /// `monotonic_ms()`; 0 when idle. Lets the master kill a worker stuck inside one computation
    /// even though its I/O loop still ticks.
    pub busy_since_ms: AtomicU64,
    /// Requests answered by this worker so far.
    pub requests: AtomicU64,
    /// Requests being handled right now.
    pub in_flight: AtomicU32,
    /// Open client connections right now.
    pub connections: AtomicU32,
}

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

    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Release);
    }

    /// Clear everything for a new owner. Called by the master before it forks.
    pub fn reset(&self, now_ms: u64) {
        self.pid.store(0, Ordering::Relaxed);
        self.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        self.busy_since_ms.store(0, Ordering::Relaxed);
        self.requests.store(0, Ordering::Relaxed);
        self.in_flight.store(0, Ordering::Relaxed);
        self.connections.store(0, Ordering::Relaxed);
        self.state
            .store(WorkerState::Booting as u32, Ordering::Release);
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
    fn transition_only_from_expected_state() {
        let slot = WorkerSlot::default();
        slot.reset(1);
        assert!(!slot.transition(WorkerState::Ready, WorkerState::Retiring));
        assert!(slot.transition(WorkerState::Booting, WorkerState::Ready));
        assert_eq!(slot.state(), WorkerState::Ready);
    }
}
