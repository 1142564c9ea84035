//! The agent's HTTP server side, built one way for both of its uses — a pod's requests to a Service
//! (`outbound`) and requests for a pod whose policies look at each one (`inbound`) — so both carry the same
//! bounds (`crate::limits`): an HTTP/1 request head must arrive within the header timeout, the first one and
//! each one after a response (the keep-alive idle timeout); HTTP/2 peers must answer keep-alive pings. Before,
//! a client could open connections, send half a request head and hold them for as long as it liked.

use std::convert::Infallible;
use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::Instrument;

use super::body::Body;
use super::client::Io;
use super::detect::Protocol;
use crate::drain::Drain;
use crate::limits::{H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT, Limits};

/// How a served connection ended, as far as the caller counts it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed, or a protocol error ended it (logged at debug).
    Normally,
    /// The agent closed it: a request head did not arrive in time.
    HeaderTimeout,
}

/// Drives a hyper server connection until it ends; once the agent drains (after `grace`), asks it to shut down
/// gracefully (HTTP/2: GOAWAY; HTTP/1: close when idle, after the response in flight otherwise) and lets it finish.
macro_rules! serve_until_drained {
    ($conn:expr, $drain:expr, $grace:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let mut drain = $drain;
        tokio::select! {
            result = conn.as_mut() => result,
            _ = async { drain.started().await; tokio::time::sleep($grace).await } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Serves HTTP (`protocol`: HTTP/1 with upgrades, or HTTP/2 with prior knowledge) on `io`, each request
/// answered by `handle`, until the connection ends or, once `drain` begins, has been moved off (`crate::drain`).
pub async fn serve<F, Fut>(io: impl Io, protocol: Protocol, limits: &Limits, drain: Drain, handle: F) -> Ended
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let span = tracing::Span::current();
    // HTTP/1 clients learn from the response that they must reconnect; HTTP/2 has GOAWAY for it (and forbids
    // the header).
    let close_when_draining = (protocol != Protocol::Http2).then(|| drain.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        let (handle, close) = (handle.clone(), close_when_draining.clone());
        async move {
            let mut response = handle(req).await;
            if close.is_some_and(|d| d.is_draining()) {
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
        .instrument(span.clone())
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .initial_stream_window_size(crate::hbone::STREAM_WINDOW)
                .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW)
                .max_frame_size(crate::hbone::MAX_FRAME)
                .serve_connection(io, svc);
            serve_until_drained!(conn, drain, std::time::Duration::ZERO)
        }
        _ => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, svc)
                .with_upgrades();
            serve_until_drained!(conn, drain, crate::drain::IDLE_GRACE)
        }
    };
    match result {
        Ok(()) => Ended::Normally,
        Err(e) if e.is_timeout() => Ended::HeaderTimeout,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP connection ended");
            Ended::Normally
        }
    }
}
