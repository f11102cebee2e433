//! Before a model serves (at start, and on HUP before it replaces the one serving), a child
//! process embeds the fixed probe sentences with it (`forkserve_worker::probe`) and the master
//! reads the verdict. A child, because the master must stay single-threaded until it forks its
//! workers, and running the model means a compute thread pool. The child is a copy of the
//! master at this instant: it sees the new model exactly as workers would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use forkserve_worker::Embedder;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe, ForkResult};

/// Run the probe in a child process; Err says why the model must not serve. Ok: the measured
/// seconds a forward pass takes per token, with one thread.
pub fn check(model: &dyn Embedder, limit: Duration) -> Result<f64, String> {
    let (read, write) = pipe().map_err(|e| format!("cannot probe the model: pipe: {e}"))?;
    // SAFETY: the master is single-threaded (asserted before the first fork, and it starts no
    // thread), so the child gets a consistent copy of every lock and of the allocator. The
    // child only computes, writes its verdict to the pipe and leaves with _exit, never
    // returning into the master's code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read);
            let verdict = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .map_err(|e| e.to_string())
                .and_then(|pool| {
                    pool.install(|| {
                        forkserve_worker::probe::probe(model)?;
                        forkserve_worker::probe::seconds_per_token(model)
                    })
                });
            let mut out = File::from(write);
            let code = match verdict {
                Ok(rate) => {
                    let _ = out.write_all(format!("{rate:e}").as_bytes());
                    0
                }
                Err(why) => {
                    let _ = out.write_all(why.as_bytes());
                    1
                }
            };
            drop(out);
            // SAFETY: _exit ends the child without running the master's exit handlers or
            // flushing its copies of the master's buffers.
            unsafe { nix::libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            let mut read = File::from(read);
            let deadline = Instant::now() + limit;
            let mut message = Vec::new();
            let mut buf = [0u8; 512];
            let finished = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                    .unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, wait) {
                    Ok(0) if left.is_zero() => break false,
                    Ok(0) => continue,
                    Ok(_) => match read.read(&mut buf) {
                        Ok(0) => break true, // the child closed its end: done
                        Ok(n) => message.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break true,
                    },
                    Err(nix::Error::EINTR) => {}
                    Err(_) => break true,
                }
            };
            if !finished {
                let _ = kill(child, Signal::SIGKILL);
            }
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::Error::EINTR) => continue,
                    other => break other,
                }
            };
            let why = String::from_utf8_lossy(&message).trim().to_string();
            match (finished, status) {
                (false, _) => Err(format!(
                    "the probe inference did not finish within {} s",
                    limit.as_secs_f64()
                )),
                (true, Ok(WaitStatus::Exited(_, 0))) => why
                    .parse::<f64>()
                    .map_err(|_| format!("the probe's answer {why:?} is not a rate")),
                (true, Ok(WaitStatus::Exited(_, _))) if !why.is_empty() => Err(why),
                (true, other) => Err(format!("the probe inference failed: {other:?}")),
            }
        }
        Err(e) => Err(format!("cannot probe the model: fork: {e}")),
    }
}

/// Whether the longest step of a computation fits in `timeout`: the master kills a worker
/// whose computation makes no progress for that long, and a forward pass reports progress
/// after each layer (forkserve's own pass) or only at its end (candle's). A `max_batch_tokens`
/// whose step cannot finish in time would have every large request killed: refused, with the
/// rate measured on this machine.
pub fn check_step_time(
    max_batch_tokens: usize,
    timeout_s: f64,
    info: &forkserve_worker::embedder::ModelInfo,
    seconds_per_token: f64,
) -> Result<(), String> {
    if timeout_s <= 0.0 {
        return Ok(()); // no timeout
    }
    let pass = max_batch_tokens as f64 * seconds_per_token;
    let (step, what) = match info.padded_batches {
        true => (pass, "one forward pass".to_string()),
        false => (
            pass / info.layers.max(1) as f64,
            format!("one of the {} layers of a forward pass", info.layers),
        ),
    };
    if step > timeout_s {
        return Err(format!(
            "max_batch_tokens = {max_batch_tokens}: {what} of that many tokens would take ~{step:.1} s \
             on this machine (measured {:.0} tokens/s per pass on one thread), longer than timeout \
             ({timeout_s} s), so every such pass would be killed: lower max_batch_tokens (at most \
             ~{}) or raise timeout",
            1.0 / seconds_per_token,
            (timeout_s / step * max_batch_tokens as f64) as usize
        ));
    }
    Ok(())
}
