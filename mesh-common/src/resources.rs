//! NodeConfig as keyed resources, for the config stream: [`split`] turns a config into resources, [`Assembler`]
//! keeps the agent's current set and builds the config back from it.

use std::collections::BTreeMap;

use crate::config::{NodeConfig, OutboundTrafficPolicy};
use crate::policy::MtlsMode;
use crate::proto::{Resource, ResourceKey};

pub const WORKLOAD: &str = "workload";
pub const SERVICE: &str = "service";
pub const PEER_AUTHENTICATION: &str = "peerAuthentication";
pub const AUTHORIZATION_POLICY: &str = "authorizationPolicy";
pub const ROUTE: &str = "route";
pub const TRAFFIC_POLICY: &str = "trafficPolicy";
pub const TELEMETRY: &str = "telemetry";
pub const SETTINGS: &str = "settings";

/// The node-wide scalars of a NodeConfig, sent as one resource.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
struct Settings {
    version: String,
    trust_domain: String,
    /// Absent from controllers before aliases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    trust_domain_aliases: Vec<String>,
    mesh_namespaces: Option<Vec<String>>,
    #[serde(default)]
    excluded_pods: Vec<String>,
    capture: crate::config::CaptureConfig,
    default_peer_authentication: MtlsMode,
    outbound_traffic_policy: OutboundTrafficPolicy,
}

/// Resource identity: (kind, "namespace/name").
pub type Key = (String, String);

fn key(kind: &str, namespace: &str, name: &str) -> Key {
    (kind.to_string(), format!("{namespace}/{name}"))
}

/// Splits `config` into resources keyed by kind and name, each the JSON of its element.
pub fn split(config: &NodeConfig) -> BTreeMap<Key, Vec<u8>> {
    let mut out = BTreeMap::new();
    let json = |v: &dyn erased::Json| v.to_json();
    for w in &config.workloads {
        out.insert(key(WORKLOAD, &w.namespace, &w.name), json(w));
    }
    for s in &config.services {
        out.insert(key(SERVICE, &s.namespace, &s.name), json(s));
    }
    for p in &config.peer_authentications {
        out.insert(key(PEER_AUTHENTICATION, &p.namespace, &p.name), json(p));
    }
    for p in &config.authorization_policies {
        out.insert(key(AUTHORIZATION_POLICY, &p.namespace, &p.name), json(p));
    }
    for r in &config.routes {
        // HTTPRoute and GRPCRoute names live in separate namespaces of names.
        let kind = match r.kind {
            crate::route::RouteKind::Http => "httproute",
            crate::route::RouteKind::Grpc => "grpcroute",
        };
        out.insert((ROUTE.to_string(), format!("{}/{}/{}", kind, r.namespace, r.name)), json(r));
    }
    for p in &config.traffic_policies {
        out.insert(key(TRAFFIC_POLICY, &p.namespace, &p.name), json(p));
    }
    for t in &config.telemetry {
        out.insert(key(TELEMETRY, &t.namespace, &t.name), json(t));
    }
    let settings = Settings {
        version: String::new(),
        trust_domain: config.trust_domain.clone(),
        trust_domain_aliases: config.trust_domain_aliases.clone(),
        mesh_namespaces: config.mesh_namespaces.clone(),
        excluded_pods: config.excluded_pods.clone(),
        capture: config.capture.clone(),
        default_peer_authentication: config.default_peer_authentication,
        outbound_traffic_policy: config.outbound_traffic_policy,
    };
    out.insert((SETTINGS.to_string(), String::new()), json(&settings));
    out
}

mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

pub fn to_proto(key: &Key, json: &[u8]) -> Resource {
    Resource { key: Some(ResourceKey { kind: key.0.clone(), name: key.1.clone() }), json: json.to_vec() }
}

/// The agent's side: applies updates and rebuilds the NodeConfig.
#[derive(Default, Debug, Clone)]
pub struct Assembler {
    resources: BTreeMap<Key, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("resource {kind}/{name}: {error}")]
    Decode { kind: String, name: String, error: String },
    #[error("resource without a key")]
    NoKey,
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
}

impl Assembler {
    /// Applies one update to a copy of the current set and returns the resulting config; the set changes only
    /// when the result is valid, so a bad update leaves the last good config in force.
    pub fn apply(
        &mut self,
        full: bool,
        upserts: &[Resource],
        removals: &[ResourceKey],
        version: &str,
    ) -> Result<NodeConfig, AssembleError> {
        let mut next = if full { BTreeMap::new() } else { self.resources.clone() };
        for r in removals {
            next.remove(&(r.kind.clone(), r.name.clone()));
        }
        for r in upserts {
            let k = r.key.as_ref().ok_or(AssembleError::NoKey)?;
            next.insert((k.kind.clone(), k.name.clone()), r.json.clone());
        }
        let config = build(&next, version)?;
        config.validate()?;
        self.resources = next;
        Ok(config)
    }
}

fn build(resources: &BTreeMap<Key, Vec<u8>>, version: &str) -> Result<NodeConfig, AssembleError> {
    let mut config = NodeConfig { trust_domain: crate::config::DEFAULT_TRUST_DOMAIN.into(), ..Default::default() };
    for ((kind, name), json) in resources {
        let bad = |e: serde_json::Error| AssembleError::Decode {
            kind: kind.clone(),
            name: name.clone(),
            error: e.to_string(),
        };
        match kind.as_str() {
            WORKLOAD => config.workloads.push(serde_json::from_slice(json).map_err(bad)?),
            SERVICE => config.services.push(serde_json::from_slice(json).map_err(bad)?),
            PEER_AUTHENTICATION => config.peer_authentications.push(serde_json::from_slice(json).map_err(bad)?),
            AUTHORIZATION_POLICY => config.authorization_policies.push(serde_json::from_slice(json).map_err(bad)?),
            ROUTE => config.routes.push(serde_json::from_slice(json).map_err(bad)?),
            TRAFFIC_POLICY => config.traffic_policies.push(serde_json::from_slice(json).map_err(bad)?),
            TELEMETRY => config.telemetry.push(serde_json::from_slice(json).map_err(bad)?),
            SETTINGS => {
                let s: Settings = serde_json::from_slice(json).map_err(bad)?;
                config.trust_domain = s.trust_domain;
                config.trust_domain_aliases = s.trust_domain_aliases;
                config.mesh_namespaces = s.mesh_namespaces;
                config.excluded_pods = s.excluded_pods;
                config.capture = s.capture;
                config.default_peer_authentication = s.default_peer_authentication;
                config.outbound_traffic_policy = s.outbound_traffic_policy;
            }
            // Kinds a newer controller sends and this agent does not know yet are skipped, not fatal.
            _ => {}
        }
    }
    config.version = version.to_string();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_assemble_round_trip_with_deltas() {
        let config = NodeConfig::from_yaml(
            "trustDomainAliases: [old.td]\n\
             workloads: [{namespace: a, name: p1, serviceAccount: s, ips: [10.0.0.1]}, {namespace: a, name: p2, trustDomain: old.td}]\n\
             authorizationPolicies: [{namespace: a, name: deny, action: DENY}]\n\
             routes: [{namespace: a, name: r, kind: GRPCRoute, parents: [{namespace: a, name: svc}], rules: [{matches: [{path: {type: PathPrefix, value: /pkg.Svc/}}], backends: [{service: {namespace: a, name: svc-v2, port: 80}, weight: 1}]}]}]\n\
             trafficPolicies: [{namespace: a, name: tp, service: svc, settings: {rateLimit: {requestsPerSecond: 10}}}]\n\
             defaultPeerAuthentication: STRICT\n",
        )
        .unwrap();
        let parts = split(&config);
        let all: Vec<Resource> = parts.iter().map(|(k, v)| to_proto(k, v)).collect();
        let mut agent = Assembler::default();
        let mut got = agent.apply(true, &all, &[], "1").unwrap();
        got.version.clear();
        assert_eq!(got, config);

        // Delta: p2 goes away, a bad resource is rejected without losing the good state.
        let removal = ResourceKey { kind: WORKLOAD.into(), name: "a/p2".into() };
        let after = agent.apply(false, &[], &[removal], "2").unwrap();
        assert_eq!(after.workloads.len(), 1);
        assert_eq!(after.version, "2");
        let broken =
            Resource { key: Some(ResourceKey { kind: WORKLOAD.into(), name: "a/x".into() }), json: b"{}".to_vec() };
        assert!(agent.apply(false, &[broken], &[], "3").is_err());
        assert_eq!(agent.apply(false, &[], &[], "4").unwrap().workloads.len(), 1);
    }
}
