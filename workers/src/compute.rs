//! The worker's compute thread: the one place where tokenization, inference and clustering run,
//! so the I/O loop (accepting, heartbeats, health checks) never waits behind a forward pass.
//! Jobs queue in a bounded channel; when it is full the request is refused (503) rather than
//! piling up latency without limit.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::embedder::{EmbedError, Embedder, ModelInfo, Side, TokenPiece, Tokens};
use crate::protocol::{monotonic_ms, SharedMetrics, WorkerSlot};

type Job = Box<dyn FnOnce(&dyn Embedder) + Send>;

#[derive(Debug, PartialEq, Eq)]
pub enum ComputeError {
    /// Too many requests are already waiting.
    QueueFull,
    /// The job panicked, or the compute thread is gone.
    Failed,
}

#[derive(Clone)]
pub struct Compute {
    jobs: SyncSender<Job>,
}

impl Compute {
    /// Start the compute thread. `pool` runs every job, so that candle's parallel kernels use
    /// exactly this worker's `threads` and no more.
    pub fn start(
        embedder: Arc<dyn Embedder>,
        pool: rayon::ThreadPool,
        slot: &'static WorkerSlot,
        metrics: &'static SharedMetrics,
        max_queue: usize,
    ) -> std::io::Result<Compute> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(max_queue.max(1));
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || run_jobs(queue, embedder, pool, slot, metrics))?;
        Ok(Compute { jobs })
    }

    /// Run `f` on the compute thread and wait for its result without blocking the I/O loop.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Embedder) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |embedder| {
            // The requester may have gone (client disconnected); nothing to do then.
            let _ = tx.send(f(embedder));
        });
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => ComputeError::QueueFull,
            TrySendError::Disconnected(_) => ComputeError::Failed,
        })?;
        rx.await.map_err(|_| ComputeError::Failed)
    }
}

fn run_jobs(
    queue: Receiver<Job>,
    embedder: Arc<dyn Embedder>,
    pool: rayon::ThreadPool,
    slot: &'static WorkerSlot,
    metrics: &'static SharedMetrics,
) {
    while let Ok(job) = queue.recv() {
        // busy_since lets the master see a computation that makes no progress, even though
        // this worker's I/O loop keeps beating. It moves on after every batch, so a long but
        // progressing request is not mistaken for a hang.
        slot.busy_since_ms.store(monotonic_ms(), Ordering::Release);
        let embedder = Progress {
            inner: embedder.as_ref(),
            slot,
            metrics,
        };
        // A panic is a bug, but it must cost only the request that hit it, not the worker and
        // every request queued behind it: the job's reply channel is dropped and that request
        // gets a 500.
        let outcome = pool
            .install(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&embedder))));
        if outcome.is_err() {
            tracing::error!("a compute job panicked; its request gets a 500");
        }
        slot.busy_since_ms.store(0, Ordering::Release);
    }
}

/// The embedder as jobs see it: every finished batch counts as progress, and is counted in the
/// server's metrics.
struct Progress<'a> {
    inner: &'a dyn Embedder,
    slot: &'static WorkerSlot,
    metrics: &'static SharedMetrics,
}

impl Embedder for Progress<'_> {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn tokenize_at(
        &self,
        text: &str,
        prompt: Option<&str>,
        side: Option<Side>,
    ) -> Result<Tokens, EmbedError> {
        self.inner.tokenize_at(text, prompt, side)
    }
    fn embed_tokens(&self, batch: &[&Tokens]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        let out = self.inner.embed_tokens(batch);
        self.progressed(batch);
        out
    }
    fn pieces(
        &self,
        text: &str,
        prompt: Option<&str>,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EmbedError> {
        self.inner.pieces(text, prompt, add_special_tokens)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EmbedError> {
        self.inner.decode(ids, skip_special_tokens)
    }
    fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let out = self.inner.embed_batch(batch);
        self.progressed(batch);
        out
    }
}

impl Progress<'_> {
    /// A forward pass finished: count it, and move the busy mark on.
    fn progressed(&self, batch: &[&Tokens]) {
        let tokens: usize = batch.iter().map(|t| t.len()).sum();
        let longest = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        self.metrics
            .count_batch(batch.len(), tokens, longest * batch.len());
        self.slot
            .busy_since_ms
            .store(monotonic_ms(), Ordering::Release);
    }
}
