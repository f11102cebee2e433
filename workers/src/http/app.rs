//! Routing and handlers. Handlers see an `Embedder` (through the compute thread) and wire types,
//! never candle or hyper internals beyond the request and response.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::errors::ApiError;
use super::types::{
    parse_cluster_request, ClusterRequest, ClusterResponse, HealthResponse, RequestLimits,
};
use crate::cluster::community_detection;
use crate::compute::{Compute, ComputeError};
use crate::embedder::{embed_all, EmbedError, Embedder, Tokens};
use crate::lifecycle::Lifecycle;
use crate::settings::WorkerSettings;

pub static X_WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

/// The routes this server knows, and which methods each takes.
enum Route {
    Cluster,
    Health,
    WrongMethod { allow: &'static str },
    Unknown,
}

fn route(method: &Method, path: &str) -> Route {
    match (path, method) {
        ("/cluster", &Method::POST) => Route::Cluster,
        ("/cluster", _) => Route::WrongMethod { allow: "POST" },
        ("/health", &Method::GET | &Method::HEAD) => Route::Health,
        ("/health", _) => Route::WrongMethod { allow: "GET, HEAD" },
        _ => Route::Unknown,
    }
}

pub struct App {
    compute: Compute,
    settings: Arc<WorkerSettings>,
    pid: HeaderValue,
    lifecycle: Arc<Lifecycle>,
}

impl App {
    pub fn new(compute: Compute, settings: Arc<WorkerSettings>, lifecycle: Arc<Lifecycle>) -> App {
        App {
            compute,
            settings,
            pid: HeaderValue::from(std::process::id()),
            lifecycle,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let result = match route(req.method(), req.uri().path()) {
            Route::Cluster => self.cluster(req).await,
            Route::Health => Ok(self.health()),
            Route::WrongMethod { allow } => Err(ApiError::MethodNotAllowed { allow }),
            Route::Unknown => Err(ApiError::NotFound(req.uri().path().to_owned())),
        };
        let mut response = result.unwrap_or_else(ApiError::into_response);
        let headers = response.headers_mut();
        headers.insert(X_WORKER_PID.clone(), self.pid.clone());
        self.lifecycle.request_done();
        if self.lifecycle.is_draining() {
            // This worker is going away: tell the client to open its next request elsewhere
            // rather than have the connection closed under it.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    fn health(&self) -> Response<Full<Bytes>> {
        if self.lifecycle.is_draining() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &HealthResponse { status: "draining" },
            )
        } else {
            json_response(StatusCode::OK, &HealthResponse { status: "ok" })
        }
    }

    async fn cluster(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let body = read_json(req, self.settings.max_body_bytes).await?;
        let limits = RequestLimits {
            max_sentences: self.settings.max_sentences,
        };
        let request = parse_cluster_request(body, limits, &self.settings.cluster)?;
        let max_batch_tokens = self.settings.max_batch_tokens;
        let response = self
            .compute
            .run(move |embedder| cluster_sentences(embedder, request, max_batch_tokens))
            .await
            .map_err(compute_error)??;
        Ok(json_response(StatusCode::OK, &response))
    }
}

/// Tokenize, embed and cluster; runs on the compute thread.
fn cluster_sentences(
    embedder: &dyn Embedder,
    request: ClusterRequest,
    max_batch_tokens: usize,
) -> Result<ClusterResponse, ApiError> {
    let tokens = request
        .sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            embedder
                .tokenize(s)
                .map_err(|e| ApiError::validation(format!("sentences[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<Tokens>, ApiError>>()?;
    let vectors = embed_all(embedder, &tokens, max_batch_tokens).map_err(embed_error)?;
    let clustering = community_detection(&vectors, request.threshold, request.min_cluster_size);
    let texts = |idx: &[usize]| -> Vec<String> {
        idx.iter().map(|&i| request.sentences[i].clone()).collect()
    };
    Ok(ClusterResponse {
        clusters: clustering.clusters.iter().map(|c| texts(c)).collect(),
        unclustered: texts(&clustering.unclustered),
        indices: clustering.clusters,
        unclustered_indices: clustering.unclustered,
        algorithm: request.algorithm,
        threshold: request.threshold,
        min_cluster_size: request.min_cluster_size,
    })
}

fn embed_error(e: EmbedError) -> ApiError {
    match e {
        EmbedError::Tokenize(m) => ApiError::validation("sentences", m),
        EmbedError::Inference(m) => ApiError::Internal(m),
    }
}

fn compute_error(e: ComputeError) -> ApiError {
    match e {
        ComputeError::QueueFull => {
            ApiError::Overloaded("this worker's queue is full; retry shortly".into())
        }
        ComputeError::Failed => ApiError::Internal("internal error while computing".into()),
    }
}

/// Read a JSON body: the media type, the size (before buffering when the client announces
/// it, and while buffering otherwise), UTF-8, then the JSON syntax, each with its own error.
async fn read_json(req: Request<Incoming>, max_bytes: usize) -> Result<Value, ApiError> {
    require_json_content_type(&req)?;
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = ApiError::PayloadTooLarge { limit: max_bytes };
    if announced.is_some_and(|n| n > max_bytes as u64)
        || req.body().size_hint().lower() > max_bytes as u64
    {
        return Err(too_large);
    }
    let bytes = Limited::new(req.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large.clone()
            } else {
                ApiError::InvalidJson(format!("could not read the body: {e}"))
            }
        })?
        .to_bytes();
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(ApiError::InvalidUtf8(format!(
            "invalid byte sequence at offset {}",
            e.valid_up_to()
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

fn require_json_content_type(req: &Request<Incoming>) -> Result<(), ApiError> {
    let value = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media_type == "application/json" || media_type.ends_with("+json") {
        Ok(())
    } else if media_type.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "missing Content-Type; send the body as application/json".into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {media_type:?} is not supported; send application/json"
        )))
    }
}

pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => ApiError::Internal(format!("cannot serialise the response: {e}")).into_response(),
    }
}
