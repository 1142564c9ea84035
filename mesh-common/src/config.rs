//! `NodeConfig`: everything one node agent needs to know about the mesh.
//!
//! This is the one config model. Today it is read from a YAML file (`mesh-agent run --config`); the controller
//! streams exactly this model later, and the file stays as the offline/debug source. Field names are camelCase
//! like the Kubernetes objects they come from; unknown fields are rejected so a typo is an error, not a no-op.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{AuthorizationPolicy, MtlsMode, PeerAuthentication};
use crate::route::Route;
use crate::traffic::TrafficPolicy;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Opaque version of this config, echoed by the admin API; the controller will set it.
    #[serde(default)]
    pub version: String,
    /// SPIFFE trust domain; default `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Other trust domains whose peers count as this mesh's (Istio's `trustDomainAliases`): admitted, reached,
    /// and matched by AuthorizationPolicy principals written with any of these or `trust_domain`. Peers of any
    /// other trust domain are refused, whatever root they chain to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domain_aliases: Vec<String>,
    /// Namespaces whose pods are captured on enrollment. Unset: every pod the CNI plugin reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_namespaces: Option<Vec<String>>,
    /// Pods (`namespace/name`) that opted out of the mesh although their namespace is in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_pods: Vec<String>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub capture: CaptureConfig,
    /// mTLS mode where no PeerAuthentication applies.
    #[serde(default)]
    pub default_peer_authentication: MtlsMode,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// HTTPRoutes and GRPCRoutes attached to Services this node's workloads may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic_policies: Vec<TrafficPolicy>,
    /// Access logging and tracing (Telemetry resources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub telemetry: Vec<crate::telemetry::Telemetry>,
    /// What happens to outbound connections to destinations the config does not know.
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Zone and region of this node, for locality-aware load balancing.
    #[serde(default, skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
}

/// Where a node (and so its pods) runs: the `topology.kubernetes.io/zone` and `/region` labels of the Node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.zone.is_none() && self.region.is_none()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Unknown destinations get plaintext passthrough.
    #[default]
    AllowAny,
    /// Only workloads and services in the config may be reached.
    RegistryOnly,
}

/// SPIFFE's rule for a trust domain name: lowercase letters, digits, `.`, `-`, `_`.
fn is_trust_domain_name(td: &str) -> bool {
    !td.is_empty() && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

/// A pod, as far as the mesh cares.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Node the pod runs on.
    #[serde(default)]
    pub node: String,
    /// The workload the pod belongs to (its Deployment, StatefulSet, DaemonSet, Job), for telemetry; absent: the
    /// pod stands alone and its own name is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_name: Option<String>,
    /// Its SPIFFE trust domain when not the mesh's (one of `trustDomainAliases`: a workload of another cluster
    /// or mesh, behind Istio's ztunnel say); absent: the mesh's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
}

fn default_service_account() -> String {
    "default".to_string()
}

impl Workload {
    /// The workload's SPIFFE identity: its Kubernetes service account, in its own trust domain or else the
    /// mesh's.
    pub fn spiffe_id(&self, mesh_trust_domain: &str) -> String {
        spiffe_id(self.trust_domain(mesh_trust_domain), &self.namespace, &self.service_account)
    }

    /// Its own trust domain, or else the mesh's.
    pub fn trust_domain<'a>(&'a self, mesh_trust_domain: &'a str) -> &'a str {
        self.trust_domain.as_deref().unwrap_or(mesh_trust_domain)
    }

    /// The owning workload's name (Istio's `*_workload` metric label).
    pub fn workload_name(&self) -> &str {
        self.workload_name.as_deref().unwrap_or(&self.name)
    }

    fn first_label(&self, keys: &[&str]) -> Option<&str> {
        keys.iter().find_map(|k| self.labels.get(*k)).map(String::as_str)
    }

    /// The `app` label (or `app.kubernetes.io/name`), as Istio reports it.
    pub fn app(&self) -> Option<&str> {
        self.first_label(&["app", "app.kubernetes.io/name"])
    }

    /// The `version` label (or `app.kubernetes.io/version`).
    pub fn version(&self) -> Option<&str> {
        self.first_label(&["version", "app.kubernetes.io/version"])
    }

    /// Istio's canonical service: the explicit label, else the app name, else the workload name.
    pub fn canonical_service(&self) -> &str {
        self.first_label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: the explicit label, else the version, else `latest`.
    pub fn canonical_revision(&self) -> &str {
        self.first_label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
            .unwrap_or("latest")
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Cluster IPs.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `namespace/name` of the workload behind the endpoint, when it is a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    #[serde(default = "default_true")]
    pub ready: bool,
}

impl ServicePort {
    /// The port the endpoints listen on.
    pub fn endpoint_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

fn default_true() -> bool {
    true
}

/// Traffic that is never captured (Istio's `excludeOutboundPorts` & co).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureConfig {
    #[serde(default)]
    pub exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ranges left alone, e.g. `169.254.169.254/32` or `fd00::/8`.
    #[serde(default)]
    pub exclude_outbound_cidrs: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot parse node config: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("invalid node config: {0}")]
    Invalid(String),
}

impl NodeConfig {
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        // An empty file is an empty config, not an error.
        let config: NodeConfig =
            if text.trim().is_empty() { NodeConfig::default_with_trust_domain() } else { serde_yaml::from_str(text)? };
        config.validate()?;
        Ok(config)
    }

    fn default_with_trust_domain() -> Self {
        NodeConfig { trust_domain: default_trust_domain(), ..Default::default() }
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        for td in std::iter::once(&self.trust_domain).chain(&self.trust_domain_aliases) {
            if !is_trust_domain_name(td) {
                return bad(format!("trust domain {td:?} is not a SPIFFE trust domain name"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for w in &self.workloads {
            if w.namespace.is_empty() || w.name.is_empty() {
                return bad("every workload needs a namespace and a name".into());
            }
            if let Some(td) = w.trust_domain.as_deref().filter(|td| !self.accepts_trust_domain(td)) {
                return bad(format!(
                    "workload {}/{} is in trust domain {td:?}, neither trustDomain nor one of trustDomainAliases",
                    w.namespace, w.name
                ));
            }
            if !seen.insert((&w.namespace, &w.name)) {
                return bad(format!("workload {}/{} is listed twice", w.namespace, w.name));
            }
        }
        for (what, ns, name) in self
            .peer_authentications
            .iter()
            .map(|p| ("peerAuthentication", &p.namespace, &p.name))
            .chain(self.authorization_policies.iter().map(|p| ("authorizationPolicy", &p.namespace, &p.name)))
        {
            if ns.is_empty() {
                return bad(format!("{what} {name:?} needs a namespace"));
            }
        }
        for p in self.capture.exclude_outbound_ports.iter().chain(&self.capture.exclude_inbound_ports) {
            if *p == 0 {
                return bad("port 0 cannot be excluded from capture".into());
            }
        }
        Ok(())
    }

    /// Whether peers of trust domain `td` belong to this mesh: its own or one of its aliases.
    pub fn accepts_trust_domain(&self, td: &str) -> bool {
        td == self.trust_domain || self.trust_domain_aliases.iter().any(|a| a == td)
    }

    /// Whether a pod in `namespace` is captured when the CNI plugin reports it.
    pub fn namespace_in_mesh(&self, namespace: &str) -> bool {
        self.mesh_namespaces.as_ref().is_none_or(|list| list.iter().any(|n| n == namespace))
    }

    /// Whether the pod `namespace/name` should be captured: its namespace is in the mesh and it did not opt out.
    pub fn pod_in_mesh(&self, namespace: &str, name: &str) -> bool {
        self.namespace_in_mesh(namespace)
            && !self.excluded_pods.iter().any(|p| p.split_once('/') == Some((namespace, name)))
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.namespace == namespace && w.name == name)
    }

    /// The workload that owns `ip`, if the mesh knows one.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = ip.to_canonical();
        self.workloads.iter().find(|w| w.ips.contains(&ip))
    }

    /// The Service whose cluster IP and port a client dialled.
    pub fn service_by_address(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let ip = ip.to_canonical();
        self.services
            .iter()
            .filter(|s| s.ips.contains(&ip))
            .find_map(|s| s.ports.iter().find(|p| p.port == port).map(|p| (s, p)))
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.namespace == namespace && s.name == name)
    }

    /// Whether `ip` belongs to a workload or a service the config knows.
    pub fn knows_destination(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.workload_by_ip(ip).is_some()
            || self.services.iter().any(|s| s.ips.contains(&ip) || s.endpoints.iter().any(|e| e.ip == ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
trustDomain: example.org
workloads:
  - namespace: shop
    name: cart-7d9f
    serviceAccount: cart
    labels: {app: cart, version: v1}
    ips: [10.244.1.5, "fd00:244:1::5"]
    node: node-1
services:
  - namespace: shop
    name: cart
    ips: [10.96.0.20]
    ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
    endpoints: [{ip: 10.244.1.5, workload: shop/cart-7d9f, node: node-1}]
capture:
  excludeOutboundPorts: [53]
  excludeOutboundCidrs: [169.254.169.254/32, "fd00:dead::/32"]
"#;

    #[test]
    fn parses_a_full_config() {
        let c = NodeConfig::from_yaml(SAMPLE).unwrap();
        let w = c.workload("shop", "cart-7d9f").unwrap();
        assert_eq!(w.spiffe_id(&c.trust_domain), "spiffe://example.org/ns/shop/sa/cart");
        assert_eq!(w.ips.len(), 2);
        assert!(c.services[0].endpoints[0].ready);
        assert_eq!(c.capture.exclude_outbound_cidrs[1].prefix_len(), 32);
        assert!(c.namespace_in_mesh("anything"));
    }

    /// The example in docs/node-config.md stays a valid config.
    #[test]
    fn documented_example_parses() {
        let doc = include_str!("../../docs/node-config.md");
        let yaml = doc.split("```yaml\n").nth(1).and_then(|rest| rest.split("```").next()).unwrap();
        let c = NodeConfig::from_yaml(yaml).unwrap_or_else(|e| panic!("docs/node-config.md example: {e}"));
        assert_eq!(c.routes[0].rules[0].backends[0].weight, 5);
        assert!(c.traffic_policies[0].settings.rate_limit.is_some());
    }

    #[test]
    fn workloads_of_aliased_trust_domains_and_nothing_else() {
        let yaml = "trustDomain: nodemesh.local\ntrustDomainAliases: [cluster.local]\n\
                    workloads: [{namespace: a, name: b, serviceAccount: s, trustDomain: cluster.local}, {namespace: a, name: c}]";
        let c = NodeConfig::from_yaml(yaml).unwrap();
        assert_eq!(c.workload("a", "b").unwrap().spiffe_id(&c.trust_domain), "spiffe://cluster.local/ns/a/sa/s");
        assert_eq!(c.workload("a", "c").unwrap().spiffe_id(&c.trust_domain), "spiffe://nodemesh.local/ns/a/sa/default");
        assert!(c.accepts_trust_domain("cluster.local") && c.accepts_trust_domain("nodemesh.local"));
        assert!(!c.accepts_trust_domain("evil.example"));
        let e = NodeConfig::from_yaml("workloads: [{namespace: a, name: b, trustDomain: other.example}]").unwrap_err();
        assert!(e.to_string().contains("neither trustDomain nor one of trustDomainAliases"), "{e}");
        for bad in ["trustDomain: Upper.Case", "trustDomainAliases: ['a/b']", "trustDomainAliases: ['']"] {
            let e = NodeConfig::from_yaml(bad).unwrap_err().to_string();
            assert!(e.contains("not a SPIFFE trust domain name"), "{bad}: {e}");
        }
    }

    #[test]
    fn empty_file_is_the_default_config() {
        let c = NodeConfig::from_yaml("\n").unwrap();
        assert_eq!(c.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert!(c.workloads.is_empty());
    }

    #[test]
    fn typos_and_semantic_errors_are_reported() {
        let e = NodeConfig::from_yaml("trustdomain: x\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `trustdomain`"), "{e}");
        let e = NodeConfig::from_yaml("workloads: [{namespace: a, name: b}, {namespace: a, name: b}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = NodeConfig::from_yaml("capture: {excludeOutboundCidrs: [10.0.0.0/33]}").unwrap_err().to_string();
        assert!(e.contains("cannot parse"), "{e}");
    }

    #[test]
    fn mesh_namespaces_limit_enrollment() {
        let c = NodeConfig::from_yaml("meshNamespaces: [shop]").unwrap();
        assert!(c.namespace_in_mesh("shop"));
        assert!(!c.namespace_in_mesh("kube-system"));
    }
}
