//! nodemesh's custom resources (`nodemesh.io/v1alpha1`). The Rust types are the source of truth:
//! `mesh-controller crds` prints the CustomResourceDefinitions, `cargo xtask gen-manifests` writes them to
//! `manifests/crds/` and the Helm chart's `crds/`, and a test fails when the committed files are stale.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use mesh_common::policy::{Action, MtlsMode, Rule};
use mesh_common::telemetry::TelemetrySettings;
use mesh_common::traffic::TrafficSettings;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Selects workloads of the policy's namespace by labels; absent: all of them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Status written back by the controller in Kubernetes mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// `Accepted` (True/False, with reason and message).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// mTLS mode for workloads: STRICT refuses plaintext, PERMISSIVE accepts it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "npa",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub mode: MtlsMode,
}

/// Who may connect to workloads: Istio's AuthorizationPolicy semantics (DENY first, then ALLOW).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "nap",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// A connection matches when any rule does. An ALLOW policy without rules allows nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Resilience and traffic shaping for calls to one Service (obeyed by the agent from the L7 milestone on).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ntp",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: ServiceRef,
    /// Flattened: in the CRD the settings sit beside `targetRef`.
    #[serde(flatten)]
    pub settings: TrafficSettings,
}

/// Access logging and tracing for the workloads of a namespace (or the selected ones; in the root namespace
/// `nodemesh-system`, for the whole mesh), like Istio's Telemetry API.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "Telemetry",
    plural = "telemetries",
    namespaced,
    status = "PolicyStatus",
    shortname = "ntel",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Flattened: `accessLogging` and `tracing` sit beside `selector`.
    #[serde(flatten)]
    pub settings: TelemetrySettings,
}

/// Mesh-wide settings in Kubernetes mode, as Istio's MeshConfig: what applies where no namespace's resource says
/// otherwise. Cluster-scoped; only the object named `default` is read (others are `Accepted: False`).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "MeshConfig",
    status = "PolicyStatus",
    shortname = "nmc",
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.defaultMtlsMode"}"#,
    printcolumn = r#"{"name":"Outbound","type":"string","jsonPath":".spec.outboundTrafficPolicy"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// mTLS mode of workloads no PeerAuthentication selects: PERMISSIVE (default) or STRICT.
    #[serde(default)]
    pub default_mtls_mode: MtlsMode,
    /// Outbound connections to destinations the mesh does not know: ALLOW_ANY (default, passed through) or
    /// REGISTRY_ONLY (refused).
    #[serde(default)]
    pub outbound_traffic_policy: OutboundPolicy,
    /// Traffic the capture leaves alone on every node.
    #[serde(default)]
    pub capture: CaptureExclusions,
}

/// [`mesh_common::config::OutboundTrafficPolicy`], as the CRD spells it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// [`mesh_common::config::CaptureConfig`] with CIDRs as strings: one that does not parse is reported on the
/// MeshConfig's status with its value, rather than failing the whole object's parse.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaptureExclusions {
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ranges, e.g. `169.254.169.254/32` (cloud metadata) or `fd00::/8`.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<String>,
}

/// A Service in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Always `Service` (core group).
    #[serde(default = "service_kind")]
    #[schemars(regex(pattern = r"^Service$"))]
    pub kind: String,
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

fn service_kind() -> String {
    "Service".into()
}

/// The CRDs nodemesh owns (nodemesh.io's). The Gateway API CRDs it also reads are the cluster's, from an
/// upstream bundle ([`crate::gateway_api`]).
pub fn definitions() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![
        PeerAuthentication::crd(),
        AuthorizationPolicy::crd(),
        TrafficPolicy::crd(),
        Telemetry::crd(),
        MeshConfig::crd(),
    ]
}

/// [`definitions`] as `(file name, YAML)`, for `manifests/crds/`.
pub fn all() -> Vec<(String, String)> {
    definitions()
        .into_iter()
        .map(|crd| {
            let file = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            (file, serde_yaml::to_string(&crd).unwrap_or_default())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo xtask gen-manifests` regenerates them.
    #[test]
    fn committed_crd_manifests_are_current() {
        for dir in ["manifests/crds", "charts/nodemesh/crds"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
            for (file, yaml) in all() {
                let committed = std::fs::read_to_string(path.join(&file)).unwrap_or_default();
                assert!(committed == yaml, "{dir}/{file} is stale: run `cargo xtask gen-manifests`");
            }
        }
    }

    #[test]
    fn schemas_carry_validation() {
        let crds = all();
        let traffic = &crds.iter().find(|(f, _)| f.starts_with("trafficpolicies")).unwrap().1;
        assert!(traffic.contains("maximum: 100"), "percentages are bounded");
        assert!(traffic.contains("pattern:"), "durations have a pattern");
        let authz = &crds.iter().find(|(f, _)| f.starts_with("authorizationpolicies")).unwrap().1;
        assert!(authz.contains("notPrincipals") && authz.contains("DENY"), "{authz}");
    }
}
