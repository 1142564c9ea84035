//! Forwarding for enrolled pods. `outbound` handles what the pod dials (HBONE to meshed destinations, plaintext
//! passthrough otherwise), `inbound` plaintext arriving at the pod, `hbone_inbound` tunnelled arrivals (the HBONE server on 15008).
//! All of them end in [`forward`], one copy loop with one set of metrics.

pub mod admission;
pub mod hbone_inbound;
pub mod hbone_requests;
pub mod inbound;
pub mod outbound;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::abort::Abort;
use crate::dataplane::DataPlane;
use crate::metrics::{Direction, Flow};
use crate::pod::PodContext;
use crate::socket::reset;
use admission::Admitted;

/// Accepts connections on one of a pod's capture listeners until the pod is unenrolled (task aborted).
pub async fn serve(listener: TcpListener, direction: Direction, pod: Arc<PodContext>, dp: DataPlane) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                // One pod must not take every descriptor the agent has: beyond its cap, new connections are reset.
                let slot = match direction {
                    Direction::Outbound => {
                        match pod.outbound_connections.try_take(dp.limits().max_connections_per_pod) {
                            Some(slot) => Some(slot),
                            None => {
                                dp.metrics().cut(&pod, direction, "connection_limit");
                                tracing::warn!(pod = %pod.name(), limit = dp.limits().max_connections_per_pod, "connection limit of the pod reached; resetting");
                                reset(conn);
                                continue;
                            }
                        }
                    }
                    Direction::Inbound => None,
                };
                // Small writes (protocol headers, request/response traffic) must not wait for delayed ACKs.
                let _ = conn.set_nodelay(true);
                let span = tracing::info_span!(
                    "conn",
                    dir = direction.as_str(),
                    pod = %pod.name(),
                    identity = pod.identity_string(&dp.config()).as_deref().unwrap_or("unknown"),
                    %peer,
                );
                let (pod, dp) = (pod.clone(), dp.clone());
                // Counted from the accept, so a drain that stops accepting never sees it as gone before it began.
                let active = dp.connection_started();
                tokio::spawn(
                    async move {
                        let (_slot, _active) = (slot, active);
                        match direction {
                            Direction::Outbound => outbound::handle(conn, peer, pod, dp).await,
                            Direction::Inbound => inbound::handle(conn, peer, pod, dp).await,
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning; the backlog keeps clients waiting.
                tracing::warn!(error = %e, dir = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Copies both ways with half-close until both sides are done, and accounts for it (metrics with `flow`'s
/// labels, `/connections`, the access log, with the trace id of a tunnel's `CONNECT`). `downstream` is the side that opened the connection, from `client`
/// to `server`. When the copy fails (one side reset or broke), both sides are aborted, so the failure reaches
/// the other end as a reset instead of a clean close. An inbound connection comes with what it was `admitted`
/// as, and ends (reset) when a later config does not admit it ([`admission`]).
pub async fn forward<D, U>(
    dp: &DataPlane,
    pod: &PodContext,
    (flow, trace_id): (Flow, Option<Arc<str>>),
    (client, server): (SocketAddr, SocketAddr),
    (downstream, upstream): (D, U),
    admitted: Option<Admitted>,
) where
    D: AsyncRead + AsyncWrite + Unpin + Abort,
    U: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let started = std::time::Instant::now();
    let open = dp.metrics().traffic.open(flow, (client, server), trace_id);
    let bytes = open.bytes().clone();
    let (mut downstream, mut upstream) = (downstream, upstream);
    let (mut down, mut up) = (Counted::new(&mut downstream, &bytes.received), Counted::new(&mut upstream, &bytes.sent));
    let copy = crate::copy::bidirectional(&mut down, &mut up);
    let result = match admitted {
        Some(admitted) => admission::while_admitted(dp, pod, admitted, copy).await,
        None => copy.await,
    };
    if result.is_err() {
        downstream.abort();
        upstream.abort();
    }
    let (received, sent) = (bytes.received.load(Ordering::Relaxed), bytes.sent.load(Ordering::Relaxed));
    let error = result.as_ref().err().map(ToString::to_string);
    crate::telemetry::access_log::connection(
        &dp.config(),
        pod,
        open.info(),
        started.elapsed(),
        received,
        sent,
        error.as_deref(),
    );
    drop(open);
    match result {
        Ok(_) => tracing::debug!(sent, received, "connection closed"),
        Err(e) => tracing::debug!(sent, received, error = %e, "connection ended with an error"),
    }
}

/// Counts and logs an inbound connection whose application could not be reached.
pub fn app_unreachable(dp: &DataPlane, pod: &PodContext, target: SocketAddr, error: &io::Error) {
    dp.metrics().failed(pod, Direction::Inbound, "connect");
    tracing::info!(%target, %error, "cannot reach the application");
}

/// A stream that counts the bytes read from it into a shared counter, so `/connections` and the metrics see
/// them while the connection lasts, and totals survive a connection that ends in an error.
struct Counted<'a, S> {
    inner: S,
    read: &'a AtomicU64,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: S, read: &'a AtomicU64) -> Self {
        Counted { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
