//! What an enrolled pod dials: through an HBONE tunnel when the destination is a meshed workload and both
//! identities are known, plaintext passthrough to destinations outside the mesh (refused under
//! `REGISTRY_ONLY`). Fail closed: nothing that could be meshed ever leaves in plaintext — before the agent has
//! any config, or when the calling pod has no identity yet, the connection is refused.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::bpf::HBONE_PORT;
use mesh_common::config::OutboundTrafficPolicy;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::forward;
use crate::dataplane::DataPlane;
use crate::hbone::client::Source;
use crate::identity::Identity;
use crate::l7::detect::Rewind;
use crate::metrics::{DestinationService, Direction, Flow, Security};
use crate::pod::PodContext;
use crate::snapshot::Snapshot;
use crate::socket::{self, reset};

#[derive(Debug, PartialEq)]
enum Route {
    Hbone {
        src: Identity,
        dst: Identity,
    },
    Passthrough,
    /// With the reason, as the denial metric and the log name it.
    Refuse(&'static str),
}

fn route(config: &Snapshot, dp: &DataPlane, pod: &PodContext, target: SocketAddr) -> Route {
    let Some(dst) = config.workload_by_ip(target.ip()) else {
        return match config.outbound_traffic_policy {
            OutboundTrafficPolicy::RegistryOnly if !config.knows_destination(target.ip()) => {
                Route::Refuse("registry_only")
            }
            _ => Route::Passthrough,
        };
    };
    match (dp.secrets(), pod.identity(config)) {
        (Some(_), Some(src)) => Route::Hbone { src, dst: config.identity_of(dst) },
        (None, _) => Route::Passthrough,
        // The config does not list the calling pod (yet): it has no certificate, and plaintext to a meshed
        // workload is exactly the leak the mesh exists to prevent.
        (Some(_), None) => Route::Refuse("no_identity"),
    }
}

pub async fn handle(conn: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, dp: DataPlane) {
    let Some(target) = dp.steering().take_original_destination(pod.netns.cookie(), peer) else {
        dp.metrics().original_destination_missing.inc();
        tracing::debug!("no original destination (direct connection to the agent's port?); closing");
        return;
    };
    let span = tracing::debug_span!("outbound", %target);
    if !dp.has_config() {
        dp.metrics().denied(&pod, Direction::Outbound, "no_config");
        tracing::info!(%target, "refused: no config yet, so nothing tells whether the destination is meshed");
        return reset(conn);
    }
    let config = dp.config();
    // A Service address: L7 when the connection speaks HTTP, an endpoint picked by the balancer otherwise.
    if let Some((service, port)) = config.service_by_address(target.ip(), target.port()) {
        let (service, port) = (service.clone(), port.clone());
        // Boxed, so L4 connections do not carry room for the L7 pipeline's state.
        let l7 = Box::pin(crate::l7::outbound::serve(conn, peer, pod.clone(), dp.clone(), &service, &port));
        let Some(opaque) = l7.instrument(span.clone()).await else { return };
        let _in_flight = opaque.in_flight;
        return to_endpoint(opaque.io, opaque.endpoint, pod, dp).instrument(span).await;
    }
    to_endpoint(Rewind::new(Default::default(), conn), target, pod, dp).instrument(span).await
}

/// L4 to one address: HBONE when it is a meshed workload, plaintext (or refused) otherwise.
pub async fn to_endpoint(conn: Rewind<TcpStream>, target: SocketAddr, pod: Arc<PodContext>, dp: DataPlane) {
    let config = dp.config();
    let client = pod.caller(conn.get_ref().peer_addr().unwrap_or(target));
    let flow = |principal: Option<String>, security| {
        let service = DestinationService::for_address(&config, target.ip(), target.port());
        Flow::outbound(&config, &pod, target.ip(), principal.as_deref(), service, security)
    };
    match route(&config, &dp, &pod, target) {
        Route::Refuse(reason) => {
            dp.metrics().denied(&pod, Direction::Outbound, reason);
            tracing::info!(%target, reason, "outbound connection refused");
            reset(conn.into_inner());
        }
        Route::Passthrough => match socket::connect_from_pod(&pod, target).await {
            Ok(upstream) => {
                forward(&dp, &pod, (flow(None, Security::None), None), (client, target), (conn, upstream), None).await
            }
            Err(e) => {
                dp.metrics().failed(&pod, Direction::Outbound, "connect");
                tracing::info!(%target, error = %e, "upstream connect failed");
                reset(conn.into_inner());
            }
        },
        Route::Hbone { src, dst } => {
            let Some(secrets) = dp.secrets() else { return };
            let cert = match secrets.fetch(&src).await {
                Ok(c) => c,
                Err(e) => {
                    dp.metrics().failed(&pod, Direction::Outbound, "no_certificate");
                    tracing::warn!(error = %e, "no certificate for the source workload");
                    return reset(conn.into_inner());
                }
            };
            let gateway = SocketAddr::new(target.ip(), HBONE_PORT);
            let (metrics, tunnels) = (dp.metrics(), dp.tunnels());
            let baggage = config.baggage(&pod.net.namespace, &pod.net.name);
            let pod_name = pod.name();
            // The tunnel's trace id goes in both sides' connection logs.
            let (trace_id, traceparent) = crate::telemetry::context::unsampled_trace();
            let source = Source {
                metrics,
                tunnels,
                netns: &pod.netns,
                cert: &cert,
                secrets,
                pod: &pod_name,
                baggage,
                client: client.ip(),
                traceparent,
            };
            match dp.pool().open(&source, gateway, &dst, target).await {
                Ok((stream, _slot)) => {
                    let flow = flow(Some(dst.to_string()), Security::MutualTls);
                    forward(&dp, &pod, (flow, Some(trace_id.into())), (client, target), (conn, stream), None).await
                }
                Err(e) => {
                    dp.metrics().failed(&pod, Direction::Outbound, e.reason());
                    tracing::info!(%target, peer_identity = %dst, error = %e, "HBONE tunnel failed");
                    reset(conn.into_inner());
                }
            }
        }
    }
}
