//! Sending a routed request to its backend Service: fault injection, local rate limit, circuit breaker, then
//! attempts — an endpoint from the balancer, the per-try timeout, retries with backoff while the route allows,
//! the budget has room and the breaker's retry limit is not reached — with every outcome fed to outlier
//! detection. Mirrors get a copy once the primary's body is known.

use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_common::route::{Mirror, Retry, ServiceRef};

use super::body::{self, Body, Replay};
use super::client::{Guard, UpstreamError};
use super::destination::Destination;
use super::destination::Here;
use super::local_reply::{Flag, reply};
use super::outbound::Call;
use super::outlier::Outcome;
use super::retry::RetryPolicy;
use super::{fault, upstream};
use crate::snapshot::Snapshot;
use crate::telemetry::request::Upstream;
use std::sync::Arc;

/// Why a try produced no response.
enum Failure {
    Timeout,
    Upstream(UpstreamError),
}

pub struct Attempt<'a> {
    pub call: &'a Call,
    /// The config the request was routed on: it picks the endpoints too, whatever arrives meanwhile.
    pub config: &'a Arc<Snapshot>,
    pub grpc: bool,
    pub retry: Option<&'a Retry>,
    pub per_try: Option<Duration>,
    pub mirrors: &'a [&'a Mirror],
}

/// A copy of the request head (for another try, or a mirror).
pub(super) fn head(parts: &Parts) -> http::request::Builder {
    let mut b = Request::builder().method(parts.method.clone()).uri(parts.uri.clone()).version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    b
}

/// The consistent-hash key of a request, when the Service's balancer hashes.
fn hash_key(call: &Call, dest: &Destination, parts: &Parts) -> Option<u64> {
    let key = dest.settings().load_balancer.as_ref()?.hash_key.as_ref()?;
    let value = if let Some(name) = &key.header {
        parts.headers.get(name.as_str())?.as_bytes().to_vec()
    } else if let Some(name) = &key.cookie {
        let cookies = parts.headers.get_all(http::header::COOKIE);
        let found = cookies.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })?;
        found.into_bytes()
    } else if key.source_ip {
        return Some(super::balance::source_ip_key(call.source_ip));
    } else {
        return None;
    };
    Some(super::balance::hash(&value, 0))
}

/// The port endpoints of `backend` listen on for a request that arrived on `called_port`.
pub(super) fn endpoint_port(config: &Snapshot, backend: &ServiceRef, called_port: u16) -> Option<u16> {
    let service = config.service(&backend.namespace, &backend.name)?;
    let port = backend.port.unwrap_or(called_port);
    service.ports.iter().find(|p| p.port == port).map(|p| p.endpoint_port())
}

pub async fn forward(
    a: Attempt<'_>,
    backend: &ServiceRef,
    called_port: u16,
    parts: Parts,
    body: Body,
) -> Response<Body> {
    let (call, config) = (a.call, a.config);
    let (Some(dest), Some(port)) = (
        call.state.l7().destinations.get(config, &backend.namespace, &backend.name),
        endpoint_port(config, backend, called_port),
    ) else {
        return reply(
            a.grpc,
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            Some(Flag::NoRoute),
            "backend Service not found",
        );
    };
    if let Some(f) = &dest.settings().fault_injection {
        let injected = fault::decide(f);
        if let Some(delay) = injected.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some((status, grpc_status)) = injected.abort {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return reply(a.grpc, status, grpc_status, Some(Flag::FaultAbort), "fault injected");
        }
    }
    if let Some(limiter) = dest.limiter() {
        if let Err(wait) = limiter.check(&call.source, Instant::now()) {
            let mut r = reply(a.grpc, StatusCode::TOO_MANY_REQUESTS, None, Some(Flag::RateLimited), "rate limited");
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64));
            return r;
        }
    }
    let Some(_permit) = dest.breaker().admit().await else {
        return reply(
            a.grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Some(Flag::UpstreamOverflow),
            "circuit breaker open: too many requests",
        );
    };
    dest.budget().request(Instant::now());
    let key = hash_key(call, &dest, &parts);
    let policy = a.retry.map(RetryPolicy::new);
    let keep_copy = policy.is_some() || !a.mirrors.is_empty();
    // A request without a body can always be sent again: once, on another connection, when the upstream never
    // processed it (its connection went away: an agent or server draining), whatever the route's retries say.
    let bodiless = http_body::Body::is_end_stream(&body);
    let mut resent_unprocessed = false;
    let (mut next_body, replay) = if keep_copy {
        let (recording, replay) = body::record(body);
        (Some(body::boxed(recording)), Some(replay))
    } else {
        (Some(body), None)
    };
    let mut retries = 0u32;
    let mut _retry_permit = None;
    let here = Here::of(&call.state);
    loop {
        let Some(endpoint) = dest.pick(key, &here) else {
            return reply(
                a.grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                Some(Flag::NoHealthyUpstream),
                "no healthy endpoint",
            );
        };
        // Always set: the first body, or a replay before `continue`.
        let body = next_body.take().unwrap_or_else(body::empty);
        let req = match head(&parts).body(body) {
            Ok(r) => r,
            Err(e) => return reply(a.grpc, StatusCode::BAD_REQUEST, None, None, &e.to_string()),
        };
        let target = std::net::SocketAddr::new(endpoint.ip, port);
        let in_flight = endpoint.start();
        let started = Instant::now();
        let breaker_dest = dest.clone();
        let guard = move || breaker_dest.breaker().connection().map(|p| Box::new(p) as Guard);
        let route = upstream::route_to(config, call.state.secrets().is_some(), &call.pod, target);
        let send = upstream::send(
            &call.state,
            &call.state.l7().upstreams,
            &call.pod,
            (target, route),
            call.protocol,
            guard,
            req,
        );
        let result = match a.per_try {
            Some(limit) => match tokio::time::timeout(limit, send).await {
                Ok(r) => r.map_err(Failure::Upstream),
                Err(_) => Err(Failure::Timeout),
            },
            None => send.await.map_err(Failure::Upstream),
        };
        drop(in_flight);
        // Not the endpoint's failure (nothing reached it): no outcome recorded, no retry budget spent.
        if let Err(Failure::Upstream(e)) = &result {
            if e.unprocessed() && !resent_unprocessed {
                let again = if bodiless { Some(body::empty()) } else { replay.as_ref().and_then(Replay::body) };
                if let Some(again) = again {
                    resent_unprocessed = true;
                    tracing::debug!(%target, error = %e, "upstream did not process the request; sending it again");
                    next_body = Some(again);
                    continue;
                }
            }
        }
        let outcome = match &result {
            Ok(r) => Outcome::of_status(r.status().as_u16()),
            Err(_) => Outcome::GatewayError,
        };
        dest.record(&endpoint, outcome, started.elapsed());
        if retries == 0 {
            for m in a.mirrors {
                super::mirror::send(call, config, m, &parts, replay.as_ref(), called_port);
            }
        }
        let retryable = match (&policy, &result) {
            (Some(p), Ok(r)) => p.retryable(r.status().as_u16()),
            (Some(_), Err(Failure::Upstream(UpstreamError::Overflow))) => false,
            (Some(_), Err(_)) => true,
            (None, _) => false,
        };
        if retryable && policy.as_ref().is_some_and(|p| retries < p.max_retries()) {
            let again = replay.as_ref().and_then(Replay::body);
            let permit = again.is_some() && dest.budget().try_retry(Instant::now());
            if let (Some(again), Some(permit)) = (again, permit.then(|| dest.breaker().retry()).flatten()) {
                _retry_permit = Some(permit);
                retries += 1;
                if let Some(p) = &policy {
                    tokio::time::sleep(p.backoff(retries)).await;
                }
                tracing::debug!(retries, %target, "retrying");
                next_body = Some(again);
                continue;
            }
        }
        return match result {
            Ok(response) => {
                let meshed = response.extensions().get::<upstream::Meshed>().is_some_and(|m| m.0);
                let mut response = upstream::response_for_downstream(response);
                response.extensions_mut().insert(Upstream { endpoint: target, backend: backend.clone(), meshed });
                response
            }
            Err(Failure::Timeout) => reply(
                a.grpc,
                StatusCode::GATEWAY_TIMEOUT,
                None,
                Some(Flag::UpstreamRequestTimeout),
                "upstream request timeout",
            ),
            Err(Failure::Upstream(UpstreamError::Overflow)) => reply(
                a.grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                Some(Flag::UpstreamOverflow),
                "circuit breaker open: too many connections",
            ),
            Err(Failure::Upstream(e)) => {
                tracing::info!(%target, error = %e, "upstream failed");
                reply(
                    a.grpc,
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    Some(Flag::UpstreamConnectionFailure),
                    "upstream connect error",
                )
            }
        };
    }
}
