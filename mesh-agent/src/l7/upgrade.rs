//! HTTP/1.1 Upgrade (WebSocket) and CONNECT: after routing, the request travels on a connection of its own
//! (an opaque HBONE stream between agents), and once the upstream agrees (101, or 2xx for CONNECT) both sides
//! are spliced together as plain bytes.

use std::net::SocketAddr;

use http::header::{CONNECTION, HOST, UPGRADE};
use http::uri::Uri;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::client::{self, Guard, Io};
use super::destination::Here;
use super::detect::Protocol;
use super::local_reply::{Flag, reply};
use super::outbound::Call;
use super::upstream;
use crate::body::{self, Body};
use crate::telemetry::request::Upstream;

/// 503 `UF` for a caller about to switch protocols (never gRPC).
pub(super) fn unreachable_upstream(why: &str) -> Response<Body> {
    reply(false, StatusCode::SERVICE_UNAVAILABLE, None, Some(Flag::UpstreamConnectionFailure), why)
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(UPGRADE)
            && req
                .headers()
                .get_all(CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Sends an upgrade request over `io` (HTTP/1.1) and, when the upstream switches protocols, splices the two
/// upgraded connections in a task of their own. The upstream's answer goes back either way.
pub async fn relay(mut req: Request<Body>, io: Box<dyn Io>, guard: Guard) -> Response<Body> {
    let downstream = hyper::upgrade::on(&mut req);
    let connect = req.method() == Method::CONNECT;
    let (mut parts, body) = req.into_parts();
    if !connect {
        // Origin form with Host, as HTTP/1.1 wants it; the Upgrade and Connection headers stay.
        let authority = parts.uri.authority().map(|a| a.to_string());
        parts.uri = parts.uri.path_and_query().map(|p| Uri::from(p.clone())).unwrap_or_else(|| Uri::from_static("/"));
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            parts.headers.entry(HOST).or_insert(v);
        }
    }
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, body);
    let sent = match client::handshake(io, Protocol::Http1, guard).await {
        Ok(sender) => sender.send(request).await,
        Err(e) => Err(e),
    };
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => return unreachable_upstream(&e.to_string()),
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && response.status().is_success());
    if switched {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                    let _ = crate::copy::bidirectional(&mut down, &mut up).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body::boxed(body))
}

/// The calling side: the Service's backend (routes decide which Service; filters, retries and mirrors do not
/// apply to a connection that is about to stop being HTTP), one endpoint, an opaque stream to it. The response
/// says where it went ([`Upstream`]) for the request metrics, which count the upgrade itself (101, or 200 for
/// CONNECT) as Istio does.
pub async fn outbound(call: &Call, req: Request<Body>) -> Response<Body> {
    if req.version() == http::Version::HTTP_2 {
        return reply(false, StatusCode::NOT_IMPLEMENTED, None, None, "CONNECT over HTTP/2 is not supported");
    }
    let config = call.dp.config();
    let l7 = call.dp.l7();
    let svc = &call.service;
    let port = svc.port.unwrap_or_default();
    let table = call.route_table(&config);
    let backend = {
        match table.select(&super::router::RequestView::new(req.method(), req.uri(), req.headers())) {
            Some(s) => super::outbound::weighted(s.rule).map(|b| b.service.clone()),
            None => Some(svc.clone()),
        }
    };
    let endpoint = backend.and_then(|b| {
        let port = super::forward::endpoint_port(&config, &b, port)?;
        let endpoint =
            l7.destinations.get(&config, &b.namespace, &b.name)?.pick(None, &Here::of(call.dp.node(), &config))?;
        Some((SocketAddr::new(endpoint.ip, port), b))
    });
    let Some((target, backend)) = endpoint else {
        return reply(
            false,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Some(Flag::NoHealthyUpstream),
            "no healthy endpoint",
        );
    };
    let route = upstream::route_to(&config, call.dp.secrets().is_some(), &call.pod, target);
    let meshed = matches!(route, upstream::Route::Mesh { .. });
    let mut response = match upstream::connect(&call.dp, &call.pod, &route, target).await {
        Ok((io, guard)) => relay(req, io, guard).await,
        Err(e) => return unreachable_upstream(&e.to_string()),
    };
    response.extensions_mut().insert(Upstream { endpoint: target, backend, meshed });
    response
}
