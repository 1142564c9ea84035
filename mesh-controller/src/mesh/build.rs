//! Building a [`Mesh`] from a source's objects, with a [`Verdict`] for every custom resource and route: parse
//! errors, unknown targets and conflicts leave that one object out and say why; everything else still counts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use mesh_common::config::{Locality, Service, ServicePort};
use mesh_common::policy::{AuthorizationPolicy, PeerAuthentication};
use mesh_common::traffic::TrafficPolicy;
use serde_json::Value;

use super::{MESH_LABEL, Mesh, Object, Pod, Rejection, SliceEndpoint, Verdict, str_at};
use crate::crds::{
    AuthorizationPolicySpec, MeshConfigSpec, OutboundPolicy, PeerAuthenticationSpec, TelemetrySpec, TrafficPolicySpec,
};
use crate::gateway;

const NODEMESH: &str = "nodemesh.io/v1alpha1";
const GATEWAY: &str = "gateway.networking.k8s.io/";

fn rejected(reason: &'static str, message: impl Into<String>) -> Option<Rejection> {
    Some(Rejection { reason, message: message.into() })
}

/// Where two objects claim the same thing, the older one wins (then the first by name), as in Gateway API.
fn age_order(o: &Object) -> (Option<String>, String, String) {
    (o.metadata.creation_timestamp.clone(), o.namespace().to_string(), o.metadata.name.clone())
}

impl Mesh {
    /// Builds the snapshot and the verdicts.
    pub fn from_objects(objects: &[Object]) -> (Mesh, Vec<Verdict>) {
        let mut mesh = Mesh::default();
        let mut verdicts = Vec::new();
        let mut sorted: Vec<&Object> = objects.iter().collect();
        sorted.sort_by_key(|o| age_order(o));
        // Pass 1: the core objects everything else refers to.
        for o in &sorted {
            let problem = match (o.api_version.as_str(), o.kind.as_str()) {
                ("v1", "Namespace") => {
                    if o.metadata.labels.get(MESH_LABEL).map(String::as_str) == Some("enabled") {
                        mesh.meshed_namespaces.insert(o.metadata.name.clone());
                    }
                    None
                }
                ("v1", "Pod") => pod(o).map(|p| mesh.pods.push(p)).err(),
                ("v1", "Service") => service(o).map(|s| mesh.services.push(s)).err(),
                ("discovery.k8s.io/v1", "EndpointSlice") => endpoint_slice(o, &mut mesh.endpoint_slices).err(),
                ("v1", "Node") => {
                    let label = |k: &str| o.metadata.labels.get(&format!("topology.kubernetes.io/{k}")).cloned();
                    mesh.nodes
                        .insert(o.metadata.name.clone(), Locality { zone: label("zone"), region: label("region") });
                    None
                }
                _ => continue,
            };
            if let Some(message) = problem {
                verdicts.push(verdict(o, rejected("Invalid", message)));
            }
        }
        let services: BTreeSet<(String, String)> =
            mesh.services.iter().map(|(s, _)| (s.namespace.clone(), s.name.clone())).collect();
        let has_service = |ns: &str, name: &str| services.contains(&(ns.to_string(), name.to_string()));
        // Pass 2: policies and routes, checked against the services and each other.
        let mut claimed_peer_auth: BTreeSet<(String, String)> = BTreeSet::new();
        let mut claimed_targets: BTreeMap<(String, String), String> = BTreeMap::new();
        for o in &sorted {
            let rejection = match (o.api_version.as_str(), o.kind.as_str()) {
                (NODEMESH, "PeerAuthentication") => match spec::<PeerAuthenticationSpec>(o) {
                    Err(e) => rejected("Invalid", e),
                    Ok(spec) => {
                        let selector = spec.selector.map(|s| s.match_labels);
                        let scope = (o.namespace().to_string(), format!("{selector:?}"));
                        if claimed_peer_auth.insert(scope) {
                            mesh.peer_authentications.push(PeerAuthentication {
                                namespace: o.namespace().into(),
                                name: o.metadata.name.clone(),
                                selector,
                                mode: spec.mode,
                            });
                            None
                        } else {
                            rejected(
                                "Conflicted",
                                "an older PeerAuthentication in this namespace has the same selector",
                            )
                        }
                    }
                },
                (NODEMESH, "AuthorizationPolicy") => match spec::<AuthorizationPolicySpec>(o) {
                    Err(e) => rejected("Invalid", e),
                    Ok(spec) => {
                        mesh.authorization_policies.push(AuthorizationPolicy {
                            namespace: o.namespace().into(),
                            name: o.metadata.name.clone(),
                            selector: spec.selector.map(|s| s.match_labels),
                            action: spec.action,
                            rules: spec.rules,
                        });
                        None
                    }
                },
                (NODEMESH, "TrafficPolicy") => match spec::<TrafficPolicySpec>(o) {
                    Err(e) => rejected("Invalid", e),
                    Ok(spec) => {
                        let target = (o.namespace().to_string(), spec.target_ref.name.clone());
                        if !has_service(&target.0, &target.1) {
                            rejected("TargetNotFound", format!("Service {}/{} does not exist", target.0, target.1))
                        } else if let Some(owner) = claimed_targets.get(&target) {
                            rejected("Conflicted", format!("TrafficPolicy {owner} already targets this Service"))
                        } else {
                            claimed_targets.insert(target, o.metadata.name.clone());
                            mesh.traffic_policies.push(TrafficPolicy {
                                namespace: o.namespace().into(),
                                name: o.metadata.name.clone(),
                                service: spec.target_ref.name,
                                settings: spec.settings,
                            });
                            None
                        }
                    }
                },
                (NODEMESH, "MeshConfig") => match spec::<MeshConfigSpec>(o).and_then(settings) {
                    _ if o.metadata.name != "default" => {
                        rejected("Ignored", "only the MeshConfig named `default` is read")
                    }
                    Err(e) => rejected("Invalid", e),
                    Ok(settings) => {
                        mesh.settings = settings;
                        None
                    }
                },
                (NODEMESH, "Telemetry") => match spec::<TelemetrySpec>(o) {
                    Err(e) => rejected("Invalid", e),
                    Ok(spec) => match spec.settings.tracing.as_ref().map(|t| t.sampling_percentage) {
                        Some(p) if !(0.0..=100.0).contains(&p) => {
                            rejected("Invalid", format!("tracing.samplingPercentage {p} is not within 0..100"))
                        }
                        _ => {
                            mesh.telemetry.push(mesh_common::telemetry::Telemetry {
                                namespace: o.namespace().into(),
                                name: o.metadata.name.clone(),
                                selector: spec.selector.map(|s| s.match_labels),
                                settings: spec.settings,
                            });
                            None
                        }
                    },
                },
                (v, "HTTPRoute" | "GRPCRoute") if v.starts_with(GATEWAY) => {
                    let route = match gateway::route(o) {
                        Err(r) => {
                            verdicts.push(verdict(o, Some(r)));
                            continue;
                        }
                        // Attached to Gateways only: not ours to judge.
                        Ok(None) => continue,
                        Ok(Some(route)) => route,
                    };
                    if let Some(p) = route.parents.iter().find(|p| !has_service(&p.namespace, &p.name)) {
                        let message = format!("parent Service {}/{} does not exist", p.namespace, p.name);
                        verdicts.push(verdict(o, rejected("NoMatchingParent", message)));
                        continue;
                    }
                    let missing: Vec<String> = route
                        .rules
                        .iter()
                        .flat_map(|r| &r.backends)
                        .map(|b| &b.service)
                        .filter(|s| !has_service(&s.namespace, &s.name))
                        .map(|s| format!("{}/{}", s.namespace, s.name))
                        .collect();
                    let unresolved = (!missing.is_empty()).then(|| Rejection {
                        reason: "BackendNotFound",
                        message: format!("backend Services do not exist: {}", missing.join(", ")),
                    });
                    mesh.routes.push(route);
                    verdicts.push(Verdict { unresolved, ..verdict(o, None) });
                    continue;
                }
                // Other kinds (Deployments, ConfigMaps, ...) are not the controller's concern.
                _ => continue,
            };
            verdicts.push(verdict(o, rejection));
        }
        for (key, rejection) in verdicts.iter().filter_map(|v| Some((&v.key, v.rejected.as_ref()?))) {
            *mesh.rejected.entry((key.kind.clone(), rejection.reason.to_string())).or_default() += 1;
        }
        (mesh, verdicts)
    }
}

fn verdict(o: &Object, rejected: Option<Rejection>) -> Verdict {
    Verdict { key: o.key(), generation: o.metadata.generation, rejected, unresolved: None }
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
        uid: o.metadata.uid.clone(),
        node: str_at(&o.spec, &["nodeName"]).unwrap_or_default().into(),
        service_account: str_at(&o.spec, &["serviceAccountName"]).unwrap_or("default").into(),
        labels: o.metadata.labels.clone(),
        running: str_at(&o.status, &["phase"]).unwrap_or("Running") == "Running" && !ips.is_empty(),
        ips,
        workload: owning_workload(&o.metadata),
    })
}

/// The workload a pod belongs to, as Istio names it: a Deployment's pods are owned by a ReplicaSet named
/// `<deployment>-<pod-template-hash>`, so the hash comes off; other controllers (StatefulSet, DaemonSet, Job)
/// own their pods directly.
fn owning_workload(m: &super::Metadata) -> Option<String> {
    let owner = m.owner_references.iter().find(|o| o.controller == Some(true)).or(m.owner_references.first())?;
    if owner.kind == "ReplicaSet" {
        if let Some(hash) = m.labels.get("pod-template-hash") {
            if let Some(deployment) = owner.name.strip_suffix(hash.as_str()).and_then(|n| n.strip_suffix('-')) {
                return Some(deployment.to_string());
            }
        }
    }
    Some(owner.name.clone())
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

fn endpoint_slice(o: &Object, out: &mut BTreeMap<String, Vec<SliceEndpoint>>) -> Result<(), String> {
    let Some(service) = o.metadata.labels.get("kubernetes.io/service-name") else { return Ok(()) };
    let endpoints = out.entry(format!("{}/{}", o.namespace(), service)).or_default();
    for e in o.other.get("endpoints").and_then(Value::as_array).into_iter().flatten() {
        let pod = match (str_at(e, &["targetRef", "kind"]), str_at(e, &["targetRef", "name"])) {
            (Some("Pod"), Some(name)) => {
                Some(format!("{}/{}", str_at(e, &["targetRef", "namespace"]).unwrap_or(o.namespace()), name))
            }
            _ => None,
        };
        // Kubernetes: a missing `ready` means ready.
        let ready = e.get("conditions").and_then(|c| c.get("ready")).and_then(Value::as_bool).unwrap_or(true);
        for ip in e.get("addresses").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            let ip = ip.parse().map_err(|_| format!("endpoint address {ip:?} is not an IP address"))?;
            let node = str_at(e, &["nodeName"]).map(String::from);
            let zone = str_at(e, &["zone"]).map(String::from);
            endpoints.push(SliceEndpoint { ip, pod: pod.clone(), node, zone, ready });
        }
    }
    Ok(())
}

/// The object's spec as its CRD type, after checking it against the CRD's schema (generated from the same
/// types): what the API server would refuse is refused here too, and unknown fields are errors.
/// A MeshConfig's spec as the agents' settings; an unparsable CIDR is refused.
fn settings(spec: MeshConfigSpec) -> Result<super::MeshSettings, String> {
    let cidrs = spec.capture.exclude_outbound_cidrs.iter();
    let exclude_outbound_cidrs = cidrs
        .map(|c| c.parse().map_err(|e| format!("capture.excludeOutboundCidrs: {c:?} is not a CIDR ({e})")))
        .collect::<Result<_, _>>()?;
    Ok(super::MeshSettings {
        default_mtls_mode: spec.default_mtls_mode,
        outbound_traffic_policy: match spec.outbound_traffic_policy {
            OutboundPolicy::AllowAny => mesh_common::config::OutboundTrafficPolicy::AllowAny,
            OutboundPolicy::RegistryOnly => mesh_common::config::OutboundTrafficPolicy::RegistryOnly,
        },
        capture: mesh_common::config::CaptureConfig {
            exclude_outbound_ports: spec.capture.exclude_outbound_ports,
            exclude_inbound_ports: spec.capture.exclude_inbound_ports,
            exclude_outbound_cidrs,
        },
    })
}

fn spec<T: serde::de::DeserializeOwned>(o: &Object) -> Result<T, String> {
    super::schema::check_spec(&o.api_version, &o.kind, &o.spec)?;
    serde_json::from_value(o.spec.clone()).map_err(|e| format!("spec: {e}"))
}
