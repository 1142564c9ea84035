//! What the data path (`proxy`, `l7`) reaches of the agent, and nothing else: the config snapshot in force, the
//! metric, telemetry and tunnel handles, the identities, the HBONE pool, the L7 state, the bounds, the drain, and
//! the capture's services to proxied connections ([`Steering`]). Enrollment, the CNI server, the handover and
//! the admin API keep the whole `AgentState`; the data path does not import it, and a unit test can build a
//! `DataPlane` on a fake snapshot without loading eBPF programs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::hbone::client::Pool;
use crate::identity::SecretManager;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::socket::Steering;
use crate::tunnels::Tunnels;

/// Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Shared>,
}

/// The fixed parts of a [`DataPlane`], made once by the agent (or a test).
pub struct Handles {
    pub node: String,
    pub metrics: Metrics,
    /// Present when a CA is configured: then meshed traffic travels in mTLS tunnels.
    pub secrets: Option<SecretManager>,
    pub pool: Pool,
    pub tunnels: Tunnels,
    pub l7: crate::l7::L7,
    pub sinks: crate::telemetry::Sinks,
    pub limits: Limits,
    pub drain: crate::drain::Drain,
    pub steering: Arc<dyn Steering>,
}

struct Shared {
    handles: Handles,
    /// A watch, so connections admitted under one config can be checked again under the next (`proxy::forward`).
    config: tokio::sync::watch::Sender<Arc<Snapshot>>,
    /// False while the agent has no config at all: enrolled pods' connections are then refused, since nothing
    /// tells what is meshed.
    has_config: AtomicBool,
    /// Whether calling agents may send their requests straight on HBONE connections (`--hbone-l7-direct`).
    direct_l7: AtomicBool,
    /// Connections being proxied right now (all listeners), for draining before exit.
    active: Arc<AtomicUsize>,
}

/// Counts one proxied connection as active until dropped.
pub struct ActiveConnection(Arc<AtomicUsize>);

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl DataPlane {
    pub fn new(handles: Handles, config: Snapshot) -> Self {
        let shared = Shared {
            handles,
            config: tokio::sync::watch::Sender::new(Arc::new(config)),
            has_config: AtomicBool::new(true),
            direct_l7: AtomicBool::new(true),
            active: Default::default(),
        };
        DataPlane { inner: Arc::new(shared) }
    }

    /// The config in force, compiled (`crate::snapshot`): take it once and use it to the end of the work at hand.
    pub fn config(&self) -> Arc<Snapshot> {
        self.inner.config.borrow().clone()
    }

    /// Resolves each time a new config is swapped in.
    pub fn config_changes(&self) -> tokio::sync::watch::Receiver<Arc<Snapshot>> {
        self.inner.config.subscribe()
    }

    /// Swaps in the next config (the agent state does, after the kernel side has what it needs of it).
    pub fn replace_config(&self, config: Snapshot) {
        self.inner.config.send_replace(Arc::new(config));
    }

    /// Whether the agent has any config to decide by.
    pub fn has_config(&self) -> bool {
        self.inner.has_config.load(Ordering::Acquire)
    }

    pub fn set_has_config(&self, has: bool) {
        self.inner.has_config.store(has, Ordering::Release);
    }

    /// Off, the agent answers calling agents as agents did before requests went straight on HBONE connections
    /// (`crate::hbone::message`): their requests then travel inside tunnels.
    pub fn direct_l7(&self) -> bool {
        self.inner.direct_l7.load(Ordering::Relaxed)
    }

    pub fn set_direct_l7(&self, take: bool) {
        self.inner.direct_l7.store(take, Ordering::Relaxed);
    }

    pub fn connection_started(&self) -> ActiveConnection {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        ActiveConnection(self.inner.active.clone())
    }

    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    pub fn node(&self) -> &str {
        &self.inner.handles.node
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.handles.metrics
    }

    pub fn secrets(&self) -> Option<&SecretManager> {
        self.inner.handles.secrets.as_ref()
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.handles.pool
    }

    pub fn tunnels(&self) -> &Tunnels {
        &self.inner.handles.tunnels
    }

    pub fn l7(&self) -> &crate::l7::L7 {
        &self.inner.handles.l7
    }

    /// What observed requests report to (`telemetry::request`).
    pub fn sinks(&self) -> &crate::telemetry::Sinks {
        &self.inner.handles.sinks
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.handles.limits
    }

    /// Whether the agent is draining, for the connections that must end when it is.
    pub fn drain(&self) -> crate::drain::Drain {
        self.inner.handles.drain.clone()
    }

    pub fn steering(&self) -> &dyn Steering {
        self.inner.handles.steering.as_ref()
    }
}

/// rustls' certificate resolvers must be `Debug`; the node name is all that is worth printing.
impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataPlane({})", self.node())
    }
}
