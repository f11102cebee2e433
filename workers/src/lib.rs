//! What runs inside a forkserve worker: the HTTP app, the model, the clustering, and the
//! worker's side of the master–worker protocol.

pub mod access_log;
pub mod busy;
pub mod cluster;
pub mod compute;
pub mod embedder;
pub mod heap;
pub mod http;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod model;
pub mod probe;
pub mod proctitle;
pub mod protocol;
pub mod settings;
pub mod shared_metrics;
pub mod worker;

pub use embedder::{Embedder, Tokens};
pub use model::SentenceEncoder;
pub use worker::{run, WorkerContext};
