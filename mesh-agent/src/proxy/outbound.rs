//! What an enrolled pod dials: through an HBONE tunnel when the destination is a meshed workload and both
//! identities are known, plaintext passthrough otherwise (or refused under `REGISTRY_ONLY`).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::bpf::HBONE_PORT;
use mesh_common::config::{NodeConfig, OutboundTrafficPolicy};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::{forward, reset};
use crate::hbone::client::Source;
use crate::identity::Identity;
use crate::inpod::PodContext;
use crate::l7::detect::Rewind;
use crate::metrics::{DestinationService, Direction, Flow, Security};
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
    let config = state.config();
    // A Service address: L7 when the connection speaks HTTP, an endpoint picked by the balancer otherwise.
    if let Some((service, port)) = config.service_by_address(target.ip(), target.port()) {
        let (service, port) = (service.clone(), port.clone());
        return crate::l7::outbound::serve(conn, peer, pod, state, &service, &port).instrument(span).await;
    }
    to_endpoint(Rewind::new(Default::default(), conn), target, pod, state).instrument(span).await
}

/// L4 to one address: HBONE when it is a meshed workload, plaintext (or refused) otherwise.
pub async fn to_endpoint(conn: Rewind<TcpStream>, target: SocketAddr, pod: Arc<PodContext>, state: AgentState) {
    let config = state.config();
    let client = pod.caller(conn.get_ref().peer_addr().unwrap_or(target));
    let flow = |principal: Option<String>, security| {
        let service = DestinationService::for_address(&config, target.ip(), target.port());
        Flow::outbound(&config, &pod, target.ip(), principal.as_deref(), service, security)
    };
    match route(&config, &state, &pod, target) {
        Route::Refuse => {
            state.metrics().denied(&pod, Direction::Outbound, "registry_only");
            tracing::info!(%target, "refused: destination unknown and outboundTrafficPolicy is REGISTRY_ONLY");
            reset(conn.into_inner());
        }
        Route::Passthrough => match super::connect_from_pod(&pod, target).await {
            Ok(upstream) => forward(&state, &pod, flow(None, Security::None), (client, target), conn, upstream).await,
            Err(e) => {
                state.metrics().failed(&pod, Direction::Outbound, "connect");
                tracing::info!(%target, error = %e, "upstream connect failed");
                reset(conn.into_inner());
            }
        },
        Route::Hbone { src, dst } => {
            let Some(secrets) = state.secrets() else { return };
            let cert = match secrets.fetch(&src).await {
                Ok(c) => c,
                Err(e) => {
                    state.metrics().failed(&pod, Direction::Outbound, "no_certificate");
                    tracing::warn!(error = %e, "no certificate for the source workload");
                    return reset(conn.into_inner());
                }
            };
            let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
            let source = Source { state: &state, netns: &pod.netns, cert: &cert, secrets, pod: &pod.name() };
            match state.pool().open(&source, gateway, &dst, target, None).await {
                Ok((stream, _slot)) => {
                    let flow = flow(Some(dst.to_string()), Security::MutualTls);
                    forward(&state, &pod, flow, (client, target), conn, stream).await
                }
                Err(e) => {
                    state.metrics().failed(&pod, Direction::Outbound, e.reason());
                    tracing::info!(%target, peer_identity = %dst, error = %e, "HBONE tunnel failed");
                    reset(conn.into_inner());
                }
            }
        }
    }
}
