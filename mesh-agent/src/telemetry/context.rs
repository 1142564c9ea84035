//! Trace context propagation: W3C `traceparent`/`tracestate` and B3 (single `b3` header or the `X-B3-*`
//! headers) are read, continued with a new span id for this hop, and written back; `x-request-id` is added when
//! absent. Parsing follows W3C Trace Context level 1: an invalid `traceparent` starts a new trace (and drops
//! `tracestate`), it never fails the request.

use http::{HeaderMap, HeaderValue};

pub use crate::baggage::TRACEPARENT;
pub const TRACESTATE: &str = "tracestate";
pub const B3: &str = "b3";
pub const B3_TRACE_ID: &str = "x-b3-traceid";
pub const B3_SPAN_ID: &str = "x-b3-spanid";
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
pub const B3_SAMPLED: &str = "x-b3-sampled";
pub const B3_FLAGS: &str = "x-b3-flags";
pub const REQUEST_ID: &str = "x-request-id";

/// Where the incoming context came from, so the outgoing request keeps the caller's format too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The trace context of a request as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    pub parent_span_id: [u8; 8],
    /// `None`: the caller deferred the decision (B3 without a sampling flag).
    pub sampled: Option<bool>,
    pub tracestate: Option<String>,
    pub format: Format,
}

/// This hop's span: the trace it belongs to, its own id and its parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    tracestate: Option<String>,
    format: Option<Format>,
}

fn hex_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !hex_digits(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex, as W3C and B3 want it (by table: this runs several times per request).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    id.iter().any(|b| *b != 0).then_some(id)
}

/// A W3C `traceparent`: `version-traceid-parentid-flags`, lowercase hex. Version `ff` is invalid; version 00
/// has exactly these four fields; later versions may append fields after a `-`, which are ignored.
pub fn parse_traceparent(value: &str) -> Option<(/*trace*/ [u8; 16], /*parent*/ [u8; 8], /*flags*/ u8)> {
    // The fields are sliced by byte offset: a non-ASCII value would put a cut inside a character (found by the
    // `trace_context` fuzz target; header values reach here only as ASCII, but the function takes any string).
    if value.len() < 55 || !value.is_ascii() {
        return None;
    }
    let version: [u8; 1] = decode(&value[..2])?;
    if version[0] == 0xff || value.as_bytes()[2] != b'-' {
        return None;
    }
    if version[0] == 0 && value.len() != 55 {
        return None;
    }
    if value.len() > 55 && value.as_bytes()[55] != b'-' {
        return None;
    }
    let (trace, rest) = (&value[3..35], &value[35..]);
    if !rest.starts_with('-') || rest.as_bytes().get(17) != Some(&b'-') {
        return None;
    }
    let trace = nonzero(decode::<16>(trace)?)?;
    let parent = nonzero(decode::<8>(&rest[1..17])?)?;
    let flags: [u8; 1] = decode(&rest[18..20])?;
    Some((trace, parent, flags[0]))
}

/// B3 trace ids are 64 or 128 bits; a 64-bit one is left-padded with zeros.
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    let s = s.to_ascii_lowercase();
    match s.len() {
        32 => nonzero(decode::<16>(&s)?),
        16 => {
            let low: [u8; 8] = decode(&s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            nonzero(id)
        }
        _ => None,
    }
}

fn b3_span_id(s: &str) -> Option<[u8; 8]> {
    nonzero(decode::<8>(&s.to_ascii_lowercase())?)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// The context the request carries: W3C first, then B3 single, then B3 multi. Invalid headers count as absent.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    if let Some(value) = header(headers, TRACEPARENT) {
        if let Some((trace_id, parent_span_id, flags)) = parse_traceparent(value) {
            let tracestate = header(headers, TRACESTATE).filter(|s| !s.is_empty() && s.len() <= 512).map(String::from);
            return Some(Incoming {
                trace_id,
                parent_span_id,
                sampled: Some(flags & 1 == 1),
                tracestate,
                format: Format::W3c,
            });
        }
    }
    if let Some(value) = header(headers, B3) {
        let mut parts = value.split('-');
        let (trace, span) = (parts.next(), parts.next());
        if let (Some(trace), Some(span)) = (trace.and_then(b3_trace_id), span.and_then(b3_span_id)) {
            let sampled = parts.next().and_then(b3_sampled);
            return Some(Incoming {
                trace_id: trace,
                parent_span_id: span,
                sampled,
                tracestate: None,
                format: Format::B3Single,
            });
        }
    }
    let trace = header(headers, B3_TRACE_ID).and_then(b3_trace_id)?;
    let span = header(headers, B3_SPAN_ID).and_then(b3_span_id)?;
    let sampled = if header(headers, B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        header(headers, B3_SAMPLED).and_then(b3_sampled)
    };
    Some(Incoming { trace_id: trace, parent_span_id: span, sampled, tracestate: None, format: Format::B3Multi })
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if let Some(id) = nonzero(id) {
            return id;
        }
    }
}

/// A new trace that is not sampled, for what a tunnel's `CONNECT` carries (requests inside it carry their own
/// context): its trace id, for the connection's access log, and its `traceparent`.
pub fn unsampled_trace() -> (String, HeaderValue) {
    let span = Span::start(None, 0.0);
    let trace_id = span.trace_id_hex();
    let value = format!("00-{trace_id}-{}-00", span.span_id_hex());
    let header = HeaderValue::from_str(&value)
        .unwrap_or_else(|_| HeaderValue::from_static("00-00000000000000000000000000000001-0000000000000001-00"));
    (trace_id, header)
}

/// The trace id of a received `traceparent` (a tunnel's `CONNECT`), lowercase hex.
pub fn trace_id_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?;
    parse_traceparent(value).map(|(trace, _, _)| hex(&trace))
}

impl Span {
    /// This hop's span: a child of the incoming context, or the root of a new trace sampled at
    /// `sampling_percentage`.
    pub fn start(incoming: Option<Incoming>, sampling_percentage: f64) -> Span {
        let roll = || fastrand::f64() * 100.0 < sampling_percentage;
        match incoming {
            Some(i) => Span {
                trace_id: i.trace_id,
                span_id: random_id(),
                parent_span_id: Some(i.parent_span_id),
                sampled: i.sampled.unwrap_or_else(roll),
                tracestate: i.tracestate,
                format: Some(i.format),
            },
            None => Span {
                trace_id: random_id(),
                span_id: random_id(),
                parent_span_id: None,
                sampled: roll(),
                tracestate: None,
                format: None,
            },
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Rewrites the request's context so the next hop is this span's child: always `traceparent` (and the
    /// caller's `tracestate`), plus B3 in the format the caller used.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let flags = if self.sampled { "01" } else { "00" };
        let (trace, span) = (self.trace_id_hex(), self.span_id_hex());
        if self.tracestate.is_none() {
            headers.remove(TRACESTATE);
        }
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        set(TRACEPARENT, format!("00-{trace}-{span}-{flags}"));
        if let Some(state) = &self.tracestate {
            set(TRACESTATE, state.clone());
        }
        let sampled = if self.sampled { "1" } else { "0" };
        let parent = self.parent_span_id.map(|p| hex(&p));
        match self.format {
            Some(Format::B3Single) => {
                let parent = parent.map(|p| format!("-{p}")).unwrap_or_default();
                set(B3, format!("{trace}-{span}-{sampled}{parent}"));
            }
            Some(Format::B3Multi) => {
                set(B3_TRACE_ID, trace);
                set(B3_SPAN_ID, span);
                set(B3_SAMPLED, sampled.to_string());
                if let Some(p) = parent {
                    set(B3_PARENT_SPAN_ID, p);
                }
            }
            Some(Format::W3c) | None => {}
        }
    }
}

/// The request's `x-request-id`, added (a random UUID v4) when it has none.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    if let Some(id) = header(headers, REQUEST_ID).filter(|id| !id.is_empty()) {
        return id.to_string();
    }
    let mut b: [u8; 16] = random_id();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    let id = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID, v);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn hex_is_lowercase_two_digits_a_byte_and_round_trips() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xf0, 0x7e]), "00ab0ff07e");
        let id: [u8; 16] = random_id();
        assert_eq!(decode::<16>(&hex(&id)), Some(id));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn w3c_traceparent_follows_the_spec() {
        let (trace, parent, flags) = parse_traceparent(VALID).unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&parent), "00f067aa0ba902b7");
        assert_eq!(flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", // v00 with more fields
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // Non-ASCII where a field boundary falls: was a panic (slicing inside a character).
            "0\u{e9}-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields; the known prefix still counts.
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever").is_some());
        assert_eq!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"), None);
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_gets_a_new_span() {
        let incoming = extract(&headers(&[(TRACEPARENT, VALID), (TRACESTATE, "congo=t61rcWkgMzE")])).unwrap();
        let span = Span::start(Some(incoming), 0.0);
        assert!(span.sampled, "the caller's decision wins over the local percentage");
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        let tp = out[TRACEPARENT].to_str().unwrap();
        let (trace, parent, flags) = parse_traceparent(tp).unwrap();
        assert_eq!(hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(hex(&parent), "00f067aa0ba902b7");
        assert_eq!(parent, span.span_id);
        assert_eq!(flags, 1);
        assert_eq!(out[TRACESTATE], "congo=t61rcWkgMzE");
    }

    #[test]
    fn an_invalid_traceparent_restarts_the_trace_and_drops_tracestate() {
        let h = headers(&[(TRACEPARENT, "00-zz-00f067aa0ba902b7-01"), (TRACESTATE, "a=b")]);
        assert_eq!(extract(&h), None);
        let span = Span::start(extract(&h), 100.0);
        assert!(span.sampled && span.parent_span_id.is_none());
        let mut out = h.clone();
        span.inject(&mut out);
        assert!(out.get(TRACESTATE).is_none());
        assert!(parse_traceparent(out[TRACEPARENT].to_str().unwrap()).is_some());
    }

    #[test]
    fn b3_single_and_multi_are_read_and_written_back_in_kind() {
        let single = extract(&headers(&[(B3, "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")]));
        let single = single.unwrap();
        assert_eq!((single.format, single.sampled), (Format::B3Single, Some(true)));
        let span = Span::start(Some(single), 0.0);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        let b3 = out[B3].to_str().unwrap();
        assert!(b3.starts_with(&format!("80f198ee56343ba864fe8b2a57d3eff7-{}-1-e457b5a2e4d86bd1", span.span_id_hex())));

        let multi = headers(&[(B3_TRACE_ID, "a3ce929d0e0e4736"), (B3_SPAN_ID, "00f067aa0ba902b7"), (B3_SAMPLED, "0")]);
        let multi = extract(&multi).unwrap();
        assert_eq!(hex(&multi.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(multi.sampled, Some(false));
        let span = Span::start(Some(multi), 100.0);
        assert!(!span.sampled);
        let mut out = HeaderMap::new();
        span.inject(&mut out);
        assert_eq!(out[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
        assert_eq!(out[B3_SAMPLED], "0");
        assert!(extract(&headers(&[(B3, "garbage")])).is_none());
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = headers(&[(REQUEST_ID, "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h[REQUEST_ID], id.as_str());
        assert_eq!(&id[14..15], "4");
    }
}
