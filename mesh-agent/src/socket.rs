//! The sockets the data path opens, from inside a pod's netns: plaintext connections as the pod, and transparent
//! connections to a pod's application as the original client. Below `proxy` and `l7`, which both use them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mesh_common::bpf::{INBOUND_MARK, OUTBOUND_MARK};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::abort::Abort;
use crate::pod::PodContext;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What proxied connections need of the traffic capture.
pub trait Steering: Send + Sync {
    /// Where a connection accepted on the outbound listener was going (recorded by the eBPF program, once).
    fn take_original_destination(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr>;
    /// The agent's socket bound to `source` is about to connect to `port` in a pod: not to be steered back to it.
    fn announce_agent_connect(&self, source: SocketAddr, port: u16) -> std::io::Result<()>;
    fn forget_agent_connect(&self, source: SocketAddr);
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

/// The source port for a transparent connection of `client` to the application: the next one in turn, but never
/// the client's own. The client's connection to the application's address is itself in the pod (captured, served
/// by the agent): a SYN with the same four-tuple is delivered to that established socket, not to the
/// application's listener, and goes unanswered until the connect times out — seen as one reset in a thousand
/// concurrent connections. (Another live connection's port can collide the same way; those end and the SYN's
/// retransmit gets through.)
fn transparent_port_for(client: SocketAddr, next: impl Fn() -> u16) -> u16 {
    let port = next();
    if port == client.port() { next() } else { port }
}

/// Whether a bind or connect failed only because this source port is taken for the destination.
fn port_taken(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL))
}

/// Connects to the pod's application *as* `client` (transparently), so the application sees the real peer.
/// See `inpod::routing` for how the replies find their way back.
pub async fn connect_to_app(
    steering: &dyn Steering,
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
        let source = SocketAddr::new(client_ip, transparent_port_for(client, next_transparent_port));
        if let Err(e) = bind_transparent(&socket, source) {
            if port_taken(&e) {
                continue;
            }
            // Still deliver the connection; the application then sees the pod's own address as peer.
            tracing::warn!(error = %e, "cannot preserve the client address towards the application");
            return connect_socket(pod_socket(pod, target, INBOUND_MARK)?, target).await;
        }
        steering.announce_agent_connect(source, target.port())?;
        let result = connect_socket(socket, target).await;
        // Only the SYN needs the exemption; an established connection never meets sk_lookup again.
        steering.forget_agent_connect(source);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transparent_connection_never_takes_the_clients_own_port() {
        let client: SocketAddr = "10.0.0.2:40000".parse().unwrap();
        let turn = std::cell::Cell::new(39_999u16);
        let next = || {
            turn.set(turn.get() + 1);
            turn.get()
        };
        assert_eq!(transparent_port_for(client, next), 40_001, "the client's port is skipped");
        assert_eq!(transparent_port_for(client, next), 40_002);
    }
}
