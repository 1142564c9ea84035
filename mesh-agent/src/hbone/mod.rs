//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams over mutual TLS on port 15008, wire-compatible with
//! Istio's ztunnel (ALPN `h2`, `:authority` = original destination `ip:port`, `200` to proceed, `401` when
//! authorization refuses, `400` for a destination the server does not own, `503` when the application cannot be
//! reached).

pub mod client;
pub mod message;
mod stream;

pub use stream::H2Stream;

/// An HTTP/2 failure that proves the peer never processed the stream: it went away (GOAWAY) before it, or
/// refused it. Such a stream (an HBONE tunnel, an agent-to-agent request) may go again on another connection.
pub fn never_processed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// On a request sent straight on the connection between nodemesh agents ([`message`]): the protocol the
/// destination application speaks (`http1` or `http2`), which the receiving agent uses towards it. Also, from
/// agents before direct requests, on a CONNECT whose stream carries the calling agent's HTTP/2 (many requests of
/// one source workload) rather than the workload's own bytes; the server side still takes that form, so such
/// agents keep working during a rolling upgrade. Other HBONE peers never see it.
pub const L7_HEADER: &str = "nodemesh-l7";

/// ALPN protocol of HBONE.
pub const ALPN: &[u8] = b"h2";
/// HTTP/2 flow-control windows. A 64 KiB default window caps a stream at window/RTT; these let one stream fill
/// a 10 Gbit/s link at sub-millisecond RTTs (ztunnel uses the same sizes).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per pooled connection before the pool opens another one.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
