//! The config as the data path reads it: compiled once, when it arrives, into an immutable snapshot that is
//! swapped whole. Every connection and request asks "whose address is this?" — which workload owns a peer IP,
//! which Service a client dialled — and the config answers from lists: a linear scan per lookup, several per
//! request, growing with the cluster. The snapshot answers from indexes built with it; everything else in the
//! config reads through `Deref` unchanged.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Deref;

use mesh_common::config::{NodeConfig, Service, ServicePort, Workload};

use crate::identity::Identity;
use crate::names::{DestinationService, Peer};

/// A config with its lookups indexed. Each index keeps the first entry in config order, as the list scans did.
#[derive(Debug, Default)]
pub struct Snapshot {
    config: NodeConfig,
    workload_by_ip: HashMap<IpAddr, usize>,
    /// namespace → name → index: looked up with borrowed names, no key built per lookup.
    workload_by_name: HashMap<String, HashMap<String, usize>>,
    /// (cluster IP, port) → (Service, port) indexes.
    service_by_address: HashMap<(IpAddr, u16), (usize, usize)>,
    service_by_name: HashMap<String, HashMap<String, usize>>,
    /// Every Service address and endpoint address: destinations the mesh knows besides workloads.
    service_ips: HashSet<IpAddr>,
    /// Endpoint address → the Services listing it, in config order.
    services_by_endpoint: HashMap<IpAddr, Vec<usize>>,
    /// Telemetry's names of each workload and Service, by the same index as the config's lists.
    peers: Vec<Peer>,
    /// Each workload's `baggage` for the CONNECTs it opens (`baggage`), by the same index.
    baggage: Vec<Option<http::HeaderValue>>,
    service_names: Vec<DestinationService>,
}

/// Principals in AuthorizationPolicies written with an aliased trust domain, moved into the mesh's own (peers'
/// principals are folded the same way when the policy check runs): either name matches peers of both.
fn fold_policy_trust_domains(mut config: NodeConfig) -> NodeConfig {
    if config.trust_domain_aliases.is_empty() {
        return config;
    }
    let (mesh, aliases) = (config.trust_domain.clone(), config.trust_domain_aliases.clone());
    let sources = config.authorization_policies.iter_mut().flat_map(|p| &mut p.rules).flat_map(|r| &mut r.from);
    for source in sources {
        for pattern in source.principals.iter_mut().chain(&mut source.not_principals) {
            if let Some(folded) = mesh_common::policy::fold_trust_domain(pattern, &mesh, &aliases) {
                *pattern = folded;
            }
        }
    }
    config
}

impl Snapshot {
    pub fn new(config: NodeConfig) -> Self {
        let mut s = Snapshot { config: fold_policy_trust_domains(config), ..Default::default() };
        for (i, w) in s.config.workloads.iter().enumerate() {
            for ip in &w.ips {
                s.workload_by_ip.entry(*ip).or_insert(i);
            }
            s.workload_by_name.entry(w.namespace.clone()).or_default().entry(w.name.clone()).or_insert(i);
        }
        for (i, svc) in s.config.services.iter().enumerate() {
            for ip in &svc.ips {
                for (j, port) in svc.ports.iter().enumerate() {
                    s.service_by_address.entry((*ip, port.port)).or_insert((i, j));
                }
            }
            s.service_by_name.entry(svc.namespace.clone()).or_default().entry(svc.name.clone()).or_insert(i);
            s.service_ips.extend(svc.ips.iter().copied().chain(svc.endpoints.iter().map(|e| e.ip)));
            for e in &svc.endpoints {
                let listed = s.services_by_endpoint.entry(e.ip.to_canonical()).or_default();
                if listed.last() != Some(&i) {
                    listed.push(i);
                }
            }
        }
        s.peers = s.config.workloads.iter().map(|w| Peer::of(w, &s.config.trust_domain)).collect();
        s.baggage = s.config.workloads.iter().zip(&s.peers).map(|(w, p)| crate::baggage::of(p, &w.name)).collect();
        s.service_names =
            s.config.services.iter().map(|svc| DestinationService::of(&svc.namespace, &svc.name)).collect();
        s
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The SPIFFE identity a workload proves: its service account, in its own trust domain or the mesh's.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(w.trust_domain(&self.config.trust_domain), &w.namespace, &w.service_account)
    }

    /// The workload that owns `ip`, if the mesh knows one.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.workload_by_ip.get(&ip.to_canonical()).map(|&i| &self.config.workloads[i])
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workload_by_name.get(namespace)?.get(name).map(|&i| &self.config.workloads[i])
    }

    /// The Service whose cluster IP and port a client dialled.
    pub fn service_by_address(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let &(i, j) = self.service_by_address.get(&(ip.to_canonical(), port))?;
        let service = &self.config.services[i];
        Some((service, &service.ports[j]))
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.service_by_name.get(namespace)?.get(name).map(|&i| &self.config.services[i])
    }

    /// Telemetry's names of the workload that owns `ip`.
    pub fn peer_by_ip(&self, ip: IpAddr) -> Option<&Peer> {
        self.workload_by_ip.get(&ip.to_canonical()).map(|&i| &self.peers[i])
    }

    /// Telemetry's names of the workload `namespace/name`.
    pub fn peer(&self, namespace: &str, name: &str) -> Option<&Peer> {
        self.workload_by_name.get(namespace)?.get(name).map(|&i| &self.peers[i])
    }

    /// What the workload `namespace/name` tells the peers it opens tunnels to about itself.
    pub fn baggage(&self, namespace: &str, name: &str) -> Option<http::HeaderValue> {
        self.workload_by_name.get(namespace)?.get(name).and_then(|&i| self.baggage[i].clone())
    }

    /// Telemetry's names of the Service `namespace/name`.
    pub fn service_names(&self, namespace: &str, name: &str) -> Option<&DestinationService> {
        self.service_by_name.get(namespace)?.get(name).map(|&i| &self.service_names[i])
    }

    /// The first Service (in config order) with an endpoint at one of `ips` and a port leading to `port`: the
    /// one a connection to a local pod's `port` arrived for, as the destination side sees it.
    pub fn service_serving(&self, ips: &[IpAddr], port: u16) -> Option<&DestinationService> {
        let candidates = ips.iter().filter_map(|ip| self.services_by_endpoint.get(&ip.to_canonical())).flatten();
        let serves = |&&i: &&usize| self.config.services[i].ports.iter().any(|p| p.endpoint_port() == port);
        candidates.filter(serves).min().map(|&i| &self.service_names[i])
    }

    /// Whether `ip` belongs to a workload or a Service (address or endpoint) the config knows.
    pub fn knows_destination(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.workload_by_ip.contains_key(&ip) || self.service_ips.contains(&ip)
    }
}

impl Deref for Snapshot {
    type Target = NodeConfig;

    fn deref(&self) -> &NodeConfig {
        &self.config
    }
}

impl From<NodeConfig> for Snapshot {
    fn from(config: NodeConfig) -> Self {
        Snapshot::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overlapping entries on purpose: an address two workloads claim, a Service port listed twice, a cluster IP
    /// two Services share — the first in config order must win, as with the scans. (Names are unique: the
    /// config refuses duplicates.)
    const CONFIG: &str = r#"
workloads:
  - {namespace: shop, name: cart-1, serviceAccount: cart, ips: [10.0.0.1, "fd00::1"]}
  - {namespace: shop, name: cart-2, serviceAccount: cart, ips: [10.0.0.2, 10.0.0.1]}
  - {namespace: shop, name: cart-9, serviceAccount: other, ips: [10.0.0.9]}
services:
  - namespace: shop
    name: cart
    ips: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}, {port: 80, targetPort: 9090}, {port: 443}]
    endpoints: [{ip: 10.0.0.7}]
  - namespace: shop
    name: cart-shadow
    ips: [10.96.0.1]
    ports: [{port: 80}, {port: 81}]
    endpoints: [{ip: 10.0.0.7}, {ip: 10.0.0.2}]
"#;

    /// The answers the config's own list scans give, for every address and port the test asks about.
    fn scans_agree(s: &Snapshot, ip: IpAddr, port: u16) {
        let c = s.config();
        assert_eq!(s.workload_by_ip(ip).map(|w| &w.name), c.workload_by_ip(ip).map(|w| &w.name), "{ip}");
        let by_index = s.service_by_address(ip, port).map(|(svc, p)| (&svc.name, p.target_port));
        let by_scan = c.service_by_address(ip, port).map(|(svc, p)| (&svc.name, p.target_port));
        assert_eq!(by_index, by_scan, "{ip}:{port}");
        assert_eq!(s.knows_destination(ip), c.knows_destination(ip), "{ip}");
        let peer = c.workload_by_ip(ip).map(|w| Peer::of(w, &c.trust_domain));
        assert_eq!(s.peer_by_ip(ip), peer.as_ref(), "{ip}");
        let serves = |svc: &&Service| {
            svc.endpoints.iter().any(|e| e.ip == ip.to_canonical())
                && svc.ports.iter().any(|p| p.endpoint_port() == port)
        };
        let by_scan = c.services.iter().find(serves).map(|svc| DestinationService::of(&svc.namespace, &svc.name));
        assert_eq!(s.service_serving(&[ip], port), by_scan.as_ref(), "{ip}:{port}");
    }

    #[test]
    fn indexed_lookups_answer_as_the_scans_do() {
        let snapshot = Snapshot::new(NodeConfig::from_yaml(CONFIG).unwrap());
        let ips =
            ["10.0.0.1", "10.0.0.2", "10.0.0.7", "10.0.0.9", "10.96.0.1", "fd00::1", "::ffff:10.0.0.1", "1.2.3.4"];
        for ip in ips {
            for port in [80, 81, 443, 8080] {
                scans_agree(&snapshot, ip.parse().unwrap(), port);
            }
        }
        assert_eq!(snapshot.workload("shop", "cart-1").unwrap().service_account, "cart");
        assert!(snapshot.workload("shop", "cart-3").is_none());
        assert_eq!(snapshot.service("shop", "cart-shadow").unwrap().ports.len(), 2);
        assert_eq!(&*snapshot.peer("shop", "cart-2").unwrap().principal, "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(&*snapshot.service_names("shop", "cart").unwrap().host, "cart.shop.svc.cluster.local");
        // 10.0.0.7 is an endpoint of both: port 81 leads only to the second, 8080 only to the first.
        let serving = |port| snapshot.service_serving(&["10.0.0.7".parse().unwrap()], port).map(|s| s.name.to_string());
        assert_eq!(serving(8080).as_deref(), Some("cart"));
        assert_eq!(serving(81).as_deref(), Some("cart-shadow"));
        // v4-mapped callers find the IPv4 workload, as the scan does.
        assert_eq!(snapshot.workload_by_ip("::ffff:10.0.0.1".parse().unwrap()).unwrap().name, "cart-1");
        // The rest of the config reads through.
        assert_eq!(snapshot.trust_domain, "cluster.local");
    }
}
