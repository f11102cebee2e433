//! A worker's life, from the instant after fork to its exit code.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::compute::Compute;
use crate::embedder::Embedder;
use crate::http::app::App;
use crate::http::server::{accept_loop, ConnectionSettings, Connections};
use crate::lifecycle::Lifecycle;
use crate::listener::ListenSocket;
use crate::protocol::{WorkerSlot, APP_LOAD_ERROR, WORKER_BOOT_ERROR};
use crate::settings::WorkerSettings;
use crate::shared_metrics::SharedBoard;

/// Everything the master hands a freshly forked worker.
pub struct WorkerContext {
    pub listeners: Vec<ListenSocket>,
    pub slot: &'static WorkerSlot,
    /// The whole scoreboard: every slot and the server-wide counters (for /metrics).
    pub board: SharedBoard,
    pub embedder: Arc<dyn Embedder>,
    pub settings: WorkerSettings,
    /// The master's pid: when our parent is no longer it, the master died.
    pub master_pid: i32,
    /// Write end of the master's wake-up pipe.
    pub wake_master: File,
}

/// Why the worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: finish in-flight requests within `graceful_timeout`.
    Graceful,
    /// SIGINT / SIGQUIT: leave now.
    Fast,
    /// The master is gone: nobody supervises us, so drain briefly and go.
    Orphaned,
}

/// How long an orphaned worker drains before it exits: short, so the port is freed quickly.
const ORPHAN_DRAIN: Duration = Duration::from_secs(1);

/// Run the worker; returns its exit code. Called in the child right after fork, while it has a
/// single thread.
pub fn run(ctx: WorkerContext) -> i32 {
    let span = tracing::info_span!("worker", pid = std::process::id());
    let _entered = span.enter();
    crate::proctitle::set(&format!("forkserve: worker [{}]", ctx.settings.proc_name));

    if let Err(e) = prepare_process(&ctx) {
        tracing::error!(error = %e, "cannot prepare the worker process");
        return WORKER_BOOT_ERROR;
    }
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.settings.threads)
        .thread_name(|i| format!("compute-{i}"))
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the compute threads");
            return WORKER_BOOT_ERROR;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the I/O runtime");
            return WORKER_BOOT_ERROR;
        }
    };
    runtime.block_on(serve(ctx, pool))
}

/// Undo what the master set up for itself, and set what must be set before any thread exists.
fn prepare_process(ctx: &WorkerContext) -> nix::Result<()> {
    // The master blocks its signals to read them from a signalfd; a worker handles its own.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    drop_privileges(ctx.settings.run_as)?;
    // If the master dies, the kernel tells us at once (SIGTERM: drain). The heartbeat loop
    // also checks the parent pid, which covers a master that died before this line ran. Set
    // after dropping privileges: a change of credentials clears it.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    // candle sizes its matrix-multiply parallelism from RAYON_NUM_THREADS on every call, and
    // the tokenizer would start its own pool unless told not to. Setting the environment is
    // sound here: the worker has one thread until the pools below are built.
    std::env::set_var("RAYON_NUM_THREADS", ctx.settings.threads.to_string());
    std::env::set_var("TOKENIZERS_PARALLELISM", "false");
    own_inherited_heap();
    Ok(())
}

/// Copy the master's heap pages into this worker now, rather than one at a time later.
///
/// After fork, the worker shares the master's heap (~4 MB: the tokenizer and the free chunks
/// left by loading) copy-on-write. The worker's malloc reuses those free chunks, and each
/// first write to one of their pages copies it: `make soak` saw a worker's private memory
/// (USS) take a 0.5-1.4 MiB step at a random point in its first ~5,000 requests, then stay
/// flat. Breaking the sharing at boot makes a worker's USS what it will be, from its first
/// request, so `max_worker_memory` and dashboards see no drift. The weights are not in the
/// heap and stay shared (see `model::weights` for where they live).
fn own_inherited_heap() {
    let Some((start, end)) = heap_range() else {
        return;
    };
    // SAFETY: MADV_POPULATE_WRITE (Linux 5.14+) faults the pages of a range in as if written,
    // which breaks copy-on-write, without changing a byte of their contents. The range is this
    // process's own [heap] mapping, read from /proc/self/maps; only this thread runs.
    let rc = unsafe {
        nix::libc::madvise(
            start as *mut nix::libc::c_void,
            end - start,
            nix::libc::MADV_POPULATE_WRITE,
        )
    };
    if rc != 0 {
        // An older kernel: the pages are then copied lazily, as before.
        tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE on the heap");
    }
}

/// The `[heap]` line of /proc/self/maps, as addresses.
fn heap_range() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[heap]"))?;
    let (range, _) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

/// Become the configured user and group. Workers face the clients; the master keeps its
/// privileges for re-binding and reloading.
fn drop_privileges(run_as: Option<(u32, u32)>) -> nix::Result<()> {
    use nix::unistd::{getegid, geteuid, setgid, setgroups, setuid, Gid, Uid};
    let Some((uid, gid)) = run_as else {
        return Ok(());
    };
    if geteuid().as_raw() == uid && getegid().as_raw() == gid {
        return Ok(());
    }
    // Supplementary groups first, then the group, then the user: after setuid we could no
    // longer change the others.
    setgroups(&[Gid::from_raw(gid)])?;
    setgid(Gid::from_raw(gid))?;
    setuid(Uid::from_raw(uid))?;
    Ok(())
}

async fn serve(ctx: WorkerContext, pool: rayon::ThreadPool) -> i32 {
    let WorkerContext {
        listeners,
        slot,
        board,
        embedder,
        settings,
        master_pid,
        wake_master,
    } = ctx;
    let settings = Arc::new(settings);
    let lifecycle = Arc::new(Lifecycle::new(slot, settings.max_requests, wake_master));
    let (stop_tx, mut stop_rx) = watch::channel::<Option<Stop>>(None);

    lifecycle.beat();
    tokio::spawn(heartbeat(
        lifecycle.clone(),
        settings.timeout,
        master_pid,
        stop_tx.clone(),
    ));
    if let Err(e) = watch_signals(stop_tx.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return WORKER_BOOT_ERROR;
    }

    let model = embedder.info().clone();
    // Booting can take a while (and, in tests, be made to hang): a stop signal during it must
    // still be obeyed at once.
    let compute = tokio::select! {
        booted = boot(embedder, pool, board, slot, &settings) => match booted {
            Ok(compute) => compute,
            Err(code) => return code,
        },
        _ = stop_rx.wait_for(Option::is_some) => return 0,
    };
    let (drain_tx, drain_rx) = watch::channel(false);
    let connections = Connections::new(slot, board);
    let app = Arc::new(App::new(
        compute,
        settings.clone(),
        lifecycle.clone(),
        board,
        model,
    ));
    let conn_settings = ConnectionSettings {
        keepalive: settings.keepalive,
        header_timeout: settings.header_timeout,
        max_headers: settings.limits.fields,
    };
    for socket in listeners {
        let listener = match socket.into_listener() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot use a listening socket");
                return WORKER_BOOT_ERROR;
            }
        };
        tokio::spawn(accept_loop(
            listener,
            app.clone(),
            conn_settings.clone(),
            connections.clone(),
            drain_rx.clone(),
        ));
    }
    lifecycle.ready();
    tracing::debug!("ready");

    let stop = match stop_rx.wait_for(Option::is_some).await {
        Ok(stop) => stop.unwrap_or(Stop::Fast),
        Err(_) => Stop::Fast,
    };
    let budget = match stop {
        Stop::Fast => return 0,
        Stop::Graceful => settings.graceful_timeout,
        Stop::Orphaned => {
            tracing::warn!("master is gone; draining and exiting");
            ORPHAN_DRAIN.min(settings.graceful_timeout)
        }
    };
    lifecycle.drain();
    let _ = drain_tx.send(true);
    let drained = tokio::select! {
        drained = tokio::time::timeout(budget, connections.all_closed()) => drained.is_ok(),
        // A fast stop (SIGQUIT/SIGINT) cuts a graceful drain short.
        _ = stop_rx.wait_for(|s| *s == Some(Stop::Fast)) => return 0,
    };
    if !drained {
        tracing::warn!(
            open = connections.open(),
            "graceful timeout reached with connections still open"
        );
    }
    0
}

/// Start the compute thread and prove the model works here with one real inference: it also
/// pages in the weights this process touches and fills the allocator's pools before any client
/// depends on them.
async fn boot(
    embedder: Arc<dyn Embedder>,
    pool: rayon::ThreadPool,
    board: SharedBoard,
    slot: &'static WorkerSlot,
    settings: &WorkerSettings,
) -> Result<Compute, i32> {
    if !settings.boot_delay.is_zero() {
        tracing::warn!(delay = ?settings.boot_delay, "testing: delaying boot (boot_delay)");
        tokio::time::sleep(settings.boot_delay).await;
    }
    let compute = Compute::start(
        embedder,
        pool,
        slot,
        board.metrics,
        settings.max_queue,
        settings.max_batch_tokens,
        settings.compute_stall,
    )
    .map_err(|e| {
        tracing::error!(error = %e, "cannot start the compute thread");
        WORKER_BOOT_ERROR
    })?;
    warm_up(&compute).await.map_err(|e| {
        tracing::error!(error = %e, "warm-up inference failed");
        APP_LOAD_ERROR
    })?;
    Ok(compute)
}

async fn warm_up(compute: &Compute) -> Result<(), String> {
    compute
        .run(|embedder| {
            let tokens = embedder
                .tokenize("forkserve warm-up", None)
                .map_err(|e| e.to_string())?;
            embedder
                .embed_batch(&[&tokens])
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .await
        .map_err(|e| format!("{e:?}"))?
}

/// Beat several times per `timeout`, and notice when the master is gone.
async fn heartbeat(
    lifecycle: Arc<Lifecycle>,
    timeout: Duration,
    master_pid: i32,
    stop: watch::Sender<Option<Stop>>,
) {
    // timeout = 0 (no heartbeat timeout) still beats: the master reads liveness from it.
    let period = match timeout.is_zero() {
        true => Duration::from_millis(500),
        false => (timeout / 4).clamp(Duration::from_millis(50), Duration::from_millis(500)),
    };
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        lifecycle.beat();
        if nix::unistd::getppid().as_raw() != master_pid {
            stop.send_if_modified(|s| set_stop(s, Stop::Orphaned));
        }
    }
}

fn watch_signals(stop: watch::Sender<Option<Stop>>) -> std::io::Result<()> {
    for (kind, what) in [
        (SignalKind::terminate(), Stop::Graceful),
        (SignalKind::interrupt(), Stop::Fast),
        (SignalKind::quit(), Stop::Fast),
    ] {
        let mut stream = signal(kind)?;
        let stop = stop.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                stop.send_if_modified(|s| set_stop(s, what));
            }
        });
    }
    // USR1: logrotate moved the log file; write to a fresh one at the same path.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match crate::logging::reopen() {
                Ok(crate::logging::Reopened::Files(_)) => tracing::info!("reopened the log files"),
                Ok(crate::logging::Reopened::NoFile) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen a log file; keeping the old one")
                }
            }
        }
    });
    // HUP is the master's business (reload); a worker that gets it, e.g. from a terminal
    // hang-up sent to the process group, must not die of it.
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move { while hup.recv().await.is_some() {} });
    Ok(())
}

/// A fast stop overrides a graceful one already under way; nothing else overrides anything.
fn set_stop(current: &mut Option<Stop>, new: Stop) -> bool {
    match current {
        None => {
            *current = Some(new);
            true
        }
        Some(Stop::Graceful | Stop::Orphaned) if new == Stop::Fast => {
            *current = Some(new);
            true
        }
        _ => false,
    }
}
