//! An inbound connection relayed at L4 is admitted under the config in force when it opens; every later config
//! decides it again, as ztunnel does. A policy that now refuses the connection — or that now decides per request,
//! which a relay of opaque bytes cannot do — ends it with a reset, instead of leaving it open on the old decision.
//! (Connections whose requests are served, `crate::l7::inbound`, are decided per request under the config of
//! each request already.)

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use crate::dataplane::DataPlane;
use crate::metrics::Direction;
use crate::pod::PodContext;
use crate::policy::{self, Refusal};
use crate::snapshot::Snapshot;

/// What an inbound connection was admitted as, to decide it again.
pub struct Admitted {
    /// The config it was admitted under: one that changed before the relay began is checked at once. Not kept
    /// once the relay runs: an old snapshot must not stay in memory because a connection lives.
    pub under: Option<Arc<Snapshot>>,
    /// The verified peer SPIFFE ID; `None` for plaintext.
    pub principal: Option<String>,
    pub source_ip: IpAddr,
    pub port: u16,
    /// Whether it was looked at for HTTP (and was not HTTP): then a policy deciding per request has already
    /// been applied to it as it applies to opaque bytes, at the connection level, request conditions failing.
    pub looked_for_http: bool,
}

impl Admitted {
    fn check(&self, config: &Snapshot, pod: &PodContext) -> Result<(), Refusal> {
        if !self.looked_for_http && policy::needs_request(config, pod) {
            return Err(Refusal { reason: "requests_now_authorized", policy: None });
        }
        policy::check_inbound(config, pod, self.principal.as_deref(), self.source_ip, self.port)
    }
}

/// Runs `copy` until it ends, or until a new config no longer admits the connection (then an error, which makes
/// the caller reset both sides), counted as `nodemesh_connections_cut_total{reason="policy_changed"}`.
pub async fn while_admitted<T>(
    dp: &DataPlane,
    pod: &PodContext,
    mut admitted: Admitted,
    copy: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let mut changes = dp.config_changes();
    let current = changes.borrow_and_update().clone();
    if admitted.under.take().is_none_or(|under| !Arc::ptr_eq(&under, &current)) {
        changes.mark_changed();
    }
    drop(current);
    let mut copy = std::pin::pin!(copy);
    loop {
        tokio::select! {
            biased;
            result = &mut copy => return result,
            changed = changes.changed() => {
                if changed.is_err() {
                    return copy.await;
                }
                let config = changes.borrow_and_update().clone();
                if let Err(refusal) = admitted.check(&config, pod) {
                    dp.metrics().cut(pod, Direction::Inbound, "policy_changed");
                    tracing::info!(
                        source = admitted.principal.as_deref().unwrap_or("plaintext"),
                        reason = refusal.reason,
                        policy = refusal.policy.as_deref().unwrap_or("-"),
                        "connection ended: the config now in force does not admit it"
                    );
                    return Err(io::Error::new(io::ErrorKind::PermissionDenied, "no longer admitted by policy"));
                }
            }
        }
    }
}
