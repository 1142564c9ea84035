//! Local rate limiting: a token bucket per destination Service (or per Service and source identity) in each
//! calling node's agent. A request that finds the bucket empty is answered 429 with `retry-after` (gRPC:
//! RESOURCE_EXHAUSTED) without leaving the node. "Local" as in Envoy's local rate limit: with callers on N
//! nodes the Service sees up to N times the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_common::traffic::RateLimit;

/// Per-source buckets kept at most; beyond it, full (idle) buckets are dropped first.
const MAX_SOURCES: usize = 10_000;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    per_source: bool,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit) -> Self {
        let rate = f64::from(limit.requests_per_second.max(1));
        RateLimiter {
            rate,
            burst: f64::from(limit.burst.unwrap_or(limit.requests_per_second).max(1)),
            per_source: limit.per_source,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for a request from `source`; `Err` carries how long until the next token.
    pub fn check(&self, source: &str, now: Instant) -> Result<(), Duration> {
        let key = if self.per_source { source } else { "" };
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens =
            (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let l = RateLimiter::new(&RateLimit { requests_per_second: 10, burst: Some(3), per_source: false });
        let t = Instant::now();
        assert!((0..3).all(|_| l.check("a", t).is_ok()));
        let wait = l.check("b", t).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert!(l.check("a", t + Duration::from_millis(100)).is_ok(), "one token back after 1/rate");
        assert!(l.check("a", t + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn per_source_buckets_are_independent() {
        let l = RateLimiter::new(&RateLimit { requests_per_second: 1, burst: None, per_source: true });
        let t = Instant::now();
        assert!(l.check("a", t).is_ok());
        assert!(l.check("a", t).is_err());
        assert!(l.check("b", t).is_ok());
    }
}
