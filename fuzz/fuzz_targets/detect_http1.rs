//! Protocol detection on a connection's first bytes, and what the agent does with an HTTP/1 head it parses:
//! the request's headers into trace-context extraction and request-id handling.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::l7::detect::{Protocol, classify};
use mesh_agent::telemetry::context;

fuzz_target!(|data: &[u8]| {
    // Whatever prefix of the data arrived first, the verdict is the same or not yet known.
    let whole = classify(data);
    if let Some(half) = classify(&data[..data.len() / 2]) {
        if half == Protocol::Http2 {
            assert_eq!(whole, Some(Protocol::Http2));
        }
    }
    if whole != Some(Protocol::Http1) {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if request.parse(data).is_err() {
        return;
    }
    let mut map = http::HeaderMap::new();
    for h in request.headers.iter() {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(h.name.as_bytes()), http::HeaderValue::from_bytes(h.value))
        {
            map.append(name, value);
        }
    }
    let _ = context::extract(&map);
    let id = context::ensure_request_id(&mut map);
    assert!(!id.is_empty());
});
