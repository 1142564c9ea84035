//! One enrolled pod as the data path sees it (`PodContext`: its network, namespace, identity claims and
//! connection count) and as the agent keeps it (`PodEntry`). Kept apart from enrollment (`inpod`) so that the
//! proxy, L7, policy, metrics and telemetry can take a pod without depending on how pods are enrolled.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::cni::PodNetwork;
use mesh_common::config::Workload;
use serde::Serialize;
use tokio::task::AbortHandle;

use crate::identity::Identity;
use crate::netns::NetNs;
use crate::snapshot::Snapshot;

/// `text` as `ip:port` when the ip is one of `pod_ips`: where a peer asks to reach a pod (a CONNECT's authority, an
/// agent-to-agent request's target). The peer is authenticated, but the address is its claim.
pub fn own_address(text: Option<&str>, pod_ips: &[std::net::IpAddr]) -> Option<SocketAddr> {
    text.and_then(|a| a.parse::<SocketAddr>().ok()).filter(|t| pod_ips.contains(&t.ip().to_canonical()))
}

/// One enrolled pod as the proxy sees it.
#[derive(Debug)]
pub struct PodContext {
    pub net: PodNetwork,
    pub netns: NetNs,
    pub enrolled_at: u64,
    /// The pod's open outbound connections, against `Limits::max_connections_per_pod`.
    pub outbound_connections: crate::limits::ConnectionCount,
}

impl PodContext {
    /// A pod in the test's own netns, for unit tests of the data path.
    #[cfg(test)]
    pub fn for_test(netns: NetNs, namespace: &str, name: &str, ips: &[&str]) -> Self {
        let net = PodNetwork {
            container_id: format!("test-{name}"),
            netns: netns.path().display().to_string(),
            namespace: namespace.into(),
            name: name.into(),
            uid: None,
            ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        };
        PodContext { net, netns, enrolled_at: 0, outbound_connections: Default::default() }
    }

    /// `namespace/name`
    pub fn name(&self) -> String {
        self.net.qualified_name()
    }

    /// The pod's entry in the config, once the control plane confirms the pod the CNI plugin described: the
    /// same namespace and name, the same UID when both know one, and an address in common (the agent checked at
    /// enrollment that the claimed addresses really are the netns's). A CNI request is only a claim: before,
    /// any network namespace announced as `default/client` was given client's identity.
    pub fn workload<'c>(&self, config: &'c Snapshot) -> Option<&'c Workload> {
        let w = config.workload(&self.net.namespace, &self.net.name)?;
        let uid_agrees = match (&w.uid, &self.net.uid) {
            (Some(known), Some(claimed)) => known == claimed,
            _ => true,
        };
        let address_agrees = w.ips.iter().any(|ip| self.net.ips.iter().any(|own| own.to_canonical() == *ip));
        (uid_agrees && address_agrees).then_some(w)
    }

    pub fn service_account(&self, config: &Snapshot) -> Option<String> {
        self.workload(config).map(|w| w.service_account.clone())
    }

    /// The pod's SPIFFE identity, once config confirms the pod (see [`PodContext::workload`]).
    pub fn identity(&self, config: &Snapshot) -> Option<Identity> {
        self.workload(config).map(|w| config.identity_of(w))
    }

    pub fn identity_string(&self, config: &Snapshot) -> Option<String> {
        self.identity(config).map(|id| id.to_string())
    }

    /// The pod's own address behind `peer`, a connection the pod opened to one of the agent's capture
    /// listeners: that peer is the pod's loopback (the connect hook's redirect), so the pod's IP in the
    /// family it dialled stands in for it, with the same port.
    pub fn caller(&self, peer: SocketAddr) -> SocketAddr {
        let ips = &self.net.ips;
        let ip = ips
            .iter()
            .find(|ip| ip.is_ipv4() == peer.ip().to_canonical().is_ipv4())
            .or(ips.first())
            .copied()
            .unwrap_or(peer.ip());
        SocketAddr::new(ip, peer.port())
    }
}

/// An enrolled pod as the agent keeps it: its context, the accept loops serving it and its listening sockets.
pub struct PodEntry {
    pub pod: Arc<PodContext>,
    pub(crate) tasks: Vec<AbortHandle>,
    /// The pod's listening sockets (copies of what the accept loops own), for a successor to take over.
    pub(crate) listeners: Vec<std::net::TcpListener>,
}

impl PodEntry {
    pub fn listeners(&self) -> &[std::net::TcpListener] {
        &self.listeners
    }

    pub fn view(&self, config: &Snapshot) -> WorkloadView {
        let p = &self.pod;
        WorkloadView {
            namespace: p.net.namespace.clone(),
            name: p.net.name.clone(),
            uid: p.net.uid.clone(),
            container_id: p.net.container_id.clone(),
            netns: p.net.netns.clone(),
            netns_cookie: p.netns.cookie(),
            ips: p.net.ips.clone(),
            service_account: p.service_account(config),
            identity: p.identity_string(config),
            enrolled_at: p.enrolled_at,
        }
    }
}

/// What `/workloads` reports for each enrolled pod.
#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub container_id: String,
    pub netns: String,
    pub netns_cookie: u64,
    pub ips: Vec<std::net::IpAddr>,
    pub service_account: Option<String>,
    /// SPIFFE ID, once config names the pod's service account.
    pub identity: Option<String>,
    /// Unix seconds.
    pub enrolled_at: u64,
}
