//! forkserve's master: read the configuration, bind, load the model, then fork and supervise
//! the workers. Everything up to the first fork runs on one thread.

mod arbiter;
mod cli;
mod config;
mod pidfile;
mod scoreboard;
mod signals;
mod sockets;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use forkserve_worker::SentenceEncoder;

use crate::arbiter::Arbiter;
use crate::config::Config;

/// Exit codes of the master.
const EXIT_FAILURE: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = cli::Cli::parse();
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &cli.overrides()) {
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
        // The model directory is part of the configuration: check its files too.
        return match forkserve_worker::model::ModelFiles::locate(&config.model.path) {
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
    init_logging(&config.log.level);
    let span = tracing::info_span!("master", pid = std::process::id());
    let _entered = span.enter();
    match start(config, started) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err((code, message)) => {
            tracing::error!("{message}");
            ExitCode::from(code)
        }
    }
}

fn start(config: Config, started: Instant) -> Result<i32, (u8, String)> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting forkserve");
    // Blocked before anything else so no signal is lost and no thread could catch one.
    let signals = signals::SignalQueue::open()
        .map_err(|e| (EXIT_FAILURE, format!("cannot set up signals: {e}")))?;

    let bound = sockets::bind_all(&config.bind, config.backlog)
        .map_err(|e| (EXIT_FAILURE, format!("bind: {e}")))?;
    for b in &bound {
        tracing::info!("listening at: {}", b.name);
    }

    let loading = Instant::now();
    let model = SentenceEncoder::load(&config.model.path)
        .map_err(|e| (EXIT_CONFIG, format!("model.path: {e}")))?;
    tracing::info!(
        path = %config.model.path.display(),
        load_ms = loading.elapsed().as_millis() as u64,
        "model loaded in the master (shared with workers copy-on-write)"
    );
    arbiter::assert_single_threaded().map_err(|e| (EXIT_FAILURE, e))?;

    let scoreboard = scoreboard::Scoreboard::new(2 * config::MAX_WORKERS)
        .map_err(|e| (EXIT_FAILURE, format!("cannot map the scoreboard: {e}")))?;
    let _pidfile = match &config.pidfile {
        Some(path) => Some(
            pidfile::Pidfile::create(path)
                .map_err(|e| (EXIT_FAILURE, format!("pidfile: {}: {e}", path.display())))?,
        ),
        None => None,
    };
    tracing::info!(
        workers = config.workers,
        threads = config.threads,
        max_requests = config.max_requests,
        startup_ms = started.elapsed().as_millis() as u64,
        "forking workers"
    );
    let listeners = bound.into_iter().map(|b| b.socket).collect();
    let arbiter = Arbiter::new(config, listeners, Arc::new(model), scoreboard, signals)
        .map_err(|e| (EXIT_FAILURE, format!("cannot create the wake-up pipe: {e}")))?;
    Ok(arbiter.run())
}

fn init_logging(level: &str) {
    let level = level
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
