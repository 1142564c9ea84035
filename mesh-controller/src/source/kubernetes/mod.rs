//! `--source kubernetes`: watches the cluster's objects with kube-rs (in-cluster config or `$KUBECONFIG`) and
//! publishes a [`Mesh`] snapshot whenever something the mesh cares about changes; verdicts go back as status
//! conditions. Level-triggered: every rebuild starts from the full set of watched objects, so a missed or
//! coalesced event cannot leave stale config behind.
//!
//! No snapshot is published before every kind has been listed once: a half-read cluster (policies not yet seen)
//! must not reach the agents as "no policies".

mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{Notify, watch};

use super::Snapshots;
use crate::mesh::{Mesh, Object};

/// The kinds watched: (group, version, kind, plural).
const KINDS: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Node", "nodes"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Service", "services"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    ("nodemesh.io", "v1alpha1", "PeerAuthentication", "peerauthentications"),
    ("nodemesh.io", "v1alpha1", "MeshConfig", "meshconfigs"),
    ("nodemesh.io", "v1alpha1", "AuthorizationPolicy", "authorizationpolicies"),
    ("nodemesh.io", "v1alpha1", "TrafficPolicy", "trafficpolicies"),
    ("nodemesh.io", "v1alpha1", "Telemetry", "telemetries"),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes"),
];

/// Changes within this window are built into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(50);

pub fn api_resource(kind: &str) -> Option<ApiResource> {
    let (group, version, kind, plural) = KINDS.iter().find(|k| k.2 == kind)?;
    Some(ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural))
}

/// The watched objects, per kind, and which kinds have been listed completely at least once.
#[derive(Default)]
struct Inventory {
    objects: Vec<BTreeMap<(String, String), Object>>,
    synced: Vec<bool>,
}

fn to_object(o: DynamicObject, ar: &ApiResource) -> Option<Object> {
    let mut v = serde_json::to_value(o).ok()?;
    // List items come without apiVersion and kind.
    v["apiVersion"] = ar.api_version.clone().into();
    v["kind"] = ar.kind.clone().into();
    serde_json::from_value(v).ok()
}

fn key_of(o: &Object) -> (String, String) {
    (o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone())
}

/// Starts the watches; returns once the first complete snapshot is built.
pub async fn watch(client: Client) -> anyhow::Result<Snapshots> {
    let inventory = Arc::new(Mutex::new(Inventory {
        objects: vec![BTreeMap::new(); KINDS.len()],
        synced: vec![false; KINDS.len()],
    }));
    let changed = Arc::new(Notify::new());
    for (index, (_, _, kind, _)) in KINDS.iter().enumerate() {
        let ar = api_resource(kind).expect("listed kind");
        tokio::spawn(watch_kind(client.clone(), ar, index, inventory.clone(), changed.clone()));
    }
    let mut waited = 0u32;
    let first = loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                waited += 10;
                let pending: Vec<&str> = {
                    let inv = inventory.lock().unwrap_or_else(|p| p.into_inner());
                    KINDS.iter().zip(&inv.synced).filter(|(_, s)| !**s).map(|(k, _)| k.2).collect()
                };
                tracing::warn!(?pending, seconds = waited, "still waiting for the first complete list");
            }
        }
        if let Some(built) = build(&inventory) {
            break built;
        }
    };
    let statuses = status::Writer::new(client);
    statuses.submit(&first.1);
    let (tx, rx) = watch::channel(Arc::new(first.0));
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            let Some((mesh, verdicts)) = build(&inventory) else { continue };
            statuses.submit(&verdicts);
            tx.send_if_modified(|current| {
                let differs = **current != mesh;
                if differs {
                    *current = Arc::new(mesh);
                }
                differs
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

type Built = (Mesh, Vec<(crate::mesh::Verdict, Object)>);

/// The snapshot and each verdict with its object, once every kind is synced.
fn build(inventory: &Mutex<Inventory>) -> Option<Built> {
    let all: Vec<Object> = {
        let inv = inventory.lock().unwrap_or_else(|p| p.into_inner());
        if !inv.synced.iter().all(|s| *s) {
            return None;
        }
        inv.objects.iter().flat_map(|m| m.values().cloned()).collect()
    };
    let (mesh, verdicts) = Mesh::from_objects(&all);
    let by_key: BTreeMap<_, &Object> = all.iter().map(|o| (o.key(), o)).collect();
    let verdicts = verdicts
        .into_iter()
        .filter_map(|v| {
            if v.is_problem() {
                tracing::warn!("{v}");
            }
            let object = (*by_key.get(&v.key)?).clone();
            Some((v, object))
        })
        .collect();
    Some((mesh, verdicts))
}

async fn watch_kind(
    client: Client,
    ar: ApiResource,
    index: usize,
    inventory: Arc<Mutex<Inventory>>,
    changed: Arc<Notify>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut relisting: Option<BTreeMap<(String, String), Object>> = None;
    let mut missing_logged = false;
    while let Some(event) = events.next().await {
        let mut inv = inventory.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Ok(watcher::Event::Init) => relisting = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let (Some(list), Some(o)) = (relisting.as_mut(), to_object(o, &ar)) {
                    list.insert(key_of(&o), o);
                }
            }
            Ok(watcher::Event::InitDone) => {
                inv.objects[index] = relisting.take().unwrap_or_default();
                inv.synced[index] = true;
                tracing::debug!(kind = %ar.kind, objects = inv.objects[index].len(), "listed");
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                if let Some(o) = to_object(o, &ar) {
                    inv.objects[index].insert(key_of(&o), o);
                    changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Some(o) = to_object(o, &ar) {
                    inv.objects[index].remove(&key_of(&o));
                    changed.notify_one();
                }
            }
            // The CRD is not installed: nothing of this kind exists. The watcher keeps retrying, so objects
            // show up once someone installs it.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                if !missing_logged {
                    tracing::warn!(kind = %ar.kind, group = %ar.group, "the API server does not serve this kind (CRD not installed?); treating it as empty");
                    missing_logged = true;
                }
                if !inv.synced[index] || !inv.objects[index].is_empty() {
                    inv.objects[index].clear();
                    inv.synced[index] = true;
                    changed.notify_one();
                }
            }
            Err(e) => tracing::warn!(kind = %ar.kind, error = %e, "watch failed; retrying"),
        }
    }
}
