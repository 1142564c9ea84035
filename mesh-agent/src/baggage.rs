//! What travels on a `CONNECT` besides the authority, as Istio's ztunnel sends it: `baggage` with the sending
//! workload's metadata (W3C Baggage members under OpenTelemetry/Istio key names), `forwarded` with the original
//! client (RFC 7239 `for=`) and a `traceparent` (`telemetry::context::unsampled_trace`); and `baggage` with the destination's metadata on the `200`. A
//! peer that is not in this agent's config (a workload of another cluster behind its ztunnel) is labelled from
//! its baggage instead of `unknown` — the SPIFFE ID stays the one its certificate proves.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use crate::names::{Peer, UNKNOWN};

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
/// W3C trace context; the tracing module reads and writes it on requests too.
pub const TRACEPARENT: &str = "traceparent";

/// A workload's `baggage` value: namespace, workload (as `k8s.deployment.name` when it has an owner, else
/// `k8s.pod.name` — the config does not know the owner's kind), canonical service and revision.
pub fn of(peer: &Peer, pod_name: &str) -> Option<HeaderValue> {
    let workload_key = if *peer.workload == *pod_name { "k8s.pod.name" } else { "k8s.deployment.name" };
    let members = [
        ("k8s.namespace.name", &*peer.namespace),
        (workload_key, &*peer.workload),
        ("service.name", &*peer.canonical_service),
        ("service.version", &*peer.canonical_revision),
    ];
    let value: Vec<String> =
        members.iter().filter(|(_, v)| *v != UNKNOWN && acceptable(v)).map(|(k, v)| format!("{k}={v}")).collect();
    HeaderValue::from_str(&value.join(",")).ok()
}

/// RFC 7239 `for=` the original client (an IPv6 address quoted in brackets).
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    let value = match client.to_canonical() {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// The metadata a peer sent about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub service: Option<String>,
    pub revision: Option<String>,
}

/// Reads every `baggage` header (members `key=value;properties`, comma-separated). Values become metric labels:
/// only names a Kubernetes object could have are taken (at most 253 of `[A-Za-z0-9._-]`), the rest is ignored.
pub fn parse(headers: &HeaderMap) -> Baggage {
    let mut baggage = Baggage::default();
    let members = headers.get_all(BAGGAGE).into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    for member in members {
        let Some((key, value)) = member.split(';').next().and_then(|kv| kv.split_once('=')) else { continue };
        let value = value.trim();
        if !acceptable(value) {
            continue;
        }
        let slot = match key.trim() {
            "k8s.namespace.name" => &mut baggage.namespace,
            "service.name" => &mut baggage.service,
            "service.version" => &mut baggage.revision,
            "k8s.cluster.name" => continue,
            k if k.starts_with("k8s.") && k.ends_with(".name") => &mut baggage.workload,
            _ => continue,
        };
        *slot = Some(value.to_string());
    }
    baggage
}

fn acceptable(value: &str) -> bool {
    (1..=253).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Baggage {
    /// Fills the names of a peer the config does not know; the namespace only where the certificate does not
    /// prove one (a peer cannot claim to be in another namespace than its SPIFFE ID says).
    pub fn label(&self, peer: &mut Peer) {
        if *peer.workload != *UNKNOWN {
            return;
        }
        let set = |slot: &mut std::sync::Arc<str>, value: &Option<String>| {
            if let Some(v) = value {
                *slot = v.as_str().into();
            }
        };
        set(&mut peer.workload, &self.workload);
        if *peer.namespace == *UNKNOWN {
            set(&mut peer.namespace, &self.namespace);
        }
        set(&mut peer.app, &self.service);
        set(&mut peer.canonical_service, &self.service);
        set(&mut peer.version, &self.revision);
        set(&mut peer.canonical_revision, &self.revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_by_istio_key_names_and_nothing_a_label_should_not_carry() {
        let mut headers = HeaderMap::new();
        headers.append(BAGGAGE, HeaderValue::from_static("k8s.cluster.name=c1, k8s.namespace.name=shop"));
        headers.append(BAGGAGE, HeaderValue::from_static("k8s.statefulset.name=db;prop=1,service.name=db,x=y"));
        headers.append(BAGGAGE, HeaderValue::from_static("service.version=v{1},bogus,=v"));
        let parsed = parse(&headers);
        let expected = Baggage {
            namespace: Some("shop".into()),
            workload: Some("db".into()),
            service: Some("db".into()),
            revision: None,
        };
        assert_eq!(parsed, expected);
        assert_eq!(parse(&HeaderMap::new()), Baggage::default());
    }

    #[test]
    fn what_is_sent_reads_back_and_fills_only_unknown_peers() {
        let mut peer = Peer::unknown();
        peer.workload = "cart".into();
        peer.namespace = "shop".into();
        peer.canonical_service = "cart".into();
        peer.canonical_revision = "v2".into();
        let value = of(&peer, "cart-7d9f").unwrap();
        assert_eq!(value, "k8s.namespace.name=shop,k8s.deployment.name=cart,service.name=cart,service.version=v2");
        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, value);
        let mut stranger = Peer::unknown();
        stranger.namespace = "proven".into();
        parse(&headers).label(&mut stranger);
        assert_eq!((&*stranger.workload, &*stranger.namespace, &*stranger.version), ("cart", "proven", "v2"));
        let mut known = peer.clone();
        known.workload = "from-config".into();
        parse(&headers).label(&mut known);
        assert_eq!(&*known.workload, "from-config");
        assert_eq!(forwarded_for("10.0.0.1".parse().unwrap()), "for=10.0.0.1");
        assert_eq!(forwarded_for("fd00::1".parse().unwrap()), "for=\"[fd00::1]\"");
        assert_eq!(forwarded_for("::ffff:10.0.0.1".parse().unwrap()), "for=10.0.0.1");
    }
}
