//! Requests a calling agent sends straight on an HBONE connection ([`crate::hbone::message`]), each naming the
//! pod address it is for. They go through the same per-request pipeline as agent-to-agent HTTP inside a tunnel
//! ([`crate::l7::inbound`]: authorization, telemetry, the application's own protocol over connections that carry
//! the caller's address); only the framing differs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body as _;

use crate::body;
use crate::dataplane::DataPlane;
use crate::hbone::L7_HEADER;
use crate::hbone::message::{self, RecvBody, TARGET_HEADER};
use crate::l7::detect::Protocol;
use crate::l7::inbound::{self as l7_inbound, Session};
use crate::metrics::Direction;
use crate::pod::PodContext;

/// The requests of one HBONE connection: one verified caller, one pod, a session per (address, protocol) so
/// that connections to the application are reused across the caller's requests.
pub struct Requests {
    dp: DataPlane,
    pod: Arc<PodContext>,
    principal: String,
    peer: SocketAddr,
    sessions: Mutex<HashMap<(SocketAddr, Protocol), Arc<Session>>>,
}

impl Requests {
    pub fn new(dp: DataPlane, pod: Arc<PodContext>, principal: String, peer: SocketAddr) -> Self {
        Requests { dp, pod, principal, peer, sessions: Mutex::default() }
    }

    fn session(&self, target: SocketAddr, app: Protocol) -> Arc<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .entry((target, app))
            .or_insert_with(|| {
                let (dp, pod) = (self.dp.clone(), self.pod.clone());
                Arc::new(Session::new(dp, pod, Some(self.principal.clone()), self.peer, target, app))
            })
            .clone()
    }
}

/// Whether a stream on an HBONE connection is such a request (not a CONNECT).
pub fn is_direct<B>(request: &Request<B>) -> bool {
    request.method() != http::Method::CONNECT && request.headers().contains_key(TARGET_HEADER)
}

/// Where a request goes and what the application there speaks: one of the pod's own addresses (400 otherwise:
/// the caller is authenticated, the address is its claim) and a known protocol (400 otherwise).
fn destination(headers: &HeaderMap, pod: &PodContext) -> Result<(SocketAddr, Protocol), StatusCode> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let target = crate::pod::own_address(text(TARGET_HEADER), &pod.net.ips).ok_or(StatusCode::BAD_REQUEST)?;
    let app = text(L7_HEADER).and_then(Protocol::parse).ok_or(StatusCode::BAD_REQUEST)?;
    Ok((target, app))
}

/// Serves one request and sends its response (and body) back on the stream.
pub async fn serve(requests: Arc<Requests>, request: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>) {
    let (target, app) = match destination(request.headers(), &requests.pod) {
        Ok(found) => found,
        Err(code) => {
            tracing::info!(target = ?request.headers().get(TARGET_HEADER), "request for an address this pod does not own");
            requests.dp.metrics().denied(&requests.pod, Direction::Inbound, "bad_destination");
            let _ = respond.send_response(Response::builder().status(code).body(()).unwrap_or_default(), true);
            return;
        }
    };
    let session = requests.session(target, app);
    let (mut parts, recv) = request.into_parts();
    parts.headers.remove(TARGET_HEADER);
    parts.headers.remove(L7_HEADER);
    let request = Request::from_parts(parts, body::boxed(RecvBody::new(recv)));
    let (parts, body) = l7_inbound::handle(&session, request).await.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) if !end => {
            if let Err(e) = message::send_body(body, send).await {
                tracing::debug!(error = %e, "response body not sent to its end");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "the calling agent went away before the response"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NetNs;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn a_request_must_name_one_of_the_pods_addresses_and_a_known_protocol() {
        let Ok(netns) = NetNs::current() else { return };
        let pod = PodContext::for_test(netns, "default", "web", &["10.0.0.7", "fd00::7"]);
        let found = destination(&headers(&[(TARGET_HEADER, "10.0.0.7:8080"), (L7_HEADER, "http1")]), &pod);
        assert_eq!(found, Ok(("10.0.0.7:8080".parse().unwrap(), Protocol::Http1)));
        let found = destination(&headers(&[(TARGET_HEADER, "[fd00::7]:80"), (L7_HEADER, "http2")]), &pod);
        assert_eq!(found, Ok(("[fd00::7]:80".parse().unwrap(), Protocol::Http2)));
        for bad in [
            headers(&[(TARGET_HEADER, "10.0.0.8:8080"), (L7_HEADER, "http1")]),
            headers(&[(TARGET_HEADER, "10.0.0.7"), (L7_HEADER, "http1")]),
            headers(&[(TARGET_HEADER, "10.0.0.7:8080"), (L7_HEADER, "smtp")]),
            headers(&[(TARGET_HEADER, "10.0.0.7:8080")]),
            headers(&[(L7_HEADER, "http1")]),
        ] {
            assert_eq!(destination(&bad, &pod), Err(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }
}
