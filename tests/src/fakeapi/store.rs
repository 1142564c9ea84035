//! The fake API server's state: resource types (built-in and from CRDs), objects, the resourceVersion counter
//! and the event log watches replay from.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{Value, json};

use super::schema;

/// Events kept for watches that resume from a resourceVersion; older ones get 410 Gone.
pub const LOG_SIZE: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a `/status` subresource: the main resource ignores status writes and `/status` ignores the rest.
    pub status: bool,
    pub short_names: Vec<String>,
    /// Per version: the CRD's openAPIV3Schema.
    pub schemas: BTreeMap<String, Value>,
    /// TokenReview and friends: create only, nothing stored.
    pub virtual_create: bool,
}

impl ResourceType {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool, status: bool) -> Self {
        ResourceType {
            group: group.into(),
            versions: vec![version.into()],
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            status,
            short_names: Vec::new(),
            schemas: BTreeMap::new(),
            virtual_create: false,
        }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() { version.to_string() } else { format!("{}/{}", self.group, version) }
    }
}

fn builtins() -> Vec<ResourceType> {
    let b = ResourceType::builtin;
    let mut out = vec![
        b("", "v1", "namespaces", "Namespace", false, true),
        b("", "v1", "nodes", "Node", false, true),
        b("", "v1", "pods", "Pod", true, true),
        b("", "v1", "services", "Service", true, true),
        b("", "v1", "serviceaccounts", "ServiceAccount", true, false),
        b("", "v1", "secrets", "Secret", true, false),
        b("", "v1", "configmaps", "ConfigMap", true, false),
        b("", "v1", "events", "Event", true, false),
        b("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true, false),
        b("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        b("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", false, true),
        b("apps", "v1", "deployments", "Deployment", true, true),
        b("apps", "v1", "daemonsets", "DaemonSet", true, true),
        b("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", true, true),
        b("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", true, false),
        b("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false, false),
        b("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false, false),
        b("rbac.authorization.k8s.io", "v1", "roles", "Role", true, false),
        b("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true, false),
        b("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", false, false),
    ];
    for t in &mut out {
        t.short_names = match t.plural.as_str() {
            "namespaces" => vec!["ns".into()],
            "pods" => vec!["po".into()],
            "services" => vec!["svc".into()],
            "serviceaccounts" => vec!["sa".into()],
            "configmaps" => vec!["cm".into()],
            "poddisruptionbudgets" => vec!["pdb".into()],
            "nodes" => vec!["no".into()],
            "customresourcedefinitions" => vec!["crd".into(), "crds".into()],
            _ => Vec::new(),
        };
        t.virtual_create = t.plural == "tokenreviews";
    }
    out
}

#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub type_id: String,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    pub old: Option<Value>,
    pub object: Value,
}

/// An API error, rendered as a `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError { code, reason, message: message.into(), details: Value::Null }
    }

    pub fn status(&self) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": self.message, "reason": self.reason, "code": self.code});
        if !self.details.is_null() {
            s["details"] = self.details.clone();
        }
        s
    }
}

fn not_found(t: &ResourceType, name: &str) -> ApiError {
    let what = if t.group.is_empty() { t.plural.clone() } else { format!("{}.{}", t.plural, t.group) };
    let mut e = ApiError::new(404, "NotFound", format!("{what} \"{name}\" not found"));
    e.details = json!({"name": name, "group": t.group, "kind": t.plural});
    e
}

#[derive(Default)]
pub struct Store {
    pub rv: u64,
    pub types: Vec<ResourceType>,
    objects: HashMap<String, BTreeMap<(String, String), Value>>,
    pub log: VecDeque<Event>,
    /// TokenReview answers: token -> `status.user`.
    pub tokens: HashMap<String, Value>,
    /// How many events the log keeps.
    pub log_size: usize,
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    if patch.is_object() && !target.is_object() {
        *target = Value::Object(Default::default());
    }
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Everything but metadata and status: what `generation` counts changes of.
fn body_without_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store { types: builtins(), log_size: LOG_SIZE, ..Default::default() };
        for ns in ["default", "kube-system", "kube-public"] {
            let t = s.find_type("", "namespaces").cloned().expect("built-in type");
            let _ = s.create(&t, "v1", None, json!({"metadata": {"name": ns}}));
        }
        s
    }

    pub fn find_type(&self, group: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.group == group && t.plural == plural)
    }

    pub fn get(&self, t: &ResourceType, ns: Option<&str>, name: &str) -> Option<&Value> {
        self.objects.get(&t.id())?.get(&(ns.unwrap_or_default().to_string(), name.to_string()))
    }

    pub fn list(&self, t: &ResourceType, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .get(&t.id())
            .map(|m| m.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, v)| v.clone()).collect())
            .unwrap_or_default()
    }

    fn record(&mut self, t: &ResourceType, kind: &'static str, old: Option<Value>, object: Value) {
        self.log.push_back(Event { rv: self.rv, type_id: t.id(), kind, old, object });
        while self.log.len() > self.log_size {
            self.log.pop_front();
        }
    }

    fn validate(&self, t: &ResourceType, version: &str, obj: &Value) -> Result<(), ApiError> {
        let Some(schema) = t.schemas.get(version) else { return Ok(()) };
        // metadata is the server's business, not the CRD schema's.
        let mut body = obj.clone();
        if let Some(m) = body.as_object_mut() {
            m.remove("metadata");
            m.remove("apiVersion");
            m.remove("kind");
        }
        let causes = schema::validate(schema, &body);
        if causes.is_empty() {
            return Ok(());
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let list: Vec<String> = causes.iter().map(|c| c.message.clone()).collect();
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{}.{} \"{name}\" is invalid: [{}]", t.kind, t.group, list.join(", ")),
        );
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": "FieldValueInvalid", "message": c.message, "field": c.field}))
            .collect();
        e.details = json!({"name": name, "group": t.group, "kind": t.kind, "causes": causes});
        Err(e)
    }

    pub fn create(
        &mut self,
        t: &ResourceType,
        version: &str,
        ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::new(400, "BadRequest", "the body is not an object"));
        }
        let meta = obj["metadata"].as_object().cloned().unwrap_or_default();
        let mut name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        if name.is_empty() {
            if let Some(prefix) = meta.get("generateName").and_then(Value::as_str) {
                name = format!("{prefix}{:05x}", self.rv + 1);
            } else {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("{} is invalid: metadata.name: Required value", t.kind),
                ));
            }
        }
        let ns = if t.namespaced {
            let ns = ns.or(meta.get("namespace").and_then(Value::as_str)).unwrap_or("default").to_string();
            let namespaces = self.find_type("", "namespaces").cloned().expect("built-in type");
            if self.get(&namespaces, None, &ns).is_none() {
                return Err(not_found(&namespaces, &ns));
            }
            Some(ns)
        } else {
            None
        };
        if self.get(t, ns.as_deref(), &name).is_some() {
            let what = if t.group.is_empty() { t.plural.clone() } else { format!("{}.{}", t.plural, t.group) };
            let mut e = ApiError::new(409, "AlreadyExists", format!("{what} \"{name}\" already exists"));
            e.details = json!({"name": name, "group": t.group, "kind": t.plural});
            return Err(e);
        }
        // As on a real server: status is not set by create where there is a status subresource.
        if t.status {
            obj.as_object_mut().map(|o| o.remove("status"));
        }
        match t.kind.as_str() {
            "Pod" => obj["status"] = json!({"phase": "Pending"}),
            "Namespace" => obj["status"] = json!({"phase": "Active"}),
            _ => {}
        }
        obj["apiVersion"] = json!(t.api_version(version));
        obj["kind"] = json!(t.kind);
        self.validate(t, version, &obj)?;
        self.rv += 1;
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        if let Some(ns) = &ns {
            m["namespace"] = json!(ns);
        }
        // A uid the client set is kept (a real API server assigns its own): tests line the CNI call's
        // K8S_POD_UID up with it, as the kubelet does with the real one.
        if m["uid"].as_str().is_none_or(str::is_empty) {
            m["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.rv));
        }
        m["resourceVersion"] = json!(self.rv.to_string());
        m["creationTimestamp"] = json!(now());
        m["generation"] = json!(1);
        if t.kind == "CustomResourceDefinition" {
            self.register_crd(&mut obj)?;
        }
        self.objects.entry(t.id()).or_default().insert((ns.unwrap_or_default(), name), obj.clone());
        self.record(t, "ADDED", None, obj.clone());
        Ok(obj)
    }

    /// Stores `next` in place of the current object: `status_only` for the `/status` subresource.
    pub fn update(
        &mut self,
        t: &ResourceType,
        version: &str,
        ns: Option<&str>,
        name: &str,
        mut next: Value,
        status_only: bool,
    ) -> Result<Value, ApiError> {
        let current = self.get(t, ns, name).cloned().ok_or_else(|| not_found(t, name))?;
        if let Some(rv) = next["metadata"]["resourceVersion"].as_str() {
            if rv != current["metadata"]["resourceVersion"].as_str().unwrap_or_default() {
                let msg = format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your \
                     changes to the latest version and try again",
                    t.plural
                );
                return Err(ApiError::new(409, "Conflict", msg));
            }
        }
        if next["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            return Err(ApiError::new(400, "BadRequest", "the name of the object does not match the URL"));
        }
        if status_only {
            let status = next.get("status").cloned().unwrap_or(Value::Null);
            next = current.clone();
            next["status"] = status;
        } else {
            if t.status {
                next["status"] = current.get("status").cloned().unwrap_or(Value::Null);
            }
            // Server-owned metadata stays the server's.
            let mut meta = current["metadata"].clone();
            for (k, v) in next["metadata"].as_object().cloned().unwrap_or_default() {
                if !matches!(k.as_str(), "uid" | "creationTimestamp" | "generation" | "resourceVersion" | "namespace") {
                    meta[&k] = v;
                }
            }
            for k in ["labels", "annotations", "finalizers", "ownerReferences"] {
                if next["metadata"].get(k).is_none() {
                    meta.as_object_mut().map(|m| m.remove(k));
                }
            }
            next["metadata"] = meta;
        }
        if next.get("status").is_some_and(Value::is_null) {
            next.as_object_mut().map(|o| o.remove("status"));
        }
        next["apiVersion"] = json!(t.api_version(version));
        next["kind"] = json!(t.kind);
        self.validate(t, version, &next)?;
        let mut unchanged = current.clone();
        unchanged["apiVersion"] = next["apiVersion"].clone();
        if next == unchanged {
            return Ok(current);
        }
        if body_without_meta(&next) != body_without_meta(&current) {
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            next["metadata"]["generation"] = json!(generation + 1);
        }
        self.rv += 1;
        next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let finalizers_gone = next["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
        if next["metadata"].get("deletionTimestamp").is_some() && finalizers_gone {
            return self.remove(t, ns, name, next);
        }
        if t.kind == "CustomResourceDefinition" {
            self.register_crd(&mut next)?;
        }
        self.objects.entry(t.id()).or_default().insert((ns.unwrap_or_default().into(), name.into()), next.clone());
        self.record(t, "MODIFIED", Some(current), next.clone());
        Ok(next)
    }

    pub fn delete(&mut self, t: &ResourceType, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let current = self.get(t, ns, name).cloned().ok_or_else(|| not_found(t, name))?;
        if current["metadata"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) {
            if current["metadata"].get("deletionTimestamp").is_some() {
                return Ok(current);
            }
            let mut next = current.clone();
            next["metadata"]["deletionTimestamp"] = json!(now());
            self.rv += 1;
            next["metadata"]["resourceVersion"] = json!(self.rv.to_string());
            self.objects.entry(t.id()).or_default().insert((ns.unwrap_or_default().into(), name.into()), next.clone());
            self.record(t, "MODIFIED", Some(current), next.clone());
            return Ok(next);
        }
        self.rv += 1;
        let mut last = current;
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.remove(t, ns, name, last)
    }

    fn remove(&mut self, t: &ResourceType, ns: Option<&str>, name: &str, last: Value) -> Result<Value, ApiError> {
        let old = self.objects.entry(t.id()).or_default().remove(&(ns.unwrap_or_default().into(), name.into()));
        if t.kind == "CustomResourceDefinition" {
            let group = last["spec"]["group"].as_str().unwrap_or_default().to_string();
            let plural = last["spec"]["names"]["plural"].as_str().unwrap_or_default().to_string();
            self.types.retain(|x| !(x.group == group && x.plural == plural));
            self.objects.remove(&format!("{group}/{plural}"));
        }
        self.record(t, "DELETED", old, last.clone());
        Ok(last)
    }

    /// Serves the CRD's kind from now on and marks it Established, as the real server does within moments.
    fn register_crd(&mut self, crd: &mut Value) -> Result<(), ApiError> {
        let spec = &crd["spec"];
        let invalid = |m: &str| ApiError::new(422, "Invalid", format!("CustomResourceDefinition is invalid: {m}"));
        let group = spec["group"].as_str().ok_or_else(|| invalid("spec.group: Required value"))?.to_string();
        let names = &spec["names"];
        let plural = names["plural"].as_str().ok_or_else(|| invalid("spec.names.plural: Required value"))?.to_string();
        let kind = names["kind"].as_str().ok_or_else(|| invalid("spec.names.kind: Required value"))?.to_string();
        let mut t = ResourceType {
            group,
            versions: Vec::new(),
            singular: names["singular"].as_str().map_or_else(|| kind.to_lowercase(), String::from),
            plural,
            kind,
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            status: false,
            short_names: serde_json::from_value(names["shortNames"].clone()).unwrap_or_default(),
            schemas: BTreeMap::new(),
            virtual_create: false,
        };
        for v in spec["versions"].as_array().into_iter().flatten() {
            let Some(name) = v["name"].as_str() else { continue };
            if v["served"].as_bool() == Some(false) {
                continue;
            }
            t.versions.push(name.to_string());
            t.status |= v["subresources"].get("status").is_some();
            if let Some(schema) = v["schema"].get("openAPIV3Schema") {
                t.schemas.insert(name.to_string(), schema.clone());
            }
        }
        if t.versions.is_empty() {
            return Err(invalid("spec.versions: no served version"));
        }
        crd["status"] = json!({
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found",
                 "lastTransitionTime": now()},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": now()}],
            "acceptedNames": names.clone(),
            "storedVersions": [t.versions[0].clone()],
        });
        self.types.retain(|x| !(x.group == t.group && x.plural == t.plural));
        self.types.push(t);
        Ok(())
    }
}
