//! The listeners a successor agent received from its predecessor (`super`), taken out one by one as the
//! successor sets itself up: the host ports by address, each pod's by container for re-adoption.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;

/// The listeners a successor received, taken out one by one as it sets itself up.
#[derive(Default)]
pub struct Inherited {
    pub(super) pods: HashMap<String, Vec<TcpListener>>,
    pub(super) admin: Option<TcpListener>,
    pub(super) metrics: Option<TcpListener>,
    pub(super) cni: Option<UnixListener>,
}

impl Inherited {
    /// The listeners of one pod (empty when it had none handed over).
    pub fn pod(&mut self, container_id: &str) -> Vec<TcpListener> {
        self.pods.remove(container_id).unwrap_or_default()
    }

    /// The admin listener, if it listens on `addr` (a changed `--admin` binds anew).
    pub fn admin(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.admin.take().filter(|l| l.local_addr().is_ok_and(|a| a == addr))
    }

    pub fn metrics(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.metrics.take().filter(|l| l.local_addr().is_ok_and(|a| a == addr))
    }

    pub fn cni(&mut self) -> Option<UnixListener> {
        self.cni.take()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
}
