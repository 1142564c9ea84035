//! The header surgery between HTTP versions: a request leaves in the form of the connection it goes on (which
//! the pool knows only once it has one), a response goes back without the upstream's connection headers.

use http::header::{self, HOST};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderMap, HeaderValue, Request, Response, Version};

use super::detect::Protocol;
use crate::body::Body;

/// Connection-specific headers never cross a proxy (RFC 9110 §7.6.1); HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
            .collect();
        for name in named {
            headers.remove(name.as_str());
        }
    }
    for h in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHORIZATION] {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Rewrites a request for the wire protocol: HTTP/2 wants an absolute URI (its `:authority`) and no Host,
/// HTTP/1 an origin-form URI and a Host header.
pub fn for_protocol(req: Request<Body>, wire: Protocol) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let authority =
        parts.uri.authority().cloned().or_else(|| {
            parts.headers.get(HOST).and_then(|h| h.to_str().ok()).and_then(|h| Authority::try_from(h).ok())
        });
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if wire == Protocol::Http2 {
        let mut uri = Uri::builder().scheme(parts.uri.scheme().cloned().unwrap_or(Scheme::HTTP)).path_and_query(path);
        if let Some(a) = &authority {
            uri = uri.authority(a.clone());
        }
        parts.uri = uri.build().unwrap_or_default();
        parts.headers.remove(HOST);
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = Uri::from(path);
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(HOST, v);
        }
        parts.version = Version::HTTP_11;
    }
    Request::from_parts(parts, body)
}

/// A response from upstream, for the downstream side.
pub fn response_for_downstream(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // hyper's HTTP/2 server ignores the version; its HTTP/1 server needs one it can write.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, body)
}
