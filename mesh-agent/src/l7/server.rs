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
use crate::limits::{H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT, Limits};

/// How a served connection ended, as far as the caller counts it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed, or a protocol error ended it (logged at debug).
    Normally,
    /// The agent closed it: a request head did not arrive in time.
    HeaderTimeout,
}

/// Serves HTTP (`protocol`: HTTP/1 with upgrades, or HTTP/2 with prior knowledge) on `io`, each request
/// answered by `handle`, until the connection ends.
pub async fn serve<F, Fut>(io: impl Io, protocol: Protocol, limits: &Limits, handle: F) -> Ended
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let span = tracing::Span::current();
    let svc = service_fn(move |req: Request<Incoming>| {
        let handle = handle.clone();
        async move { Ok::<_, Infallible>(handle(req).await) }.instrument(span.clone())
    });
    let io = TokioIo::new(io);
    let result = match protocol {
        Protocol::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .initial_stream_window_size(crate::hbone::STREAM_WINDOW)
                .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW)
                .max_frame_size(crate::hbone::MAX_FRAME)
                .serve_connection(io, svc)
                .await
        }
        _ => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
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
