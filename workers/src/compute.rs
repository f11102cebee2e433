//! The worker's compute thread: the one place where tokenization, inference and clustering run,
//! so the I/O loop (accepting, heartbeats, health checks) never waits behind a forward pass.
//!
//! Two kinds of work reach it. **Jobs** (tokenize a request, cluster its vectors) run one after
//! another, in order. **Embeddings** are batched across requests: while a forward pass runs,
//! new requests' sentences queue; the next pass takes queued sentences of several requests,
//! up to `max_batch_tokens` (padded), runs once, and hands each request its rows. Requests with
//! the fewest tokens left go first, so a one-sentence request on a worker busy with a large job
//! joins the very next pass instead of waiting for the job to finish; the large job takes what
//! remains of every pass. A lone request on an idle worker starts at once: there is no batching
//! window. A request whose client has gone is dropped before its next pass.
//!
//! Requests waiting here are bounded (`max_queue`): past it a request is refused (503) rather
//! than piling up latency without limit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::embedder::{EmbedError, Embedder, Tokens};
use crate::protocol::{monotonic_ms, WorkerSlot};
use crate::shared_metrics::{BatchStats, SharedMetrics};

/// A unit of work for the compute thread.
type Job = Box<dyn FnOnce(&dyn Embedder) -> Next + Send>;

/// What a job leaves behind.
enum Next {
    Done,
    /// A request to embed, which joins the coming pass (tokenizing a request is such a job).
    Embed(EmbedTask),
    /// The rest of a long job (clustering thousands of sentences), run after the coming pass
    /// so that other requests are served between its steps.
    Later(Job),
}

/// Called with the number of a request's sentences embedded so far, after each pass.
pub type Progress = Box<dyn Fn(usize) + Send>;

/// Work done in bounded steps on the compute thread, other requests' passes between them.
pub trait Stepwise: Send + 'static {
    type Output: Send + 'static;
    /// One bounded step; true when only `finish` is left.
    fn step(&mut self) -> bool;
    fn finish(self) -> Self::Output;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ComputeError {
    /// Too many requests are already waiting.
    QueueFull,
    /// The work panicked, or the compute thread is gone.
    Failed,
    /// The forward pass failed (not the client's fault).
    Inference(String),
}

/// One request's sentences, run over one or several passes.
struct EmbedTask {
    tokens: Vec<Tokens>,
    /// Sentence indices, shortest first: consecutive ones pad each other least.
    order: Vec<usize>,
    /// How many of `order` have been handed to a pass.
    next: usize,
    vectors: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Embedded, ComputeError>>,
    progress: Option<Progress>,
    /// When the request was queued for the compute thread; taken by its first pass, which
    /// counts the wait (`forkserve_queue_duration_seconds`).
    queued_since: Option<Instant>,
}

impl EmbedTask {
    fn remaining_tokens(&self) -> usize {
        self.order[self.next..]
            .iter()
            .map(|&i| self.tokens[i].len())
            .sum()
    }

    fn finished(&self) -> bool {
        self.next == self.order.len()
    }
}

/// Requests submitted and not yet answered, to bound the queue.
struct Waiting {
    count: AtomicUsize,
    max: usize,
    /// Where the queue depth is published (`forkserve_worker_queue_depth`).
    slot: &'static WorkerSlot,
}

/// Releases its place in the queue when the request is answered (or dropped).
struct Place(Arc<Waiting>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.slot.add_queued(-1);
    }
}

#[derive(Clone)]
pub struct Compute {
    work: Sender<Job>,
    waiting: Arc<Waiting>,
}

impl Compute {
    /// Start the compute thread. `pool` runs every job and pass, so that the parallel kernels
    /// use exactly this worker's `threads` and no more.
    pub fn start(
        embedder: Arc<dyn Embedder>,
        pool: rayon::ThreadPool,
        slot: &'static WorkerSlot,
        metrics: &'static SharedMetrics,
        max_queue: usize,
        max_batch_tokens: usize,
        stall: std::time::Duration,
    ) -> std::io::Result<Compute> {
        let (work, queue) = mpsc::channel::<Job>();
        crate::busy::report_to(slot);
        let runner = Runner {
            embedder,
            slot,
            metrics,
            max_batch_tokens: max_batch_tokens.max(1),
            stall,
        };
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || pool.install(|| runner.run(queue)))?;
        Ok(Compute {
            work,
            waiting: Arc::new(Waiting {
                count: AtomicUsize::new(0),
                max: max_queue.max(1),
                slot,
            }),
        })
    }

    /// A place in the queue, or `QueueFull`.
    fn place(&self) -> Result<Place, ComputeError> {
        let before = self.waiting.count.fetch_add(1, Ordering::AcqRel);
        self.waiting.slot.add_queued(1);
        let place = Place(self.waiting.clone());
        if before >= self.waiting.max {
            return Err(ComputeError::QueueFull);
        }
        Ok(place)
    }

    /// Run `f` on the compute thread and wait for its result without blocking the I/O loop.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ComputeError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Embedder) -> T + Send + 'static,
    {
        let _place = self.place()?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |embedder| {
            // The requester may have gone (client disconnected); nothing to do then.
            let _ = tx.send(f(embedder));
            Next::Done
        });
        self.work.send(job).map_err(|_| ComputeError::Failed)?;
        rx.await.map_err(|_| ComputeError::Failed)
    }

    /// Run `work` step by step on the compute thread; `progress` sees it after every step but
    /// the last. If the requester goes away (its client disconnected), no further step runs.
    pub async fn run_stepwise<S, P>(&self, work: S, progress: P) -> Result<S::Output, ComputeError>
    where
        S: Stepwise,
        P: Fn(&S) + Send + 'static,
    {
        fn next_step<S: Stepwise, P: Fn(&S) + Send + 'static>(
            mut work: S,
            progress: P,
            reply: oneshot::Sender<S::Output>,
        ) -> Job {
            Box::new(move |_| {
                if reply.is_closed() {
                    return Next::Done; // cancelled
                }
                if work.step() {
                    let _ = reply.send(work.finish());
                    return Next::Done;
                }
                progress(&work);
                Next::Later(next_step(work, progress, reply))
            })
        }
        let _place = self.place()?;
        let (tx, rx) = oneshot::channel();
        self.work
            .send(next_step(work, progress, tx))
            .map_err(|_| ComputeError::Failed)?;
        rx.await.map_err(|_| ComputeError::Failed)
    }

    /// Tokenize with `tokenize` on the compute thread, then embed the sentences in passes
    /// shared with other requests. The tokenized request joins the very next pass: had the
    /// tokens gone back to the I/O thread first, a pass could start in between and the request
    /// would wait one pass more (measured behind a large job: 3.1 passes instead of 2).
    /// Returns one vector per sentence in input order, and the number of tokens run; or the
    /// tokenizer's error.
    /// `progress`, if any, hears how many sentences are done after each pass.
    pub async fn embed<E, F>(
        &self,
        tokenize: F,
        progress: Option<Progress>,
    ) -> Result<Result<Embedded, E>, ComputeError>
    where
        E: Send + 'static,
        F: FnOnce(&dyn Embedder) -> Result<Vec<Tokens>, E> + Send + 'static,
    {
        let _place = self.place()?;
        let queued_since = Instant::now();
        // One wake-up of the I/O thread per request, at its answer: a tokenizer's error comes
        // back through `refused`, sent before the job drops `reply` (which ends `embedded`).
        // The I/O thread woken as soon as the tokens were counted interrupted the pass it was
        // waiting for (a context switch mid-pass, or a wake-up of the other core).
        let (refused_tx, refused) = oneshot::channel::<E>();
        let (reply, embedded) = oneshot::channel();
        let job: Job = Box::new(move |embedder| {
            let tokens = match tokenize(embedder) {
                Ok(tokens) => tokens,
                Err(e) => {
                    let _ = refused_tx.send(e);
                    return Next::Done;
                }
            };
            if tokens.is_empty() {
                let _ = reply.send(Ok(Embedded {
                    vectors: Vec::new(),
                    tokens: 0,
                }));
                return Next::Done;
            }
            let mut order: Vec<usize> = (0..tokens.len()).collect();
            order.sort_by_key(|&i| tokens[i].len());
            Next::Embed(EmbedTask {
                vectors: vec![Vec::new(); tokens.len()],
                tokens,
                order,
                next: 0,
                reply,
                progress,
                queued_since: Some(queued_since),
            })
        });
        self.work.send(job).map_err(|_| ComputeError::Failed)?;
        match embedded.await {
            Ok(embedded) => Ok(Ok(embedded?)),
            // The job ended without an answer: the tokenizer refused the input, or the job
            // panicked (then `refused` has nothing either).
            Err(_) => match refused.await {
                Ok(e) => Ok(Err(e)),
                Err(_) => Err(ComputeError::Failed),
            },
        }
    }
}

/// A request's embeddings: one vector per sentence in input order, and the tokens run.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

struct Runner {
    embedder: Arc<dyn Embedder>,
    slot: &'static WorkerSlot,
    metrics: &'static SharedMetrics,
    max_batch_tokens: usize,
    /// Testing only (`testing.compute_stall`): every forward pass first hangs this long
    /// without progress, as a computation stuck in a kernel would.
    stall: std::time::Duration,
}

impl Runner {
    fn run(&self, queue: Receiver<Job>) {
        let mut jobs: VecDeque<Job> = VecDeque::new();
        let mut tasks: Vec<EmbedTask> = Vec::new();
        // The next steps of long jobs, run after the coming pass.
        let mut later: Vec<Job> = Vec::new();
        // Whether the last pass left a long job's sentences for later (see
        // `leave_long_job_for_next_pass`): the next pass takes them, whatever else waits.
        let mut deferred = false;
        loop {
            jobs.extend(later.drain(..));
            // Block only when there is nothing to do; otherwise take whatever has arrived.
            if jobs.is_empty() && tasks.is_empty() {
                match queue.recv() {
                    Ok(work) => jobs.push_back(work),
                    Err(_) => return,
                }
            }
            while let Ok(work) = queue.try_recv() {
                jobs.push_back(work);
            }
            // Jobs first: they are short (tokenizing a request, clustering its vectors), and a
            // request tokenized now joins the coming pass.
            while let Some(job) = jobs.pop_front() {
                match self.guarded(|| job(self.embedder.as_ref())) {
                    Some(Next::Embed(task)) => tasks.push(task),
                    Some(Next::Later(job)) => later.push(job),
                    Some(Next::Done) | None => {}
                }
                while let Ok(work) = queue.try_recv() {
                    jobs.push_back(work);
                }
            }
            // The clients that left take their sentences with them.
            tasks.retain(|t| !t.reply.is_closed());
            if !tasks.is_empty() {
                self.pass(&mut tasks, &mut deferred);
            }
        }
    }

    /// Run `f` as one unit of work: its start and end move the busy mark the master watches,
    /// and a panic costs only the requests it was serving.
    fn guarded<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        // busy_since lets the master see a computation that makes no progress, even though
        // this worker's I/O loop keeps beating. It moves on after every pass and job, so a
        // long but progressing request is not mistaken for a hang.
        self.slot.set_busy_since(Some(monotonic_ms()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        self.slot.set_busy_since(None);
        if outcome.is_err() {
            tracing::error!("a computation panicked; the requests it served get a 500");
        }
        outcome.ok()
    }

    /// Requests that finish in this pass go without the long job that filled the rest of it:
    /// only the last task picked can be left unfinished (the fill stops inside it), and when
    /// its sentences are most of the pass while others finish, they wait for the next pass.
    /// A one-sentence request sent during a large job then waits for the pass under way and
    /// one short pass of its own, not a full pass of the job's sentences besides. Never twice
    /// in a row (the caller's rule), so a stream of small requests cannot starve the job: it
    /// gets at least every other pass. True when it left them.
    fn leave_long_job_for_next_pass(
        tasks: &mut [EmbedTask],
        picked: &mut Vec<(usize, usize)>,
    ) -> bool {
        let Some(&(last, _)) = picked.last() else {
            return false;
        };
        if tasks[last].finished() {
            return false;
        }
        let tokens = |pairs: &[(usize, usize)]| -> usize {
            pairs.iter().map(|&(t, i)| tasks[t].tokens[i].len()).sum()
        };
        let split = picked.iter().position(|&(t, _)| t == last).unwrap_or(0);
        let (others, long) = picked.split_at(split);
        if others.is_empty() || tokens(long) <= tokens(others) {
            return false;
        }
        tasks[last].next -= long.len();
        picked.truncate(split);
        true
    }

    /// One forward pass over sentences of several requests, fewest tokens left first.
    /// `deferred` says whether the pass before left a long job for later, and is updated.
    fn pass(&self, tasks: &mut Vec<EmbedTask>, deferred: &mut bool) {
        tasks.sort_by_key(EmbedTask::remaining_tokens);
        // (task, sentence) pairs of this pass.
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut longest = 0;
        'fill: for (t, task) in tasks.iter_mut().enumerate() {
            while !task.finished() {
                let i = task.order[task.next];
                let len = task.tokens[i].len().max(1);
                let padded = longest.max(len) * (picked.len() + 1);
                // A sentence longer than the budget still runs, alone.
                if padded > self.max_batch_tokens && !picked.is_empty() {
                    break 'fill;
                }
                longest = longest.max(len);
                picked.push((t, i));
                task.next += 1;
            }
        }
        *deferred = !*deferred && Self::leave_long_job_for_next_pass(tasks, &mut picked);
        for &(t, _) in &picked {
            if let Some(since) = tasks[t].queued_since.take() {
                self.metrics.count_queued(since.elapsed().as_secs_f64());
            }
        }
        let batch: Vec<&Tokens> = picked.iter().map(|&(t, i)| &tasks[t].tokens[i]).collect();
        let started = Instant::now();
        let result = self.guarded(|| {
            if !self.stall.is_zero() {
                std::thread::sleep(self.stall);
            }
            self.embedder.embed_batch(&batch)
        });
        let seconds = started.elapsed().as_secs_f64();
        let requests = {
            let mut ts: Vec<usize> = picked.iter().map(|&(t, _)| t).collect();
            ts.dedup();
            ts.len()
        };
        let tokens: usize = batch.iter().map(|t| t.len()).sum();
        let padded = match self.embedder.info().padded_batches {
            true => batch.iter().map(|t| t.len()).max().unwrap_or(0) * batch.len(),
            false => tokens,
        };
        self.metrics.count_batch(&BatchStats {
            sentences: batch.len(),
            requests,
            tokens,
            padded,
            seconds,
        });
        match result {
            Some(Ok(vectors)) => {
                for (&(t, i), v) in picked.iter().zip(vectors) {
                    tasks[t].vectors[i] = v;
                }
                let mut reported = usize::MAX;
                for &(t, _) in &picked {
                    if t != reported {
                        reported = t;
                        if let Some(progress) = &tasks[t].progress {
                            progress(tasks[t].next);
                        }
                    }
                }
            }
            failed => {
                let error = match failed {
                    Some(Err(EmbedError::Inference(m) | EmbedError::Tokenize(m))) => {
                        ComputeError::Inference(m)
                    }
                    _ => ComputeError::Failed,
                };
                let mut hit: Vec<usize> = picked.iter().map(|&(t, _)| t).collect();
                hit.dedup();
                // Every request in the failed pass gets the error; its other sentences stop.
                for &t in hit.iter().rev() {
                    let task = tasks.swap_remove(t);
                    let _ = task.reply.send(Err(error.clone()));
                }
                return;
            }
        }
        // Answer the requests whose every sentence has run.
        let mut t = 0;
        while t < tasks.len() {
            if tasks[t].finished() {
                let task = tasks.swap_remove(t);
                let tokens = task.tokens.iter().map(Tokens::len).sum();
                let _ = task.reply.send(Ok(Embedded {
                    vectors: task.vectors,
                    tokens,
                }));
            } else {
                t += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task of sentences of these token counts, `picked` of them already handed out.
    fn task(lengths: &[usize], picked: usize) -> EmbedTask {
        let tokens: Vec<Tokens> = lengths
            .iter()
            .map(|&n| Tokens {
                ids: vec![1; n],
                untruncated_len: n,
                prompt_len: 0,
            })
            .collect();
        EmbedTask {
            vectors: vec![Vec::new(); tokens.len()],
            order: (0..tokens.len()).collect(),
            tokens,
            next: picked,
            reply: oneshot::channel().0,
            progress: None,
            queued_since: None,
        }
    }

    #[test]
    fn a_long_job_that_fills_most_of_a_pass_waits_for_the_next() {
        // A one-sentence request (finished) and 4 of a job's 10 sentences of 100 tokens.
        let mut tasks = vec![task(&[8], 1), task(&[100; 10], 4)];
        let mut picked = vec![(0, 0), (1, 0), (1, 1), (1, 2), (1, 3)];
        assert!(Runner::leave_long_job_for_next_pass(
            &mut tasks,
            &mut picked
        ));
        assert_eq!(picked, vec![(0, 0)]);
        assert_eq!(tasks[1].next, 0, "the job's sentences go back");
    }

    #[test]
    fn a_pass_stays_whole_when_the_job_is_a_small_part_or_alone() {
        // Many small requests and a little of the job: it stays.
        let mut tasks = vec![task(&[50, 50], 2), task(&[10; 10], 3)];
        let mut picked = vec![(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)];
        assert!(!Runner::leave_long_job_for_next_pass(
            &mut tasks,
            &mut picked
        ));
        assert_eq!(picked.len(), 5);
        // The job alone.
        let mut tasks = vec![task(&[100; 10], 4)];
        let mut picked = vec![(0, 0), (0, 1), (0, 2), (0, 3)];
        assert!(!Runner::leave_long_job_for_next_pass(
            &mut tasks,
            &mut picked
        ));
        assert_eq!(tasks[0].next, 4);
        // Everything finishes in this pass.
        let mut tasks = vec![task(&[8], 1), task(&[100, 100], 2)];
        let mut picked = vec![(0, 0), (1, 0), (1, 1)];
        assert!(!Runner::leave_long_job_for_next_pass(
            &mut tasks,
            &mut picked
        ));
        assert_eq!(picked.len(), 3);
    }
}
