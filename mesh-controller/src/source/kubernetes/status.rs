//! Writes verdicts back as status: `Accepted` on nodemesh.io policies; for HTTPRoute and GRPCRoute, one
//! `status.parents` entry per Service parent with `Accepted` and `ResolvedRefs`, leaving other controllers'
//! entries alone. Only differences are written, with the object's resourceVersion as a precondition.

use std::collections::HashMap;
use std::time::SystemTime;

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::mesh::{Object, ObjectKey, Rejection, Verdict};

pub const CONTROLLER_NAME: &str = "nodemesh.io/mesh-controller";

pub struct Writer {
    tx: mpsc::UnboundedSender<Vec<(Verdict, Object)>>,
}

impl Writer {
    pub fn new(client: Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx));
        Writer { tx }
    }

    pub fn submit(&self, verdicts: &[(Verdict, Object)]) {
        let _ = self.tx.send(verdicts.to_vec());
    }
}

async fn run(client: Client, mut rx: mpsc::UnboundedReceiver<Vec<(Verdict, Object)>>) {
    // What was last written per object, so a rebuild before the watch echoes our write does not write again.
    let mut written: HashMap<ObjectKey, Value> = HashMap::new();
    while let Some(mut batch) = rx.recv().await {
        // Only the newest batch matters.
        while let Ok(newer) = rx.try_recv() {
            batch = newer;
        }
        for (verdict, object) in batch {
            let Some(status) = desired(&verdict, &object) else { continue };
            if written.get(&verdict.key) == Some(&status) {
                continue;
            }
            let Some(ar) = super::api_resource(&object.kind) else { continue };
            // MeshConfig is cluster-scoped.
            let api: Api<DynamicObject> = match object.metadata.namespace.as_deref() {
                None => Api::all_with(client.clone(), &ar),
                Some(namespace) => Api::namespaced_with(client.clone(), namespace, &ar),
            };
            let patch = json!({"metadata": {"resourceVersion": object.metadata.resource_version}, "status": status});
            match api.patch_status(&object.metadata.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::debug!(object = %verdict.key, "status written");
                    written.insert(verdict.key.clone(), status);
                }
                // Changed meanwhile: the watch brings the new version and the next build writes again.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
                Err(e) => tracing::warn!(object = %verdict.key, error = %e, "cannot write status"),
            }
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn condition(kind: &str, problem: Option<&Rejection>, ok_reason: &str, generation: Option<i64>, old: &Value) -> Value {
    let (status, reason, message) = match problem {
        None => ("True", ok_reason, String::new()),
        Some(r) => ("False", r.reason, r.message.clone()),
    };
    let previous = old.as_array().into_iter().flatten().find(|c| c["type"] == kind);
    // The transition time moves only when the status does.
    let since = previous
        .filter(|c| c["status"] == status)
        .and_then(|c| c["lastTransitionTime"].as_str().map(String::from))
        .unwrap_or_else(now);
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "observedGeneration": generation.unwrap_or(0), "lastTransitionTime": since})
}

/// The status the object should have, or `None` when it already has it (or is not ours to report on).
fn desired(v: &Verdict, o: &Object) -> Option<Value> {
    let status = match o.kind.as_str() {
        "PeerAuthentication" | "AuthorizationPolicy" | "TrafficPolicy" | "Telemetry" | "MeshConfig" => {
            let old = &o.status["conditions"];
            let accepted = condition("Accepted", v.rejected.as_ref(), "Accepted", v.generation, old);
            json!({"conditions": [accepted]})
        }
        "HTTPRoute" | "GRPCRoute" => {
            let old_parents = o.status["parents"].as_array().cloned().unwrap_or_default();
            let mut parents: Vec<Value> =
                old_parents.iter().filter(|p| p["controllerName"] != CONTROLLER_NAME).cloned().collect();
            for parent in o.spec["parentRefs"].as_array().into_iter().flatten() {
                if parent["kind"] != "Service" {
                    continue;
                }
                let old = old_parents
                    .iter()
                    .find(|p| p["controllerName"] == CONTROLLER_NAME && p["parentRef"] == *parent)
                    .map(|p| p["conditions"].clone())
                    .unwrap_or(Value::Null);
                let accepted = condition("Accepted", v.rejected.as_ref(), "Accepted", v.generation, &old);
                let resolved = condition("ResolvedRefs", v.unresolved.as_ref(), "ResolvedRefs", v.generation, &old);
                parents.push(json!({"parentRef": parent, "controllerName": CONTROLLER_NAME,
                                    "conditions": [accepted, resolved]}));
            }
            json!({"parents": parents})
        }
        _ => return None,
    };
    let unchanged = |field: &str| o.status.get(field) == status.get(field);
    if unchanged("conditions") && unchanged("parents") { None } else { Some(status) }
}
