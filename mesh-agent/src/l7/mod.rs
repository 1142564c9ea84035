//! L7 in the node agent: HTTP/1.1, HTTP/2 and gRPC for enrolled pods, with no extra hop.
//!
//! - `outbound`: a pod calls a Service → protocol detection → routing (Gateway API), filters, backends →
//!   `forward`: faults, rate limit, circuit breaker, balancer, retries, timeouts, outlier detection, mirrors.
//! - `inbound`: requests for a local pod → per-request authorization → the application, in its protocol.
//! - Between agents a request travels as an HTTP/2 stream of its own on the pooled mTLS HBONE connection
//!   (`upstream`, `crate::hbone::message`); to an HBONE peer that does not take that, in the application's own
//!   protocol inside a tunnel. `wire` puts a request in the form of the connection it goes on.
//!
//! Each concern is its own module with its own tests; the pipeline in `outbound`/`forward` calls them in order.

pub mod balance;
pub mod breaker;
pub mod client;
pub mod destination;
pub mod detect;
pub mod fault;
pub mod filters;
pub mod forward;
pub mod inbound;
pub mod local_reply;
pub mod mirror;
pub mod outbound;
pub mod outlier;
pub mod ratelimit;
pub mod retry;
pub mod router;
pub mod server;
pub mod upgrade;
pub mod upstream;
pub mod wire;

/// True for `percent` % of the calls (0–100): fault injection and mirroring decide per request with it.
pub fn roll(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

/// The agent's L7 state, shared by all connections: compiled routes, per-Service runtime state and pooled
/// upstream connections.
#[derive(Default)]
pub struct L7 {
    pub routes: router::RouteTables,
    pub destinations: destination::Destinations,
    pub upstreams: client::HttpPool<upstream::UpstreamKey>,
}

impl L7 {
    /// Drops pooled connections of a pod that left.
    pub fn forget_pod(&self, netns_cookie: u64) {
        self.upstreams.retain(|k| k.netns_cookie != netns_cookie);
    }
}

#[cfg(test)]
mod tests;
