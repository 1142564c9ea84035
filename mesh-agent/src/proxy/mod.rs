//! Forwarding for enrolled pods. `outbound` handles what the pod dials (HBONE to meshed destinations, plaintext
//! passthrough otherwise), `inbound` plaintext arriving at the pod, `hbone_inbound` tunnelled arrivals (the HBONE server on 15008).
//! All of them end in [`forward`], one copy loop with one set of metrics.

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

use mesh_common::bpf::{INBOUND_MARK, OUTBOUND_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::Instrument;

use crate::abort::Abort;
use crate::metrics::{Direction, Flow};
use crate::pod::PodContext;
use crate::state::AgentState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections on one of a pod's capture listeners until the pod is unenrolled (task aborted).
pub async fn serve(listener: TcpListener, direction: Direction, pod: Arc<PodContext>, state: AgentState) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                // One pod must not take every descriptor the agent has: beyond its cap, new connections are reset.
                let slot = match direction {
                    Direction::Outbound => {
                        match pod.outbound_connections.try_take(state.limits().max_connections_per_pod) {
                            Some(slot) => Some(slot),
                            None => {
                                state.metrics().cut(&pod, direction, "connection_limit");
                                tracing::warn!(pod = %pod.name(), limit = state.limits().max_connections_per_pod, "connection limit of the pod reached; resetting");
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
                    identity = pod.identity_string(&state.config()).as_deref().unwrap_or("unknown"),
                    %peer,
                );
                let (pod, state) = (pod.clone(), state.clone());
                // Counted from the accept, so a drain that stops accepting never sees it as gone before it began.
                let active = state.connection_started();
                tokio::spawn(
                    async move {
                        let (_slot, _active) = (slot, active);
                        match direction {
                            Direction::Outbound => outbound::handle(conn, peer, pod, state).await,
                            Direction::Inbound => inbound::handle(conn, peer, pod, state).await,
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
/// labels, `/connections`, the access log). `downstream` is the side that opened the connection, from `client`
/// to `server`. When the copy fails (one side reset or broke), both sides are aborted, so the failure reaches
/// the other end as a reset instead of a clean close.
pub async fn forward<D, U>(
    state: &AgentState,
    pod: &PodContext,
    flow: Flow,
    (client, server): (SocketAddr, SocketAddr),
    downstream: D,
    upstream: U,
) where
    D: AsyncRead + AsyncWrite + Unpin + Abort,
    U: AsyncRead + AsyncWrite + Unpin + Abort,
{
    let started = std::time::Instant::now();
    let open = state.metrics().traffic.open(flow, client, server);
    let bytes = open.bytes().clone();
    let (mut downstream, mut upstream) = (downstream, upstream);
    let result = crate::copy::bidirectional(
        &mut Counted::new(&mut downstream, &bytes.received),
        &mut Counted::new(&mut upstream, &bytes.sent),
    )
    .await;
    if result.is_err() {
        downstream.abort();
        upstream.abort();
    }
    let (received, sent) = (bytes.received.load(Ordering::Relaxed), bytes.sent.load(Ordering::Relaxed));
    let error = result.as_ref().err().map(ToString::to_string);
    crate::telemetry::access_log::connection(
        &state.config(),
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

/// Refuses a connection the agent already accepted: a reset, so the application sees an error, not a clean EOF.
pub fn reset(conn: TcpStream) {
    conn.abort();
}

fn pod_socket(pod: &PodContext, target: SocketAddr, mark: u32) -> io::Result<Socket> {
    let socket = pod.netns.run(|| Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_mark(mark)?;
    Ok(socket)
}

async fn connect_socket(socket: Socket, target: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpSocket::from_std_stream(socket.into()).connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Plaintext connection from inside the pod (its IP as source), never captured again.
pub async fn connect_from_pod(pod: &PodContext, target: SocketAddr) -> io::Result<TcpStream> {
    connect_socket(pod_socket(pod, target, OUTBOUND_MARK)?, target).await
}

/// Counts and logs an inbound connection whose application could not be reached.
pub fn app_unreachable(state: &AgentState, pod: &PodContext, target: SocketAddr, error: &io::Error) {
    state.metrics().failed(pod, Direction::Inbound, "connect");
    tracing::info!(%target, %error, "cannot reach the application");
}

/// Source ports of the agent's transparent connections to applications. The kernel's choice for `bind(ip, 0)`
/// draws only odd ports and treats a port in TIME_WAIT towards *any* destination as taken; as the agent closes
/// first whenever the client does, sustained short connections from one client left it without ports after
/// ~14,000 in a minute (and slowed to a crawl). Taking the whole ephemeral range in turn, with `SO_REUSEADDR`,
/// reuses a port only after every other one, and only a TIME_WAIT of the very same four-tuple blocks it — then
/// the next port is tried — so the agent sustains what the client itself could on a direct path.
const TRANSPARENT_PORTS: (u16, u16) = (32768, 60999);
const TRANSPARENT_PORT_ATTEMPTS: usize = 16;
static NEXT_TRANSPARENT_PORT: AtomicU64 = AtomicU64::new(0);

fn next_transparent_port() -> u16 {
    let (low, high) = TRANSPARENT_PORTS;
    let span = u64::from(high - low) + 1;
    low + (NEXT_TRANSPARENT_PORT.fetch_add(1, Ordering::Relaxed) % span) as u16
}

/// Whether a bind or connect failed only because this source port is taken for the destination.
fn port_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL))
}

/// Connects to the pod's application *as* `client` (transparently), so the application sees the real peer.
/// See `inpod::routing` for how the replies find their way back.
pub async fn connect_to_app(
    state: &AgentState,
    pod: &PodContext,
    target: SocketAddr,
    client: SocketAddr,
) -> io::Result<TcpStream> {
    let client_ip = client.ip().to_canonical();
    if client_ip.is_ipv4() != target.is_ipv4() {
        return connect_socket(pod_socket(pod, target, INBOUND_MARK)?, target).await;
    }
    for _ in 0..TRANSPARENT_PORT_ATTEMPTS {
        let socket = pod_socket(pod, target, INBOUND_MARK)?;
        let source = SocketAddr::new(client_ip, next_transparent_port());
        if let Err(e) = bind_transparent(&socket, source) {
            if port_taken(&e) {
                continue;
            }
            // Still deliver the connection; the application then sees the pod's own address as peer.
            tracing::warn!(error = %e, "cannot preserve the client address towards the application");
            return connect_socket(pod_socket(pod, target, INBOUND_MARK)?, target).await;
        }
        state.capture().announce_agent_connect(source, target.port()).map_err(io::Error::other)?;
        let result = connect_socket(socket, target).await;
        // Only the SYN needs the exemption; an established connection never meets sk_lookup again.
        state.capture().forget_agent_connect(source);
        match result {
            Err(e) if port_taken(&e) => continue,
            other => return other,
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "no free source port towards the application"))
}

/// Binds `socket` transparently to `source`, the client's address with a port the caller chose (known before
/// the SYN, so it can be announced to `sk_lookup`).
fn bind_transparent(socket: &Socket, source: SocketAddr) -> io::Result<()> {
    if source.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with an int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())
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
