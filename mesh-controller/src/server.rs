//! The gRPC API agents talk to: the config stream (versioned, acknowledged, deltas after the first update) and
//! the certificate service (node-bound signing).
//!
//! Every call is authenticated first ([`crate::auth`]): it yields the node the caller may act for.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_agent::identity::{CertificateAuthority, Identity};
use mesh_common::proto::certificate_service_server::{CertificateService, CertificateServiceServer};
use mesh_common::proto::config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer};
use mesh_common::proto::{
    ConfigRequest, ConfigUpdate, Resource, ResourceKey, SignRequest, SignResponse, config_request,
};
use mesh_common::resources::{self, Key};
use rustls::pki_types::CertificateSigningRequestDer;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::source::Snapshots;

use crate::auth::Authenticator;
pub use crate::auth::NODE_HEADER;
const MIN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone)]
pub struct Controller {
    snapshots: Snapshots,
    ca: Arc<dyn CertificateAuthority>,
    trust_domain: String,
    /// Trust domains whose peers the agents admit as the mesh's (`--trust-domain-alias`).
    trust_domain_aliases: Vec<String>,
    /// One counter for every update sent: versions are unique and increase.
    versions: Arc<AtomicU64>,
    shared: Arc<Mutex<SharedCache>>,
    auth: Arc<Authenticator>,
    metrics: Metrics,
}

type Resources = BTreeMap<Key, Vec<u8>>;

/// The cluster-wide part of every node's config for one snapshot, serialized once for all node streams.
struct Shared {
    mesh: Arc<Mesh>,
    resources: Resources,
    /// The same, packed (`mesh_common::packed`) at the first full update that asks for it, for every agent after.
    packed: std::sync::OnceLock<bytes::Bytes>,
}

impl Shared {
    fn packed(&self) -> bytes::Bytes {
        self.packed
            .get_or_init(|| {
                mesh_common::packed::pack(self.resources.iter().map(|(k, v)| resources::to_proto(k, v)).collect())
            })
            .clone()
    }
}

/// The latest [`Shared`], and the delta from the one before, which most node streams need next.
#[derive(Default)]
struct SharedCache {
    current: Option<Arc<Shared>>,
    delta: Option<(Arc<Shared>, Arc<Shared>, Arc<Delta>)>,
}

#[derive(Default, Clone)]
struct Delta {
    upserts: Vec<Resource>,
    removals: Vec<ResourceKey>,
}

impl Controller {
    pub fn new(
        snapshots: Snapshots,
        ca: Arc<dyn CertificateAuthority>,
        trust_domain: String,
        auth: Authenticator,
        metrics: Metrics,
    ) -> Self {
        Controller {
            snapshots,
            ca,
            trust_domain,
            trust_domain_aliases: Vec::new(),
            versions: Arc::new(AtomicU64::new(0)),
            shared: Default::default(),
            auth: Arc::new(auth),
            metrics,
        }
    }

    /// Peers of these trust domains are the mesh's too (Istio's `trustDomainAliases`).
    pub fn with_trust_domain_aliases(mut self, aliases: Vec<String>) -> Self {
        self.trust_domain_aliases = aliases;
        self
    }

    fn shared_for(&self, mesh: &Arc<Mesh>) -> Arc<Shared> {
        let mut cache = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = cache.current.as_ref().filter(|c| Arc::ptr_eq(&c.mesh, mesh)) {
            return current.clone();
        }
        let mut resources = resources::split(&mesh.shared_config());
        resources.retain(|(kind, _), _| kind != resources::SETTINGS);
        let shared = Arc::new(Shared { mesh: mesh.clone(), resources, packed: Default::default() });
        cache.current = Some(shared.clone());
        shared
    }

    /// What changed in the cluster-wide part between two snapshots; computed once per change.
    fn shared_delta(&self, old: &Arc<Shared>, new: &Arc<Shared>) -> Arc<Delta> {
        let mut cache = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((o, n, delta)) = &cache.delta {
            if Arc::ptr_eq(o, old) && Arc::ptr_eq(n, new) {
                return delta.clone();
            }
        }
        let delta = Arc::new(diff(&old.resources, &new.resources));
        cache.delta = Some((old.clone(), new.clone(), delta.clone()));
        delta
    }

    /// Both services.
    pub fn router(self) -> tonic::service::Routes {
        tonic::service::Routes::new(ConfigDiscoveryServer::new(self.clone()))
            .add_service(CertificateServiceServer::new(self))
    }

    fn trust_bundle_pem(&self) -> Vec<u8> {
        crate::tls::roots_pem(self.ca.as_ref()).into_bytes()
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for Controller {
    type StreamConfigStream = UpdateStream;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let header_node = self.auth.node_of(&request).await?;
        let mut inbound = request.into_inner();
        let (node, packed) = match inbound.message().await? {
            Some(ConfigRequest { kind: Some(config_request::Kind::Hello(hello)) }) => {
                (hello.node, hello.accepts_packed)
            }
            _ => return Err(Status::invalid_argument("the stream must start with Hello")),
        };
        if node != header_node {
            return Err(Status::permission_denied(format!("Hello names {node} but the caller is {header_node}")));
        }
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(serve_node(self.clone(), Agent { node, packed }, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One connected agent: its node, and whether it reads packed upserts.
struct Agent {
    node: String,
    packed: bool,
}

/// Feeds one agent: a full update first, then deltas whenever its node's config changes.
async fn serve_node(
    controller: Controller,
    agent: Agent,
    mut inbound: Streaming<ConfigRequest>,
    tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
) {
    let node = agent.node.as_str();
    tracing::info!(%node, "agent connected");
    controller.metrics.connected_agents.inc();
    let mut snapshots = controller.snapshots.clone();
    // What the agent has: the shared part (by snapshot) and its own part.
    let mut sent: Option<(Arc<Shared>, Resources)> = None;
    loop {
        let mesh = snapshots.borrow_and_update().clone();
        if let Some(why) = &mesh.withheld {
            tracing::warn!(%node, reason = %why, "snapshot withheld; the agent keeps its last config");
        }
        let next = if mesh.withheld.is_some() { None } else { Some(next_update(&controller, &agent, &mesh, &sent)) };
        if let Some((Some(update), now)) = next {
            let version = controller.versions.fetch_add(1, Ordering::Relaxed) + 1;
            let update = ConfigUpdate { version: version.to_string(), ..update };
            let kind = if update.full { "full" } else { "delta" };
            controller.metrics.config_updates.with_label_values(&[kind]).inc();
            tracing::debug!(%node, version, upserts = update.upserts.len(), removals = update.removals.len(), "sending config");
            if tx.send(Ok(update)).await.is_err() {
                break;
            }
            sent = Some(now);
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            message = inbound.message() => match message {
                Ok(Some(ConfigRequest { kind: Some(config_request::Kind::Ack(ack)) })) => {
                    if ack.error.is_empty() {
                        tracing::debug!(%node, version = %ack.version, "config applied");
                    } else {
                        controller.metrics.config_rejections.inc();
                        tracing::warn!(%node, version = %ack.version, error = %ack.error, "agent rejected config");
                    }
                }
                Ok(Some(_)) => tracing::debug!(%node, "ignoring unexpected message"),
                Ok(None) | Err(_) => break,
            },
        }
    }
    controller.metrics.connected_agents.dec();
    tracing::info!(%node, "agent disconnected");
}

/// The update that brings an agent from what it was `sent` to `mesh` (everything when it was sent nothing; `None`
/// when nothing changed for it), and what it has after it.
fn next_update(
    controller: &Controller,
    agent: &Agent,
    mesh: &Arc<Mesh>,
    sent: &Option<(Arc<Shared>, Resources)>,
) -> (Option<ConfigUpdate>, (Arc<Shared>, Resources)) {
    let shared = controller.shared_for(mesh);
    let mut local = mesh.local_config(&agent.node, &controller.trust_domain);
    local.trust_domain_aliases.clone_from(&controller.trust_domain_aliases);
    let local = resources::split(&local);
    let update = match sent {
        None if agent.packed => Some(ConfigUpdate {
            full: true,
            upserts: local.iter().map(|(k, v)| resources::to_proto(k, v)).collect(),
            packed_upserts: shared.packed(),
            trust_bundle_pem: controller.trust_bundle_pem(),
            ..Default::default()
        }),
        None => {
            let upserts = shared.resources.iter().chain(&local).map(|(k, v)| resources::to_proto(k, v)).collect();
            Some(ConfigUpdate {
                full: true,
                upserts,
                trust_bundle_pem: controller.trust_bundle_pem(),
                ..Default::default()
            })
        }
        Some((old_shared, old_local)) => {
            let mut delta = if Arc::ptr_eq(old_shared, &shared) {
                Delta::default()
            } else {
                (*controller.shared_delta(old_shared, &shared)).clone()
            };
            let own = diff(old_local, &local);
            delta.upserts.extend(own.upserts);
            delta.removals.extend(own.removals);
            (!delta.upserts.is_empty() || !delta.removals.is_empty()).then(|| ConfigUpdate {
                upserts: delta.upserts,
                removals: delta.removals,
                ..Default::default()
            })
        }
    };
    (update, (shared, local))
}

/// What changed from `old` to `new`.
fn diff(old: &Resources, new: &Resources) -> Delta {
    Delta {
        upserts: new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| resources::to_proto(k, v)).collect(),
        removals: old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .map(|(kind, name)| ResourceKey { kind: kind.clone(), name: name.clone() })
            .collect(),
    }
}

#[tonic::async_trait]
impl CertificateService for Controller {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let node = self.auth.node_of(&request).await?;
        let req = request.into_inner();
        let count = |result: &str| self.metrics.certificate_requests.with_label_values(&[result]).inc();
        let identity: Identity = req.identity.parse().map_err(|e| {
            count("invalid");
            Status::invalid_argument(format!("{e}"))
        })?;
        if identity.trust_domain != self.trust_domain {
            count("refused");
            return Err(Status::permission_denied(format!("trust domain is {}", self.trust_domain)));
        }
        if !self.snapshots.borrow().has_pod(&node, &identity.namespace, &identity.service_account) {
            count("refused");
            tracing::warn!(%node, %identity, "refused to sign: no running meshed pod with this identity on the node");
            return Err(Status::permission_denied(format!("{node} runs no meshed pod with identity {identity}")));
        }
        let lifetime = match req.lifetime_seconds {
            0 => DEFAULT_LIFETIME,
            s => Duration::from_secs(s).clamp(MIN_LIFETIME, MAX_LIFETIME),
        };
        let chain = self
            .ca
            .sign(&identity, CertificateSigningRequestDer::from(req.csr_der.as_slice()), lifetime)
            .await
            .map_err(|e| {
                count("invalid");
                Status::invalid_argument(e.to_string())
            })?;
        count("signed");
        tracing::info!(%node, %identity, "signed workload certificate");
        Ok(Response::new(SignResponse { chain_der: chain.iter().map(|c| c.to_vec()).collect() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_agent::identity::LocalCa;
    use mesh_common::resources::Assembler;

    fn controller(dir: &std::path::Path) -> (Controller, Arc<Mesh>) {
        let objects = crate::mesh::tests::parse(crate::mesh::tests::OBJECTS);
        let mesh = Arc::new(Mesh::from_objects(&objects).0);
        LocalCa::init(dir, "cluster.local").unwrap();
        let ca = Arc::new(LocalCa::load(dir).unwrap());
        let (_changes, snapshots) = tokio::sync::watch::channel(mesh.clone());
        let auth = Authenticator::Bootstrap { token: "t".into() };
        (Controller::new(snapshots, ca, "cluster.local".into(), auth, Metrics::default()), mesh)
    }

    #[test]
    fn the_shared_part_goes_packed_once_to_agents_that_read_it_and_listed_to_the_others() {
        let dir = std::env::temp_dir().join(format!("nodemesh-server-test-{}", std::process::id()));
        let (controller, mesh) = controller(&dir);
        let agent = |node: &str, packed| Agent { node: node.into(), packed };
        let (listed, _) = next_update(&controller, &agent("node-1", false), &mesh, &None);
        let (packed, _) = next_update(&controller, &agent("node-1", true), &mesh, &None);
        let (other, _) = next_update(&controller, &agent("node-2", true), &mesh, &None);
        let _ = std::fs::remove_dir_all(&dir);
        let (listed, packed, other) = (listed.unwrap(), packed.unwrap(), other.unwrap());
        assert!(listed.packed_upserts.is_empty(), "an agent that did not ask gets everything listed");
        assert!(!packed.packed_upserts.is_empty() && packed.upserts.len() < listed.upserts.len());
        // The same bytes for every agent: packed once per snapshot, not per stream.
        assert_eq!(packed.packed_upserts.as_ptr(), other.packed_upserts.as_ptr());
        // Both forms assemble to the same config.
        let assemble = |u: &ConfigUpdate| {
            let mut all = u.upserts.clone();
            if !u.packed_upserts.is_empty() {
                all.extend(mesh_common::packed::unpack(&u.packed_upserts).unwrap());
            }
            Assembler::default().apply(true, &all, &[], "1").unwrap()
        };
        assert_eq!(assemble(&listed), assemble(&packed));
        assert!(assemble(&packed).workloads.len() >= 2, "{:?}", assemble(&packed).workloads);
    }

    #[test]
    fn diffs_list_upserts_and_removals() {
        let a = BTreeMap::from([(("workload".into(), "x/a".into()), b"1".to_vec())]);
        let mut b = a.clone();
        b.insert(("workload".into(), "x/b".into()), b"2".to_vec());
        let none = diff(&a, &a);
        assert!(none.upserts.is_empty() && none.removals.is_empty());
        let added = diff(&a, &b);
        assert!(added.upserts.len() == 1 && added.removals.is_empty());
        let removed = diff(&b, &a);
        assert_eq!(removed.removals[0].name, "x/b");
        let changed = diff(&a, &BTreeMap::from([(("workload".into(), "x/a".into()), b"9".to_vec())]));
        assert_eq!(changed.upserts.len(), 1);
    }
}
