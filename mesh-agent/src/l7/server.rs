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

use super::client::Io;
use super::detect::Protocol;
use crate::body::Body;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::drain::Trigger;

    /// A connection served over real loopback sockets; the client end, the drain trigger and the serving task.
    /// Each request is answered `ok` after `delay`.
    async fn served(protocol: Protocol, delay: Duration) -> (TcpStream, Trigger, tokio::task::JoinHandle<Ended>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (trigger, drain) = crate::drain::channel();
        let limits = Limits {
            header_timeout: Duration::from_secs(5),
            max_connections_per_pod: 1,
            hbone_idle_timeout: Duration::from_secs(1),
        };
        let task = tokio::spawn(async move {
            serve(server, protocol, &limits, drain, move |_req| async move {
                tokio::time::sleep(delay).await;
                Response::new(crate::body::full("ok"))
            })
            .await
        });
        (client, trigger, task)
    }

    /// Reads one HTTP/1.1 response (head and a 2-byte body) and returns its head.
    async fn response(client: &mut TcpStream) -> String {
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\nok") {
            assert_eq!(client.read(&mut byte).await.unwrap(), 1, "closed mid-response: {bytes:?}");
            bytes.push(byte[0]);
        }
        String::from_utf8(bytes).unwrap().to_ascii_lowercase()
    }

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n";

    #[tokio::test]
    async fn a_draining_http1_connection_answers_with_connection_close_then_closes() {
        let (mut client, trigger, task) = served(Protocol::Http1, Duration::ZERO).await;
        client.write_all(REQUEST).await.unwrap();
        assert!(!response(&mut client).await.contains("connection: close"), "kept alive before the drain");
        trigger.start();
        client.write_all(REQUEST).await.unwrap();
        assert!(response(&mut client).await.contains("connection: close"));
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "the agent closed after the response: {read:?}");
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap(), Ended::Normally);
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_closed_a_moment_after_the_drain_began() {
        let (mut client, trigger, task) = served(Protocol::Http1, Duration::ZERO).await;
        client.write_all(REQUEST).await.unwrap();
        response(&mut client).await;
        let began = std::time::Instant::now();
        trigger.start();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        // Not at once (a request may be on its way) and not after the keep-alive timeout (5 s here).
        let waited = began.elapsed();
        assert!(waited >= crate::drain::IDLE_GRACE && waited < Duration::from_secs(3), "{waited:?}");
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_draining_http2_connection_sends_goaway_and_finishes_the_request_in_flight() {
        let (client, trigger, task) = served(Protocol::Http2, Duration::from_millis(300)).await;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client)).await.unwrap();
        let conn = tokio::spawn(conn);
        let request = Request::get("http://web/").body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let in_flight = tokio::spawn(sender.send_request(request));
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.start();
        assert_eq!(in_flight.await.unwrap().unwrap().status(), 200, "the request in flight was answered");
        // The server's GOAWAY ends the connection once nothing is in flight; the client sees it close cleanly.
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await.expect("GOAWAY closed the connection");
        assert!(ended.unwrap().is_ok(), "a graceful end, not an error");
        assert!(sender.is_closed());
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap(), Ended::Normally);
    }
}
