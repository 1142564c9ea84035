//! TrafficPolicy: resilience and traffic shaping for calls to one Service. The same types are the CRD's schema
//! (`nodemesh.io/v1alpha1` TrafficPolicy, in mesh-controller) and what the agent receives.

use serde::{Deserialize, Serialize};

/// A TrafficPolicy as the agent receives it: the settings for calls to `namespace/service`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub namespace: String,
    pub name: String,
    /// The Service (in `namespace`) the policy targets.
    pub service: String,
    pub settings: TrafficSettings,
}

/// What a TrafficPolicy sets; every part is optional. The CRD's spec is these plus `targetRef`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
}

/// A Go-style duration: `250ms`, `10s`, `1m30s` (the pattern is [`DURATION`]).
pub type Duration = String;
pub const DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Parses a [`Duration`] string (`1m30s`, `0.5s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 250ms, 10s or 1m30s");
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let value: f64 = rest[..number_end].parse().map_err(|_| bad())?;
        rest = &rest[number_end..];
        let (unit, len) = [("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .map(|(u, f)| (f, u.len()))
            .ok_or_else(bad)?;
        total += value * unit;
        rest = &rest[len..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_connections: Option<u32>,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_pending_requests: Option<u32>,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_requests: Option<u32>,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_retries: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub consecutive_5xx_errors: Option<u32>,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub consecutive_gateway_errors: Option<u32>,
    #[cfg_attr(feature = "schema", schemars(regex(pattern = DURATION)))]
    pub interval: Option<Duration>,
    #[cfg_attr(feature = "schema", schemars(regex(pattern = DURATION)))]
    pub base_ejection_time: Option<Duration>,
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 100)))]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Algorithm {
    RoundRobin,
    /// Power of two choices with an EWMA of latency.
    #[default]
    LeastRequest,
    RingHash,
    Maglev,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// For RingHash and Maglev: what requests are hashed on.
    pub hash_key: Option<HashKey>,
    /// Prefer endpoints on the same node, then zone, then region.
    #[serde(default)]
    pub locality_preference: bool,
}

/// What consistent hashing keys on: set exactly one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct HashKey {
    /// A request header's value.
    pub header: Option<String>,
    /// A cookie's value.
    pub cookie: Option<String>,
    /// The client's IP address.
    #[serde(default)]
    pub source_ip: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed as a percentage of live requests.
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 100)))]
    pub percent: u32,
    /// Retries always allowed per second, whatever the ratio.
    #[serde(default)]
    pub min_retries_per_second: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub requests_per_second: u32,
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub burst: Option<u32>,
    /// One bucket per source identity instead of one for the Service.
    #[serde(default)]
    pub per_source: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[cfg_attr(feature = "schema", schemars(regex(pattern = DURATION)))]
    pub fixed_delay: Duration,
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[cfg_attr(feature = "schema", schemars(range(min = 200, max = 599)))]
    pub http_status: Option<u16>,
    #[cfg_attr(feature = "schema", schemars(range(min = 0, max = 16)))]
    pub grpc_status: Option<u8>,
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        assert_eq!(parse_duration("1m30s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("0.5s").unwrap().as_millis(), 500);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        let huge = format!("{}h", "9".repeat(400));
        for bad in ["", "10", "5x", "ms", "1.2.3s", &huge] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
