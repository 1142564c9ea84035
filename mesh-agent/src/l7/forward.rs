//! Sending a routed request to its backend Service: fault injection, local rate limit, circuit breaker, then
//! attempts — an endpoint from the balancer, the per-try timeout, retries with backoff while the route allows,
//! the budget has room and the breaker's retry limit is not reached — with every outcome fed to outlier
//! detection. Mirrors get a copy once the primary's body is known.

use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use mesh_common::route::{Mirror, Retry, ServiceRef};

use super::breaker::{CountPermit, RequestPermit};
use super::client::{Guard, UpstreamError};
use super::destination::Destination;
use super::destination::Here;
use super::local_reply::{Flag, reply};
use super::outbound::Call;
use super::outlier::Outcome;
use super::retry::RetryPolicy;
use super::{fault, upstream};
use crate::body::{self, Body, Replay};
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
        call.dp.l7().destinations.get(config, &backend.namespace, &backend.name),
        endpoint_port(config, backend, called_port),
    ) else {
        let flag = Some(Flag::NoRoute);
        return reply(a.grpc, StatusCode::INTERNAL_SERVER_ERROR, None, flag, "backend Service not found");
    };
    let _permit = match admit(&a, &dest).await {
        Ok(permit) => permit,
        Err(refused) => return refused,
    };
    let key = hash_key(call, &dest, &parts);
    let mut tries = Tries::new(&a, body);
    let here = Here::of(call.dp.node(), config);
    loop {
        let Some(endpoint) = dest.pick(key, &here) else {
            let flag = Some(Flag::NoHealthyUpstream);
            return reply(a.grpc, StatusCode::SERVICE_UNAVAILABLE, None, flag, "no healthy endpoint");
        };
        let target = std::net::SocketAddr::new(endpoint.ip, port);
        let req = match head(&parts).body(tries.body()) {
            Ok(r) => r,
            Err(e) => return reply(a.grpc, StatusCode::BAD_REQUEST, None, None, &e.to_string()),
        };
        let in_flight = endpoint.start();
        let started = Instant::now();
        let result = try_once(&a, &dest, target, req).await;
        drop(in_flight);
        // Not the endpoint's failure (nothing reached it): no outcome recorded, no retry budget spent.
        if tries.resend_unprocessed(&result) {
            tracing::debug!(%target, "upstream did not process the request; sending it again");
            continue;
        }
        let outcome = match &result {
            Ok(r) => Outcome::of_status(r.status().as_u16()),
            Err(_) => Outcome::GatewayError,
        };
        dest.record(&endpoint, outcome, started.elapsed());
        if tries.first() {
            for m in a.mirrors {
                super::mirror::send(call, config, m, &parts, tries.replay.as_ref(), called_port);
            }
        }
        if let Some(backoff) = tries.retry(&result, &dest) {
            tokio::time::sleep(backoff).await;
            tracing::debug!(retries = tries.retries, %target, "retrying");
            continue;
        }
        return finish(a.grpc, result, target, backend);
    }
}

/// Fault injection, the local rate limit and the circuit breaker, in that order; the request's breaker permit,
/// or the agent's own answer.
async fn admit(a: &Attempt<'_>, dest: &Destination) -> Result<RequestPermit, Response<Body>> {
    if let Some(f) = &dest.settings().fault_injection {
        let injected = fault::decide(f);
        if let Some(delay) = injected.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some((status, grpc_status)) = injected.abort {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(reply(a.grpc, status, grpc_status, Some(Flag::FaultAbort), "fault injected"));
        }
    }
    if let Some(limiter) = dest.limiter() {
        if let Err(wait) = limiter.check(&a.call.source, Instant::now()) {
            let mut r = reply(a.grpc, StatusCode::TOO_MANY_REQUESTS, None, Some(Flag::RateLimited), "rate limited");
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64));
            return Err(r);
        }
    }
    let Some(permit) = dest.breaker().admit().await else {
        let flag = Some(Flag::UpstreamOverflow);
        return Err(reply(
            a.grpc,
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            flag,
            "circuit breaker open: too many requests",
        ));
    };
    dest.budget().request(Instant::now());
    Ok(permit)
}

/// One try at `target`, within the per-try timeout.
async fn try_once(
    a: &Attempt<'_>,
    dest: &Arc<Destination>,
    target: std::net::SocketAddr,
    req: Request<Body>,
) -> Result<Response<Body>, Failure> {
    let call = a.call;
    let breaker_dest = dest.clone();
    let guard = move || breaker_dest.breaker().connection().map(|p| Box::new(p) as Guard);
    let route = upstream::route_to(a.config, call.dp.secrets().is_some(), &call.pod, target);
    let send = upstream::send(&call.dp, &call.dp.l7().upstreams, &call.pod, (target, route), call.protocol, guard, req);
    match a.per_try {
        Some(limit) => match tokio::time::timeout(limit, send).await {
            Ok(r) => r.map_err(Failure::Upstream),
            Err(_) => Err(Failure::Timeout),
        },
        None => send.await.map_err(Failure::Upstream),
    }
}

/// The retry state of one request: the route's policy, the recorded body for another try, and what was spent.
struct Tries<'a> {
    policy: Option<RetryPolicy<'a>>,
    replay: Option<Replay>,
    next_body: Option<Body>,
    /// A request without a body can always be sent again: once, on another connection, when the upstream never
    /// processed it (its connection went away: an agent or server draining), whatever the route's retries say.
    bodiless: bool,
    resent_unprocessed: bool,
    retries: u32,
    started: bool,
    _retry_permit: Option<CountPermit>,
}

impl<'a> Tries<'a> {
    fn new(a: &Attempt<'a>, body: Body) -> Self {
        let policy = a.retry.map(RetryPolicy::new);
        let bodiless = http_body::Body::is_end_stream(&body);
        let keep_copy = policy.is_some() || !a.mirrors.is_empty();
        let (next_body, replay) = if keep_copy {
            let (recording, replay) = body::record(body);
            (Some(body::boxed(recording)), Some(replay))
        } else {
            (Some(body), None)
        };
        Tries {
            policy,
            replay,
            next_body,
            bodiless,
            resent_unprocessed: false,
            retries: 0,
            started: false,
            _retry_permit: None,
        }
    }

    /// The body for this try: the first body, or a replay set before another.
    fn body(&mut self) -> Body {
        self.next_body.take().unwrap_or_else(body::empty)
    }

    /// True once, for the first try that produced an outcome (mirrors go out then).
    fn first(&mut self) -> bool {
        !std::mem::replace(&mut self.started, true)
    }

    fn again(&self) -> Option<Body> {
        if self.bodiless { Some(body::empty()) } else { self.replay.as_ref().and_then(Replay::body) }
    }

    /// Whether `result` is a request the upstream never processed that can go once more.
    fn resend_unprocessed(&mut self, result: &Result<Response<Body>, Failure>) -> bool {
        let Err(Failure::Upstream(e)) = result else { return false };
        if !e.unprocessed() || self.resent_unprocessed {
            return false;
        }
        let Some(again) = self.again() else { return false };
        self.resent_unprocessed = true;
        self.next_body = Some(again);
        true
    }

    /// The backoff before another try, when the route retries this result and budget and breaker allow it.
    fn retry(&mut self, result: &Result<Response<Body>, Failure>, dest: &Destination) -> Option<Duration> {
        let policy = self.policy.as_ref()?;
        let retryable = match result {
            Ok(r) => policy.retryable(r.status().as_u16()),
            Err(Failure::Upstream(UpstreamError::Overflow)) => false,
            Err(_) => true,
        };
        if !retryable || self.retries >= policy.max_retries() {
            return None;
        }
        let again = self.replay.as_ref().and_then(Replay::body)?;
        if !dest.budget().try_retry(Instant::now()) {
            return None;
        }
        self._retry_permit = Some(dest.breaker().retry()?);
        self.retries += 1;
        self.next_body = Some(again);
        Some(policy.backoff(self.retries))
    }
}

/// The response for the downstream, or the agent's own answer for a try that produced none.
fn finish(
    grpc: bool,
    result: Result<Response<Body>, Failure>,
    target: std::net::SocketAddr,
    backend: &ServiceRef,
) -> Response<Body> {
    match result {
        Ok(response) => {
            let meshed = response.extensions().get::<upstream::Meshed>().is_some_and(|m| m.0);
            let mut response = super::wire::response_for_downstream(response);
            response.extensions_mut().insert(Upstream { endpoint: target, backend: backend.clone(), meshed });
            response
        }
        Err(Failure::Timeout) => {
            let flag = Some(Flag::UpstreamRequestTimeout);
            reply(grpc, StatusCode::GATEWAY_TIMEOUT, None, flag, "upstream request timeout")
        }
        Err(Failure::Upstream(UpstreamError::Overflow)) => {
            let flag = Some(Flag::UpstreamOverflow);
            reply(grpc, StatusCode::SERVICE_UNAVAILABLE, None, flag, "circuit breaker open: too many connections")
        }
        Err(Failure::Upstream(e)) => {
            tracing::info!(%target, error = %e, "upstream failed");
            let flag = Some(Flag::UpstreamConnectionFailure);
            reply(grpc, StatusCode::SERVICE_UNAVAILABLE, None, flag, "upstream connect error")
        }
    }
}
