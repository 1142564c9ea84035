//! What an enrolled pod dials: through an HBONE tunnel when the destination is a meshed workload and both
//! identities are known, plaintext passthrough otherwise (or refused under `REGISTRY_ONLY`).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::bpf::HBONE_PORT;
use mesh_common::config::{NodeConfig, OutboundTrafficPolicy};
use tokio::net::TcpStream;

use super::{MUTUAL_TLS, PLAINTEXT, forward, reset};
use crate::hbone::client::Source;
use crate::identity::Identity;
use crate::inpod::PodContext;
use crate::metrics::Direction;
use crate::state::AgentState;

#[derive(Debug, PartialEq)]
enum Route {
    Hbone { src: Identity, dst: Identity },
    Passthrough,
    Refuse,
}

fn route(config: &NodeConfig, state: &AgentState, pod: &PodContext, target: SocketAddr) -> Route {
    let Some(dst) = config.workload_by_ip(target.ip()) else {
        return match config.outbound_traffic_policy {
            OutboundTrafficPolicy::RegistryOnly if !config.knows_destination(target.ip()) => Route::Refuse,
            _ => Route::Passthrough,
        };
    };
    match (state.secrets(), pod.identity(config)) {
        (Some(_), Some(src)) => {
            Route::Hbone { src, dst: Identity::new(&config.trust_domain, &dst.namespace, &dst.service_account) }
        }
        (None, _) => Route::Passthrough,
        (Some(_), None) => {
            tracing::warn!("pod has no identity in config; sending plaintext to a meshed destination");
            Route::Passthrough
        }
    }
}

pub async fn handle(conn: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, state: AgentState) {
    let Some(target) = state.capture().take_original_destination(pod.netns.cookie(), peer) else {
        state.metrics().original_destination_missing.inc();
        tracing::debug!("no original destination (direct connection to the agent's port?); closing");
        return;
    };
    let span = tracing::debug_span!("outbound", %target);
    let _enter = span.enter();
    let config = state.config();
    match route(&config, &state, &pod, target) {
        Route::Refuse => {
            state.metrics().denied(&pod, Direction::Outbound, "registry_only");
            tracing::info!(%target, "refused: destination unknown and outboundTrafficPolicy is REGISTRY_ONLY");
            reset(conn);
        }
        Route::Passthrough => match super::connect_from_pod(&pod, target).await {
            Ok(upstream) => forward(&state, &pod, Direction::Outbound, PLAINTEXT, conn, upstream).await,
            Err(e) => {
                state.metrics().failed(&pod, Direction::Outbound, "connect");
                tracing::info!(%target, error = %e, "upstream connect failed");
                reset(conn);
            }
        },
        Route::Hbone { src, dst } => {
            let Some(secrets) = state.secrets() else { return };
            let cert = match secrets.fetch(&src).await {
                Ok(c) => c,
                Err(e) => {
                    state.metrics().failed(&pod, Direction::Outbound, "no_certificate");
                    tracing::warn!(error = %e, "no certificate for the source workload");
                    return reset(conn);
                }
            };
            let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
            let source = Source { state: &state, netns: &pod.netns, cert: &cert, secrets, pod: &pod.name() };
            match state.pool().open(&source, gateway, &dst, target).await {
                Ok((stream, _slot)) => forward(&state, &pod, Direction::Outbound, MUTUAL_TLS, conn, stream).await,
                Err(e) => {
                    state.metrics().failed(&pod, Direction::Outbound, e.reason());
                    tracing::info!(%target, peer_identity = %dst, error = %e, "HBONE tunnel failed");
                    reset(conn);
                }
            }
        }
    }
}
