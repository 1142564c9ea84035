//! Plaintext arriving at an enrolled pod (port 15006, steered by `sk_lookup`): from clients outside the mesh,
//! or meshed clients without an identity. Subject to PeerAuthentication (STRICT refuses it) and authorization
//! with no principal.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_common::bpf::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;

use super::admission::Admitted;
use super::forward;
use crate::dataplane::DataPlane;
use crate::l7::{self, detect::Rewind, inbound::Session};
use crate::metrics::{Flow, Security};
use crate::pod::PodContext;
use crate::policy;
use crate::socket::{self, reset};

/// Loopback or one of the agent's own ports: never a real destination, and forwarding it would loop.
fn is_agent_address(a: &SocketAddr) -> bool {
    a.ip().is_loopback() || [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&a.port())
}

pub async fn handle(conn: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, dp: DataPlane) {
    // sk_lookup delivered the connection unchanged: its local address is what the client dialled.
    let Some(target) = conn.local_addr().ok().filter(|a| !is_agent_address(a)) else {
        dp.metrics().original_destination_missing.inc();
        return;
    };
    if !dp.has_config() {
        // Without config the agent cannot know the pod's PeerAuthentication or AuthorizationPolicy.
        dp.metrics().denied(&pod, crate::metrics::Direction::Inbound, "no_config");
        return reset(conn);
    }
    let config = dp.config();
    if let Err(refusal) = policy::check_mtls_mode(&config, &pod, None) {
        refusal.record(dp.metrics(), &config, &pod, None, peer);
        return reset(conn);
    }
    // Policies that look at requests: serve HTTP here and decide per request.
    let looked_for_http = policy::needs_request(&config, &pod);
    let conn = if looked_for_http {
        let session = |app| Session::new(dp.clone(), pod.clone(), None, peer, target, app);
        // Boxed, so L4 connections do not carry room for the L7 pipeline's state.
        match Box::pin(l7::inbound::serve_if_http(conn, session)).await {
            Some(opaque) => opaque,
            None => return,
        }
    } else {
        Rewind::new(Default::default(), conn)
    };
    if let Err(refusal) = policy::check_inbound(&config, &pod, None, peer.ip(), target.port()) {
        refusal.record(dp.metrics(), &config, &pod, None, peer);
        return reset(conn.into_inner());
    }
    match socket::connect_to_app(dp.steering(), &pod, target, peer).await {
        Ok(app) => {
            let flow = Flow::inbound(&config, &pod, peer.ip(), None, target.port(), Security::None);
            let (source_ip, port) = (peer.ip(), target.port());
            let admitted = Admitted { under: Some(config), principal: None, source_ip, port, looked_for_http };
            forward(&dp, &pod, (flow, None), (peer, target), (conn, app), Some(admitted)).await
        }
        Err(e) => {
            super::app_unreachable(&dp, &pod, target, &e);
            reset(conn.into_inner());
        }
    }
}
