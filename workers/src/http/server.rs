//! Accepting on the inherited listeners and driving HTTP/1.1 connections, with keep-alive
//! expiry and a drain that never closes a connection under a request.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::app::{App, ResponseBody};
use super::head_guard::HeadGuard;
use crate::listener::Listener;
use crate::protocol::{monotonic_ms, WorkerSlot, WorkerState};
use crate::shared_metrics::SharedBoard;

/// While draining, an idle keep-alive connection is closed once it has been idle this long. A
/// client under load sends its next request well within it and gets `Connection: close` on the
/// response instead, which no client mistakes for an error.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ConnectionSettings {
    pub keepalive: Duration,
    pub header_timeout: Duration,
    /// `limit_request_fields`: hyper answers 431 past it.
    pub max_headers: usize,
}

/// Open connections of this worker, so that a drain knows when it is done, and so that
/// accepting can favour the least busy worker.
#[derive(Clone)]
pub struct Connections {
    slot: &'static WorkerSlot,
    board: SharedBoard,
    closed: Arc<tokio::sync::Notify>,
}

impl Connections {
    pub fn new(slot: &'static WorkerSlot, board: SharedBoard) -> Connections {
        Connections {
            slot,
            board,
            closed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Whether another serving worker has fewer open connections than this one.
    pub fn busier_than_another_worker(&self) -> bool {
        let mine = self.slot.connections();
        self.board.slots.iter().any(|s| {
            !std::ptr::eq(s, self.slot)
                && matches!(s.state(), WorkerState::Ready | WorkerState::Retiring)
                && s.connections() < mine
        })
    }

    pub fn open(&self) -> usize {
        self.slot.connections() as usize
    }

    /// Wait until every connection is closed.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn track(&self) -> ConnectionGuard {
        self.slot.add_connections(1);
        ConnectionGuard(self.clone())
    }
}

struct ConnectionGuard(Connections);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.slot.add_connections(-1);
        self.0.closed.notify_waiters();
    }
}

/// Accept until the drain starts; then drop the listener (other workers keep accepting on the
/// same socket).
pub async fn accept_loop(
    listener: Listener,
    app: Arc<App>,
    settings: ConnectionSettings,
    connections: Connections,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        let busier = || connections.busier_than_another_worker();
        let accepted = tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => return,
            accepted = listener.accept(&busier) => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                let guard = connections.track();
                let app = app.clone();
                let settings = settings.clone();
                let draining = draining.clone();
                tokio::spawn(async move {
                    match stream {
                        crate::listener::Stream::Tcp(s) => {
                            let _ = s.set_nodelay(true);
                            serve_connection(s, remote, app, settings, draining).await
                        }
                        crate::listener::Stream::Unix(s) => {
                            serve_connection(s, remote, app, settings, draining).await
                        }
                    }
                    drop(guard);
                });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning on a readable socket.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// When the connection last did something, and whether a request is in progress.
struct Activity {
    in_flight: AtomicU32,
    last_ms: AtomicU64,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(monotonic_ms().saturating_sub(last)))
    }

    fn touch(&self) {
        self.last_ms.store(monotonic_ms(), Ordering::Release);
    }
}

/// One request of a connection, from its head until its response body is done (or dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request `Busy` (if streamed) until hyper has sent it or
/// dropped it.
struct TrackedBody {
    body: ResponseBody,
    _busy: Option<Busy>,
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BodyError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn serve_connection<S>(
    stream: S,
    remote: String,
    app: Arc<App>,
    settings: ConnectionSettings,
    mut draining: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicU32::new(0),
        last_ms: AtomicU64::new(monotonic_ms()),
    });
    let remote: Arc<str> = remote.into();
    let (stream, defects) = HeadGuard::new(stream);
    // Requests of this connection so far: hyper calls the service once per request, in order.
    let requests = Arc::new(AtomicU64::new(0));
    let refusals = (app.clone(), remote.clone());
    let service = {
        let activity = activity.clone();
        service_fn(move |req| {
            let app = app.clone();
            let activity = activity.clone();
            let remote = remote.clone();
            let defect = defects.of_request(requests.fetch_add(1, Ordering::Relaxed));
            async move {
                let busy = Busy::start(activity);
                let response = app.handle(req, &remote, defect).await;
                // A streamed body (which may take minutes) keeps its request in flight until
                // it is sent, so the keep-alive and drain timers do not take the connection
                // for idle meanwhile; a whole body is done now.
                let streamed = matches!(response.body(), http_body_util::Either::Right(_));
                let busy = streamed.then_some(busy);
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _busy: busy }))
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .max_headers(settings.max_headers)
        // A client may close its sending side and still wait for the answer (RFC 9112 §9.6).
        .half_close(true)
        // keepalive = 0: one request per connection, answered with `Connection: close`
        // (gunicorn's meaning).
        .keep_alive(!settings.keepalive.is_zero())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);

    let mut closing = false;
    loop {
        let limit = if *draining.borrow() {
            DRAIN_IDLE_GRACE
        } else if settings.keepalive.is_zero() {
            // No keep-alive: hyper closes after the response; a connection that sends
            // nothing is bounded by the header timeout.
            settings.header_timeout
        } else {
            settings.keepalive
        };
        // Sleep until this connection could have been idle for `limit`; a busy one is checked
        // again a full period later.
        let wait = match activity.idle_for() {
            Some(idle) => limit.saturating_sub(idle),
            None => limit,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    // hyper answered 400 (or 431) itself for a head it could not parse.
                    if e.is_parse() || e.is_parse_too_large() {
                        let status = if e.is_parse_too_large() { 431 } else { 400 };
                        refusals.0.refused_while_parsing(&refusals.1, status, &e.to_string());
                    } else {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                return;
            }
            _ = draining.changed(), if !closing => {}
            _ = tokio::time::sleep(wait), if !closing => {
                if activity.idle_for().is_some_and(|idle| idle >= limit) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
