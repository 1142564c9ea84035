//! Reaching one endpoint from a local pod: through HBONE when the endpoint is a meshed workload (requests
//! straight on the pooled mTLS connection when the peer agent takes them, the application's own protocol in a
//! tunnel otherwise), in plaintext from the pod's netns otherwise.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
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
    /// Meshed: through the endpoint's HBONE peer.
    pub mesh: bool,
    /// What the application speaks.
    pub protocol: Protocol,
}

/// How a request reaches `target` from `pod`.
pub enum Route {
    /// HBONE to the endpoint's agent, presenting `src` and expecting `dst`; the source's `baggage` on the CONNECT.
    Mesh {
        src: Identity,
        dst: Identity,
        baggage: Option<http::HeaderValue>,
    },
    Plain,
}

/// Decided on the request's config snapshot, with `mtls` when the agent has a CA to tunnel with.
pub fn route_to(config: &Snapshot, mtls: bool, pod: &PodContext, target: SocketAddr) -> Route {
    match (config.workload_by_ip(target.ip()), pod.identity(config), mtls) {
        (Some(w), Some(src), true) => {
            let baggage = config.baggage(&pod.net.namespace, &pod.net.name);
            Route::Mesh { src, dst: config.identity_of(w), baggage }
        }
        _ => Route::Plain,
    }
}

/// A pod's source for HBONE to `target`: its certificate for `src`, fetched (or issued) on first use, its
/// `baggage`, and its own address of `target`'s family (the `forwarded` client).
async fn with_source<T>(
    dp: &DataPlane,
    pod: &PodContext,
    (src, baggage, target): (&Identity, &Option<http::HeaderValue>, SocketAddr),
    open: impl AsyncFnOnce(&Source<'_>) -> Result<T, crate::hbone::client::HboneError>,
) -> Result<T, UpstreamError> {
    let secrets = dp.secrets().ok_or_else(|| UpstreamError::Connect("no certificate authority".into()))?;
    let cert = secrets.fetch(src).await.map_err(|e| UpstreamError::Connect(e.to_string()))?;
    let (metrics, tunnels) = (dp.metrics(), dp.tunnels());
    let client = pod.net.ips.iter().copied().find(|ip| ip.is_ipv4() == target.is_ipv4());
    let client = client.unwrap_or(target.ip());
    let (pod_name, baggage) = (pod.name(), baggage.clone());
    // Requests in the tunnel carry their own trace context; the tunnel's is a trace of its own.
    let (_, traceparent) = crate::telemetry::context::unsampled_trace();
    let netns = &pod.netns;
    let source = Source { metrics, tunnels, netns, cert: &cert, secrets, pod: &pod_name, baggage, client, traceparent };
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
        Route::Mesh { src, dst, baggage } => {
            let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
            let open = async |source: &Source<'_>| dp.pool().open(source, gateway, dst, target).await;
            let (stream, slot) = with_source(dp, pod, (src, baggage, target), open).await?;
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
    let Route::Mesh { src, dst, baggage } = route else {
        let (io, guard) = connect(dp, pod, route, target).await?;
        return Ok(Dialed::Io(io, guard));
    };
    let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
    let open = async |source: &Source<'_>| dp.pool().open_l7(source, gateway, dst, target, app.as_str()).await;
    let opened = with_source(dp, pod, (src, baggage, target), open).await?;
    Ok(match opened {
        L7Channel::Direct(channel) => Dialed::Mesh(channel, Box::new(())),
        L7Channel::Tunnel(stream, slot) => Dialed::Io(Box::new(stream), Box::new(slot)),
    })
}

/// Left in a response's extensions by [`send`]: whether the endpoint was reached over HBONE (mTLS).
#[derive(Clone, Copy, Debug)]
pub struct Meshed(pub bool);

/// Sends a request to one endpoint over the node's pooled connections. `app` is the protocol the application
/// speaks (the caller's); it is also what travels in a tunnel to a meshed endpoint whose peer does not take
/// requests directly.
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
    let key = UpstreamKey { netns_cookie: pod.netns.cookie(), target, mesh, protocol: app };
    let mut response = pool
        .send(key, app, req, || async move {
            let permit = connection_guard().ok_or(UpstreamError::Overflow)?;
            Ok(dial(dp, pod, &route, target, app).await?.holding(permit))
        })
        .await?;
    response.extensions_mut().insert(Meshed(mesh));
    Ok(response)
}
