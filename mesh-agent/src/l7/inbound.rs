//! The receiving side of L7: HTTP arriving for a local pod — a calling agent's request straight on an HBONE
//! connection (`proxy::hbone_requests`), agent-to-agent HTTP/2 in an HBONE stream from agents before that, or the
//! client's own HTTP when the pod's AuthorizationPolicies look at requests — is authorized request by request
//! (403, gRPC PERMISSION_DENIED, with the connection staying up for the next request) and forwarded to the
//! application in its own protocol over connections that carry the caller's address.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_common::policy::Request as PolicyRequest;

use super::client::{Dialed, HttpPool, Io, io_error};
use super::detect::{self, Hint, Protocol, Rewind};
use super::local_reply::{Flag, reply};
use super::{server, upgrade, wire};
use crate::baggage::Baggage;
use crate::body::{self, Body};
use crate::dataplane::DataPlane;
use crate::http_message::is_grpc;
use crate::metrics::{Flow, Security};
use crate::pod::PodContext;
use crate::policy;
use crate::telemetry::request;

/// One inbound connection (or HBONE stream) served at L7.
pub struct Session {
    pub dp: DataPlane,
    pub pod: Arc<PodContext>,
    /// Verified SPIFFE ID of the caller; `None` for plaintext.
    pub principal: Option<String>,
    pub peer: SocketAddr,
    /// The pod address the caller dialled.
    pub target: SocketAddr,
    /// The protocol the application speaks.
    pub app: Protocol,
    /// Connections to the application for this session only: they carry this caller's address.
    app_conns: HttpPool<()>,
    /// What the caller's tunnel said of it, for a caller the config does not know.
    caller: Baggage,
}

impl Session {
    pub fn new(
        dp: DataPlane,
        pod: Arc<PodContext>,
        principal: Option<String>,
        peer: SocketAddr,
        target: SocketAddr,
        app: Protocol,
    ) -> Self {
        Session { dp, pod, principal, peer, target, app, app_conns: HttpPool::default(), caller: Baggage::default() }
    }

    /// Labels a caller the config does not know by what its tunnel's `baggage` said (`crate::baggage`).
    pub fn with_caller(mut self, caller: Baggage) -> Self {
        self.caller = caller;
        self
    }
}

/// For streams whose policies look at requests: when `io` speaks HTTP, serves it to its end (with the session
/// `session` makes for the detected protocol) and returns `None`; otherwise gives the stream back for the
/// connection-level decision. A stream that fails during detection is dropped (`None`).
pub async fn serve_if_http<I: Io>(io: I, session: impl FnOnce(Protocol) -> Session) -> Option<Rewind<I>> {
    let (protocol, io) = detect::detect(io, Hint::Detect).await.ok()?;
    if protocol == Protocol::Opaque {
        return Some(io);
    }
    serve(io, protocol, session(protocol)).await;
    None
}

/// Serves `downstream` HTTP on `io` until the caller closes it.
pub async fn serve(io: impl Io, downstream: Protocol, session: Session) {
    let (limits, drain) = (*session.dp.limits(), session.dp.drain());
    let (metrics, pod) = (session.dp.metrics().clone(), session.pod.clone());
    let session = Arc::new(session);
    let ended = server::serve(io, downstream, &limits, drain, move |req: Request<Incoming>| {
        let session = session.clone();
        async move { handle(&session, req.map(body::boxed)).await }
    })
    .await;
    if ended == server::Ended::HeaderTimeout {
        metrics.cut(&pod, crate::metrics::Direction::Inbound, "header_timeout");
    }
}

fn authorize<B>(s: &Session, req: &Request<B>) -> Result<(), policy::Refusal> {
    let headers: Vec<(&str, &str)> =
        req.headers().iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))).collect();
    let request = PolicyRequest { method: req.method().as_str(), path: req.uri().path(), headers: &headers };
    let config = s.dp.config();
    policy::check_request(&config, &s.pod, s.principal.as_deref(), s.peer.ip(), s.target.port(), request)
}

fn denied(s: &Session, refusal: policy::Refusal, grpc: bool) -> Response<Body> {
    refusal.record(s.dp.metrics(), &s.dp.config(), &s.pod, s.principal.as_deref(), s.peer);
    reply(grpc, StatusCode::FORBIDDEN, None, Some(Flag::Denied), "RBAC: access denied")
}

/// Authorizes one request and answers it: from the application, or the agent's refusal.
pub async fn handle(s: &Session, req: Request<Body>) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let upgrade = upgrade::is_upgrade(&req);
    let ends = (Some(s.peer), Some(s.target));
    let (observation, req) = request::start(s.dp.sinks(), &s.dp.config(), &s.pod, ends, req);
    let response = match authorize(s, &req) {
        Err(refusal) => denied(s, refusal, grpc),
        // Counted like any request: the switch (101, or 200 for CONNECT) or the refusal.
        Ok(()) if upgrade => match crate::socket::connect_to_app(s.dp.steering(), &s.pod, s.target, s.peer).await {
            Ok(app) => upgrade::relay(req, Box::new(app), Box::new(())).await,
            Err(e) => upgrade::unreachable_upstream(&e.to_string()),
        },
        Ok(()) => to_app(s, grpc, req).await,
    };
    let security = if s.principal.is_some() { Security::MutualTls } else { Security::None };
    let config = s.dp.config();
    let mut flow = Flow::inbound(&config, &s.pod, s.peer.ip(), s.principal.as_deref(), s.target.port(), security);
    s.caller.label(&mut flow.source);
    observation.finish(response, flow)
}

async fn to_app(s: &Session, grpc: bool, req: Request<Body>) -> Response<Body> {
    let dial = || async {
        let app = crate::socket::connect_to_app(s.dp.steering(), &s.pod, s.target, s.peer).await.map_err(io_error)?;
        Ok(Dialed::Io(Box::new(app), Box::new(())))
    };
    match s.app_conns.send((), s.app, req, dial).await {
        Ok(response) => wire::response_for_downstream(response),
        Err(e) => {
            tracing::info!(target = %s.target, error = %e, "cannot reach the application");
            reply(
                grpc,
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                Some(Flag::UpstreamConnectionFailure),
                "cannot reach the application",
            )
        }
    }
}
