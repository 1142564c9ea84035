//! JSON access logs on stdout: one line per HTTP request and one per TCP connection, for workloads whose
//! Telemetry turns them on (off by default). Field names are stable; see docs/observability.md.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;

use crate::metrics::labels::{Flow, Peer};
use crate::metrics::traffic::ConnectionInfo;
use crate::pod::PodContext;
use crate::snapshot::Snapshot;

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn peer(p: &Peer, address: Option<SocketAddr>) -> serde_json::Value {
    json!({
        "workload": p.workload,
        "namespace": p.namespace,
        "principal": p.principal,
        "app": p.app,
        "version": p.version,
        "address": address.map(|a| a.to_string()),
    })
}

fn write(line: &impl Serialize) {
    let Ok(mut text) = serde_json::to_vec(line) else { return };
    text.push(b'\n');
    // One write per line, so lines from concurrent requests never interleave.
    let _ = std::io::stdout().lock().write_all(&text);
}

pub fn enabled(config: &Snapshot, pod: &PodContext) -> bool {
    crate::telemetry::settings(config, pod).access_logging
}

/// A TCP connection, when it ends.
pub fn connection(
    config: &Snapshot,
    pod: &PodContext,
    info: &ConnectionInfo,
    duration: Duration,
    received: u64,
    sent: u64,
    error: Option<&str>,
) {
    if !enabled(config, pod) {
        return;
    }
    let f = &info.flow;
    write(&json!({
        "time": now(),
        "kind": "tcp",
        "reporter": f.reporter.as_str(),
        "source": peer(&f.source, Some(info.client)),
        "destination": peer(&f.destination, Some(info.server)),
        "destinationService": f.service.host,
        "connectionSecurityPolicy": f.security.as_str(),
        "bytesReceived": received,
        "bytesSent": sent,
        "durationMs": millis(duration),
        "error": error,
        "traceId": info.trace_id.as_deref(),
    }));
}

/// One HTTP request, when its response has been sent.
pub struct RequestLine<'a> {
    pub flow: &'a Flow,
    pub client: Option<SocketAddr>,
    pub upstream: Option<SocketAddr>,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub flags: &'a str,
    pub route: Option<&'a str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub duration: Duration,
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub request_id: &'a str,
    pub user_agent: Option<&'a str>,
}

pub fn request(r: &RequestLine<'_>) {
    let f = r.flow;
    write(&json!({
        "time": now(),
        "kind": "http",
        "reporter": f.reporter.as_str(),
        "source": peer(&f.source, r.client),
        "destination": peer(&f.destination, r.upstream),
        "destinationService": f.service.host,
        "connectionSecurityPolicy": f.security.as_str(),
        "method": r.method,
        "path": r.path,
        "authority": r.authority,
        "protocol": r.protocol,
        "responseCode": r.status,
        "grpcStatus": r.grpc_status,
        "responseFlags": r.flags,
        "route": r.route,
        "bytesReceived": r.request_bytes,
        "bytesSent": r.response_bytes,
        "durationMs": millis(r.duration),
        "traceId": r.trace_id,
        "spanId": r.span_id,
        "requestId": r.request_id,
        "userAgent": r.user_agent,
    }));
}
