//! The label set of traffic metrics, access logs and spans: Istio's standard labels, so dashboards, Kiali and
//! habits carry over. Every value comes from config, enrollment or a verified certificate, never from the
//! traffic itself (no paths, no headers), which bounds cardinality by the workloads and services of the mesh.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::pod::PodContext;
use crate::snapshot::Snapshot;

pub use crate::names::{CLUSTER_DOMAIN, DestinationService, Peer, UNKNOWN};

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

impl Peer {
    /// A local pod: from config when it lists the pod, else from what enrollment knows (namespace and name).
    pub fn local(config: &Snapshot, pod: &PodContext) -> Peer {
        match config.peer(&pod.net.namespace, &pod.net.name) {
            Some(peer) => peer.clone(),
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
        let mut peer = config.peer_by_ip(ip).cloned().unwrap_or_else(Peer::unknown);
        match principal {
            // The config's principal for the address is what the certificate says, as a rule: nothing to build.
            Some(principal) if *peer.principal == *principal => {}
            Some(principal) => {
                peer.principal = principal.into();
                if &*peer.namespace == UNKNOWN {
                    if let Some(ns) = principal.split("/ns/").nth(1).and_then(|r| r.split('/').next()) {
                        peer.namespace = ns.into();
                    }
                }
            }
            // Plaintext: nothing proves who is on the other end.
            None => peer.principal = crate::names::unknown(),
        }
        peer
    }
}

impl DestinationService {
    /// The Service a connection to a local pod's `port` arrived for, as the destination side sees it: one
    /// whose endpoints include the pod and whose ports lead to `port`.
    pub fn serving(config: &Snapshot, pod_ips: &[IpAddr], port: u16) -> Self {
        config.service_serving(pod_ips, port).cloned().unwrap_or_else(Self::unknown)
    }

    /// The Service `namespace/name`: its names from the snapshot when it lists it (no allocation).
    pub fn named(config: &Snapshot, namespace: &str, name: &str) -> Self {
        config.service_names(namespace, name).cloned().unwrap_or_else(|| Self::of(namespace, name))
    }

    /// Which Service a destination address belongs to, as the caller's side sees it.
    pub fn for_address(config: &Snapshot, ip: IpAddr, port: u16) -> Self {
        match config.service_by_address(ip, port) {
            Some((s, _)) => Self::named(config, &s.namespace, &s.name),
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
            self.source.principal = crate::names::unknown();
            self.destination.principal = crate::names::unknown();
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
