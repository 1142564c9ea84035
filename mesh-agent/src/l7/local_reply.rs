//! Responses the agent answers itself (no route, overflow, rate limit, denial, injected fault, timeout). Each
//! carries a response flag in `x-nodemesh-response-flags`, with Envoy's codes so dashboards and habits carry
//! over; gRPC callers get a trailers-only response with the matching `grpc-status` instead of a bare HTTP error.

use http::{HeaderValue, Response, StatusCode, header};

use crate::http_message::FLAGS_HEADER;

use crate::body::{self, Body};

/// Why the agent answered (Envoy's response flag names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// Circuit breaker overflow.
    UpstreamOverflow,
    /// No healthy endpoint.
    NoHealthyUpstream,
    /// Connecting to the endpoint failed.
    UpstreamConnectionFailure,
    /// A try or the whole request ran out of time.
    UpstreamRequestTimeout,
    RateLimited,
    FaultAbort,
    /// Authorization denied the request.
    Denied,
    /// The route has no usable backend.
    NoRoute,
}

impl Flag {
    pub fn code(self) -> &'static str {
        match self {
            Flag::UpstreamOverflow => "UO",
            Flag::NoHealthyUpstream => "UH",
            Flag::UpstreamConnectionFailure => "UF",
            Flag::UpstreamRequestTimeout => "UT",
            Flag::RateLimited => "RL",
            Flag::FaultAbort => "FI",
            Flag::Denied => "RBAC",
            Flag::NoRoute => "NR",
        }
    }
}

/// gRPC status codes the agent produces.
pub mod grpc {
    pub const PERMISSION_DENIED: u8 = 7;
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const UNAVAILABLE: u8 = 14;
    pub const INTERNAL: u8 = 13;
    pub const UNIMPLEMENTED: u8 = 12;
}

/// The gRPC status that stands for an HTTP status (gRPC's mapping, with 429 and 504 made specific).
fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => grpc::INTERNAL,
        401 => 16, // UNAUTHENTICATED
        403 => grpc::PERMISSION_DENIED,
        404 => grpc::UNIMPLEMENTED,
        429 => grpc::RESOURCE_EXHAUSTED,
        504 => grpc::DEADLINE_EXCEEDED,
        502 | 503 => grpc::UNAVAILABLE,
        _ => 2, // UNKNOWN
    }
}

/// A local reply in the caller's protocol: HTTP `status`, or for gRPC 200 with `grpc-status` (the given one, or
/// the one that stands for `status`).
pub fn reply(
    grpc: bool,
    status: StatusCode,
    grpc_status: Option<u8>,
    flag: Option<Flag>,
    message: &str,
) -> Response<Body> {
    let mut response = if grpc {
        let code = grpc_status.unwrap_or_else(|| grpc_status_for(status));
        let mut r = Response::new(body::empty());
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(u16::from(code)));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(body::full(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    if let Some(flag) = flag {
        response.headers_mut().insert(FLAGS_HEADER, HeaderValue::from_static(flag.code()));
    }
    response
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec): printable ASCII except `%` stays as is.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_callers_get_a_trailers_only_status() {
        let r = reply(true, StatusCode::TOO_MANY_REQUESTS, None, Some(Flag::RateLimited), "rate limited 100%");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "rate limited 100%25");
        assert_eq!(r.headers()[FLAGS_HEADER], "RL");
        let r = reply(false, StatusCode::FORBIDDEN, None, Some(Flag::Denied), "denied");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.headers().get("grpc-status").is_none());
        assert_eq!(grpc_status_for(StatusCode::SERVICE_UNAVAILABLE), grpc::UNAVAILABLE);
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), grpc::DEADLINE_EXCEEDED);
    }
}
