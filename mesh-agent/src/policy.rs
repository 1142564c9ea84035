//! Applies the config's security policy to one inbound connection of a local pod.

use std::net::{IpAddr, SocketAddr};

use mesh_common::policy::{self as model, Connection, Decision, MtlsMode};

use crate::metrics::{Direction, Metrics};
use crate::pod::PodContext;
use crate::snapshot::Snapshot;

/// Why a connection was refused, for logs, metrics and the HBONE status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub policy: Option<String>,
}

impl Refusal {
    /// Logs the refusal with both identities (`config` names the pod's) and counts it.
    pub fn record(
        &self,
        metrics: &Metrics,
        config: &Snapshot,
        pod: &PodContext,
        principal: Option<&str>,
        peer: SocketAddr,
    ) {
        metrics.denied(pod, Direction::Inbound, self.reason);
        tracing::info!(
            source = principal.unwrap_or("plaintext"),
            %peer,
            destination = pod.identity_string(config).as_deref().unwrap_or("unknown"),
            reason = self.reason,
            policy = self.policy.as_deref().unwrap_or("-"),
            "connection refused"
        );
    }
}

fn labels<'a>(config: &'a Snapshot, pod: &PodContext) -> Option<&'a std::collections::BTreeMap<String, String>> {
    pod.workload(config).map(|w| &w.labels)
}

/// Whether the pod's inbound HTTP must be authorized per request (its policies have L7 conditions).
pub fn needs_request(config: &Snapshot, pod: &PodContext) -> bool {
    let empty = Default::default();
    model::needs_request(&config.authorization_policies, &pod.net.namespace, labels(config, pod).unwrap_or(&empty))
}

/// Authorizes one HTTP request on a connection already admitted by mTLS mode.
pub fn check_request(
    config: &Snapshot,
    pod: &PodContext,
    principal: Option<&str>,
    source_ip: IpAddr,
    port: u16,
    request: model::Request<'_>,
) -> Result<(), Refusal> {
    authorize(
        config,
        pod,
        Connection { principal, source_ip: source_ip.to_canonical(), destination_port: port, request: Some(request) },
    )
}

/// The mTLS-mode check alone: STRICT refuses plaintext.
pub fn check_mtls_mode(config: &Snapshot, pod: &PodContext, principal: Option<&str>) -> Result<(), Refusal> {
    let empty = Default::default();
    let labels = labels(config, pod).unwrap_or(&empty);
    if principal.is_none()
        && model::mtls_mode(
            &config.peer_authentications,
            config.default_peer_authentication,
            &pod.net.namespace,
            labels,
        ) == MtlsMode::Strict
    {
        return Err(Refusal { reason: "peer_authentication_strict", policy: None });
    }
    Ok(())
}

/// `principal` is the verified peer SPIFFE ID for mTLS, `None` for plaintext.
pub fn check_inbound(
    config: &Snapshot,
    pod: &PodContext,
    principal: Option<&str>,
    source_ip: IpAddr,
    port: u16,
) -> Result<(), Refusal> {
    check_mtls_mode(config, pod, principal)?;
    authorize(
        config,
        pod,
        Connection { principal, source_ip: source_ip.to_canonical(), destination_port: port, request: None },
    )
}

fn authorize(config: &Snapshot, pod: &PodContext, conn: Connection<'_>) -> Result<(), Refusal> {
    // A peer of an aliased trust domain is matched as the mesh's own (the policies were folded alike, `snapshot`).
    let folded =
        conn.principal.and_then(|p| model::fold_trust_domain(p, &config.trust_domain, &config.trust_domain_aliases));
    let conn = Connection { principal: folded.as_deref().or(conn.principal), ..conn };
    let empty = Default::default();
    let labels = labels(config, pod).unwrap_or(&empty);
    match model::authorize(&config.authorization_policies, &pod.net.namespace, labels, &conn) {
        Decision::Allow => Ok(()),
        Decision::Deny { reason, policy } => Err(Refusal { reason: reason.as_str(), policy }),
    }
}
