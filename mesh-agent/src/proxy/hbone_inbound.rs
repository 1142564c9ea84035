//! The receiving side of HBONE: the pod's 15008 listener terminates mTLS with the pod's own certificate,
//! requires a client SVID from the trust bundle, and serves `CONNECT` streams to the pod's addresses after
//! authorization, connecting to the application as the original client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use mesh_common::telemetry::Reporters;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::baggage;
use crate::dataplane::DataPlane;
use crate::hbone::{ALPN, CONNECTION_WINDOW, H2Stream, MAX_FRAME, STREAM_WINDOW, message};
use crate::identity::svid::{self, Svid};
use crate::identity::verifier::{ForeignTrustDomain, SvidClientVerifier};
use crate::l7::detect::Protocol;
use crate::l7::inbound::{self as l7_inbound, Session};
use crate::metrics::Direction;
use crate::metrics::{Flow, Security};
use crate::pod::PodContext;
use crate::policy;
use crate::proxy;
use crate::proxy::admission::Admitted;
use crate::proxy::hbone_requests::{self, Requests};
use crate::snapshot::Snapshot;
use crate::socket;
use crate::tunnels::TunnelView;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a peer may open at once on one connection (its pool opens more connections beyond its own limit).
const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Presents the certificate of the pod's current identity (looked up per handshake, so config changes and
/// rotations apply to the next connection).
#[derive(Debug)]
struct PodCert {
    pod: Arc<PodContext>,
    dp: DataPlane,
}

impl ResolvesServerCert for PodCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let identity = self.pod.identity(&self.dp.config())?;
        Some(self.dp.secrets()?.current(&identity)?.certified_key.clone())
    }
}

pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, dp: DataPlane) {
    let Some(secrets) = dp.secrets() else { return };
    let verifier = Arc::new(SvidClientVerifier { bundle: secrets.bundle(), provider: secrets.provider() });
    let config = match rustls::ServerConfig::builder_with_provider(secrets.provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => {
            let mut c = b
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(PodCert { pod: pod.clone(), dp: dp.clone() }));
            c.alpn_protocols = vec![ALPN.to_vec()];
            c
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HBONE TLS configuration");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // HEADERS and the first DATA frame are separate small writes: no Nagle between them.
                let _ = tcp.set_nodelay(true);
                let span = tracing::info_span!("hbone", pod = %pod.name(), %peer);
                tokio::spawn(connection(tcp, peer, acceptor.clone(), pod.clone(), dp.clone()).instrument(span));
            }
            Err(e) => {
                tracing::warn!(error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor, pod: Arc<PodContext>, dp: DataPlane) {
    let _active = dp.connection_started();
    let metrics = dp.metrics();
    // A pod just enrolled may still be waiting for its first certificate: a caller arriving meanwhile waits for
    // it (within the handshake timeout) instead of being refused for want of a certificate to present.
    let local = pod.identity(&dp.config());
    let handshake = async {
        if let (Some(secrets), Some(identity)) = (dp.secrets(), &local) {
            let _ = secrets.fetch(identity).await;
        }
        acceptor.accept(tcp).await
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(foreign) = ForeignTrustDomain::cause_of(&e) {
                metrics.hbone_failed(Direction::Inbound, "foreign_trust_domain");
                tracing::info!(peer_identity = %foreign.identity, "mTLS handshake refused: the peer's trust domain is not the mesh's nor one of its aliases");
                return;
            }
            metrics.hbone_failed(Direction::Inbound, "tls");
            tracing::info!(error = %e, "mTLS handshake refused");
            return;
        }
        Err(_) => {
            metrics.hbone_failed(Direction::Inbound, "tls_timeout");
            return;
        }
    };
    // The verifier accepted the chain and the SVID rules; read the identity back out of the leaf.
    let Some(peer_svid) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| svid::check(c).ok())
    else {
        metrics.hbone_failed(Direction::Inbound, "no_peer_identity");
        return;
    };
    let Some(local) = local else { return };
    metrics.hbone_connections.with_label_values(&[Direction::Inbound.as_str()]).inc();
    let _tunnel = dp.tunnels().open(TunnelView::inbound(&pod.name(), &local, &peer_svid, peer));
    tracing::debug!(peer_identity = %peer_svid.identity, serial = %peer_svid.serial, "HBONE connection");

    let mut h2 = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(h2) => h2,
        Err(e) => {
            metrics.hbone_failed(Direction::Inbound, "http2");
            tracing::info!(error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let peer_svid = Arc::new(peer_svid);
    // Made at the first request sent straight on the connection (most connections carry tunnels only).
    let mut requests: Option<Arc<Requests>> = None;
    // Direct requests are served in this task, beside the connection they travel on: a task of their own would
    // cost a spawn and two cross-task wake-ups per request.
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let (mut drain, mut going_away) = (dp.drain(), false);
    loop {
        let next = tokio::select! {
            next = h2.accept() => next,
            Some(()) = futures_util::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => continue,
            // The peer's pool opens its next tunnels on a new connection, which reaches the agent that took over
            // the listener; the streams in flight here finish (`crate::drain`).
            _ = drain.started(), if !going_away => {
                going_away = true;
                h2.graceful_shutdown();
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) if hbone_requests::is_direct(&request) => {
                let requests = requests
                    .get_or_insert_with(|| {
                        let principal = peer_svid.identity.to_string();
                        Arc::new(Requests::new(dp.clone(), pod.clone(), principal, peer))
                    })
                    .clone();
                in_flight.push(Box::pin(hbone_requests::serve(requests, request, respond)));
            }
            Some(Ok((request, respond))) => {
                let (pod, dp, svid) = (pod.clone(), dp.clone(), peer_svid.clone());
                tokio::spawn(stream(request, respond, peer, svid, pod, dp).in_current_span());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "HBONE connection ended");
                break;
            }
            None => break,
        }
    }
}

fn status(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let response = Response::builder().status(code).body(()).unwrap_or_default();
    let _ = respond.send_response(response, true);
}

async fn stream(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_svid: Arc<Svid>,
    pod: Arc<PodContext>,
    dp: DataPlane,
) {
    let authority = request.uri().authority().map(|a| a.as_str());
    let target = match connect_target(request.method(), authority, &pod.net.ips) {
        Ok(target) => target,
        Err(code) => {
            if code == StatusCode::BAD_REQUEST {
                tracing::info!(?authority, "CONNECT to an address this pod does not own");
                dp.metrics().denied(&pod, Direction::Inbound, "bad_destination");
            }
            return status(&mut respond, code);
        }
    };
    let config = dp.config();
    if request.headers().contains_key(message::DIRECT_HEADER) && dp.direct_l7() && takes_requests(&config, &pod) {
        // The calling agent offers to send its requests straight on the connection (`hbone_requests`, each one
        // authorized there): taken. Declined, the stream is a plain tunnel like any other.
        let response = Response::builder().header(message::DIRECT_HEADER, "1").body(()).unwrap_or_default();
        let _ = respond.send_response(response, true);
        return;
    }
    let principal = peer_svid.identity.to_string();
    // A caller the config does not know (a workload behind another cluster's ztunnel) says who it is.
    let sent = baggage::parse(request.headers());
    let inbound_flow = |config: &Snapshot| {
        let mut flow = Flow::inbound(config, &pod, peer.ip(), Some(&principal), target.port(), Security::MutualTls);
        sent.label(&mut flow.source);
        flow
    };
    let ours = config.baggage(&pod.net.namespace, &pod.net.name);
    // The caller's trace of the tunnel, for the connection's access log (its own log has the same id).
    let trace: Option<Arc<str>> = crate::telemetry::context::trace_id_of(request.headers()).map(Into::into);
    // Agent-to-agent HTTP/2 (from an agent before direct requests: it routed the requests), or policies that need
    // each request: the decision moves from the tunnel to the requests inside it.
    let l7 = request.headers().get(crate::hbone::L7_HEADER).and_then(|v| v.to_str().ok()).and_then(Protocol::parse);
    let per_request = l7.is_some() || policy::needs_request(&config, &pod);
    let admitted = |config, principal| Admitted {
        under: Some(config),
        principal: Some(principal),
        source_ip: peer.ip(),
        port: target.port(),
        looked_for_http: per_request,
    };
    if !per_request {
        if let Err(refusal) = policy::check_inbound(&config, &pod, Some(&principal), peer.ip(), target.port()) {
            refusal.record(dp.metrics(), &config, &pod, Some(&principal), peer);
            return status(&mut respond, StatusCode::UNAUTHORIZED);
        }
        // Connect first, so an unreachable application is a 503 on the CONNECT (as ztunnel answers).
        let app = match socket::connect_to_app(dp.steering(), &pod, target, peer).await {
            Ok(app) => app,
            Err(e) => {
                proxy::app_unreachable(&dp, &pod, target, &e);
                return status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        let Some(tunnel) = accept(respond, request, ours) else { return };
        let flow = inbound_flow(&config);
        let admitted = admitted(config, principal);
        return proxy::forward(&dp, &pod, (flow, trace), (peer, target), (tunnel, app), Some(admitted)).await;
    }
    let Some(tunnel) = accept(respond, request, ours) else { return };
    let session = |app| {
        Session::new(dp.clone(), pod.clone(), Some(principal.clone()), peer, target, app).with_caller(sent.clone())
    };
    // Boxed, so L4 streams do not carry room for the L7 pipeline's state (hyper's connection, the drain).
    if let Some(app) = l7 {
        return Box::pin(l7_inbound::serve(tunnel, Protocol::Http2, session(app))).await;
    }
    let Some(io) = Box::pin(l7_inbound::serve_if_http(tunnel, session)).await else { return };
    // Not HTTP: the connection-level decision, where request conditions fail closed.
    if let Err(refusal) = policy::check_inbound(&config, &pod, Some(&principal), peer.ip(), target.port()) {
        refusal.record(dp.metrics(), &config, &pod, Some(&principal), peer);
        return;
    }
    match socket::connect_to_app(dp.steering(), &pod, target, peer).await {
        Ok(app) => {
            let flow = inbound_flow(&config);
            let admitted = admitted(config, principal);
            proxy::forward(&dp, &pod, (flow, trace), (peer, target), (io, app), Some(admitted)).await
        }
        Err(e) => proxy::app_unreachable(&dp, &pod, target, &e),
    }
}

/// Whether the pod's agent takes calling agents' requests one by one (`hbone_requests`): when its policy decides
/// per request, or its Telemetry has its own agent report, log or export spans of them. Otherwise a calling
/// agent's requests come inside a tunnel relayed at L4 — L7 done once, by the caller, the cheaper path; a policy
/// that later decides per request ends such tunnels (`proxy::admission`), and the caller's next ones are taken.
pub fn takes_requests(config: &Snapshot, pod: &PodContext) -> bool {
    if policy::needs_request(config, pod) {
        return true;
    }
    let telemetry = crate::telemetry::settings(config, pod);
    telemetry.reporters == Reporters::SourceAndDestination
        || telemetry.access_logging
        || telemetry.tracing.is_some_and(|t| t.collector.is_some())
}

/// Where a tunnel request wants to go: it must be a `CONNECT` (405 otherwise) to `ip:port` of one of the pod's
/// own addresses (400 otherwise) — the peer is authenticated, but the address is its claim.
pub fn connect_target(
    method: &Method,
    authority: Option<&str>,
    pod_ips: &[std::net::IpAddr],
) -> Result<SocketAddr, StatusCode> {
    if method != Method::CONNECT {
        return Err(StatusCode::METHOD_NOT_ALLOWED);
    }
    crate::pod::own_address(authority, pod_ips).ok_or(StatusCode::BAD_REQUEST)
}

/// Answers 200 to the CONNECT, with the pod's `baggage` as ztunnel's answer carries its workload's: from here on
/// the stream is the tunnel.
fn accept(
    mut respond: SendResponse<Bytes>,
    request: Request<h2::RecvStream>,
    baggage: Option<http::HeaderValue>,
) -> Option<H2Stream> {
    let mut response = Response::new(());
    if let Some(baggage) = baggage {
        response.headers_mut().insert(baggage::BAGGAGE, baggage);
    }
    match respond.send_response(response, false) {
        Ok(send) => Some(H2Stream::new(send, request.into_body())),
        Err(e) => {
            tracing::debug!(error = %e, "peer went away before the tunnel opened");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_name_one_of_the_pods_own_addresses() {
        let ips = ["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        assert_eq!(connect_target(&Method::CONNECT, Some("10.0.0.7:8080"), &ips), Ok("10.0.0.7:8080".parse().unwrap()));
        assert_eq!(connect_target(&Method::CONNECT, Some("[fd00::7]:80"), &ips), Ok("[fd00::7]:80".parse().unwrap()));
        assert_eq!(connect_target(&Method::CONNECT, Some("[::ffff:10.0.0.7]:80"), &ips).map(|t| t.port()), Ok(80));
        assert_eq!(connect_target(&Method::GET, Some("10.0.0.7:8080"), &ips), Err(StatusCode::METHOD_NOT_ALLOWED));
        for bad in [None, Some("10.0.0.8:8080"), Some("10.0.0.7"), Some("example.com:80"), Some("")] {
            assert_eq!(connect_target(&Method::CONNECT, bad, &ips), Err(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }
}
