//! One HTTP request observed from arrival to the last byte of its response, on either agent: trace context
//! continued (with this hop's span id in the forwarded headers) and `x-request-id` ensured on arrival; at the
//! end, the request metrics, the access-log line and the span.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Frame, SizeHint};
use mesh_common::telemetry::Effective;
use opentelemetry_proto::tonic::trace::v1::{Span as OtlpSpan, Status, span::SpanKind, status::StatusCode};

use super::context::{self, Span};
use super::otlp::{Finished, int_attribute, string_attribute};
use crate::body::{self, Body, BoxError};
use crate::http_message::FLAGS_HEADER;
use crate::metrics::labels::{Flow, Reporter};
use crate::metrics::traffic::RequestKey;
use crate::pod::PodContext;
use crate::snapshot::Snapshot;

/// Where the calling agent sent a request, left in the response's extensions for telemetry.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub endpoint: SocketAddr,
    pub backend: mesh_common::route::ServiceRef,
    /// Reached over HBONE (mTLS).
    pub meshed: bool,
}

/// The route (`namespace/name`) that matched a request, left in the response's extensions for telemetry.
#[derive(Clone, Debug)]
pub struct RouteName(pub String);

pub struct Observation {
    sinks: super::Sinks,
    pod: Arc<PodContext>,
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    settings: Effective,
    started: Instant,
    started_unix_ns: u64,
    span: Span,
    request_id: String,
    method: http::Method,
    path: String,
    authority: String,
    user_agent: Option<String>,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Starts observing `req` (from `client`, to `server` when known before routing) for `pod`: rewrites its trace headers for the next hop and counts its body.
pub fn start(
    sinks: &super::Sinks,
    config: &Snapshot,
    pod: &Arc<PodContext>,
    (client, server): (Option<SocketAddr>, Option<SocketAddr>),
    req: Request<Body>,
) -> (Observation, Request<Body>) {
    let settings = super::settings(config, pod);
    let (mut parts, body) = req.into_parts();
    let sampling = settings.tracing.as_ref().map_or(0.0, |t| t.sampling_percentage);
    let span = Span::start(context::extract(&parts.headers), sampling);
    span.inject(&mut parts.headers);
    let request_id = context::ensure_request_id(&mut parts.headers);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let counted = body::boxed(Counting { inner: body, bytes: request_bytes.clone(), on_end: None });
    // Path, authority and user agent go only into access-log lines and spans: not copied for metrics alone.
    let detail = settings.access_logging || span.sampled;
    let authority = match (detail, parts.uri.authority()) {
        (false, _) => String::new(),
        (true, Some(a)) => a.to_string(),
        (true, None) => parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string(),
    };
    let observation = Observation {
        sinks: sinks.clone(),
        pod: pod.clone(),
        client,
        server,
        settings,
        started: Instant::now(),
        started_unix_ns: unix_ns(),
        span,
        request_id,
        method: parts.method.clone(),
        path: if detail { parts.uri.path().to_string() } else { String::new() },
        authority,
        user_agent: parts
            .headers
            .get(http::header::USER_AGENT)
            .filter(|_| detail)
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        grpc: crate::http_message::is_grpc(&parts.headers),
        request_bytes,
    };
    (observation, Request::from_parts(parts, counted))
}

struct Outcome {
    status: u16,
    grpc_status: Option<u16>,
    flags: String,
    upstream: Option<SocketAddr>,
    route: Option<String>,
}

impl Observation {
    /// Hands back `response` with its body watched; the records are made when the body ends (or is dropped).
    pub fn finish(self, response: Response<Body>, flow: Flow) -> Response<Body> {
        let (parts, body) = response.into_parts();
        let outcome = Outcome {
            status: parts.status.as_u16(),
            grpc_status: grpc_status(&parts.headers),
            flags: parts.headers.get(FLAGS_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string(),
            upstream: parts.extensions.get::<Upstream>().map(|u| u.endpoint).or(self.server),
            route: parts.extensions.get::<RouteName>().map(|r| r.0.clone()),
        };
        let bytes = Arc::new(AtomicU64::new(0));
        let counted_bytes = bytes.clone();
        let on_end: OnEnd = Box::new(move |trailer_status| self.record(flow, outcome, counted_bytes, trailer_status));
        let body = body::boxed(Counting { inner: body, bytes, on_end: Some(on_end) });
        Response::from_parts(parts, body)
    }

    fn record(self, flow: Flow, outcome: Outcome, response_bytes: Arc<AtomicU64>, trailer_status: Option<u16>) {
        let duration = self.started.elapsed();
        let grpc_status = if self.grpc { trailer_status.or(outcome.grpc_status) } else { None };
        let (request_bytes, response_bytes) =
            (self.request_bytes.load(Ordering::Relaxed), response_bytes.load(Ordering::Relaxed));
        let protocol = if self.grpc { "grpc" } else { "http" };
        let key = RequestKey {
            flow: flow.clone(),
            protocol,
            response_code: outcome.status,
            grpc_status,
            flags: outcome.flags.as_str().into(),
        };
        self.sinks.traffic.request(key, duration, request_bytes, response_bytes);
        if self.settings.access_logging {
            let (trace_id, span_id) = (self.span.trace_id_hex(), self.span.span_id_hex());
            super::access_log::request(&super::access_log::RequestLine {
                flow: &flow,
                client: self.client,
                upstream: outcome.upstream,
                method: self.method.as_str(),
                path: &self.path,
                authority: &self.authority,
                protocol,
                status: outcome.status,
                grpc_status,
                flags: &outcome.flags,
                route: outcome.route.as_deref(),
                request_bytes,
                response_bytes,
                duration,
                trace_id: &trace_id,
                span_id: &span_id,
                request_id: &self.request_id,
                user_agent: self.user_agent.as_deref(),
            });
        }
        let collector = self.settings.tracing.as_ref().and_then(|t| t.collector.as_deref());
        if let (true, Some(collector)) = (self.span.sampled, collector) {
            let local = flow.local();
            let error = outcome.status >= 500 || grpc_status.is_some_and(|s| s != 0);
            let mut attributes = vec![
                string_attribute("http.request.method", self.method.as_str()),
                string_attribute("url.path", self.path.clone()),
                string_attribute("server.address", self.authority.clone()),
                int_attribute("http.response.status_code", i64::from(outcome.status)),
                string_attribute("nodemesh.reporter", flow.reporter.as_str()),
                string_attribute("nodemesh.source_workload", flow.source.workload.to_string()),
                string_attribute("nodemesh.destination_workload", flow.destination.workload.to_string()),
                string_attribute("nodemesh.destination_service", flow.service.host.to_string()),
                string_attribute("nodemesh.response_flags", outcome.flags.clone()),
                string_attribute("guid:x-request-id", self.request_id.clone()),
                string_attribute("node_id", self.sinks.node.to_string()),
            ];
            if let Some(s) = grpc_status {
                attributes.push(int_attribute("rpc.grpc.status_code", i64::from(s)));
            }
            if let Some(route) = &outcome.route {
                attributes.push(string_attribute("nodemesh.route", route.clone()));
            }
            if let Some(u) = outcome.upstream {
                attributes.push(string_attribute("upstream.address", u.to_string()));
            }
            let span = OtlpSpan {
                trace_id: self.span.trace_id.to_vec(),
                span_id: self.span.span_id.to_vec(),
                parent_span_id: self.span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
                name: format!("{} {}", self.method, flow.service.host),
                kind: match flow.reporter {
                    Reporter::Source => SpanKind::Client,
                    Reporter::Destination => SpanKind::Server,
                } as i32,
                start_time_unix_nano: self.started_unix_ns,
                end_time_unix_nano: self.started_unix_ns + duration.as_nanos() as u64,
                attributes,
                status: Some(Status {
                    code: if error { StatusCode::Error } else { StatusCode::Unset } as i32,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let service_name = format!("{}.{}", local.canonical_service, local.namespace);
            self.sinks.exporters.send(collector, Finished { service_name, span });
        }
        tracing::trace!(pod = %self.pod.name(), "request recorded");
    }
}

/// Called once when a body ends or is dropped, with the `grpc-status` of its trailers if any.
type OnEnd = Box<dyn FnOnce(Option<u16>) + Send>;

/// A body that counts its data bytes and reports its end.
struct Counting {
    inner: Body,
    bytes: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
}

impl Counting {
    fn end(&mut self, trailer_status: Option<u16>) {
        if let Some(on_end) = self.on_end.take() {
            on_end(trailer_status);
        }
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.end(None);
    }
}

impl http_body::Body for Counting {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                } else if let Some(trailers) = frame.trailers_ref() {
                    let status = grpc_status(trailers);
                    self.end(status);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.end(None),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
