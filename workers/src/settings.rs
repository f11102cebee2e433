//! What a worker needs to know from the master's configuration.

use std::time::Duration;

/// `POST /cluster`'s defaults (when the request does not say) and limits, apart from the
/// embedding routes': the sets people cluster are thousands of lines, and cannot be split
/// across requests.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterDefaults {
    /// Cosine similarity at or above which two sentences are neighbours. 0.5 sits in the middle
    /// of the range (0.241–0.755) where the seed example's 5/4 split holds.
    pub threshold: f32,
    pub min_cluster_size: usize,
    pub max_sentences: usize,
    pub max_body_bytes: usize,
    /// Agglomerative clustering holds every pair's similarity: its own, lower limit.
    pub max_agglomerative_sentences: usize,
}

impl Default for ClusterDefaults {
    fn default() -> Self {
        ClusterDefaults {
            threshold: 0.5,
            min_cluster_size: 1,
            max_sentences: 20_000,
            max_body_bytes: 16 << 20,
            max_agglomerative_sentences: 5_000,
        }
    }
}

/// gunicorn's request limits (same names and meaning).
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Longest request line, in bytes.
    pub request_line: usize,
    /// Most header fields.
    pub fields: usize,
    /// Longest header field (name + value), in bytes.
    pub field_size: usize,
}

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Compute threads for this worker's inference (created after fork).
    pub threads: usize,
    /// Requests after which this worker retires; jitter already added; 0 = never.
    pub max_requests: u64,
    /// The master's heartbeat timeout: the worker beats several times within it.
    pub timeout: Duration,
    /// How long a draining worker waits for in-flight requests before it gives up.
    pub graceful_timeout: Duration,
    /// How long an idle keep-alive connection is kept open.
    pub keepalive: Duration,
    /// How long a client may take to send a request's headers (slow-loris guard).
    pub header_timeout: Duration,
    pub limits: HttpLimits,
    pub max_body_bytes: usize,
    pub max_sentences: usize,
    /// Padded tokens per forward pass; a request's sentences are batched within it.
    pub max_batch_tokens: usize,
    /// Requests that may wait for the compute thread before new ones get 503.
    pub max_queue: usize,
    pub cluster: ClusterDefaults,
    /// Testing only: sleep this long during boot, before the warm-up, so tests can exercise the
    /// master's `boot_timeout`. Never set in production.
    pub boot_delay: Duration,
    /// Testing only: every forward pass hangs this long first, without progress, so tests can
    /// exercise the master's kill of a stuck computation. Never set in production.
    pub compute_stall: Duration,
    /// (uid, gid) the worker switches to right after fork; None keeps the master's.
    pub run_as: Option<(u32, u32)>,
    /// The model's name in `/info` and `/v1/embeddings`.
    pub model_name: String,
    /// The name in the process titles (`forkserve: worker [NAME]`).
    pub proc_name: String,
    /// Bearer token every route but /health and /ping requires; None: open.
    pub api_key: Option<String>,
    /// Serve /metrics without the API key.
    pub metrics_public: bool,
    /// One log line per request.
    pub access_log: bool,
    /// The access log has its own file (or stdout): lines in this gunicorn format go there.
    /// None: they go to the error log, as structured events.
    pub access_log_format: Option<crate::access_log::Format>,
}
