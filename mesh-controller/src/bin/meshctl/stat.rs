//! `meshctl stat`: per-workload golden signals from the agents' destination-side request metrics, over a
//! window (two scrapes `window` apart), like `linkerd viz stat`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::output::{self, Format};
use crate::prom::{self, Sample};

const REQUESTS: &str = "nodemesh_requests_total";
const DURATION_BUCKET: &str = "nodemesh_request_duration_seconds_bucket";

/// Counts of one workload: requests, successes (not 5xx), and the duration histogram (upper bound → count).
#[derive(Default, Clone)]
struct Counts {
    requests: f64,
    successes: f64,
    buckets: BTreeMap<u64, f64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub workload: String,
    pub requests: u64,
    /// Share of requests that were not answered with a 5xx, 0–1; absent without requests.
    pub success_rate: Option<f64>,
    pub rps: f64,
    /// Milliseconds.
    pub latency_p50_ms: Option<f64>,
    pub latency_p90_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

/// Bounds are kept as integer microseconds so they can key a map.
fn bound_us(le: &str) -> u64 {
    if le == "+Inf" { u64::MAX } else { le.parse::<f64>().map(|s| (s * 1e6).round() as u64).unwrap_or(u64::MAX) }
}

fn collect(samples: &[Sample]) -> BTreeMap<(String, String), Counts> {
    let mut out: BTreeMap<(String, String), Counts> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.labels.get("reporter").map(String::as_str) == Some("destination")) {
        let key = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let entry = out.entry((key("destination_workload_namespace"), key("destination_workload"))).or_default();
        if s.name == REQUESTS {
            entry.requests += s.value;
            if !key("response_code").starts_with('5') {
                entry.successes += s.value;
            }
        } else if s.name == DURATION_BUCKET {
            *entry.buckets.entry(bound_us(&key("le"))).or_default() += s.value;
        }
    }
    out
}

/// Prometheus' `histogram_quantile`: linear within the bucket that holds the quantile.
fn quantile(q: f64, buckets: &BTreeMap<u64, f64>) -> Option<f64> {
    let total = *buckets.get(&u64::MAX)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, cumulative) in buckets {
        if *cumulative >= rank {
            if *bound == u64::MAX {
                return Some(lower);
            }
            let upper = *bound as f64 / 1e3;
            let inside = cumulative - below;
            let fraction = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
            return Some(lower + (upper - lower) * fraction);
        }
        lower = *bound as f64 / 1e3;
        below = *cumulative;
    }
    None
}

/// Where the agents' metrics are read from.
pub enum Source {
    /// `host:port` endpoints.
    Endpoints(Vec<String>),
    /// Every agent pod of a Kubernetes install, through the API server's port-forward.
    Kubernetes(kube::Client),
}

const METRICS_PORT: u16 = 15020;

async fn scrape(source: &Source) -> anyhow::Result<Vec<Sample>> {
    let texts: Vec<String> = match source {
        Source::Endpoints(endpoints) => {
            futures::future::try_join_all(endpoints.iter().map(|e| async move {
                let (status, text) = crate::admin::get(e, "/metrics").await?;
                anyhow::ensure!(status == 200, "{e}/metrics answered {status}");
                Ok(text)
            }))
            .await?
        }
        Source::Kubernetes(client) => {
            let (pods, agents) = crate::admin::agent_pods(client.clone()).await?;
            anyhow::ensure!(!agents.is_empty(), "no nodemesh agent pods found (is nodemesh installed?)");
            let pods = &pods;
            futures::future::try_join_all(agents.iter().map(|(node, name)| async move {
                let (status, text) = crate::admin::get_through_pod(pods, name, METRICS_PORT, "/metrics").await?;
                anyhow::ensure!(status == 200, "the agent on {node} answered {status} for /metrics");
                Ok(text)
            }))
            .await?
        }
    };
    Ok(texts.iter().flat_map(|t| prom::parse(t)).collect())
}

fn matches(target: Option<&str>, namespace: &str, workload: &str) -> bool {
    match target.map(|t| t.split_once('/')) {
        None => true,
        Some(Some((ns, w))) => ns == namespace && w == workload,
        Some(None) => target == Some(namespace),
    }
}

pub async fn run(format: Format, target: Option<&str>, source: &Source, window: Duration) -> anyhow::Result<bool> {
    let before = collect(&scrape(source).await?);
    tokio::time::sleep(window).await;
    let after = collect(&scrape(source).await?);
    let seconds = window.as_secs_f64().max(0.001);
    let rows: Vec<Row> = after
        .into_iter()
        .filter(|((ns, w), _)| matches(target, ns, w))
        .map(|((namespace, workload), now)| {
            let then = before.get(&(namespace.clone(), workload.clone())).cloned().unwrap_or_default();
            let requests = (now.requests - then.requests).max(0.0);
            let successes = (now.successes - then.successes).max(0.0);
            let buckets: BTreeMap<u64, f64> =
                now.buckets.iter().map(|(b, n)| (*b, n - then.buckets.get(b).copied().unwrap_or(0.0))).collect();
            let round = |v: Option<f64>| v.map(|v| (v * 1000.0).round() / 1000.0);
            Row {
                namespace,
                workload,
                requests: requests as u64,
                success_rate: (requests > 0.0).then(|| successes / requests),
                rps: (requests / seconds * 100.0).round() / 100.0,
                latency_p50_ms: round(quantile(0.5, &buckets)),
                latency_p90_ms: round(quantile(0.9, &buckets)),
                latency_p99_ms: round(quantile(0.99, &buckets)),
            }
        })
        .collect();
    if output::structured(format, &rows)? {
        return Ok(true);
    }
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}ms"));
    output::table(
        &["NAMESPACE", "WORKLOAD", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P90", "LATENCY_P99"],
        &rows
            .iter()
            .map(|r| {
                vec![
                    r.namespace.clone(),
                    r.workload.clone(),
                    r.success_rate.map_or("-".to_string(), |s| format!("{:.2}%", s * 100.0)),
                    format!("{:.1}", r.rps),
                    ms(r.latency_p50_ms),
                    ms(r.latency_p90_ms),
                    ms(r.latency_p99_ms),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        // 10 requests: 5 within 1ms, 4 more within 5ms, 1 within 10ms (seconds in `le`).
        let buckets: BTreeMap<u64, f64> =
            [(bound_us("0.001"), 5.0), (bound_us("0.005"), 9.0), (bound_us("0.01"), 10.0), (u64::MAX, 10.0)].into();
        assert_eq!(quantile(0.5, &buckets), Some(1.0));
        let p90 = quantile(0.9, &buckets).unwrap();
        assert!((p90 - 5.0).abs() < 1e-9, "{p90}");
        let p99 = quantile(0.99, &buckets).unwrap();
        assert!(p99 > 5.0 && p99 <= 10.0, "{p99}");
        assert_eq!(quantile(0.5, &BTreeMap::new()), None);
    }
}
