//! L4 forwarding for enrolled pods.
//!
//! Outbound: the original destination comes from the kernel (`ORIG_BY_PEER`, keyed by the pod's netns cookie
//! and the client address `accept()` returned); the upstream socket is created inside the pod's netns and marked
//! so capture skips it, so it leaves with the pod's own IP.
//! Inbound: `sk_lookup` delivered the connection unchanged, so its local address is what the client dialled; the
//! agent connects to the application transparently as the client (see `inpod::routing`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_common::bpf::{HBONE_PORT, INBOUND_MARK, INBOUND_PORT, OUTBOUND_MARK, OUTBOUND_PORT};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::Instrument;

use crate::inpod::PodContext;
use crate::metrics::Direction;
use crate::state::AgentState;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-direction copy buffer. 64 KiB keeps a single stream near line rate on loopback/veth while 1000
/// concurrent connections cost ~128 MiB at most; revisit with `cargo xtask bench`.
const COPY_BUFFER: usize = 64 * 1024;

/// Accepts connections on one in-pod listener until the pod is unenrolled (the task is aborted).
pub async fn serve(listener: TcpListener, direction: Direction, pod: Arc<PodContext>, state: AgentState) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let span = tracing::info_span!(
                    "conn",
                    dir = direction.as_str(),
                    pod = %format!("{}/{}", pod.net.namespace, pod.net.name),
                    identity = pod.identity(&state.config()).as_deref().unwrap_or("unknown"),
                    %peer,
                );
                tokio::spawn(handle(conn, peer, direction, pod.clone(), state.clone()).instrument(span));
            }
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning; the backlog keeps the clients waiting.
                tracing::warn!(error = %e, dir = direction.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(conn: TcpStream, peer: SocketAddr, direction: Direction, pod: Arc<PodContext>, state: AgentState) {
    let metrics = state.metrics();
    let labels = [pod.net.namespace.as_str(), pod.net.name.as_str(), direction.as_str()];
    let target = match direction {
        Direction::Outbound => state.capture().take_original_destination(pod.netns.cookie(), peer),
        Direction::Inbound => conn.local_addr().ok().filter(|a| !is_agent_address(a)),
    };
    let Some(target) = target else {
        metrics.original_destination_missing.inc();
        tracing::debug!("no original destination (direct connection to the agent's port?); closing");
        return;
    };
    let upstream = match connect(&state, &pod, target, direction, peer).await {
        Ok(s) => s,
        Err(e) => {
            metrics.connection_failures.with_label_values(&labels).inc();
            tracing::info!(%target, error = %e, "upstream connect failed");
            return;
        }
    };
    metrics.connections_opened.with_label_values(&labels).inc();
    tracing::debug!(%target, "proxying");
    let mut downstream = Counted::new(conn);
    let mut upstream = Counted::new(upstream);
    let result =
        tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, COPY_BUFFER, COPY_BUFFER).await;
    // From the workload's point of view: outbound it is the client (downstream), inbound the server (upstream).
    let (sent, received) = match direction {
        Direction::Outbound => (downstream.read, upstream.read),
        Direction::Inbound => (upstream.read, downstream.read),
    };
    metrics.sent_bytes.with_label_values(&labels).inc_by(sent);
    metrics.received_bytes.with_label_values(&labels).inc_by(received);
    metrics.connections_closed.with_label_values(&labels).inc();
    match result {
        Ok(_) => tracing::debug!(%target, sent, received, "connection closed"),
        Err(e) => tracing::debug!(%target, sent, received, error = %e, "connection ended with an error"),
    }
}

/// Loopback or one of the agent's own ports: never a real destination, and forwarding it would loop.
fn is_agent_address(a: &SocketAddr) -> bool {
    a.ip().is_loopback() || [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&a.port())
}

async fn connect(
    state: &AgentState,
    pod: &PodContext,
    target: SocketAddr,
    direction: Direction,
    client: SocketAddr,
) -> io::Result<TcpStream> {
    let domain = Domain::for_address(target);
    let socket = pod.netns.run(|| Socket::new(domain, Type::STREAM, Some(Protocol::TCP)))??;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let mut announced = None;
    match direction {
        Direction::Outbound => socket.set_mark(OUTBOUND_MARK)?,
        Direction::Inbound => {
            socket.set_mark(INBOUND_MARK)?;
            let client = SocketAddr::new(client.ip().to_canonical(), 0);
            if client.is_ipv4() == target.is_ipv4() {
                match bind_transparent(&socket, client) {
                    Ok(source) => {
                        state.capture().announce_agent_connect(source, target.port()).map_err(io::Error::other)?;
                        announced = Some(source);
                    }
                    // Still deliver the connection; the application then sees the pod's own address as peer.
                    Err(e) => tracing::warn!(error = %e, "cannot preserve the client address towards the application"),
                }
            }
        }
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let result = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        .and_then(|r| r);
    // Only the SYN needs the exemption; an established connection never meets sk_lookup again.
    if let Some(source) = announced {
        state.capture().forget_agent_connect(source);
    }
    result
}

/// Binds `socket` to the client's address (port chosen now, so it can be announced to `sk_lookup`).
fn bind_transparent(socket: &Socket, client: SocketAddr) -> io::Result<SocketAddr> {
    if client.is_ipv4() {
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
    socket.bind(&client.into())?;
    socket.local_addr()?.as_socket().ok_or_else(|| io::Error::other("bound socket has no IP address"))
}

/// A stream that counts the bytes read from it, so totals survive a connection that ends in an error.
struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted { inner, read: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
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
