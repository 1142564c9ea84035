//! The sending side of HBONE: a pool of mTLS HTTP/2 connections per (source pod, destination, identities),
//! each carrying up to [`MAX_STREAMS_PER_CONNECTION`] tunnelled connections. Connections are opened from inside
//! the source pod's netns, so the tunnel leaves with the pod's IP. A connection made with a certificate that has
//! since been rotated takes no new streams: new connections present the new certificate.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, Method, Request, StatusCode, Version};
use mesh_common::bpf::OUTBOUND_MARK;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use super::{ALPN, CONNECTION_WINDOW, H2Stream, MAX_FRAME, MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW, message};
use crate::baggage;
use crate::identity::verifier::{ForeignTrustDomain, SvidServerVerifier};
use crate::identity::{Identity, SecretManager, WorkloadCert};
use crate::netns::NetNs;
use crate::tunnels::{TunnelGuard, TunnelView};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("mTLS handshake with {0}: {1}")]
    Tls(SocketAddr, io::Error),
    #[error("HTTP/2 with {0}: {1}")]
    H2(SocketAddr, h2::Error),
    #[error("{0} refused the tunnel with HTTP {1}")]
    Refused(SocketAddr, u16),
    #[error("{0}")]
    Setup(String),
}

impl HboneError {
    /// Short reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Connect(..) => "connect",
            HboneError::Tls(_, e) if ForeignTrustDomain::cause_of(e).is_some() => "foreign_trust_domain",
            HboneError::Tls(..) => "tls",
            HboneError::H2(..) => "http2",
            HboneError::Refused(_, 401 | 403) => "denied",
            HboneError::Refused(..) => "refused",
            HboneError::Setup(_) => "setup",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    netns_cookie: u64,
    dst: SocketAddr,
    src_identity: Identity,
    dst_identity: Identity,
}

struct Conn {
    sender: SendRequest<Bytes>,
    /// Serial of the certificate the connection was made with.
    serial: String,
    streams: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// When the last stream ended.
    idle_since: Mutex<Instant>,
}

impl Conn {
    /// Still worth keeping: open, and either busy or used within `idle_timeout`.
    fn keep(&self, now: Instant, idle_timeout: Duration) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        self.streams.load(Ordering::Acquire) > 0
            || now.duration_since(*self.idle_since.lock().unwrap_or_else(|p| p.into_inner())) < idle_timeout
    }
}

/// Keeps a pooled connection's stream slot while a tunnelled connection uses it.
pub struct StreamSlot(Arc<Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

#[derive(Clone)]
pub struct Pool {
    idle_timeout: Duration,
    conns: Arc<Mutex<HashMap<Key, Vec<Arc<Conn>>>>>,
    /// One dial at a time per key: a burst of new connections waits for the connection being set up and
    /// shares it, instead of each opening its own.
    dialing: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>>,
}

/// Everything needed to open a tunnel from one pod.
pub struct Source<'a> {
    /// Where a new connection is counted, and listed while it lives.
    pub metrics: &'a crate::metrics::Metrics,
    pub tunnels: &'a crate::tunnels::Tunnels,
    pub netns: &'a NetNs,
    pub cert: &'a WorkloadCert,
    pub secrets: &'a SecretManager,
    pub pod: &'a str,
    /// The pod's metadata for its CONNECTs (`baggage`), the address it connects from (`forwarded`), and the
    /// trace context they carry (`traceparent`).
    pub baggage: Option<HeaderValue>,
    pub client: IpAddr,
    pub traceparent: HeaderValue,
}

impl Pool {
    /// Opens a tunnelled connection to `authority` through the agent at `dst` (the destination pod's 15008),
    /// which must prove `dst_identity`.
    pub async fn open(
        &self,
        src: &Source<'_>,
        dst: SocketAddr,
        dst_identity: &Identity,
        authority: SocketAddr,
    ) -> Result<(H2Stream, StreamSlot), HboneError> {
        let (response, send, slot) = self.connect(src, dst, dst_identity, authority, false).await?;
        Ok((H2Stream::new(send, response.into_body()), slot))
    }

    /// Opens a way for the calling agent's requests (for an application speaking `protocol`) to the workload at
    /// `authority`: straight on the connection when the peer agent takes them so (it answers the offer, see
    /// [`message::DIRECT_HEADER`]), otherwise a plain tunnel to the workload for the application's own protocol.
    pub async fn open_l7(
        &self,
        src: &Source<'_>,
        dst: SocketAddr,
        dst_identity: &Identity,
        authority: SocketAddr,
        protocol: &'static str,
    ) -> Result<L7Channel, HboneError> {
        let (response, mut send, slot) = self.connect(src, dst, dst_identity, authority, true).await?;
        let direct = response.headers().contains_key(message::DIRECT_HEADER);
        src.metrics.hbone_l7_channels.with_label_values(&[if direct { "direct" } else { "tunnel" }]).inc();
        if direct {
            // The offer was taken: this stream has served its purpose.
            let _ = send.send_data(Bytes::new(), true);
            return Ok(L7Channel::Direct(Channel { slot, authority, protocol }));
        }
        Ok(L7Channel::Tunnel(H2Stream::new(send, response.into_body()), slot))
    }

    /// Sends the CONNECT for `authority` on a pooled (or new) connection and waits for its 200. A failure of the
    /// connection itself (not the peer's answer to the CONNECT) is counted by reason.
    async fn connect(
        &self,
        src: &Source<'_>,
        dst: SocketAddr,
        dst_identity: &Identity,
        authority: SocketAddr,
        offer_direct: bool,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>, StreamSlot), HboneError> {
        let result = self.try_connect(src, dst, dst_identity, authority, offer_direct).await;
        if let Err(e) = &result
            && !matches!(e, HboneError::Refused(..))
        {
            src.metrics.hbone_failed(crate::metrics::Direction::Outbound, e.reason());
        }
        result
    }

    async fn try_connect(
        &self,
        src: &Source<'_>,
        dst: SocketAddr,
        dst_identity: &Identity,
        authority: SocketAddr,
        offer_direct: bool,
    ) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>, StreamSlot), HboneError> {
        let key = Key {
            netns_cookie: src.netns.cookie(),
            dst,
            src_identity: src.cert.identity.clone(),
            dst_identity: dst_identity.clone(),
        };
        // A pooled connection may have died since it was last used: one retry on a fresh one.
        for attempt in 0..2 {
            let conn = match self.checkout(&key, &src.cert.svid.serial) {
                Some(c) if attempt == 0 => c,
                // Boxed: the dial (TCP, TLS, HTTP/2 handshakes) is rare and large, and every tunnelled connection
                // would otherwise carry room for it in its state for as long as it lives.
                _ => Box::pin(self.checkout_or_dial(&key, src)).await?,
            };
            let slot = StreamSlot(conn.clone());
            let sender = match conn.sender.clone().ready().await {
                Ok(s) => s,
                Err(e) => {
                    conn.closed.store(true, Ordering::Release);
                    if attempt == 0 {
                        continue;
                    }
                    return Err(HboneError::H2(dst, e));
                }
            };
            match connect_stream(sender, src, dst, authority, offer_direct).await {
                Ok((response, send)) => return Ok((response, send, slot)),
                // The peer agent is draining (GOAWAY) or refused the stream unprocessed: the connection takes no
                // more tunnels, and nothing reached the destination, so a fresh connection may carry this one.
                Err(HboneError::H2(_, e)) if attempt == 0 && super::never_processed(&e) => {
                    conn.closed.store(true, Ordering::Release);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(HboneError::Setup("no usable connection".into()))
    }

    pub fn new(idle_timeout: Duration) -> Self {
        Pool { idle_timeout, conns: Default::default(), dialing: Default::default() }
    }

    /// Dead and long-idle connections leave the pool (dropping the last handle closes them gracefully).
    fn drop_unused(&self, conns: &mut HashMap<Key, Vec<Arc<Conn>>>, now: Instant) {
        conns.retain(|_, list| {
            list.retain(|c| c.keep(now, self.idle_timeout));
            !list.is_empty()
        });
        // A burst to many destinations must not leave its table behind either.
        if conns.capacity() > 4 * conns.len().max(8) {
            conns.shrink_to_fit();
        }
        // A dial lock nobody waits on, for a destination with no connection left, goes too.
        let mut dialing = self.dialing.lock().unwrap_or_else(|p| p.into_inner());
        dialing.retain(|key, lock| Arc::strong_count(lock) > 1 || conns.contains_key(key));
    }

    /// Closes idle connections even when no new tunnel comes to look at the pool: an HTTP/2 connection's
    /// stream tables keep the size of the largest burst it carried (3,000 streams: about 1 MiB on each side)
    /// for as long as it lives.
    pub async fn close_idle_connections(self) {
        let every = (self.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            tokio::time::sleep(every).await;
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            self.drop_unused(&mut conns, Instant::now());
        }
    }

    /// A live connection made with the current certificate and room for one more stream (slot taken).
    fn checkout(&self, key: &Key, serial: &str) -> Option<Arc<Conn>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        // Here for every destination as well: the pool stays small, so this is cheap.
        self.drop_unused(&mut conns, Instant::now());
        let list = conns.get_mut(key)?;
        // Idle connections made with a rotated certificate leave too.
        list.retain(|c| c.serial == serial || c.streams.load(Ordering::Acquire) > 0);
        list.iter()
            .find(|c| {
                c.serial == serial
                    && c.streams
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n < MAX_STREAMS_PER_CONNECTION).then_some(n + 1)
                        })
                        .is_ok()
            })
            .cloned()
    }

    async fn checkout_or_dial(&self, key: &Key, src: &Source<'_>) -> Result<Arc<Conn>, HboneError> {
        let lock = self.dialing.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let _dialing = lock.lock().await;
        if let Some(conn) = self.checkout(key, &src.cert.svid.serial) {
            return Ok(conn);
        }
        self.dial(key, src).await
    }

    async fn dial(&self, key: &Key, src: &Source<'_>) -> Result<Arc<Conn>, HboneError> {
        let dst = key.dst;
        let socket = src
            .netns
            .run(|| -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                s.set_nonblocking(true)?;
                s.set_tcp_nodelay(true)?;
                s.set_mark(OUTBOUND_MARK)?;
                Ok(s)
            })
            .and_then(|r| r)
            .map_err(|e| HboneError::Connect(dst, e))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpSocket::from_std_stream(socket.into()).connect(dst))
            .await
            .map_err(|_| HboneError::Connect(dst, io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
            .map_err(|e| HboneError::Connect(dst, e))?;

        let verifier = Arc::new(SvidServerVerifier {
            bundle: src.secrets.bundle(),
            provider: src.secrets.provider(),
            expected: Some(key.dst_identity.clone()),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(src.secrets.provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HboneError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OwnCert(src.cert.certified_key.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(dst.ip().into()), tcp)
            .await
            .map_err(|e| HboneError::Tls(dst, e))?;
        // TLS 1.3 ends the client's handshake before the server has checked this side's certificate; a server
        // that refuses it sends an alert and closes. Written to in the meantime, it resets instead and the alert
        // is lost (the refusal looked like a broken HTTP/2 connection). So wait for its first bytes — every
        // HTTP/2 server opens with SETTINGS — before writing: one round trip per new connection, and a refusal
        // reads as what it is. They stay buffered for h2.
        let mut tls = tls;
        match tokio::time::timeout(CONNECT_TIMEOUT, tls.fill_buf()).await {
            Ok(Ok(first)) if !first.is_empty() => {}
            Ok(Ok(_)) => return Err(HboneError::Tls(dst, io::ErrorKind::UnexpectedEof.into())),
            Ok(Err(e)) => return Err(HboneError::Tls(dst, e)),
            Err(_) => return Err(HboneError::Tls(dst, io::ErrorKind::TimedOut.into())),
        }

        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| HboneError::H2(dst, e))?;
        src.metrics.hbone_connections.with_label_values(&[crate::metrics::Direction::Outbound.as_str()]).inc();
        let closed = Arc::new(AtomicBool::new(false));
        let guard: TunnelGuard = src.tunnels.open(TunnelView::outbound(
            src.pod,
            &key.src_identity,
            &src.cert.svid.serial,
            &key.dst_identity,
            dst,
        ));
        let done = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%dst, error = %e, "HBONE connection ended");
            }
            done.store(true, Ordering::Release);
            drop(guard);
        });
        // The dialler's own stream is the first one on the connection.
        let conn = Arc::new(Conn {
            sender,
            serial: src.cert.svid.serial.clone(),
            streams: AtomicUsize::new(1),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().push(conn.clone());
        Ok(conn)
    }

    /// Drops the pool's connections from one pod (it left); they close once their streams finish.
    pub fn forget_pod(&self, netns_cookie: u64) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.netns_cookie != netns_cookie);
        self.dialing.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.netns_cookie != netns_cookie);
    }
}

/// Sends the CONNECT with what ztunnel sends on one: `baggage` (the source's metadata), `forwarded` (the original
/// client) and the source's `traceparent`.
async fn connect_stream(
    mut sender: SendRequest<Bytes>,
    src: &Source<'_>,
    dst: SocketAddr,
    authority: SocketAddr,
    offer_direct: bool,
) -> Result<(http::Response<h2::RecvStream>, h2::SendStream<Bytes>), HboneError> {
    let mut request = Request::builder().method(Method::CONNECT).uri(authority.to_string()).version(Version::HTTP_2);
    if offer_direct {
        request = request.header(message::DIRECT_HEADER, "1");
    }
    let mut request = request.body(()).map_err(|e| HboneError::Setup(e.to_string()))?;
    let headers = request.headers_mut();
    if let Some(baggage) = &src.baggage {
        headers.insert(baggage::BAGGAGE, baggage.clone());
    }
    headers.insert(baggage::FORWARDED, baggage::forwarded_for(src.client));
    headers.insert(baggage::TRACEPARENT, src.traceparent.clone());
    let (response, send) = sender.send_request(request, false).map_err(|e| HboneError::H2(dst, e))?;
    let response = response.await.map_err(|e| HboneError::H2(dst, e))?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Refused(dst, response.status().as_u16()));
    }
    Ok((response, send))
}

/// How the calling agent's requests reach one workload (see [`Pool::open_l7`]).
pub enum L7Channel {
    /// Each request is a stream of its own on the HBONE connection.
    Direct(Channel),
    /// The peer does not take them: a plain tunnel to the workload, for the application's own protocol.
    Tunnel(H2Stream, StreamSlot),
}

/// Requests to one workload sent straight on a pooled HBONE connection. The connection counts it as one of its
/// streams while it lives, so it stays open for as long as requests may come.
pub struct Channel {
    slot: StreamSlot,
    authority: SocketAddr,
    protocol: &'static str,
}

impl Channel {
    pub fn is_closed(&self) -> bool {
        self.slot.0.closed.load(Ordering::Acquire)
    }

    /// Sends `request` (HTTP/2 form: absolute URI, no connection headers) and returns the response head with
    /// its body. A request body is sent by a task of its own, alongside the response (bidirectional streaming).
    pub async fn send(
        &self,
        request: Request<crate::body::Body>,
    ) -> Result<http::Response<message::RecvBody>, h2::Error> {
        let (mut parts, body) = request.into_parts();
        let target = http::HeaderValue::try_from(self.authority.to_string()).map_err(|_| h2::Reason::INTERNAL_ERROR)?;
        parts.headers.insert(message::TARGET_HEADER, target);
        parts.headers.insert(super::L7_HEADER, http::HeaderValue::from_static(self.protocol));
        let end = http_body::Body::is_end_stream(&body);
        let sent = async {
            let mut sender = self.slot.0.sender.clone().ready().await?;
            let (response, send) = sender.send_request(Request::from_parts(parts, ()), end)?;
            if !end {
                tokio::spawn(async move {
                    if let Err(e) = message::send_body(body, send).await {
                        tracing::debug!(error = %e, "request body not sent to its end");
                    }
                });
            }
            response.await
        };
        match sent.await {
            Ok(response) => Ok(response.map(message::RecvBody::new)),
            Err(e) => {
                // The peer agent drains (GOAWAY) or refuses streams: this channel takes no more requests, so the
                // caller's next one opens a channel on a fresh connection.
                if super::never_processed(&e) {
                    self.slot.0.closed.store(true, Ordering::Release);
                }
                Err(e)
            }
        }
    }
}

/// Presents the source workload's certificate.
#[derive(Debug)]
struct OwnCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
