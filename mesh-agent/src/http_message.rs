//! What the agent's HTTP layers read off a message the same way: whether it is gRPC (local replies answer in
//! gRPC's terms, telemetry labels by it), and the header that carries the agent's own response flags from a
//! local reply to the telemetry that observes it.

use http::{HeaderMap, header};

/// Set on the agent's own replies (Envoy's response flag codes), read and removed by telemetry.
pub const FLAGS_HEADER: &str = "x-nodemesh-response-flags";

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}
