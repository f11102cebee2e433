//! The server-wide counters, in the scoreboard's shared mapping beside the worker slots: every
//! worker adds to them, any worker reports them (`/metrics`), and they outlive the workers that
//! counted them. All zeroes is the valid initial state.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::http::routes::Route;
use crate::protocol::{RestartReason, WorkerSlot};

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
/// Upper bounds (seconds) of the forward-pass and queue-time histograms: the latency buckets
/// with three finer ones below, since a one-sentence pass takes a few ms and an empty queue a
/// fraction of one.
pub const PASS_BUCKETS: [f64; 16] = finer_below([0.0005, 0.001, 0.0025], LATENCY_BUCKETS);

/// `low` followed by `high`: one histogram's bounds extending another's downwards.
const fn finer_below<const L: usize, const H: usize, const N: usize>(
    low: [f64; L],
    high: [f64; H],
) -> [f64; N] {
    assert!(L + H == N, "the bounds' count is the sum of both parts");
    let mut out = [0.0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < L { low[i] } else { high[i - L] };
        i += 1;
    }
    out
}
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
    /// How long each forward pass took (tokens in, pooled vectors out).
    pub pass_duration: Histogram<{ PASS_BUCKETS.len() }>,
    /// How long a request waited from being queued for the compute thread to its first pass
    /// (tokenizing included).
    pub queue_duration: Histogram<{ PASS_BUCKETS.len() }>,
    /// Real tokens run through the model.
    pub tokens: AtomicU64,
    /// Tokens including padding (the compute actually spent).
    pub padded_tokens: AtomicU64,
    /// Worker replacements by reason (`RestartReason::ALL`).
    pub restarts: [AtomicU64; RestartReason::ALL.len()],
    /// When the master started, in ms since the Unix epoch (set once, before any fork).
    pub started_unix_ms: AtomicU64,
}

impl Default for SharedMetrics {
    fn default() -> Self {
        SharedMetrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            latency: std::array::from_fn(|_| Histogram::default()),
            batch_size: Histogram::default(),
            batch_requests: Histogram::default(),
            pass_duration: Histogram::default(),
            queue_duration: Histogram::default(),
            tokens: AtomicU64::new(0),
            padded_tokens: AtomicU64::new(0),
            restarts: std::array::from_fn(|_| AtomicU64::new(0)),
            started_unix_ms: AtomicU64::new(0),
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

    pub fn count_batch(&self, batch: &BatchStats) {
        let BatchStats {
            sentences,
            requests,
            tokens,
            padded,
            seconds,
        } = *batch;
        self.pass_duration.observe(&PASS_BUCKETS, seconds);
        self.batch_size.observe(&BATCH_BUCKETS, sentences as f64);
        self.batch_requests.observe(&BATCH_BUCKETS, requests as f64);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.padded_tokens
            .fetch_add(padded as u64, Ordering::Relaxed);
    }

    /// A request's wait before its first forward pass.
    pub fn count_queued(&self, seconds: f64) {
        self.queue_duration.observe(&PASS_BUCKETS, seconds);
    }

    /// Count one restart; returns the total for that reason.
    pub fn count_restart(&self, reason: RestartReason) -> u64 {
        self.restarts[reason as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn restarts(&self, reason: RestartReason) -> u64 {
        self.restarts[reason as usize].load(Ordering::Relaxed)
    }
}

/// One forward pass, as counted.
#[derive(Clone, Copy, Debug)]
pub struct BatchStats {
    /// Sentences in the pass.
    pub sentences: usize,
    /// Requests they came from.
    pub requests: usize,
    /// Real tokens.
    pub tokens: usize,
    /// Tokens computed, padding included (the same as `tokens` for a backend that never pads).
    pub padded: usize,
    /// How long the pass took.
    pub seconds: f64,
}

/// The shared mapping as every process sees it: all worker slots, and the server-wide
/// counters. (The master's `Scoreboard` owns the mapping; this is the view it hands out.)
#[derive(Clone, Copy)]
pub struct SharedBoard {
    pub slots: &'static [WorkerSlot],
    pub metrics: &'static SharedMetrics,
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn pass_buckets_extend_the_latency_buckets_downwards() {
        assert_eq!(PASS_BUCKETS[..3], [0.0005, 0.001, 0.0025]);
        assert_eq!(PASS_BUCKETS[3..], LATENCY_BUCKETS);
        assert!(PASS_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn unknown_status_is_other() {
        let m = SharedMetrics::default();
        m.count_request(0, 418, 0.01);
        assert_eq!(m.requests[0][STATUSES.len() - 1].load(Ordering::Relaxed), 1);
    }
}
