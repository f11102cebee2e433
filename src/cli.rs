//! Command-line flags. Each overrides the config file key of the same name.

use std::path::PathBuf;

use clap::Parser;

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "forkserve",
    version,
    about = "Prefork HTTP server for sentence embeddings and clustering: the model is loaded \
             once in the master and shared copy-on-write by every worker."
)]
pub struct Cli {
    /// Config file (TOML). Default: conf/forkserve.toml if it exists.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (HOST:PORT, [V6]:PORT or unix:PATH); repeat for several.
    #[arg(short = 'b', long = "bind", value_name = "ADDRESS")]
    pub bind: Vec<String>,
    /// Number of worker processes.
    #[arg(short = 'w', long)]
    pub workers: Option<usize>,
    /// Compute threads per worker.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Model directory (model.safetensors, tokenizer.json, config.json).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Requests after which a worker is replaced (0 = never).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Random extra requests (0..=N) per worker before it is replaced.
    #[arg(long)]
    pub max_requests_jitter: Option<u64>,
    /// Seconds of silence after which a worker is killed.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Seconds a new worker has to become ready.
    #[arg(long, value_name = "SECONDS")]
    pub boot_timeout: Option<f64>,
    /// Seconds a stopping worker has to finish its requests.
    #[arg(long, value_name = "SECONDS")]
    pub graceful_timeout: Option<f64>,
    /// Log level: trace, debug, info, warn, error.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Validate the configuration and exit (0 if valid, 2 if not).
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective configuration (file + environment + flags) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// GET /health at HOST:PORT and exit 0 if it answers 200, 1 otherwise (a container
    /// HEALTHCHECK that needs no curl in the image).
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["check_config", "print_config"])]
    pub health_check: Option<String>,
}

impl Cli {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            bind: self.bind.clone(),
            workers: self.workers,
            threads: self.threads,
            model: self.model.clone(),
            max_requests: self.max_requests,
            max_requests_jitter: self.max_requests_jitter,
            timeout: self.timeout,
            boot_timeout: self.boot_timeout,
            graceful_timeout: self.graceful_timeout,
            log_level: self.log_level.clone(),
        }
    }
}
