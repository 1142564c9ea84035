//! The agent's shared state: config, capture handle, enrolled pods, metrics. Cheap to clone (one `Arc`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_common::config::NodeConfig;

use crate::capture::Capture;
use crate::dataplane::{DataPlane, Handles};
use crate::hbone::client::Pool;
use crate::identity::{Identity, SecretManager};
use crate::metrics::Metrics;
use crate::pod::{PodEntry, WorkloadView};
use crate::snapshot::Snapshot;
use crate::socket::Steering;
use crate::tunnels::Tunnels;

#[derive(Clone)]
pub struct AgentState {
    inner: Arc<Inner>,
}

struct Inner {
    capture: Mutex<Capture>,
    /// What the data path reaches (`crate::dataplane`); its config is the agent's.
    dp: DataPlane,
    pods: Mutex<BTreeMap<String, PodEntry>>,
    /// Pods the CNI plugin reported that are not captured (namespace not in the mesh, or opted out): kept so a
    /// config change can capture them later.
    parked: Mutex<BTreeMap<String, mesh_common::cni::PodNetwork>>,
    /// Serializes enrollment changes (CNI requests, re-adoption, reconciliation after config changes).
    enrollment: tokio::sync::Mutex<()>,
    state_file: PathBuf,
    capture_ready: AtomicBool,
    /// False until a controller-fed agent has its first config.
    config_ready: AtomicBool,
    telemetry: crate::telemetry::Telemetry,
    /// Notified when `/quitquitquit` asks the agent to drain and exit.
    quit: tokio::sync::Notify,
    config_changed: tokio::sync::Notify,
    quitting: AtomicBool,
    drain_trigger: crate::drain::Trigger,
    /// Set while a successor agent is preparing to take over (`handover`): this one is then not ready, so the
    /// successor's readiness probe, answered on the same host port until the handover, does not pass early.
    successor_pending: AtomicBool,
}

/// The capture's services to proxied connections, through the agent state (held weakly: the state holds the
/// data plane that holds this).
struct CaptureSteering(std::sync::Weak<Inner>);

impl Steering for CaptureSteering {
    fn take_original_destination(&self, netns_cookie: u64, peer: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        lock(&self.0.upgrade()?.capture).take_original_destination(netns_cookie, peer)
    }

    fn announce_agent_connect(&self, source: std::net::SocketAddr, port: u16) -> std::io::Result<()> {
        let inner = self.0.upgrade().ok_or_else(|| std::io::Error::other("the agent is stopping"))?;
        lock(&inner.capture).announce_agent_connect(source, port).map_err(std::io::Error::other)
    }

    fn forget_agent_connect(&self, source: std::net::SocketAddr) {
        if let Some(inner) = self.0.upgrade() {
            lock(&inner.capture).forget_agent_connect(source);
        }
    }
}

impl AgentState {
    pub fn new(
        node: String,
        capture: Capture,
        config: NodeConfig,
        state_file: PathBuf,
        secrets: Option<SecretManager>,
        istio_metric_names: bool,
        limits: crate::limits::Limits,
    ) -> Self {
        let capture = Mutex::new(capture);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let counters_of = weak.clone();
            let capture_counters =
                move || counters_of.upgrade().map(|inner| lock(&inner.capture).counters()).unwrap_or_default();
            let metrics = Metrics::new(capture_counters, istio_metric_names);
            let (drain_trigger, drain) = crate::drain::channel();
            let telemetry = crate::telemetry::Telemetry::default();
            let sinks = crate::telemetry::Sinks {
                traffic: metrics.traffic.clone(),
                exporters: telemetry.exporters.clone(),
                node: node.as_str().into(),
            };
            let handles = Handles {
                pool: Pool::new(limits.hbone_idle_timeout),
                node,
                metrics,
                secrets,
                tunnels: Tunnels::default(),
                l7: Default::default(),
                sinks,
                limits,
                drain,
                steering: Arc::new(CaptureSteering(weak.clone())),
            };
            Inner {
                capture,
                dp: DataPlane::new(handles, Snapshot::new(config)),
                pods: Mutex::new(BTreeMap::new()),
                parked: Mutex::new(BTreeMap::new()),
                enrollment: tokio::sync::Mutex::new(()),
                state_file,
                capture_ready: AtomicBool::new(false),
                config_ready: AtomicBool::new(true),
                telemetry,
                quit: tokio::sync::Notify::new(),
                config_changed: tokio::sync::Notify::new(),
                quitting: AtomicBool::new(false),
                drain_trigger,
                successor_pending: AtomicBool::new(false),
            }
        });
        AgentState { inner }
    }

    /// What the data path reaches: handed to every listener.
    pub fn data_plane(&self) -> &DataPlane {
        &self.inner.dp
    }

    pub fn limits(&self) -> &crate::limits::Limits {
        self.inner.dp.limits()
    }

    pub fn node(&self) -> &str {
        self.inner.dp.node()
    }

    pub fn capture(&self) -> MutexGuard<'_, Capture> {
        lock(&self.inner.capture)
    }

    /// The config in force, compiled (`crate::snapshot`): take it once and use it to the end of the work at hand.
    pub fn config(&self) -> Arc<Snapshot> {
        self.inner.dp.config()
    }

    /// Swaps in a new config and applies what the kernel side needs of it; pods whose membership in the mesh
    /// changed are captured or released right after, by whoever waits on [`AgentState::config_changed`]
    /// (`inpod::reconcile_on_config_change`).
    pub fn set_config(&self, config: NodeConfig) -> Result<(), crate::capture::CaptureError> {
        self.capture().set_exclusions(&config.capture)?;
        if let Some(secrets) = self.secrets() {
            let domains = std::iter::once(&config.trust_domain).chain(&config.trust_domain_aliases).cloned().collect();
            secrets.bundle().set_trust_domains(domains);
        }
        self.inner.dp.replace_config(Snapshot::new(config));
        self.sync_identities();
        self.inner.config_changed.notify_one();
        Ok(())
    }

    /// Resolves after the next config change (at once if one came since the last call); changes in between
    /// coalesce into one.
    pub async fn config_changed(&self) {
        self.inner.config_changed.notified().await
    }

    pub fn parked(&self) -> MutexGuard<'_, BTreeMap<String, mesh_common::cni::PodNetwork>> {
        lock(&self.inner.parked)
    }

    pub async fn enrollment_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.enrollment.lock().await
    }

    pub fn secrets(&self) -> Option<&SecretManager> {
        self.inner.dp.secrets()
    }

    pub fn pool(&self) -> &Pool {
        self.inner.dp.pool()
    }

    pub fn l7(&self) -> &crate::l7::L7 {
        self.inner.dp.l7()
    }

    pub fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.inner.telemetry
    }

    pub fn tunnels(&self) -> &Tunnels {
        self.inner.dp.tunnels()
    }

    /// Keeps exactly the certificates the enrolled pods' identities need (after enrollment and config changes).
    pub fn sync_identities(&self) {
        let Some(secrets) = self.secrets() else { return };
        let config = self.config();
        let mut wanted: std::collections::HashMap<Identity, usize> = Default::default();
        for entry in self.pods().values() {
            if let Some(id) = entry.pod.identity(&config) {
                *wanted.entry(id).or_default() += 1;
            }
        }
        secrets.set_users(&wanted);
    }

    pub fn pods(&self) -> MutexGuard<'_, BTreeMap<String, PodEntry>> {
        lock(&self.inner.pods)
    }

    pub fn metrics(&self) -> &Metrics {
        self.inner.dp.metrics()
    }

    pub fn state_file(&self) -> &PathBuf {
        &self.inner.state_file
    }

    /// True once capture is attached and the enrolled pods of an earlier agent are re-adopted.
    pub fn capture_ready(&self) -> bool {
        self.inner.capture_ready.load(Ordering::Acquire)
    }

    pub fn set_capture_ready(&self) {
        self.inner.capture_ready.store(true, Ordering::Release);
    }

    /// For an agent fed by the controller: not ready until the first config arrives.
    pub fn expect_config(&self) {
        self.inner.config_ready.store(false, Ordering::Release);
    }

    /// For an agent fed by the controller with no config to start from: not ready, and every connection of an
    /// enrolled pod refused, until the first config arrives.
    pub fn fail_closed_until_config(&self) {
        self.expect_config();
        self.inner.dp.set_has_config(false);
    }

    pub fn set_config_ready(&self) {
        self.inner.dp.set_has_config(true);
        self.inner.config_ready.store(true, Ordering::Release);
    }

    /// Ready when the programs are attached, config is loaded, the enrolled pods were re-adopted and have their
    /// certificates, and not draining.
    pub fn ready(&self) -> bool {
        self.inner.capture_ready.load(Ordering::Acquire)
            && self.inner.config_ready.load(Ordering::Acquire)
            && self.secrets().is_none_or(SecretManager::all_issued)
            && !self.inner.quitting.load(Ordering::Acquire)
            && !self.inner.successor_pending.load(Ordering::Acquire)
    }

    /// See `Inner::successor_pending`.
    pub fn set_successor_pending(&self, pending: bool) {
        self.inner.successor_pending.store(pending, Ordering::Release);
    }

    /// Whether the agent is draining, for the connections that must end when it is.
    pub fn drain(&self) -> crate::drain::Drain {
        self.inner.dp.drain()
    }

    /// Tells every connection to move elsewhere (`drain`).
    pub fn start_draining(&self) {
        self.inner.drain_trigger.start();
    }

    pub fn active_connections(&self) -> usize {
        self.inner.dp.active_connections()
    }

    /// Asks the agent to drain and exit (`/quitquitquit`).
    pub fn request_quit(&self) {
        self.inner.quitting.store(true, Ordering::Release);
        self.inner.quit.notify_one();
    }

    pub async fn quit_requested(&self) {
        self.inner.quit.notified().await
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        let config = self.config();
        self.pods().values().map(|p| p.view(&config)).collect()
    }
}

/// rustls' certificate resolvers must be `Debug`; the node name is all that is worth printing.
impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentState({})", self.node())
    }
}

/// A poisoned lock only means another task panicked while holding it; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
