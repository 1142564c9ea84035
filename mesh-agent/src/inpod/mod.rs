//! Enrolled pods: the agent's listeners inside each pod's netns, the kernel capture state, and the state file
//! that lets a restarted agent re-adopt its pods without any CNI call.

pub mod routing;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_common::bpf::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use mesh_common::cni::{AgentError, PodNetwork};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::metrics::Direction;
use crate::netns::NetNs;
use crate::pod::{PodContext, PodEntry};
use crate::proxy;
use crate::state::AgentState;

/// Accept backlog of the in-pod listeners: a pod may open many connections at once.
const LISTEN_BACKLOG: i32 = 4096;

/// What the state file keeps per pod.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
struct SavedPod {
    #[serde(flatten)]
    net: PodNetwork,
    netns_cookie: u64,
    /// False for pods reported by the CNI plugin but not in the mesh (yet).
    #[serde(default = "yes")]
    captured: bool,
}

fn yes() -> bool {
    true
}

/// The pod's capture listeners are held by another process: another agent on this node, which did not hand
/// them over (the upgrade handover).
pub const LISTENERS_IN_USE: u32 = 104;

fn err(code: u32, msg: impl Into<String>, details: impl ToString) -> AgentError {
    AgentError { code, msg: msg.into(), details: details.to_string() }
}

/// CNI ADD. Returns whether the pod is captured; returns only once capture is active.
pub async fn enroll(state: &AgentState, net: PodNetwork) -> Result<bool, AgentError> {
    let _serial = state.enrollment_lock().await;
    // Before its first config (fed by a controller, none kept from before) the agent cannot tell a meshed pod
    // from another: capturing every pod would mesh namespaces nobody meshed, capturing none would let a meshed
    // pod start in plaintext. It takes neither; the runtime retries the sandbox.
    if !state.data_plane().has_config() && !state.pods().contains_key(&net.container_id) {
        return Err(err(
            11,
            "the node agent has no mesh config yet; try again later",
            "it cannot tell whether the pod's namespace is meshed before the controller's first config",
        ));
    }
    let outcome = enroll_locked(state, net, Vec::new()).await;
    persist(state);
    outcome
}

/// Enrollment proper, with the listeners a predecessor handed over for this pod (the upgrade handover) used instead
/// of new ones; the caller holds the enrollment lock and persists the state file afterwards.
async fn enroll_locked(
    state: &AgentState,
    net: PodNetwork,
    inherited: Vec<std::net::TcpListener>,
) -> Result<bool, AgentError> {
    if state.pods().contains_key(&net.container_id) {
        return Ok(true);
    }
    if !state.config().pod_in_mesh(&net.namespace, &net.name) {
        tracing::info!(pod = %net.qualified_name(), "not in the mesh (namespace or opt-out); not captured");
        state.parked().insert(net.container_id.clone(), net);
        return Ok(false);
    }
    state.parked().remove(&net.container_id);
    if net.ips.is_empty() {
        return Err(err(
            7,
            "pod has no IP addresses",
            "prevResult lists no ips; chain nodemesh-cni after the main plugin",
        ));
    }
    let pod_name = net.qualified_name();
    let hbone = state.secrets().is_some();
    let prepared = tokio::task::spawn_blocking(move || prepare(net, hbone, inherited))
        .await
        .map_err(|e| err(101, "enrollment task failed", e))?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => err(LISTENERS_IN_USE, "another agent holds the pod's listeners", e),
            _ => err(102, "cannot set up capture inside the pod", e),
        })?;
    let activated = activate(state, prepared).map_err(|e| err(103, "cannot activate capture", e))?;
    tracing::info!(pod = %pod_name, netns_cookie = activated.netns.cookie(), "pod enrolled");
    state.sync_identities();
    Ok(true)
}

/// CNI DEL. Tolerates pods that are unknown or whose netns is already gone.
pub async fn unenroll(state: &AgentState, container_id: &str) -> bool {
    let _serial = state.enrollment_lock().await;
    let parked = state.parked().remove(container_id).is_some();
    let released = release(state, container_id).await.is_some();
    if parked || released {
        persist(state);
    }
    released
}

/// Captures pods that joined the mesh and releases those that left it (namespace label, opt-out label), after
/// a config change.
pub async fn reconcile(state: AgentState) {
    // Before re-adoption the state file is the truth; re-adoption applies the config itself.
    if !state.capture_ready() {
        return;
    }
    let _serial = state.enrollment_lock().await;
    let config = state.config();
    let mut changed = false;
    let leaving: Vec<String> = state
        .pods()
        .iter()
        .filter(|(_, p)| !config.pod_in_mesh(&p.pod.net.namespace, &p.pod.net.name))
        .map(|(id, _)| id.clone())
        .collect();
    for id in leaving {
        if let Some(net) = release(&state, &id).await {
            tracing::info!(pod = %net.qualified_name(), "left the mesh; capture released");
            state.parked().insert(id, net);
            changed = true;
        }
    }
    let joining: Vec<PodNetwork> =
        state.parked().values().filter(|p| config.pod_in_mesh(&p.namespace, &p.name)).cloned().collect();
    for net in joining {
        changed = true;
        let name = net.qualified_name();
        let id = net.container_id.clone();
        match enroll_locked(&state, net, Vec::new()).await {
            Ok(true) => tracing::info!(pod = %name, "joined the mesh; captured"),
            Ok(false) => {}
            Err(e) => {
                // Its netns is probably gone (DEL never came); forget it.
                tracing::warn!(pod = %name, error = %e.msg, details = %e.details, "cannot capture a pod that joined the mesh");
                state.parked().remove(&id);
            }
        }
    }
    if changed {
        persist(&state);
    }
}

/// Reconciles after every config change, for as long as the agent runs.
pub async fn reconcile_on_config_change(state: AgentState) {
    loop {
        state.config_changed().await;
        reconcile(state.clone()).await;
    }
}

/// Stops capturing one pod; returns what the CNI plugin told us about it. The caller holds the enrollment lock
/// and persists the state file afterwards.
async fn release(state: &AgentState, container_id: &str) -> Option<PodNetwork> {
    let entry = state.pods().remove(container_id)?;
    let pod = entry.pod.clone();
    state.capture().unenroll(pod.netns.cookie(), &pod.net.ips);
    for task in &entry.tasks {
        task.abort();
    }
    state.pool().forget_pod(pod.netns.cookie());
    state.l7().forget_pod(pod.netns.cookie());
    state.sync_identities();
    state.metrics().enrolled_pods.set(state.pods().len() as i64);
    let cleanup = tokio::task::spawn_blocking(move || remove_routing(&pod.netns));
    if let Ok(Err(e)) = cleanup.await {
        tracing::debug!(error = %e, "pod netns gone before its routing could be removed");
    }
    tracing::info!(pod = %entry.pod.name(), "pod unenrolled");
    Some(entry.pod.net.clone())
}

/// Stops accepting in every pod (draining, or handed over to a successor): the accept loops end and this agent's
/// copies of the listening sockets close. Connections already accepted carry on. Without a successor holding
/// the sockets too, new connections of enrolled pods are then refused, as when the agent is stopped.
pub fn stop_accepting(state: &AgentState) {
    for entry in state.pods().values_mut() {
        for task in entry.tasks.drain(..) {
            task.abort();
        }
        entry.listeners.clear();
    }
}

/// CNI CHECK.
pub fn is_enrolled(state: &AgentState, container_id: &str) -> bool {
    state.pods().contains_key(container_id)
}

/// Whether the pod was added and left uncaptured because the config keeps it outside the mesh (it is captured
/// once its namespace joins).
pub fn is_parked(state: &AgentState, container_id: &str) -> bool {
    state.parked().contains_key(container_id)
}

/// At start-up: takes over the pods an earlier agent enrolled (on the listeners `handed_over` gives for a
/// container, when that agent is still running and handed them over), and forgets those that are gone. An error when another agent still serves them without handing
/// them over: releasing its pods' capture then (as for a pod that cannot be re-adopted) would let their
/// traffic bypass the mesh, so nothing is touched and the caller must not start.
pub async fn readopt(
    state: &AgentState,
    handed_over: &mut dyn FnMut(&str) -> Vec<std::net::TcpListener>,
) -> Result<(), AgentError> {
    let _serial = state.enrollment_lock().await;
    let saved = load_saved(state.state_file());
    for s in saved.iter().filter(|s| !s.captured) {
        if NetNs::open(&s.net.netns).is_ok() {
            state.parked().insert(s.net.container_id.clone(), s.net.clone());
        }
    }
    for s in saved.iter().filter(|s| s.captured) {
        let pod = s.net.qualified_name();
        let same_netns = NetNs::open(&s.net.netns).map(|ns| ns.cookie() == s.netns_cookie).unwrap_or(false);
        let listeners = handed_over(&s.net.container_id);
        let outcome = if same_netns { enroll_locked(state, s.net.clone(), listeners).await } else { Ok(false) };
        match outcome {
            Ok(true) => tracing::info!(%pod, "re-adopted enrolled pod"),
            Ok(false) => {
                tracing::info!(%pod, "previously enrolled pod is gone or left the mesh; releasing its capture");
                state.capture().unenroll(s.netns_cookie, &s.net.ips);
            }
            Err(e) if e.code == LISTENERS_IN_USE => return Err(e),
            Err(e) => {
                tracing::error!(%pod, error = %e.msg, details = %e.details, "cannot re-adopt pod; releasing it");
                state.capture().unenroll(s.netns_cookie, &s.net.ips);
            }
        }
    }
    // Pods captured in the kernel that no state file remembers cannot be served: let them go rather than keep
    // their connections failing forever.
    let known: Vec<u64> = state.pods().values().map(|p| p.pod.netns.cookie()).collect();
    let orphans: Vec<u64> = state.capture().enrolled_cookies().into_iter().filter(|c| !known.contains(c)).collect();
    for cookie in orphans {
        tracing::warn!(netns_cookie = cookie, "releasing captured netns unknown to the state file");
        state.capture().unenroll(cookie, &[]);
    }
    persist(state);
    Ok(())
}

struct Prepared {
    net: PodNetwork,
    netns: NetNs,
    routing: routing::Installed,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<(IpAddr, std::net::TcpListener)>,
    hbone: Vec<std::net::TcpListener>,
}

/// The blocking part of enrollment: namespace, routing, listeners (HBONE's only when mTLS is configured; an
/// inherited one where it has the address and lives in the pod's netns).
fn prepare(net: PodNetwork, with_hbone: bool, inherited: Vec<std::net::TcpListener>) -> std::io::Result<Prepared> {
    let netns = NetNs::open(&net.netns)?;
    let cookie = netns.cookie();
    let mut inherited: Vec<std::net::TcpListener> = inherited
        .into_iter()
        .filter(|l| crate::netns::netns_cookie(std::os::fd::AsRawFd::as_raw_fd(l)).is_ok_and(|c| c == cookie))
        .collect();
    let mut take_or_listen =
        move |addr: SocketAddr| match inherited.iter().position(|l| l.local_addr().is_ok_and(|a| a == addr)) {
            Some(i) => {
                let listener = inherited.swap_remove(i);
                listener.set_nonblocking(true)?;
                Ok(listener)
            }
            None => listen(addr),
        };
    // The addresses are the CNI request's claim; the identity given to them must not rest on a lie.
    let configured = netns.run(crate::node::local_addresses)??;
    if let Some(missing) = net.ips.iter().find(|ip| !configured.contains(&ip.to_canonical())) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("pod address {missing} is not configured in its network namespace"),
        ));
    }
    let has_v4 = net.ips.iter().any(|ip| ip.is_ipv4());
    let has_v6 = net.ips.iter().any(|ip| ip.is_ipv6());
    let routing = netns.run_on_thread(move || routing::install(has_v4, has_v6))?;
    let listeners = netns.run(|| -> std::io::Result<_> {
        // IPv4 outbound always: v6 sockets dialling v4-mapped addresses land on it too.
        let mut outbound = vec![take_or_listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT))?];
        let mut inbound = Vec::new();
        if has_v6 {
            outbound.push(take_or_listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT))?);
        }
        for (enabled, loopback) in [(has_v4, IpAddr::from(Ipv4Addr::LOCALHOST)), (has_v6, Ipv6Addr::LOCALHOST.into())] {
            if !enabled {
                continue;
            }
            let listener = take_or_listen(SocketAddr::new(loopback, INBOUND_PORT))?;
            for ip in net.ips.iter().filter(|ip| ip.is_ipv4() == loopback.is_ipv4()) {
                inbound.push((*ip, listener.try_clone()?));
            }
        }
        let mut hbone = Vec::new();
        for (enabled, any) in [(has_v4, IpAddr::from(Ipv4Addr::UNSPECIFIED)), (has_v6, Ipv6Addr::UNSPECIFIED.into())] {
            if enabled && with_hbone {
                hbone.push(take_or_listen(SocketAddr::new(any, HBONE_PORT))?);
            }
        }
        Ok((outbound, inbound, hbone))
    });
    match listeners.and_then(|l| l) {
        Ok((outbound, inbound, hbone)) => Ok(Prepared { net, netns, routing, outbound, inbound, hbone }),
        Err(e) => {
            roll_back_routing(&netns, routing);
            Err(e)
        }
    }
}

/// Removes the capture routing from the pod (from a thread inside its netns).
fn remove_routing(netns: &NetNs) -> std::io::Result<()> {
    netns.run_on_thread(|| {
        routing::remove();
        Ok(())
    })
}

/// After a failed enrollment: the pod is left as the ADD found it — without the rules when this enrollment added
/// them, untouched when they were in place (another agent's connections may be using them).
fn roll_back_routing(netns: &NetNs, routing: routing::Installed) {
    if routing == routing::Installed::Fresh {
        if let Err(e) = remove_routing(netns) {
            tracing::warn!(error = %e, "cannot remove the pod's capture routing after a failed enrollment");
        }
    }
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} in the pod: {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The non-blocking part: kernel maps and accept loops. Synchronous so no lock is held across an await. A failure
/// leaves nothing behind: accept loops stopped, kernel maps cleared, and the routing removed when this enrollment
/// added it (a rare path; its `ip` calls block this thread for a few milliseconds).
fn activate(state: &AgentState, p: Prepared) -> anyhow::Result<Arc<PodContext>> {
    let enrolled_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let pod =
        Arc::new(PodContext { net: p.net, netns: p.netns, enrolled_at, outbound_connections: Default::default() });
    let mut tasks = Vec::new();
    match serve_and_capture(state, &pod, (p.outbound, p.hbone, p.inbound), &mut tasks) {
        Ok(listeners) => {
            let mut pods = state.pods();
            pods.insert(pod.net.container_id.clone(), PodEntry { pod: pod.clone(), tasks, listeners });
            state.metrics().enrolled_pods.set(pods.len() as i64);
            Ok(pod)
        }
        Err(e) => {
            for t in &tasks {
                t.abort();
            }
            roll_back_routing(&pod.netns, p.routing);
            Err(e)
        }
    }
}

type Listeners = (Vec<std::net::TcpListener>, Vec<std::net::TcpListener>, Vec<(IpAddr, std::net::TcpListener)>);

/// Starts the pod's accept loops (their abort handles pushed to `tasks`) and enrolls it with the capture programs;
/// returns the listeners kept for a handover.
fn serve_and_capture(
    state: &AgentState,
    pod: &Arc<PodContext>,
    (outbound, hbone, inbound): Listeners,
    tasks: &mut Vec<tokio::task::AbortHandle>,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::new();
    for listener in outbound {
        listeners.push(listener.try_clone()?);
        let listener = TcpListener::from_std(listener)?;
        tasks.push(
            tokio::spawn(proxy::serve(listener, Direction::Outbound, pod.clone(), state.data_plane().clone()))
                .abort_handle(),
        );
    }
    for listener in hbone {
        listeners.push(listener.try_clone()?);
        let listener = TcpListener::from_std(listener)?;
        tasks.push(
            tokio::spawn(crate::proxy::hbone_inbound::serve(listener, pod.clone(), state.data_plane().clone()))
                .abort_handle(),
        );
    }
    // Several pod IPs of one family share one listener; serve each listener once.
    let mut served = Vec::new();
    for (_, listener) in &inbound {
        let local = listener.local_addr()?;
        if !served.contains(&local) {
            served.push(local);
            listeners.push(listener.try_clone()?);
            let listener = TcpListener::from_std(listener.try_clone()?)?;
            tasks.push(
                tokio::spawn(proxy::serve(listener, Direction::Inbound, pod.clone(), state.data_plane().clone()))
                    .abort_handle(),
            );
        }
    }
    let inbound: Vec<(IpAddr, &std::net::TcpListener)> = inbound.iter().map(|(ip, l)| (*ip, l)).collect();
    if let Err(e) = state.capture().enroll(pod.netns.file(), pod.netns.cookie(), &inbound) {
        state.capture().unenroll(pod.netns.cookie(), &pod.net.ips);
        return Err(e.into());
    }
    Ok(listeners)
}

fn load_saved(path: &Path) -> Vec<SavedPod> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(file = %path.display(), error = %e, "state file unreadable; starting without enrolled pods");
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read state file");
            Vec::new()
        }
    }
}

/// Writes the state file (atomically and root-only, like everything under the state dir).
fn persist(state: &AgentState) {
    let mut saved: Vec<SavedPod> = state
        .pods()
        .values()
        .map(|p| SavedPod { net: p.pod.net.clone(), netns_cookie: p.pod.netns.cookie(), captured: true })
        .collect();
    saved.extend(state.parked().values().map(|net| SavedPod { net: net.clone(), netns_cookie: 0, captured: false }));
    let path = state.state_file();
    let result = serde_json::to_vec_pretty(&saved)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::state_dir::write_private(path, &bytes));
    if let Err(e) = result {
        tracing::error!(file = %path.display(), error = %e, "cannot write state file; a restarted agent would not re-adopt pods");
    }
}
