//! Telemetry: access logging, tracing and who reports request metrics, for a namespace or selected workloads,
//! like Istio's Telemetry API trimmed to what the agent does. The same types are the CRD's schema (`nodemesh.io/v1alpha1` Telemetry, in
//! mesh-controller) and what the agent receives. A Telemetry in the mesh's root namespace applies to every
//! workload; one in a namespace overrides it there, one with a selector overrides both for its workloads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The namespace whose Telemetry (without selector) applies mesh-wide, as Istio's root namespace does.
pub const ROOT_NAMESPACE: &str = "nodemesh-system";

/// A Telemetry as the agent receives it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub settings: TelemetrySettings,
}

/// What a Telemetry sets; each part is optional and inherited from the wider scope when absent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_logging: Option<AccessLogging>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<RequestMetrics>,
}

/// Which agents report a workload's HTTP requests: Istio's `metrics` overrides by mode, reduced to the one choice
/// that changes what the data path does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMetrics {
    #[serde(default)]
    pub reporters: Reporters,
}

/// `source`: only the calling agent reports requests to this workload (as ambient's single L7 hop does); its own
/// agent then relays calls from other agents at L4 — the cheaper path — unless its AuthorizationPolicy, access
/// logging or tracing needs each request there.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Reporters {
    /// Both agents report, like a sidecar mesh (`reporter="source"` and `reporter="destination"`).
    #[default]
    SourceAndDestination,
    Source,
}

/// JSON access logs on the agent's stdout: one line per HTTP request and per TCP connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(default)]
    pub enabled: bool,
}

/// Spans for HTTP requests, exported over OTLP/gRPC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// OTLP/gRPC collector, `host:port` (e.g. `otel-collector.observability:4317`). Without one, trace context
    /// is still propagated but no spans are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// Share of new traces to sample, 0–100; requests that arrive with a sampling decision keep it.
    #[serde(default = "default_sampling")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub sampling_percentage: f64,
}

fn default_sampling() -> f64 {
    1.0
}

/// What applies to one workload, after inheritance.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Effective {
    pub access_logging: bool,
    pub tracing: Option<Tracing>,
    pub reporters: Reporters,
}

/// The settings for a workload in `namespace` with `labels`: selector matches in its namespace, over
/// namespace-wide ones, over the root namespace's; per part.
pub fn effective(all: &[Telemetry], namespace: &str, labels: &BTreeMap<String, String>) -> Effective {
    let matches = |sel: &BTreeMap<String, String>| sel.iter().all(|(k, v)| labels.get(k) == Some(v));
    // Widest first, so narrower scopes overwrite.
    let mut scoped: Vec<(u8, &Telemetry)> = all
        .iter()
        .filter_map(|t| match (&t.selector, t.namespace.as_str()) {
            (None, ns) if ns == ROOT_NAMESPACE && ns != namespace => Some((0, t)),
            (None, ns) if ns == namespace => Some((1, t)),
            (Some(sel), ns) if ns == namespace && matches(sel) => Some((2, t)),
            _ => None,
        })
        .collect();
    scoped.sort_by_key(|(rank, t)| (*rank, t.name.clone()));
    let mut out = Effective::default();
    for (_, t) in scoped {
        if let Some(a) = &t.settings.access_logging {
            out.access_logging = a.enabled;
        }
        if let Some(tr) = &t.settings.tracing {
            out.tracing = Some(tr.clone());
        }
        if let Some(m) = &t.settings.metrics {
            out.reporters = m.reporters;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ns: &str, name: &str, selector: Option<(&str, &str)>, log: Option<bool>, sampling: Option<f64>) -> Telemetry {
        Telemetry {
            namespace: ns.into(),
            name: name.into(),
            selector: selector.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            settings: TelemetrySettings {
                access_logging: log.map(|enabled| AccessLogging { enabled }),
                tracing: sampling.map(|p| Tracing { collector: None, sampling_percentage: p }),
                metrics: None,
            },
        }
    }

    #[test]
    fn narrower_scopes_override_wider_ones_part_by_part() {
        let all = vec![
            t(ROOT_NAMESPACE, "mesh", None, Some(true), Some(1.0)),
            t("shop", "ns", None, Some(false), None),
            t("shop", "cart", Some(("app", "cart")), None, Some(100.0)),
        ];
        let cart: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
        let e = effective(&all, "shop", &cart);
        assert!(!e.access_logging, "the namespace turned logging off");
        assert_eq!(e.tracing.unwrap().sampling_percentage, 100.0);
        let other = effective(&all, "shop", &BTreeMap::new());
        assert_eq!(other.tracing.unwrap().sampling_percentage, 1.0, "inherited from the root namespace");
        assert!(effective(&all, "web", &BTreeMap::new()).access_logging);
        assert_eq!(effective(&[], "web", &BTreeMap::new()), Effective::default(), "off by default");
    }

    #[test]
    fn request_reporters_default_to_both_and_are_inherited() {
        let mut source_only = t("shop", "ns", None, None, None);
        source_only.settings.metrics = Some(RequestMetrics { reporters: Reporters::Source });
        let mut both_for_cart = t("shop", "cart", Some(("app", "cart")), None, None);
        both_for_cart.settings.metrics = Some(RequestMetrics::default());
        let all = vec![source_only, both_for_cart];
        let cart: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
        assert_eq!(effective(&all, "shop", &BTreeMap::new()).reporters, Reporters::Source);
        assert_eq!(effective(&all, "shop", &cart).reporters, Reporters::SourceAndDestination);
        assert_eq!(effective(&all, "web", &BTreeMap::new()).reporters, Reporters::SourceAndDestination);
        let parsed: TelemetrySettings = serde_json::from_str(r#"{"metrics": {"reporters": "source"}}"#).unwrap();
        assert_eq!(parsed.metrics.unwrap().reporters, Reporters::Source);
        assert!(serde_json::from_str::<TelemetrySettings>(r#"{"metrics": {"reporters": "server"}}"#).is_err());
    }
}
