//! Trace context from request headers (W3C `traceparent`, B3 single and multi header): decoded without
//! panicking; a parsed traceparent has non-zero ids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::telemetry::context::{extract, parse_traceparent};

const NAMES: [&str; 6] = ["traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-parentspanid"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some((trace, parent, _flags)) = parse_traceparent(text) {
        assert!(trace != [0; 16] && parent != [0; 8]);
    }
    let mut headers = http::HeaderMap::new();
    for (name, line) in NAMES.iter().zip(text.lines()) {
        if let Ok(value) = http::HeaderValue::from_str(line) {
            headers.insert(*name, value);
        }
    }
    let _ = extract(&headers);
});
