//! The label set of traffic metrics, access logs and spans: Istio's standard labels, so dashboards, Kiali and
//! habits carry over. Every value comes from config, enrollment or a verified certificate, never from the
//! traffic itself (no paths, no headers), which bounds cardinality by the workloads and services of the mesh.

use std::net::IpAddr;
use std::sync::Arc;

use mesh_common::config::{Service, Workload};
use serde::Serialize;

use crate::pod::PodContext;
use crate::snapshot::Snapshot;

/// Istio's value for a label the reporter cannot know.
pub const UNKNOWN: &str = "unknown";
/// Kubernetes' default cluster domain, for `destination_service` host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Which side reports a metric: the caller's agent (`source`) or the callee's (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// `connection_security_policy`: mutual TLS (HBONE) or plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Security {
    #[serde(rename = "mutual_tls")]
    MutualTls,
    #[serde(rename = "none")]
    None,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::None => "none",
        }
    }
}

/// One end of a connection or request, as the labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub principal: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

impl Peer {
    pub fn unknown() -> Peer {
        let u: Arc<str> = Arc::from(UNKNOWN);
        Peer {
            workload: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: u,
        }
    }

    pub fn of(w: &Workload, trust_domain: &str) -> Peer {
        Peer {
            workload: w.workload_name().into(),
            namespace: w.namespace.as_str().into(),
            principal: w.spiffe_id(trust_domain).into(),
            app: w.app().unwrap_or(UNKNOWN).into(),
            version: w.version().unwrap_or(UNKNOWN).into(),
            canonical_service: w.canonical_service().into(),
            canonical_revision: w.canonical_revision().into(),
        }
    }

    /// A local pod: from config when it lists the pod, else from what enrollment knows (namespace and name).
    pub fn local(config: &Snapshot, pod: &PodContext) -> Peer {
        match config.workload(&pod.net.namespace, &pod.net.name) {
            Some(w) => Peer::of(w, &config.trust_domain),
            None => Peer {
                workload: pod.net.name.as_str().into(),
                namespace: pod.net.namespace.as_str().into(),
                canonical_service: pod.net.name.as_str().into(),
                canonical_revision: Arc::from("latest"),
                ..Peer::unknown()
            },
        }
    }

    /// A remote end known by address (and, for mTLS, by its verified SPIFFE ID, which wins over config).
    pub fn remote(config: &Snapshot, ip: IpAddr, principal: Option<&str>) -> Peer {
        let mut peer =
            config.workload_by_ip(ip).map(|w| Peer::of(w, &config.trust_domain)).unwrap_or_else(Peer::unknown);
        match principal {
            Some(principal) => {
                peer.principal = principal.into();
                if &*peer.namespace == UNKNOWN {
                    if let Some(ns) = principal.split("/ns/").nth(1).and_then(|r| r.split('/').next()) {
                        peer.namespace = ns.into();
                    }
                }
            }
            // Plaintext: nothing proves who is on the other end.
            None => peer.principal = UNKNOWN.into(),
        }
        peer
    }
}

/// `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct DestinationService {
    /// `name.namespace.svc.cluster.local`
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl DestinationService {
    pub fn unknown() -> Self {
        let u: Arc<str> = Arc::from(UNKNOWN);
        DestinationService { host: u.clone(), name: u.clone(), namespace: u }
    }

    pub fn of(namespace: &str, name: &str) -> Self {
        DestinationService {
            host: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}").into(),
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    /// The Service a connection to a local pod's `port` arrived for, as the destination side sees it: one
    /// whose endpoints include the pod and whose ports lead to `port`.
    pub fn serving(config: &Snapshot, pod_ips: &[IpAddr], port: u16) -> Self {
        let serves = |s: &&Service| {
            s.endpoints.iter().any(|e| pod_ips.contains(&e.ip)) && s.ports.iter().any(|p| p.endpoint_port() == port)
        };
        config.services.iter().find(serves).map(|s| Self::of(&s.namespace, &s.name)).unwrap_or_else(Self::unknown)
    }

    /// Which Service a destination address belongs to, as the caller's side sees it.
    pub fn for_address(config: &Snapshot, ip: IpAddr, port: u16) -> Self {
        match config.service_by_address(ip, port) {
            Some((s, _)) => Self::of(&s.namespace, &s.name),
            None => Self::serving(config, &[ip.to_canonical()], port),
        }
    }
}

/// The labels of one connection (and of the requests on it, with the request's own added).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub service: DestinationService,
    pub security: Security,
}

impl Flow {
    /// What a local pod opens to `target` (`principal`: the verified peer of an mTLS connection).
    pub fn outbound(
        config: &Snapshot,
        pod: &PodContext,
        target: IpAddr,
        principal: Option<&str>,
        service: DestinationService,
        security: Security,
    ) -> Flow {
        Flow {
            reporter: Reporter::Source,
            source: Peer::local(config, pod),
            destination: Peer::remote(config, target, principal),
            service,
            security,
        }
        .proven()
    }

    /// What arrives for a local pod's `port` from `peer` (`principal`: its verified SPIFFE ID under mTLS).
    pub fn inbound(
        config: &Snapshot,
        pod: &PodContext,
        peer: IpAddr,
        principal: Option<&str>,
        port: u16,
        security: Security,
    ) -> Flow {
        Flow {
            reporter: Reporter::Destination,
            source: Peer::remote(config, peer, principal),
            destination: Peer::local(config, pod),
            service: DestinationService::serving(config, &pod.net.ips, port),
            security,
        }
        .proven()
    }

    /// Principals only where mTLS proves them, as Istio reports them.
    fn proven(mut self) -> Flow {
        if self.security == Security::None {
            self.source.principal = UNKNOWN.into();
            self.destination.principal = UNKNOWN.into();
        }
        self
    }

    /// The local end: its series go away some time after it leaves the node.
    pub fn local(&self) -> &Peer {
        match self.reporter {
            Reporter::Source => &self.source,
            Reporter::Destination => &self.destination,
        }
    }

    /// The label pairs shared by TCP and request series, in Istio's order.
    pub fn label_pairs(&self) -> [(&'static str, &str); 18] {
        let (s, d, svc) = (&self.source, &self.destination, &self.service);
        [
            ("reporter", self.reporter.as_str()),
            ("source_workload", &s.workload),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &s.principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &d.principal),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_service", &svc.host),
            ("destination_service_name", &svc.name),
            ("destination_service_namespace", &svc.namespace),
        ]
    }
}
