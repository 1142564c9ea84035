//! Live HBONE connections (not streams), for the admin API's `/connections`: who is on the other end, with
//! which certificate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::identity::Identity;
use crate::identity::svid::Svid;

#[derive(Serialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct TunnelView {
    pub id: u64,
    /// `outbound`: this agent opened it for a local pod; `inbound`: a peer agent opened it to a local pod.
    pub direction: &'static str,
    /// Local pod (`namespace/name`).
    pub pod: String,
    pub local_identity: String,
    /// Serial of the certificate this side presented (outbound).
    pub local_serial: Option<String>,
    pub peer_identity: String,
    /// Serial of the certificate the peer presented (inbound).
    pub peer_serial: Option<String>,
    pub peer: SocketAddr,
    /// Unix seconds.
    pub opened_at: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TunnelView {
    pub fn outbound(pod: &str, local: &Identity, local_serial: &str, peer: &Identity, peer_addr: SocketAddr) -> Self {
        TunnelView {
            id: 0,
            direction: "outbound",
            pod: pod.to_string(),
            local_identity: local.to_string(),
            local_serial: Some(local_serial.to_string()),
            peer_identity: peer.to_string(),
            peer_serial: None,
            peer: peer_addr,
            opened_at: now(),
        }
    }

    pub fn inbound(pod: &str, local: &Identity, peer: &Svid, peer_addr: SocketAddr) -> Self {
        TunnelView {
            id: 0,
            direction: "inbound",
            pod: pod.to_string(),
            local_identity: local.to_string(),
            local_serial: None,
            peer_identity: peer.identity.to_string(),
            peer_serial: Some(peer.serial.clone()),
            peer: peer_addr,
            opened_at: now(),
        }
    }
}

#[derive(Clone, Default)]
pub struct Tunnels {
    live: Arc<Mutex<BTreeMap<u64, TunnelView>>>,
    next_id: Arc<AtomicU64>,
}

/// Removes the tunnel from the list when the connection ends.
pub struct TunnelGuard {
    tunnels: Tunnels,
    id: u64,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.tunnels.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Tunnels {
    pub fn open(&self, mut view: TunnelView) -> TunnelGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        view.id = id;
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, view);
        TunnelGuard { tunnels: self.clone(), id }
    }

    pub fn list(&self) -> Vec<TunnelView> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}
