//! Telemetry: access logging and tracing for a namespace or selected workloads, like Istio's Telemetry API
//! trimmed to what the agent does. The same types are the CRD's schema (`nodemesh.io/v1alpha1` Telemetry, in
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
}
