//! Reaching one endpoint from a local pod: through HBONE when the endpoint is a meshed workload (one
//! agent-to-agent HTTP/2 connection per source pod and endpoint, inside an mTLS tunnel), in plaintext from the
//! pod's netns otherwise. Also the header surgery between HTTP versions.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HOST};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use mesh_common::bpf::HBONE_PORT;

use super::client::{Dialed, Guard, HttpPool, Io, UpstreamError, io_error};
use super::detect::Protocol;
use crate::body::Body;
use crate::dataplane::DataPlane;
use crate::hbone::client::{L7Channel, Source};
use crate::identity::Identity;
use crate::pod::PodContext;
use crate::snapshot::Snapshot;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct UpstreamKey {
    pub netns_cookie: u64,
    pub target: SocketAddr,
    /// Meshed: agent-to-agent HTTP/2 carrying requests for an application speaking this protocol.
    pub mesh: bool,
    pub protocol: Protocol,
}

/// How a request reaches `target` from `pod`.
pub enum Route {
    /// HBONE to the endpoint's agent, presenting `src` and expecting `dst`.
    Mesh {
        src: Identity,
        dst: Identity,
    },
    Plain,
}

/// Decided on the request's config snapshot, with `mtls` when the agent has a CA to tunnel with.
pub fn route_to(config: &Snapshot, mtls: bool, pod: &PodContext, target: SocketAddr) -> Route {
    match (config.workload_by_ip(target.ip()), pod.identity(config), mtls) {
        (Some(w), Some(src), true) => {
            Route::Mesh { src, dst: Identity::new(&config.trust_domain, &w.namespace, &w.service_account) }
        }
        _ => Route::Plain,
    }
}

/// A pod's source for HBONE: its certificate for `src`, fetched (or issued) on first use.
async fn with_source<T>(
    dp: &DataPlane,
    pod: &PodContext,
    src: &Identity,
    open: impl AsyncFnOnce(&Source<'_>) -> Result<T, crate::hbone::client::HboneError>,
) -> Result<T, UpstreamError> {
    let secrets = dp.secrets().ok_or_else(|| UpstreamError::Connect("no certificate authority".into()))?;
    let cert = secrets.fetch(src).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let (metrics, tunnels) = (dp.metrics(), dp.tunnels());
    let source = Source { metrics, tunnels, netns: &pod.netns, cert: &cert, secrets, pod: &pod.name() };
    open(&source).await.map_err(|e| UpstreamError::Connect(e.to_string()))
}

/// Opens a byte stream to `target`: an HBONE tunnel or a plaintext connection from the pod.
pub async fn connect(
    dp: &DataPlane,
    pod: &PodContext,
    route: &Route,
    target: SocketAddr,
) -> Result<(Box<dyn Io>, Guard), UpstreamError> {
    match route {
        Route::Mesh { src, dst } => {
            let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
            let (stream, slot) =
                with_source(dp, pod, src, async |source| dp.pool().open(source, gateway, dst, target).await).await?;
            Ok((Box::new(stream), Box::new(slot)))
        }
        Route::Plain => {
            let stream = crate::socket::connect_from_pod(pod, target).await.map_err(io_error)?;
            Ok((Box::new(stream), Box::new(())))
        }
    }
}

/// Opens the way for requests to `target` for an application speaking `app`: through the peer agent for a
/// meshed endpoint (straight on the HBONE connection when it takes that, see [`crate::hbone::message`]), a
/// plaintext connection from the pod otherwise.
async fn dial(
    dp: &DataPlane,
    pod: &PodContext,
    route: &Route,
    target: SocketAddr,
    app: Protocol,
) -> Result<Dialed, UpstreamError> {
    let Route::Mesh { src, dst } = route else {
        let (io, guard) = connect(dp, pod, route, target).await?;
        return Ok(Dialed::Io(io, guard));
    };
    let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
    let opened =
        with_source(dp, pod, src, async |source| dp.pool().open_l7(source, gateway, dst, target, app.as_str()).await)
            .await?;
    Ok(match opened {
        L7Channel::Direct(channel) => Dialed::Mesh(channel, Box::new(())),
        L7Channel::Stream(stream, slot) => Dialed::Io(Box::new(stream), Box::new(slot)),
    })
}

/// Left in a response's extensions by [`send`]: whether the endpoint was reached over HBONE (mTLS).
#[derive(Clone, Copy, Debug)]
pub struct Meshed(pub bool);

/// Sends a request to one endpoint over the node's pooled connections. `app` is the protocol the application
/// speaks (the caller's); meshed endpoints are always reached over agent-to-agent HTTP/2.
pub async fn send(
    dp: &DataPlane,
    pool: &HttpPool<UpstreamKey>,
    pod: &Arc<PodContext>,
    (target, route): (SocketAddr, Route),
    app: Protocol,
    connection_guard: impl FnOnce() -> Option<Guard>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let mesh = matches!(route, Route::Mesh { .. });
    let wire = if mesh { Protocol::Http2 } else { app };
    let key = UpstreamKey { netns_cookie: pod.netns.cookie(), target, mesh, protocol: app };
    let req = for_protocol(req, wire);
    let mut response = pool
        .send(key, wire, req, || async move {
            let permit = connection_guard().ok_or(UpstreamError::Overflow)?;
            Ok(dial(dp, pod, &route, target, app).await?.holding(permit))
        })
        .await?;
    response.extensions_mut().insert(Meshed(mesh));
    Ok(response)
}

/// Connection-specific headers never cross a proxy (RFC 9110 §7.6.1); HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for h in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHORIZATION] {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Rewrites a request for the wire protocol: HTTP/2 wants an absolute URI (its `:authority`) and no Host,
/// HTTP/1 an origin-form URI and a Host header.
pub fn for_protocol(req: Request<Body>, wire: Protocol) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let authority =
        parts.uri.authority().cloned().or_else(|| {
            parts.headers.get(HOST).and_then(|h| h.to_str().ok()).and_then(|h| Authority::try_from(h).ok())
        });
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if wire == Protocol::Http2 {
        let mut uri = Uri::builder().scheme(parts.uri.scheme().cloned().unwrap_or(Scheme::HTTP)).path_and_query(path);
        if let Some(a) = &authority {
            uri = uri.authority(a.clone());
        }
        parts.uri = uri.build().unwrap_or_default();
        parts.headers.remove(HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::from(path);
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    Request::from_parts(parts, body)
}

/// A response from upstream, for the downstream side.
pub fn response_for_downstream(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // hyper's HTTP/2 server ignores the version; its HTTP/1 server needs one it can write.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body)
}
