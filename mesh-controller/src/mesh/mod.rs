//! The cluster objects the mesh cares about, as read from a source, and the per-node NodeConfig computed from
//! them. Objects use the Kubernetes shapes (`apiVersion`, `kind`, `metadata`, `spec`, `status`), so the directory
//! source and the Kubernetes source read the same things.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

mod build;
pub mod schema;
#[cfg(test)]
pub(crate) mod tests;

use mesh_common::config::{Endpoint, Locality, NodeConfig, Service, Workload};
use mesh_common::policy::{AuthorizationPolicy, PeerAuthentication};
use mesh_common::route::Route;
use mesh_common::traffic::TrafficPolicy;
use serde::Deserialize;
use serde_json::Value;

/// Namespace label that opts a namespace into the mesh, and (with `disabled`) a pod out of it.
pub const MESH_LABEL: &str = "nodemesh.io/mesh";

#[derive(Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Pods' UIDs go to the agents, which give a pod its identity only when the UID its CNI call claimed agrees.
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub generation: Option<i64>,
    #[serde(default)]
    pub resource_version: Option<String>,
    /// RFC 3339; where two objects conflict, the older one wins.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Deserialize, Clone, Debug, PartialEq)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
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
    /// Top-level fields of kinds that keep their data outside `spec` (EndpointSlice `endpoints`).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Object {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey { kind: self.kind.clone(), namespace: self.namespace().to_string(), name: self.metadata.name.clone() }
    }
}

/// `kind`, namespace and name: which object a verdict is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Why an object is not (fully) in force, as a condition reason (`Invalid`, `Conflicted`, `TargetNotFound`,
/// `NoMatchingParent`, `BackendNotFound`, `UnsupportedValue`) and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub message: String,
}

/// What the controller made of one object: every custom resource and route gets one (it becomes the object's
/// status in Kubernetes mode); other kinds only when something is wrong with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub key: ObjectKey,
    /// `metadata.generation` the verdict is about (`observedGeneration`).
    pub generation: Option<i64>,
    /// `None`: accepted and in force.
    pub rejected: Option<Rejection>,
    /// Routes only: a backendRef names no Service (Gateway API's `ResolvedRefs=False`).
    pub unresolved: Option<Rejection>,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.rejected, &self.unresolved) {
            (Some(r), _) | (None, Some(r)) => write!(f, "{}: {} ({})", self.key, r.message, r.reason),
            (None, None) => write!(f, "{}: accepted", self.key),
        }
    }
}

impl Verdict {
    pub fn is_problem(&self) -> bool {
        self.rejected.is_some() || self.unresolved.is_some()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub running: bool,
    /// The owning workload (Deployment, StatefulSet, ...), when the pod has a controller.
    pub workload: Option<String>,
}

/// A snapshot of everything relevant, built from all objects of a source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mesh {
    pub meshed_namespaces: BTreeSet<String>,
    pub pods: Vec<Pod>,
    pub services: Vec<(Service, BTreeMap<String, String>)>,
    /// EndpointSlice endpoints per Service (`namespace/name`); Services without slices (the directory source)
    /// get their endpoints from their selector.
    pub endpoint_slices: BTreeMap<String, Vec<SliceEndpoint>>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub routes: Vec<Route>,
    pub traffic_policies: Vec<TrafficPolicy>,
    pub telemetry: Vec<mesh_common::telemetry::Telemetry>,
    /// Zone and region of each Node, from its topology labels.
    pub nodes: BTreeMap<String, Locality>,
    /// Mesh-wide defaults (the MeshConfig `default`; the agents' defaults without one).
    pub settings: MeshSettings,
    /// Set when the source knows this snapshot lacks objects (a file of the directory source that never
    /// parsed): it must not be served, since agents would drop everything it lost. Says why.
    pub withheld: Option<String>,
    /// Objects left out of this snapshot, by `(kind, reason)` (`Invalid`, `Conflicted`, ...), for the metrics.
    pub rejected: BTreeMap<(String, String), usize>,
}

/// What a MeshConfig sets in every node's config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshSettings {
    pub default_mtls_mode: mesh_common::policy::MtlsMode,
    pub outbound_traffic_policy: mesh_common::config::OutboundTrafficPolicy,
    pub capture: mesh_common::config::CaptureConfig,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// `namespace/name` of the Pod behind it (`targetRef`).
    pub pod: Option<String>,
    pub node: Option<String>,
    /// The slice's own `zone` for the endpoint, if it has one.
    pub zone: Option<String>,
    pub ready: bool,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

impl Mesh {
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
                    uid: p.uid.clone(),
                    service_account: p.service_account.clone(),
                    labels: p.labels.clone(),
                    ips: p.ips.clone(),
                    node: p.node.clone(),
                    workload_name: p.workload.clone(),
                    // Pods of this cluster are in the controller's trust domain.
                    trust_domain: None,
                })
                .collect(),
            services: self.services.iter().map(|(svc, selector)| self.with_endpoints(svc, selector, &meshed)).collect(),
            ..Default::default()
        }
    }

    fn locality_of(&self, node: Option<&str>) -> Locality {
        node.and_then(|n| self.nodes.get(n)).cloned().unwrap_or_default()
    }

    /// EndpointSlices are the truth where there are any (Kubernetes); otherwise the selector picks meshed pods.
    fn with_endpoints(&self, svc: &Service, selector: &BTreeMap<String, String>, meshed: &[&Pod]) -> Service {
        let mut svc = svc.clone();
        let qualified = |p: &Pod| format!("{}/{}", p.namespace, p.name);
        if let Some(slice) = self.endpoint_slices.get(&format!("{}/{}", svc.namespace, svc.name)) {
            let meshed_pod = |name: &String| meshed.iter().any(|p| &qualified(p) == name);
            svc.endpoints = slice
                .iter()
                .map(|e| {
                    let mut locality = self.locality_of(e.node.as_deref());
                    locality.zone = e.zone.clone().or(locality.zone);
                    Endpoint {
                        ip: e.ip,
                        workload: e.pod.clone().filter(meshed_pod),
                        node: e.node.clone(),
                        locality,
                        ready: e.ready,
                    }
                })
                .collect();
            return svc;
        }
        svc.endpoints = meshed
            .iter()
            .filter(|p| {
                p.namespace == svc.namespace
                    && !selector.is_empty()
                    && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            })
            .flat_map(|p| {
                // Like EndpointSlices: one address family per endpoint set, the Service's own.
                let family_served =
                    |ip: &&IpAddr| svc.ips.is_empty() || svc.ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4());
                p.ips.iter().filter(family_served).map(|ip| Endpoint {
                    ip: *ip,
                    workload: Some(qualified(p)),
                    node: Some(p.node.clone()),
                    locality: self.locality_of(Some(&p.node)),
                    ready: true,
                })
            })
            .collect();
        svc
    }

    /// What only this node needs: the policies of the namespaces its meshed pods live in (a policy change
    /// reaches the agents it concerns and no others), the routes and TrafficPolicies its meshed pods' calls obey
    /// (producer routes for every caller, consumer routes for callers in the route's namespace), its opted-out
    /// pods, and the node-wide settings.
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
            routes: self
                .routes
                .iter()
                .filter(|r| {
                    !local_namespaces.is_empty()
                        && (r.parents.iter().any(|p| r.is_producer_route(p))
                            || local_namespaces.contains(r.namespace.as_str()))
                })
                .cloned()
                .collect(),
            traffic_policies: if local_namespaces.is_empty() { Vec::new() } else { self.traffic_policies.clone() },
            telemetry: if local_namespaces.is_empty() { Vec::new() } else { self.telemetry.clone() },
            locality: self.locality_of(Some(node)),
            default_peer_authentication: self.settings.default_mtls_mode,
            outbound_traffic_policy: self.settings.outbound_traffic_policy,
            capture: self.settings.capture.clone(),
            ..Default::default()
        }
    }
}
