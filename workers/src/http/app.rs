//! Routing and handlers. Handlers see an `Embedder` (through the compute thread) and wire types,
//! never candle or hyper internals beyond the request and response.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, REFERER, USER_AGENT,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::auth::ApiKey;
use super::errors::ApiError;
use super::routes::{Handler, Route};
use super::types::{
    parse_cluster_request, HealthResponse, InfoResponse, RequestLimits, ALGORITHMS,
};
use super::{metrics, openapi, pages};
use crate::compute::Compute;
use crate::embedder::ModelInfo;
use crate::lifecycle::Lifecycle;
use crate::settings::WorkerSettings;
use crate::shared_metrics::SharedBoard;

pub static X_WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

/// A response body: whole, or lines streamed as they are produced (`/cluster` with
/// `Accept: application/x-ndjson`).
pub type ResponseBody = Either<Full<Bytes>, LineStream>;

/// A body fed by a channel, one frame per line. When the client goes, hyper drops it, and the
/// producer sees its channel closed.
pub struct LineStream(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl LineStream {
    pub fn channel() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, LineStream) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (tx, LineStream(rx))
    }
}

impl Body for LineStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|bytes| Ok(Frame::data(bytes))))
    }
}

pub struct App {
    pub(super) compute: Compute,
    pub(super) settings: Arc<WorkerSettings>,
    lifecycle: Arc<Lifecycle>,
    board: SharedBoard,
    pub(super) model: ModelInfo,
    /// `/openapi.json`, rendered once with this server's limits.
    openapi: Bytes,
    pid: HeaderValue,
    api_key: Option<ApiKey>,
}

/// What the access log needs from a request, taken before its body is consumed.
struct RequestLine {
    method: Method,
    target: String,
    version: hyper::Version,
    /// The request's headers, kept for the access log (its format may show any of them).
    headers: hyper::HeaderMap,
}

impl App {
    pub fn new(
        compute: Compute,
        settings: Arc<WorkerSettings>,
        lifecycle: Arc<Lifecycle>,
        board: SharedBoard,
        model: ModelInfo,
    ) -> App {
        let openapi = openapi::document(&openapi::SpecLimits {
            max_sentences: settings.max_sentences,
            cluster_max_sentences: settings.cluster.max_sentences,
            dimension: model.dimension,
            model: settings.model_name.clone(),
            prompts: model.prompts.keys().cloned().collect(),
            vocab_size: model.vocab_size,
            api_key: settings.api_key.is_some(),
        })
        .to_string()
        .into();
        let api_key = settings.api_key.as_deref().map(ApiKey::new);
        App {
            compute,
            settings,
            lifecycle,
            board,
            model,
            openapi,
            pid: HeaderValue::from(std::process::id()),
            api_key,
        }
    }

    /// Answer one request. `head_defect` is what the connection's `HeadGuard` found wrong in
    /// this request's raw head, if anything.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        remote: &str,
        head_defect: Option<&'static str>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let _in_flight = self.lifecycle.request_started();
        let line = RequestLine {
            method: req.method().clone(),
            target: req.uri().to_string(),
            version: req.version(),
            headers: match self.settings.access_log {
                true => req.headers().clone(),
                false => hyper::HeaderMap::new(),
            },
        };
        let route = Route::of(req.uri().path());
        // Limits first: a request past them is refused whatever its path; then the key, then
        // the route.
        let checked = match head_defect {
            Some(why) => Err(ApiError::MalformedRequest(why.to_string())),
            None => self.check_request(&req, &line.target),
        };
        let handler = checked
            .and_then(|()| self.authorize(route, &req))
            .and_then(|()| match route.handler(req.method()) {
                Ok(h) => Ok(h),
                Err("") => Err(ApiError::NotFound(req.uri().path().to_string())),
                Err(allow) => Err(ApiError::MethodNotAllowed { allow }),
            });
        let result = match handler {
            Ok(h) => self.dispatch(h, req).await,
            Err(e) => Err(e),
        };
        let mut response = result.unwrap_or_else(|e| {
            match route.is_openai() {
                true => e.into_openai_response(),
                false => e.into_response(),
            }
            .map(Either::Left)
        });
        let headers = response.headers_mut();
        headers.insert(X_WORKER_PID.clone(), self.pid.clone());
        if self.lifecycle.is_draining() {
            // This worker is going away: tell the client to open its next request elsewhere
            // rather than have the connection closed under it.
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let elapsed = started.elapsed();
        self.board.metrics.count_request(
            route.index(),
            response.status().as_u16(),
            elapsed.as_secs_f64(),
        );
        if self.settings.access_log {
            self.access_log(remote, &line, &response, elapsed);
        }
        self.lifecycle.request_done();
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        handler: Handler,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ApiError> {
        if handler == Handler::Cluster {
            let stream = accepts_ndjson(req.headers());
            let body = read_json(req, self.settings.cluster.max_body_bytes).await?;
            let request = parse_cluster_request(body, &self.settings.cluster)?;
            return match stream {
                true => Ok(self.cluster_stream(request)),
                false => {
                    let response = self.cluster(request, None).await?;
                    Ok(json_response(StatusCode::OK, &response).map(Either::Left))
                }
            };
        }
        self.dispatch_whole(handler, req)
            .await
            .map(|r| r.map(Either::Left))
    }

    /// The routes whose answer is one JSON (or text) body.
    async fn dispatch_whole(
        &self,
        handler: Handler,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let max_body = self.settings.max_body_bytes;
        match handler {
            Handler::Cluster => Err(ApiError::Internal("/cluster is dispatched apart".into())),
            Handler::Embed => self.embed(read_json(req, max_body).await?).await,
            Handler::EmbedAll => self.embed_all(read_json(req, max_body).await?).await,
            Handler::Similarity => self.similarity(read_json(req, max_body).await?).await,
            Handler::Tokenize => self.tokenize(read_json(req, max_body).await?).await,
            Handler::Decode => self.decode(read_json(req, max_body).await?).await,
            Handler::OpenAiEmbeddings => self.openai(read_json(req, max_body).await?).await,
            Handler::Models => Ok(self.models()),
            Handler::Model => self.model(req.uri().path()),
            Handler::Info => Ok(json_response(StatusCode::OK, &self.info())),
            Handler::Health => Ok(self.health()),
            Handler::Metrics => Ok(text_response(
                metrics::CONTENT_TYPE,
                metrics::render(&self.board),
            )),
            Handler::OpenApi => Ok(text_response("application/json", self.openapi.clone())),
            Handler::Docs => Ok(text_response("text/html; charset=utf-8", pages::DOCS)),
            Handler::Page => Ok(text_response("text/html; charset=utf-8", pages::INDEX)),
        }
    }

    /// With `api_key` set, every route but the health checks (and `/metrics` when
    /// `metrics_public`) needs `Authorization: Bearer <key>`.
    fn authorize(&self, route: Route, req: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        if route.is_public() || (route == Route::Metrics && self.settings.metrics_public) {
            return Ok(());
        }
        key.check(req.headers())
    }

    /// What hyper's parser lets through but a strict server refuses before any handler sees
    /// the request: gunicorn's `limit_request_line` and `limit_request_field_size` (hyper
    /// enforces `limit_request_fields`), and ambiguous framing that request smuggling feeds
    /// on (RFC 9112 §6.1, §6.3): Transfer-Encoding with Content-Length, or in HTTP/1.0, or
    /// not ending in a single `chunked`; repeated Host, Content-Length or Content-Type;
    /// methods that are not upper-case tokens; `*` and authority-form targets with the wrong
    /// method.
    fn check_request(&self, req: &Request<Incoming>, target: &str) -> Result<(), ApiError> {
        let limits = self.settings.limits;
        // "METHOD SP target SP HTTP/1.1"
        let line = req.method().as_str().len() + target.len() + 10;
        if line > limits.request_line {
            return Err(ApiError::RequestLineTooLong {
                limit: limits.request_line,
            });
        }
        let headers = req.headers();
        if let Some((name, _)) = headers
            .iter()
            // As gunicorn counts it: the whole "Name: value" line with its CRLF.
            .find(|(n, v)| n.as_str().len() + v.len() + 4 > limits.field_size)
        {
            return Err(ApiError::HeaderTooLarge {
                name: name.to_string(),
                limit: limits.field_size,
            });
        }
        let malformed = |m: &str| Err(ApiError::MalformedRequest(m.to_string()));
        // gunicorn's rule: 3 to 20 characters, no lower case (methods are case-sensitive and
        // a lower-case one is almost always a client bug), no '#'.
        let method = req.method().as_str();
        if !(3..=20).contains(&method.len())
            || method.bytes().any(|b| b.is_ascii_lowercase() || b == b'#')
        {
            return malformed("the method must be 3 to 20 upper-case token characters");
        }
        for name in [hyper::header::HOST, CONTENT_LENGTH, CONTENT_TYPE] {
            if headers.get_all(&name).iter().count() > 1 {
                return malformed(&format!("repeated {name} header"));
            }
        }
        if contradicting_scheme_headers(headers) {
            return malformed(
                "X-Forwarded-Proto, X-Forwarded-Protocol and X-Forwarded-Ssl disagree on the scheme",
            );
        }
        let codings: Vec<String> = headers
            .get_all(hyper::header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| {
                v.to_str()
                    .unwrap_or("\u{0}")
                    .split(',')
                    .map(|c| c.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect();
        if !codings.is_empty() {
            if req.version() == hyper::Version::HTTP_10 {
                return malformed("Transfer-Encoding in an HTTP/1.0 request");
            }
            if headers.contains_key(CONTENT_LENGTH) {
                return malformed("both Transfer-Encoding and Content-Length");
            }
            let chunked = codings.iter().filter(|c| *c == "chunked").count();
            if chunked != 1 || codings.last().map(String::as_str) != Some("chunked") {
                return malformed("Transfer-Encoding must end with a single chunked");
            }
        }
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400.
        if req.version() == hyper::Version::HTTP_11 && !headers.contains_key(hyper::header::HOST) {
            return malformed("HTTP/1.1 request without a Host header (RFC 9112 §3.2)");
        }
        if req.method() == Method::CONNECT {
            return Err(ApiError::NotAProxy);
        }
        if let Some(expect) = headers.get(hyper::header::EXPECT) {
            if !expect
                .to_str()
                .is_ok_and(|e| e.trim().eq_ignore_ascii_case("100-continue"))
            {
                return Err(ApiError::ExpectationFailed(format!(
                    "Expect: {}: only 100-continue is supported",
                    String::from_utf8_lossy(expect.as_bytes())
                )));
            }
        }
        // Bodies are read as they come: a compressed one would be JSON to nobody.
        for coding in headers.get_all(hyper::header::CONTENT_ENCODING) {
            let coding = String::from_utf8_lossy(coding.as_bytes()).to_string();
            if coding
                .split(',')
                .any(|c| !c.trim().is_empty() && !c.trim().eq_ignore_ascii_case("identity"))
            {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "unsupported content encoding {:?}: send the body uncompressed",
                    coding.trim()
                )));
            }
        }
        let target = req.uri();
        if target.scheme().is_none()
            && target.authority().is_some()
            && req.method() != Method::CONNECT
        {
            return malformed("an authority-form target is only for CONNECT");
        }
        if target.path() == "*" && req.method() != Method::OPTIONS {
            return malformed("an asterisk-form target is only for OPTIONS");
        }
        Ok(())
    }

    pub(super) fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_sentences: self.settings.max_sentences,
            dimension: self.model.dimension,
            vocab_size: self.model.vocab_size,
        }
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

    fn info(&self) -> InfoResponse {
        let model = &self.model;
        InfoResponse {
            model_id: self.settings.model_name.clone(),
            model_dtype: model.precision.dtype(),
            architecture: model.architecture.clone(),
            model_type: model.model_type.clone(),
            pooling: model.pooling.join("+"),
            dense: model.dense.clone(),
            normalized: model.normalized,
            dimension: model.dimension,
            max_input_length: model.max_tokens,
            prompts: model.prompts.clone(),
            default_prompt_name: model.default_prompt_name.clone(),
            similarity_fn_name: model.similarity.clone(),
            max_sentences: self.settings.max_sentences,
            max_body_bytes: self.settings.max_body_bytes,
            max_batch_tokens: self.settings.max_batch_tokens,
            cluster_algorithms: ALGORITHMS,
            default_threshold: self.settings.cluster.threshold,
            default_min_cluster_size: self.settings.cluster.min_cluster_size,
            cluster_max_sentences: self.settings.cluster.max_sentences,
            cluster_max_body_bytes: self.settings.cluster.max_body_bytes,
            cluster_max_agglomerative_sentences: self.settings.cluster.max_agglomerative_sentences,
            version: env!("CARGO_PKG_VERSION"),
            worker_pid: std::process::id(),
        }
    }
}

/// Whether the headers proxies use to pass the client's scheme say both https and not https
/// (gunicorn's `secure_scheme_headers`, refused when they disagree).
fn contradicting_scheme_headers(headers: &hyper::HeaderMap) -> bool {
    const SECURE: [(&str, &str); 3] = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-protocol", "ssl"),
        ("x-forwarded-ssl", "on"),
    ];
    let mut says = SECURE.iter().flat_map(|(name, secure)| {
        headers
            .get_all(*name)
            .iter()
            .map(move |v| v.as_bytes().eq_ignore_ascii_case(secure.as_bytes()))
    });
    match says.next() {
        Some(first) => says.any(|s| s != first),
        None => false,
    }
}

impl App {
    /// One line per request: in gunicorn's format to the access log's own file (or stdout),
    /// or else into the error log as a structured event (JSON fields with `log.format =
    /// "json"`). Client-controlled values are quoted and escaped either way.
    /// A request hyper refused while parsing its head (it answers 400 or 431 itself and
    /// closes): it never reaches `handle`, and is logged and counted all the same.
    pub fn refused_while_parsing(&self, remote: &str, status: u16, why: &str) {
        self.board
            .metrics
            .count_request(Route::Other.index(), status, 0.0);
        if !self.settings.access_log {
            return;
        }
        if let Some(format) = &self.settings.access_log_format {
            let none = hyper::HeaderMap::new();
            let record = crate::access_log::Record {
                remote,
                method: "-",
                target: "-",
                version: "-",
                status,
                length: None,
                duration: std::time::Duration::ZERO,
                request_headers: &none,
                response_headers: &none,
                time: std::time::SystemTime::now(),
            };
            if crate::logging::write_access(&format.line(&record)) {
                return;
            }
        }
        let pid = std::process::id();
        tracing::info!(target: "forkserve::access", remote, request = "-", status, length = 0,
            refused = ?why, pid, "access");
    }

    fn access_log(
        &self,
        remote: &str,
        line: &RequestLine,
        response: &Response<ResponseBody>,
        elapsed: std::time::Duration,
    ) {
        let length = response.body().size_hint().exact();
        let version = format!("{:?}", line.version);
        if let Some(format) = &self.settings.access_log_format {
            let record = crate::access_log::Record {
                remote,
                method: line.method.as_str(),
                target: &line.target,
                version: &version,
                status: response.status().as_u16(),
                length,
                duration: elapsed,
                request_headers: &line.headers,
                response_headers: response.headers(),
                time: std::time::SystemTime::now(),
            };
            if crate::logging::write_access(&format.line(&record)) {
                return;
            }
        }
        let text = |name: HeaderName| {
            line.headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| "-".into())
        };
        let request = format!("{} {} {version}", line.method, line.target);
        let (referer, user_agent) = (text(REFERER), text(USER_AGENT));
        let duration_s = format!("{:.6}", elapsed.as_secs_f64());
        let (status, length, pid) = (
            response.status().as_u16(),
            length.unwrap_or(0),
            std::process::id(),
        );
        if crate::logging::is_json() {
            tracing::info!(target: "forkserve::access", remote, request, status, length,
                referer, user_agent, duration_s, pid, "access");
        } else {
            // Text lines quote and escape what the client sent (Debug formatting), so that a
            // user agent cannot append fields of its own.
            tracing::info!(target: "forkserve::access", remote, request = ?request, status,
                length, referer = ?referer, user_agent = ?user_agent, duration_s, pid, "access");
        }
    }
}

/// Read a JSON body: the media type, the size (before buffering when the client announces
/// it, and while buffering otherwise), UTF-8, then the JSON syntax, each with its own error.
/// Whether the client asked for newline-delimited JSON (`Accept: application/x-ndjson`, as
/// one of its media ranges, not refused with q=0).
fn accepts_ndjson(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            media.eq_ignore_ascii_case("application/x-ndjson") && !refused
        })
}

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
    decode_json(&bytes)
}

/// A request body as JSON: UTF-8 first (naming the offset of the first bad byte), then
/// serde_json, whose recursion limit (128) refuses deep nesting before it can overflow a
/// stack. Public for the fuzz target `fuzz/fuzz_targets/cluster_request.rs`.
pub fn decode_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::InvalidUtf8(format!(
            "invalid byte sequence at offset {}",
            e.valid_up_to()
        )));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
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

fn text_response(content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
