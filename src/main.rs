//! forkserve's master: read the configuration, bind, load the model, then fork and supervise
//! the workers. Everything up to the first fork runs on one thread.

mod arbiter;
mod cli;
mod config;
mod healthcheck;
mod memory;
mod model_probe;
mod pidfile;
mod privileges;
mod reexec;
mod registry;
mod scoreboard;
mod signals;
mod sockets;
mod systemd;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Instant;

use forkserve_worker::model::ModelIdentity;
use forkserve_worker::{logging, Embedder, SentenceEncoder};

use crate::arbiter::{Arbiter, MasterParts};
use crate::config::{Config, ConfigSource};
use crate::pidfile::Pidfile;
use crate::reexec::{Invocation, Upgrade};

/// Exit codes of the master (3, workers failing to boot, is the arbiter's).
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let started = Instant::now();
    tune_allocator();
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" that print and exit 0.
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if cli.print_default_config {
        print!("{}", config::default_config_file());
        return ExitCode::SUCCESS;
    }
    if cli.print_settings_table {
        print!("{}", config::settings_table());
        return ExitCode::SUCCESS;
    }
    if let Some(address) = &cli.health_check {
        return match healthcheck::probe(address, std::time::Duration::from_secs(2)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("forkserve: health check of {address}: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    // How we were started, for a USR2 re-exec; and the sockets a previous master handed us.
    let invocation = Invocation::capture();
    let inherited_fds = std::env::var(sockets::INHERITED_FDS_ENV).ok();
    // Socket activation: systemd's listening sockets, if they are meant for this process.
    let activated = systemd::activation_fds(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id() as i32,
    );
    // Sound: no thread exists yet. Removed so our own children never see them (a USR2 master
    // gets the sockets through FORKSERVE_FDS instead), as sd_listen_fds(3) does.
    for var in [
        sockets::INHERITED_FDS_ENV,
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        std::env::remove_var(var);
    }
    let activated = match activated {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("forkserve: socket activation: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    let source = ConfigSource {
        path: cli.config.clone(),
        env: utf8_env(std::env::vars_os()),
        flags: cli.flags.clone(),
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("forkserve: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if cli.check_config {
        // The model directory is part of the configuration: check what its files ask for
        // (modules, encoder, tokenizer, pooling, Dense layers, prompts), without loading the
        // weights.
        return match forkserve_worker::model::check(&config.model.path) {
            Ok(_) => {
                println!("forkserve: configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("forkserve: configuration error: model.path: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    if let Some(mask) = config.umask {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    if let Err(e) = logging::init(
        config.log.level,
        config.log.file.as_deref(),
        config.log.format,
    ) {
        eprintln!("forkserve: configuration error: log.file: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(path) = config.log.access_log_file.as_deref() {
        if let Err(e) = logging::init_access(path) {
            eprintln!("forkserve: configuration error: log.access_log_file: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let span = tracing::info_span!("master", pid = std::process::id());
    let _entered = span.enter();
    // The arguments were read above (clap, the re-exec invocation): the title may reuse their
    // memory now.
    forkserve_worker::proctitle::set(&format!("forkserve: master [{}]", config.proc_name()));
    let sockets = Sockets {
        upgrade: inherited_fds,
        activated,
    };
    match start(config, source, invocation, sockets, started) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err((code, message)) => {
            tracing::error!("{message}");
            ExitCode::from(code)
        }
    }
}

/// Listening sockets the master did not bind itself.
struct Sockets {
    /// From the master that started this one by USR2 (`FORKSERVE_FDS`).
    upgrade: Option<String>,
    /// From systemd's socket activation (`LISTEN_FDS`).
    activated: Option<Vec<i32>>,
}

fn start(
    config: Config,
    source: ConfigSource,
    invocation: Invocation,
    sockets: Sockets,
    started: Instant,
) -> Result<i32, (u8, String)> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting forkserve");
    // Blocked before anything else so no signal is lost and no thread could catch one.
    let signals = signals::SignalQueue::open()
        .map_err(|e| (EXIT_FAILURE, format!("cannot set up signals: {e}")))?;

    let upgraded_from = sockets
        .upgrade
        .as_ref()
        .map(|_| nix::unistd::getppid().as_raw());
    let socket_activated = sockets.activated.is_some();
    let listeners = match (&sockets.upgrade, &sockets.activated) {
        (Some(fds), _) => {
            sockets::inherit(fds).map_err(|e| (EXIT_FAILURE, format!("inherited sockets: {e}")))?
        }
        (None, Some(fds)) => {
            let list: Vec<String> = fds.iter().map(i32::to_string).collect();
            sockets::inherit(&list.join(","))
                .map_err(|e| (EXIT_FAILURE, format!("socket activation: {e}")))?
        }
        // An address another live process holds is a conflict of configurations (exit 2, as
        // a bad configuration); other failures (permissions, no such interface) exit 1.
        (None, None) => sockets::bind_all(&config.bind, config.backlog, config.socket_mode)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => (EXIT_CONFIG, format!("bind: {e}")),
                _ => (EXIT_FAILURE, format!("bind: {e}")),
            })?,
    };
    for b in &listeners {
        match upgraded_from {
            Some(old) => tracing::info!(old_master = old, "listening at: {} (inherited)", b.name),
            None if socket_activated => {
                tracing::info!("listening at: {} (from systemd)", b.name)
            }
            None => tracing::info!("listening at: {}", b.name),
        }
    }
    if socket_activated {
        tracing::info!(
            "socket activation: `bind` is not used; systemd's sockets are never re-bound"
        );
    }

    let loading = Instant::now();
    let model_identity = ModelIdentity::of(&config.model.path);
    config::check_model_pin(&config.model).map_err(|e| (EXIT_CONFIG, e))?;
    let model = SentenceEncoder::load_with(
        &config.model.path,
        config.model.backend,
        config.model.precision,
    )
    .map_err(|e| (EXIT_CONFIG, format!("model.path: {e}")))?;
    let seconds_per_token =
        model_probe::check(&model, config::secs(config.boot_timeout)).map_err(|e| {
            (
                EXIT_CONFIG,
                format!("model.path: {}: {e}", config.model.path.display()),
            )
        })?;
    model_probe::check_step_time(
        config.max_batch_tokens,
        config.timeout,
        model.info(),
        seconds_per_token,
    )
    .map_err(|e| (EXIT_CONFIG, e))?;
    let info = model.info();
    // What the many-rows kernel sizes its row blocks by: read here, before fork, whatever the
    // log level (a disabled log line does not evaluate its fields), so that the workers
    // inherit it instead of each reading sysfs in its first pass.
    let l2_kib = forkserve_worker::model::linear::l2_cache_bytes() >> 10;
    tracing::info!(
        path = %config.model.path.display(),
        load_ms = loading.elapsed().as_millis() as u64,
        backend = config.model.backend.name(),
        precision = config.model.precision.name(),
        // Which product kernels this CPU runs (gemm where it lacks AVX2, FMA and F16C).
        kernels = forkserve_worker::model::linear::best_isa().map_or("gemm", |isa| isa.name()),
        l2_kib,
        architecture = %info.model_type,
        pooling = %info.pooling.join("+"),
        dimension = info.dimension,
        max_tokens = info.max_tokens,
        normalized = info.normalized,
        "model loaded in the master (shared with workers copy-on-write)"
    );
    arbiter::assert_single_threaded().map_err(|e| (EXIT_FAILURE, e))?;

    let scoreboard = scoreboard::Scoreboard::new(2 * config::MAX_WORKERS)
        .map_err(|e| (EXIT_FAILURE, format!("cannot map the scoreboard: {e}")))?;
    let pidfile = match &config.pidfile {
        Some(path) => {
            // A master started by USR2 writes <pidfile>.2 until the old master exits.
            let target = match upgraded_from {
                Some(_) => Pidfile::upgrade_path(path),
                None => path.clone(),
            };
            Some(Pidfile::create(&target).map_err(|e| {
                let code = match e.kind() {
                    std::io::ErrorKind::AlreadyExists => EXIT_CONFIG,
                    _ => EXIT_FAILURE,
                };
                (code, format!("pidfile: {}: {e}", target.display()))
            })?)
        }
        None => None,
    };
    if let Some((uid, gid)) = config.run_as {
        tracing::info!(uid, gid, "workers will run as another user");
    }
    tracing::info!(
        workers = config.workers,
        threads = config.threads,
        max_requests = config.max_requests,
        startup_ms = started.elapsed().as_millis() as u64,
        "forking workers"
    );
    let parts = MasterParts {
        source,
        bindings: listeners,
        model,
        model_identity,
        seconds_per_token,
        scoreboard,
        signals,
        socket_activated,
        upgrade: Upgrade::new(invocation, upgraded_from, pidfile),
    };
    let arbiter = Arbiter::new(config, parts)
        .map_err(|e| (EXIT_FAILURE, format!("cannot create the wake-up pipe: {e}")))?;
    Ok(arbiter.run())
}

/// glibc's malloc raises its mmap threshold each time a large block is freed, so large blocks
/// (a request's activations, its body) end up in the heap, where they fragment it: a worker's
/// private memory crept up by ~10-30 % over 20,000 requests before levelling off (tests/
/// reliability.rs, `make soak`), and the master's heap kept ~50 MB of freed loading buffers
/// that every worker inherits. A fixed threshold gives every block of 128 KiB or more its own
/// mapping, returned to the kernel when freed. Set before anything allocates much, in the
/// master; the workers inherit it through fork.
fn tune_allocator() {
    const LARGE: i32 = 128 * 1024;
    // SAFETY: mallopt only sets allocator parameters and is called first thing in main, while
    // the process has one thread and nothing else is allocating.
    let ok = unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, LARGE) == 1
            && nix::libc::mallopt(nix::libc::M_TRIM_THRESHOLD, LARGE) == 1
    };
    if !ok {
        eprintln!("forkserve: warning: could not set malloc's thresholds");
    }
}

/// The environment as UTF-8 pairs; variables that are not UTF-8 cannot be config keys.
fn utf8_env(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<(String, String)> {
    vars.filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}
