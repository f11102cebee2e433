//! The contract between the master and its workers, in one place: worker states, exit codes and
//! the layout of a scoreboard slot. The master maps the slots in shared memory (see the master's
//! `scoreboard` module); a worker only ever touches its own slot, through these atomics.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::http::routes::Route;

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
    /// Private memory (USS) as last sampled by the master, in bytes.
    pub private_bytes: AtomicU64,
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

/// Status codes counted one by one; anything else is counted as "other".
pub const STATUSES: [u16; 15] = [
    200, 400, 401, 404, 405, 408, 413, 415, 417, 422, 431, 500, 501, 503, 0,
];
/// Upper bounds (seconds) of the request-latency histogram; the last is +Inf.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    f64::INFINITY,
];
/// Upper bounds of the inference batch-size histogram (sentences per forward pass).
pub const BATCH_BUCKETS: [f64; 11] = [
    1.0,
    2.0,
    4.0,
    8.0,
    16.0,
    32.0,
    64.0,
    128.0,
    256.0,
    512.0,
    f64::INFINITY,
];
/// Why workers were replaced, as counted by the master.
pub const RESTART_REASONS: [&str; 7] = [
    "max_requests",
    "memory",
    "reload",
    "timeout",
    "boot_failure",
    "crash",
    "scale_down",
];

/// A histogram of atomics: per-bucket counts (not cumulative), the sum in micro-units and the
/// count.
#[repr(C)]
pub struct Histogram<const N: usize> {
    pub buckets: [AtomicU64; N],
    pub sum_micros: AtomicU64,
    pub count: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub fn observe(&self, bounds: &[f64; N], value: f64) {
        let i = bounds.iter().position(|&b| value <= b).unwrap_or(N - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// Counters for the whole server, in the scoreboard's shared mapping: every worker adds to
/// them, any worker reports them, and they outlive the workers that counted them. All zeroes
/// is the valid initial state.
#[repr(C)]
pub struct SharedMetrics {
    /// Requests by route and status.
    pub requests: [[AtomicU64; STATUSES.len()]; Route::COUNT],
    /// Request latency by route.
    pub latency: [Histogram<{ LATENCY_BUCKETS.len() }>; Route::COUNT],
    /// Sentences per forward pass.
    pub batch_size: Histogram<{ BATCH_BUCKETS.len() }>,
    /// Requests sharing a forward pass.
    pub batch_requests: Histogram<{ BATCH_BUCKETS.len() }>,
    /// Real tokens run through the model.
    pub tokens: AtomicU64,
    /// Tokens including padding (the compute actually spent).
    pub padded_tokens: AtomicU64,
    /// Worker replacements by reason (`RESTART_REASONS`).
    pub restarts: [AtomicU64; RESTART_REASONS.len()],
}

impl Default for SharedMetrics {
    fn default() -> Self {
        SharedMetrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| Histogram::default()),
            batch_size: Histogram::default(),
            batch_requests: Histogram::default(),
            tokens: AtomicU64::new(0),
            padded_tokens: AtomicU64::new(0),
            restarts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl SharedMetrics {
    pub fn count_request(&self, route: usize, status: u16, seconds: f64) {
        let s = STATUSES
            .iter()
            .position(|&c| c == status)
            .unwrap_or(STATUSES.len() - 1);
        self.requests[route][s].fetch_add(1, Ordering::Relaxed);
        self.latency[route].observe(&LATENCY_BUCKETS, seconds);
    }

    /// Requests answered since the server started, every route and status.
    pub fn total_requests(&self) -> u64 {
        self.requests
            .iter()
            .flatten()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    pub fn count_batch(&self, sentences: usize, requests: usize, tokens: usize, padded: usize) {
        self.batch_size.observe(&BATCH_BUCKETS, sentences as f64);
        self.batch_requests.observe(&BATCH_BUCKETS, requests as f64);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.padded_tokens
            .fetch_add(padded as u64, Ordering::Relaxed);
    }

    /// Count one restart; returns the total for that reason (None for a reason not counted).
    pub fn count_restart(&self, reason: &str) -> Option<u64> {
        let i = RESTART_REASONS.iter().position(|&r| r == reason)?;
        Some(self.restarts[i].fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// The shared scoreboard as every process sees it: all slots, and the server-wide counters.
#[derive(Clone, Copy)]
pub struct Board {
    pub slots: &'static [WorkerSlot],
    pub metrics: &'static SharedMetrics,
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
    fn histogram_counts_into_the_first_bucket_that_fits() {
        let h: Histogram<3> = Histogram::default();
        let bounds = [0.1, 1.0, f64::INFINITY];
        for v in [0.05, 0.1, 0.5, 7.0] {
            h.observe(&bounds, v);
        }
        let counts: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, vec![2, 1, 1]);
        assert_eq!(h.count.load(Ordering::Relaxed), 4);
        assert_eq!(h.sum_micros.load(Ordering::Relaxed), 7_650_000);
    }

    #[test]
    fn unknown_status_is_other() {
        let m = SharedMetrics::default();
        m.count_request(0, 418, 0.01);
        assert_eq!(m.requests[0][STATUSES.len() - 1].load(Ordering::Relaxed), 1);
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
