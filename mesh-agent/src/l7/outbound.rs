//! The calling side of L7, for connections a local pod opens to a Service: detect the protocol, serve it with
//! hyper, and send each request through the pipeline
//!
//! route (HTTPRoute/GRPCRoute) → filters → backend (weights) → [`forward`](super::forward): fault injection →
//! rate limit → circuit breaker → attempts (balancer, per-try timeout, retries within the budget, outlier
//! detection) → response filters,
//!
//! all under the route's request timeout. Opaque connections keep the L4 path, to an endpoint the Service's
//! balancer picks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_common::config::{Service, ServicePort};
use mesh_common::route::{Filter, HeaderModifier, Mirror, RouteRule, ServiceRef};
use tokio::net::TcpStream;

use super::destination::Here;
use super::detect::{self, Protocol, Rewind};
use super::filters;
use super::forward::{self, Attempt};
use super::local_reply::{Flag, reply};
use super::router::{RequestView, RouteTable};
use super::server;
use crate::body::{self, Body};
use crate::dataplane::DataPlane;
use crate::http_message::is_grpc;
use crate::metrics::{DestinationService, Direction, Flow, Peer, Reporter, Security};
use crate::pod::PodContext;
use crate::snapshot::Snapshot;
use crate::telemetry::request::{self, Upstream};

/// One downstream connection to a Service.
pub struct Call {
    pub dp: DataPlane,
    pub pod: Arc<PodContext>,
    /// The calling pod's address (for hashing on the source IP).
    pub source_ip: IpAddr,
    /// The calling pod's end of the connection.
    pub client: SocketAddr,
    pub service: ServiceRef,
    /// The protocol the calling application speaks.
    pub protocol: Protocol,
    /// The caller's SPIFFE ID (rate limits per source), or its pod name when it has none.
    pub source: String,
    /// The route table of the last config a request on this connection used: the table depends only on the
    /// config, the Service and port called and the caller's namespace, so requests after the first skip the
    /// agent-wide table lookup.
    routes: std::sync::Mutex<Option<(Arc<Snapshot>, Arc<RouteTable>)>>,
}

impl Call {
    /// The routes for this connection's Service and port under `config`.
    pub fn route_table(&self, config: &Arc<Snapshot>) -> Arc<RouteTable> {
        let mut cached = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, table)) = cached.as_ref().filter(|(seen, _)| Arc::ptr_eq(seen, config)) {
            return table.clone();
        }
        let svc = &self.service;
        let port = svc.port.unwrap_or_default();
        let table = self.dp.l7().routes.get(config, &svc.namespace, &svc.name, port, &self.pod.net.namespace);
        *cached = Some((config.clone(), table.clone()));
        table
    }
}

/// A connection to a Service that does not speak HTTP, handed back for L4 (`proxy::outbound`): the bytes read
/// during detection, and the endpoint the Service's balancer picked (counted in flight while the guard lives).
pub struct Opaque {
    pub io: Rewind<TcpStream>,
    pub endpoint: SocketAddr,
    pub in_flight: super::destination::InFlight,
}

/// Handles a connection to `service:port` that the pod dialled: serves HTTP to its end (`None`), or hands an
/// opaque connection back with its endpoint; a connection with no ready endpoint is reset here.
pub async fn serve(
    conn: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    dp: DataPlane,
    service: &Service,
    port: &ServicePort,
) -> Option<Opaque> {
    let (protocol, io) = match detect::detect(conn, detect::hint(port, dp.limits().header_timeout)).await {
        Ok(detected) => detected,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            dp.metrics().cut(&pod, Direction::Outbound, "header_timeout");
            return None;
        }
        Err(e) => {
            tracing::debug!(error = %e, "connection closed during protocol detection");
            return None;
        }
    };
    let service_ref =
        ServiceRef { namespace: service.namespace.clone(), name: service.name.clone(), port: Some(port.port) };
    if protocol == Protocol::Opaque {
        return opaque(io, pod.caller(peer).ip(), &dp, &service_ref, port);
    }
    let config = dp.config();
    let source = pod.identity_string(&config).unwrap_or_else(|| pod.name());
    tracing::debug!(protocol = protocol.as_str(), service = %format!("{}/{}", service.namespace, service.name), "L7");
    let client = pod.caller(peer);
    let (limits, drain) = (*dp.limits(), dp.drain());
    let (metrics, counted) = (dp.metrics().clone(), pod.clone());
    let call = Arc::new(Call {
        dp,
        pod,
        source_ip: client.ip(),
        client,
        service: service_ref,
        protocol,
        source,
        routes: Default::default(),
    });
    let ended = server::serve(io, protocol, &limits, drain, move |req| handle(call.clone(), req)).await;
    if ended == server::Ended::HeaderTimeout {
        metrics.cut(&counted, Direction::Outbound, "header_timeout");
    }
    None
}

/// Not HTTP: one endpoint for the whole connection, then bytes as they are (the caller's L4 path).
fn opaque(
    io: Rewind<TcpStream>,
    source_ip: IpAddr,
    dp: &DataPlane,
    svc: &ServiceRef,
    port: &ServicePort,
) -> Option<Opaque> {
    let config = dp.config();
    let endpoint = dp
        .l7()
        .destinations
        .get(&config, &svc.namespace, &svc.name)
        .and_then(|d| d.pick(Some(super::balance::source_ip_key(source_ip)), &Here::of(dp.node(), &config)));
    let Some(endpoint) = endpoint else {
        tracing::info!(service = %format!("{}/{}", svc.namespace, svc.name), "no ready endpoint");
        crate::socket::reset(io.into_inner());
        return None;
    };
    let in_flight = endpoint.start();
    Some(Opaque { io, endpoint: SocketAddr::new(endpoint.ip, port.endpoint_port()), in_flight })
}

/// What a rule's (or a backend's) filters asked for beyond changing the request in place.
#[derive(Default)]
struct Effects<'a> {
    response_headers: Vec<&'a HeaderModifier>,
    mirrors: Vec<&'a Mirror>,
}

/// Applies request filters to `parts`; a redirect ends the request with its response.
fn apply_filters<'a>(
    filters: &'a [Filter],
    prefix: Option<&str>,
    parts: &mut Parts,
    effects: &mut Effects<'a>,
) -> Option<Response<Body>> {
    for f in filters {
        match f {
            Filter::RequestRedirect(r) => return Some(filters::redirect(r, prefix, &parts.uri, &parts.headers)),
            Filter::RequestHeaderModifier(m) => filters::modify_headers(m, &mut parts.headers),
            Filter::ResponseHeaderModifier(m) => effects.response_headers.push(m),
            Filter::UrlRewrite(r) => filters::rewrite(r, prefix, &mut parts.uri, &mut parts.headers),
            Filter::RequestMirror(m) => effects.mirrors.push(m),
        }
    }
    None
}

/// A backend by weight; `None` when every weight is zero (or there is none).
pub(super) fn weighted(rule: &RouteRule) -> Option<&mesh_common::route::Backend> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = fastrand::u64(..total);
    rule.backends.iter().find(|b| {
        let w = u64::from(b.weight);
        if roll < w {
            true
        } else {
            roll -= w;
            false
        }
    })
}

async fn handle(call: Arc<Call>, req: Request<Incoming>) -> Response<Body> {
    let upgrade = super::upgrade::is_upgrade(&req);
    // One config for the whole request: telemetry settings, routing, endpoints, upstream route and labels.
    let config = call.dp.config();
    let client = (Some(call.client), None);
    let (observation, req) = request::start(call.dp.sinks(), &config, &call.pod, client, req.map(body::boxed));
    let response =
        if upgrade { super::upgrade::outbound(&call, req).await } else { route_and_send(&call, &config, req).await };
    let flow = flow(&call, &config, &response);
    observation.finish(response, flow)
}

/// The labels of a request's metrics: to the endpoint and backend Service that served it, or to the called
/// Service when the agent answered itself.
fn flow(call: &Call, config: &Snapshot, response: &Response<Body>) -> Flow {
    match response.extensions().get::<Upstream>() {
        Some(u) => {
            let ip = u.endpoint.ip();
            // The tunnel proved the identity the config gives the address (the pool expects exactly that one).
            let principal = u.meshed.then(|| config.peer_by_ip(ip).map(|p| &*p.principal)).flatten();
            let security = if u.meshed { Security::MutualTls } else { Security::None };
            let service = DestinationService::named(config, &u.backend.namespace, &u.backend.name);
            Flow::outbound(config, &call.pod, ip, principal, service, security)
        }
        None => Flow {
            reporter: Reporter::Source,
            source: Peer::local(config, &call.pod),
            destination: Peer::unknown(),
            service: DestinationService::named(config, &call.service.namespace, &call.service.name),
            security: Security::None,
        },
    }
}

/// Routes and sends the request; the response carries the matched route's name for telemetry.
async fn route_and_send(call: &Arc<Call>, config: &Arc<Snapshot>, req: Request<Body>) -> Response<Body> {
    let mut route = None;
    let mut response = send_routed(call, config, req, &mut route).await;
    if let Some(route) = route {
        response.extensions_mut().insert(request::RouteName(route));
    }
    response
}

async fn send_routed(
    call: &Arc<Call>,
    config: &Arc<Snapshot>,
    req: Request<Body>,
    route: &mut Option<String>,
) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let svc = &call.service;
    let port = svc.port.unwrap_or_default();
    let table = call.route_table(config);
    let (mut parts, body) = req.into_parts();
    let selected = table.select(&RequestView::new(&parts.method, &parts.uri, &parts.headers));
    *route = selected.as_ref().map(|s| format!("{}/{}", s.route.namespace, s.route.name));
    if selected.is_none() && !table.is_empty() {
        return reply(grpc, StatusCode::NOT_FOUND, None, Some(Flag::NoRoute), "no route matches the request");
    }
    let mut effects = Effects::default();
    let (backend, timeouts, retry) = match &selected {
        Some(s) => {
            if let Some(redirect) = apply_filters(&s.rule.filters, s.prefix, &mut parts, &mut effects) {
                return redirect;
            }
            let Some(backend) = weighted(s.rule) else {
                return reply(
                    grpc,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    Some(Flag::NoRoute),
                    "the route has no backend",
                );
            };
            if let Some(redirect) = apply_filters(&backend.filters, s.prefix, &mut parts, &mut effects) {
                return redirect;
            }
            (backend.service.clone(), s.rule.timeouts.unwrap_or_default(), s.rule.retry.as_ref())
        }
        None => (svc.clone(), Default::default(), None),
    };
    let ms = |ms: Option<u64>| ms.filter(|ms| *ms > 0).map(Duration::from_millis);
    let attempt =
        Attempt { call, config, grpc, retry, per_try: ms(timeouts.backend_request_ms), mirrors: &effects.mirrors };
    let work = forward::forward(attempt, &backend, port, parts, body);
    let mut response = match ms(timeouts.request_ms) {
        Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            reply(grpc, StatusCode::GATEWAY_TIMEOUT, None, Some(Flag::UpstreamRequestTimeout), "request timeout")
        }),
        None => work.await,
    };
    for m in effects.response_headers {
        filters::modify_headers(m, response.headers_mut());
    }
    response
}
