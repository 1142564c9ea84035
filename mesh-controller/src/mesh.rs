//! The cluster objects the mesh cares about, as read from a source, and the per-node NodeConfig computed from
//! them. Objects use the Kubernetes shapes (`apiVersion`, `kind`, `metadata`, `spec`, `status`), so the directory
//! source and the Kubernetes source read the same things.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_common::config::{Endpoint, NodeConfig, Service, ServicePort, Workload};
use mesh_common::policy::{AuthorizationPolicy, PeerAuthentication};
use serde::Deserialize;
use serde_json::Value;

use crate::crds::{AuthorizationPolicySpec, PeerAuthenticationSpec, TrafficPolicySpec};

/// Namespace label that opts a namespace into the mesh, and (with `disabled`) a pod out of it.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

#[derive(Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Any Kubernetes-shaped object; typed views are taken from it per kind.
#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Value,
    #[serde(default)]
    pub status: Value,
}

impl Object {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `kind namespace/name`, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace(), self.metadata.name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub running: bool,
}

/// A snapshot of everything relevant, built from all objects of a source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mesh {
    pub meshed_namespaces: BTreeSet<String>,
    pub pods: Vec<Pod>,
    pub services: Vec<(Service, BTreeMap<String, String>)>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

#[derive(Debug, thiserror::Error)]
#[error("{object}: {message}")]
pub struct ObjectError {
    pub object: String,
    pub message: String,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

impl Mesh {
    /// Builds the snapshot. Objects that cannot be understood are returned as errors and left out; everything
    /// else still counts.
    pub fn from_objects(objects: &[Object]) -> (Mesh, Vec<ObjectError>) {
        let mut mesh = Mesh::default();
        let mut errors = Vec::new();
        let mut fail = |o: &Object, message: String| errors.push(ObjectError { object: o.describe(), message });
        for o in objects {
            match (o.api_version.as_str(), o.kind.as_str()) {
                ("v1", "Namespace") if o.metadata.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled") => {
                    mesh.meshed_namespaces.insert(o.metadata.name.clone());
                }
                ("v1", "Pod") => match pod(o) {
                    Ok(p) => mesh.pods.push(p),
                    Err(e) => fail(o, e),
                },
                ("v1", "Service") => match service(o) {
                    Ok(s) => mesh.services.push(s),
                    Err(e) => fail(o, e),
                },
                ("nodemesh.io/v1alpha1", "PeerAuthentication") => match spec::<PeerAuthenticationSpec>(o) {
                    Ok(spec) => mesh.peer_authentications.push(PeerAuthentication {
                        namespace: o.namespace().into(),
                        name: o.metadata.name.clone(),
                        selector: spec.selector.map(|s| s.match_labels),
                        mode: spec.mode,
                    }),
                    Err(e) => fail(o, e),
                },
                ("nodemesh.io/v1alpha1", "AuthorizationPolicy") => match spec::<AuthorizationPolicySpec>(o) {
                    Ok(spec) => mesh.authorization_policies.push(AuthorizationPolicy {
                        namespace: o.namespace().into(),
                        name: o.metadata.name.clone(),
                        selector: spec.selector.map(|s| s.match_labels),
                        action: spec.action,
                        rules: spec.rules,
                    }),
                    Err(e) => fail(o, e),
                },
                // Checked now so mistakes surface early; the agent obeys TrafficPolicy from the L7 milestone on.
                ("nodemesh.io/v1alpha1", "TrafficPolicy") => {
                    if let Err(e) = spec::<TrafficPolicySpec>(o) {
                        fail(o, e);
                    }
                }
                // Other kinds (Deployments, ConfigMaps, later milestones' CRDs) are not the controller's concern.
                _ => {}
            }
        }
        (mesh, errors)
    }

    fn meshed(&self, p: &Pod) -> bool {
        p.running
            && self.meshed_namespaces.contains(&p.namespace)
            && p.labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
    }

    /// Whether `node` runs a meshed pod with this identity: the CA signs only those (node binding).
    pub fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.pods.iter().any(|p| {
            self.meshed(p) && p.node == node && p.namespace == namespace && p.service_account == service_account
        })
    }

    /// What one node's agent needs: the cluster-wide part ([`Mesh::shared_config`]) plus its own part
    /// ([`Mesh::local_config`]).
    pub fn node_config(&self, node: &str, trust_domain: &str) -> NodeConfig {
        let shared = self.shared_config();
        NodeConfig { workloads: shared.workloads, services: shared.services, ..self.local_config(node, trust_domain) }
    }

    /// What every node needs alike: every meshed workload (any local pod may call any of them; the agent needs
    /// their identities to open tunnels) and the services with their meshed endpoints. The controller serializes
    /// this once per snapshot for all nodes.
    pub fn shared_config(&self) -> NodeConfig {
        let meshed: Vec<&Pod> = self.pods.iter().filter(|p| self.meshed(p)).collect();
        NodeConfig {
            workloads: meshed
                .iter()
                .map(|p| Workload {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    uid: None,
                    service_account: p.service_account.clone(),
                    labels: p.labels.clone(),
                    ips: p.ips.clone(),
                    node: p.node.clone(),
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|(svc, selector)| {
                    let mut svc = svc.clone();
                    svc.endpoints = meshed
                        .iter()
                        .filter(|p| {
                            p.namespace == svc.namespace
                                && !selector.is_empty()
                                && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                        })
                        .flat_map(|p| {
                            p.ips.iter().map(|ip| Endpoint {
                                ip: *ip,
                                workload: Some(format!("{}/{}", p.namespace, p.name)),
                                node: Some(p.node.clone()),
                                ready: true,
                            })
                        })
                        .collect();
                    svc
                })
                .collect(),
            ..Default::default()
        }
    }

    /// What only this node needs: the policies of the namespaces its meshed pods live in (a policy change
    /// reaches the agents it concerns and no others), its opted-out pods, and the node-wide settings.
    pub fn local_config(&self, node: &str, trust_domain: &str) -> NodeConfig {
        let local_namespaces: BTreeSet<&str> =
            self.pods.iter().filter(|p| p.node == node && self.meshed(p)).map(|p| p.namespace.as_str()).collect();
        NodeConfig {
            trust_domain: trust_domain.to_string(),
            mesh_namespaces: Some(self.meshed_namespaces.iter().cloned().collect()),
            // The agent decides capture at CNI ADD time, before the pod has an IP the controller could list.
            excluded_pods: self
                .pods
                .iter()
                .filter(|p| p.node == node && p.labels.get(MESH_LABEL).map(String::as_str) == Some("disabled"))
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            peer_authentications: self
                .peer_authentications
                .iter()
                .filter(|p| local_namespaces.contains(p.namespace.as_str()))
                .cloned()
                .collect(),
            authorization_policies: self
                .authorization_policies
                .iter()
                .filter(|p| local_namespaces.contains(p.namespace.as_str()))
                .cloned()
                .collect(),
            ..Default::default()
        }
    }
}

fn pod(o: &Object) -> Result<Pod, String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for entry in o.status.get("podIPs").and_then(Value::as_array).into_iter().flatten() {
        let ip = str_at(entry, &["ip"]).ok_or("status.podIPs entry without ip")?;
        ips.push(ip.parse().map_err(|_| format!("status.podIPs: {ip:?} is not an IP address"))?);
    }
    if ips.is_empty() {
        if let Some(ip) = str_at(&o.status, &["podIP"]) {
            ips.push(ip.parse().map_err(|_| format!("status.podIP: {ip:?} is not an IP address"))?);
        }
    }
    Ok(Pod {
        namespace: o.namespace().into(),
        name: o.metadata.name.clone(),
        node: str_at(&o.spec, &["nodeName"]).unwrap_or_default().into(),
        service_account: str_at(&o.spec, &["serviceAccountName"]).unwrap_or("default").into(),
        labels: o.metadata.labels.clone(),
        running: str_at(&o.status, &["phase"]).unwrap_or("Running") == "Running" && !ips.is_empty(),
        ips,
    })
}

fn service(o: &Object) -> Result<(Service, BTreeMap<String, String>), String> {
    let mut ips = Vec::new();
    let listed = o.spec.get("clusterIPs").and_then(Value::as_array).cloned().unwrap_or_default();
    for ip in listed.iter().filter_map(Value::as_str).chain(str_at(&o.spec, &["clusterIP"])) {
        if ip == "None" {
            continue;
        }
        let ip: IpAddr = ip.parse().map_err(|_| format!("clusterIP {ip:?} is not an IP address"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for p in o.spec.get("ports").and_then(Value::as_array).into_iter().flatten() {
        let port =
            p.get("port").and_then(Value::as_u64).filter(|p| (1..=65535).contains(p)).ok_or("port out of range")?;
        ports.push(ServicePort {
            name: str_at(p, &["name"]).map(String::from),
            port: port as u16,
            target_port: p.get("targetPort").and_then(Value::as_u64).map(|t| t as u16),
            app_protocol: str_at(p, &["appProtocol"]).map(String::from),
        });
    }
    let selector: BTreeMap<String, String> = o
        .spec
        .get("selector")
        .map(|s| serde_json::from_value(s.clone()))
        .transpose()
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let svc =
        Service { namespace: o.namespace().into(), name: o.metadata.name.clone(), ips, ports, endpoints: Vec::new() };
    Ok((svc, selector))
}

/// The object's spec as its CRD type: the same types that define the CRDs' schemas.
fn spec<T: serde::de::DeserializeOwned>(o: &Object) -> Result<T, String> {
    serde_json::from_value(o.spec.clone()).map_err(|e| format!("spec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-1, serviceAccountName: cart}
status: {phase: Running, podIPs: [{ip: 10.244.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {app: legacy, nodemesh.io/mesh: disabled}}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: other}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules: [{from: [{principals: ["cluster.local/ns/shop/sa/default"]}]}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {action: MAYBE}
"#;

    fn objects() -> Vec<Object> {
        serde_yaml::Deserializer::from_str(OBJECTS).map(|d| Object::deserialize(d).unwrap()).collect()
    }

    #[test]
    fn node_configs_follow_labels_and_locality() {
        let (mesh, errors) = Mesh::from_objects(&objects());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("broken"));
        let n1 = mesh.node_config("node-1", "cluster.local");
        let names: Vec<&str> = n1.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["cart-1", "web-1"], "meshed namespace only, opt-out excluded");
        assert_eq!(n1.mesh_namespaces, Some(vec!["shop".to_string()]));
        assert_eq!(n1.excluded_pods, ["shop/legacy"]);
        assert_eq!(n1.services[0].endpoints.len(), 1);
        assert_eq!(n1.services[0].endpoints[0].ip, "10.244.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(n1.authorization_policies.len(), 1);
        // node-3 runs nothing meshed: it still learns the workloads, but no policies.
        assert!(mesh.node_config("node-3", "cluster.local").authorization_policies.is_empty());
        assert!(mesh.has_pod("node-1", "shop", "cart"));
        assert!(!mesh.has_pod("node-2", "shop", "cart"), "node binding");
        assert!(!mesh.has_pod("node-1", "shop", "default"), "the opted-out pod has no identity");
    }
}
