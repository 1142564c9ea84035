//! A small Kubernetes API server for tests: no real kube-apiserver can be installed on these machines, so this
//! speaks the real REST and watch protocol well enough for kube-rs and kubectl to run unchanged against it.
//! JSON only (kubectl: use `apply -f`, not typed `create`); no authentication (any token is accepted) apart from
//! answering TokenReviews for tokens registered with [`FakeApi::add_token`].
//!
//! Supported: discovery; list and watch with resourceVersion (410 when the log no longer covers it), label and
//! field selectors, `timeoutSeconds`; create, get, replace, delete (with finalizers); merge and strategic-merge
//! patch (both as RFC 7386), server-side apply (as create-or-merge); the status subresource; CRD registration
//! with structural-schema validation (422); TokenReview.

mod discovery;
mod portforward;
mod schema;
mod select;
mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use select::Selector;
use store::Store;
pub use store::{ApiError, Event, ResourceType};

/// A running fake API server. Clones share the server.
#[derive(Clone)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Event>,
    pub url: String,
    /// `namespace/pod` → the network namespace whose loopback `pods/portforward` reaches.
    forwards: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
}

/// Where a request points.
struct Target {
    t: ResourceType,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn respond(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

fn error(e: &ApiError) -> Response {
    respond(e.code, &e.status())
}

impl FakeApi {
    /// Serves on `listener` (a std listener, so callers can bind it inside a network namespace).
    pub fn serve(listener: std::net::TcpListener) -> anyhow::Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener).context("tokio listener")?;
        let (events, _) = broadcast::channel(4096);
        let api = FakeApi {
            store: Arc::new(Mutex::new(Store::new())),
            events,
            url: format!("http://{addr}"),
            forwards: Default::default(),
        };
        let app = axum::Router::new()
            .route("/api/v1/namespaces/{ns}/pods/{name}/portforward", axum::routing::get(portforward::handle))
            .fallback(handle)
            .with_state(api.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(api)
    }

    /// Serves on 127.0.0.1 at a free port.
    pub fn spawn() -> anyhow::Result<FakeApi> {
        FakeApi::serve(std::net::TcpListener::bind("127.0.0.1:0")?)
    }

    /// Keeps only the last `events` events for resuming watches (the default is [`store::LOG_SIZE`]), so tests
    /// can make a resourceVersion expire.
    pub fn set_log_size(&self, events: usize) {
        self.lock().log_size = events.max(1);
    }

    /// Lets `pods/portforward` of `namespace/pod` reach ports on the loopback of network namespace `netns` (as
    /// the kubelet reaches the pod's; for a hostNetwork pod, the node's).
    pub fn forward_pod(&self, namespace: &str, pod: &str, netns: &str) {
        self.forwards.lock().unwrap_or_else(|e| e.into_inner()).insert(format!("{namespace}/{pod}"), netns.to_string());
    }

    /// A kubeconfig for this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: test\n  \
             user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n\
             current-context: fake\n",
            self.url
        )
    }

    /// Makes TokenReview authenticate `token` as `username`, with `extra` (e.g. the node a pod-bound token
    /// belongs to: `authentication.kubernetes.io/node-name`), for the API server's own audience (a pod's default
    /// service-account token).
    pub fn add_token(&self, token: &str, username: &str, extra: &[(&str, &str)]) {
        self.add_token_for(token, username, extra, &[API_AUDIENCE]);
    }

    /// As [`FakeApi::add_token`], for a projected token minted for `audiences`.
    pub fn add_token_for(&self, token: &str, username: &str, extra: &[(&str, &str)], audiences: &[&str]) {
        let extra: serde_json::Map<String, Value> = extra.iter().map(|(k, v)| (k.to_string(), json!([v]))).collect();
        let user = json!({"username": username, "uid": format!("uid-{username}"),
                          "groups": ["system:serviceaccounts", "system:authenticated"], "extra": extra});
        self.lock().tokens.insert(token.to_string(), json!({"user": user, "audiences": audiences}));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock is a bug in a test; the state is still usable for reporting it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, store: &Store, since: u64) {
        for e in store.log.iter().filter(|e| e.rv > since) {
            let _ = self.events.send(e.clone());
        }
    }

    fn resolve(&self, api_version: &str, kind: &str) -> Result<(ResourceType, String), ApiError> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let store = self.lock();
        store
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
            .map(|t| (t.clone(), version.to_string()))
            .ok_or_else(|| ApiError::new(404, "NotFound", format!("no kind {kind:?} is registered for {api_version}")))
    }

    /// Create-or-merge, as server-side apply does it here; the in-process way for tests to change objects.
    pub fn apply(&self, object: &Value) -> Result<Value, ApiError> {
        let (t, version) = self
            .resolve(object["apiVersion"].as_str().unwrap_or_default(), object["kind"].as_str().unwrap_or_default())?;
        let ns = object["metadata"]["namespace"].as_str().map(String::from).or(t.namespaced.then(|| "default".into()));
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.write(|s| apply_patch(s, &t, &version, ns.as_deref(), &name, object, false))
    }

    /// Applies every document of a YAML stream.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            if !v.is_null() {
                self.apply(&v).map_err(|e| anyhow::anyhow!("{}", e.message))?;
            }
        }
        Ok(())
    }

    /// Replaces the object's status through the status subresource (what a kubelet does for pods).
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value, ApiError> {
        let (t, version) = self.resolve(api_version, kind)?;
        self.write(|s| s.update(&t, &version, ns, name, json!({"status": status}), true))
    }

    pub fn delete(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        let (t, _) = self.resolve(api_version, kind)?;
        self.write(|s| s.delete(&t, ns, name))
    }

    pub fn get(&self, api_version: &str, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let (t, _) = self.resolve(api_version, kind).ok()?;
        self.lock().get(&t, ns, name).cloned()
    }

    fn write(&self, f: impl FnOnce(&mut Store) -> Result<Value, ApiError>) -> Result<Value, ApiError> {
        let mut store = self.lock();
        let before = store.rv;
        let out = f(&mut store);
        self.publish(&store, before);
        out
    }

    fn target(&self, path: &str) -> Result<Target, ApiError> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource")),
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, plural, rest @ ..] if !matches!(*plural, "status" | "finalize") => {
                (Some(ns.to_string()), std::iter::once(*plural).chain(rest.iter().copied()).collect::<Vec<_>>())
            }
            _ => (None, rest.to_vec()),
        };
        let Some(plural) = rest.first() else {
            return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
        };
        let store = self.lock();
        let t = store
            .find_type(group, plural)
            .filter(|t| t.versions.iter().any(|v| v == version))
            .cloned()
            .ok_or_else(|| ApiError::new(404, "NotFound", "the server could not find the requested resource"))?;
        Ok(Target {
            namespace: namespace.filter(|_| t.namespaced),
            t,
            version: version.to_string(),
            name: rest.get(1).map(|s| s.to_string()),
            subresource: rest.get(2).map(|s| s.to_string()),
        })
    }
}

fn apply_patch(
    s: &mut Store,
    t: &ResourceType,
    version: &str,
    ns: Option<&str>,
    name: &str,
    patch: &Value,
    status_only: bool,
) -> Result<Value, ApiError> {
    match s.get(t, ns, name).cloned() {
        None if !status_only => {
            // Merging into nothing drops the patch's nulls, as applying to a missing object does.
            let mut obj = json!({});
            store::merge(&mut obj, patch);
            obj["metadata"]["name"] = json!(name);
            s.create(t, version, ns, obj)
        }
        None => Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", t.plural))),
        Some(mut current) => {
            // A resourceVersion in the patch is a precondition, as on the real server.
            let precondition = patch["metadata"]["resourceVersion"].clone();
            store::merge(&mut current, patch);
            if precondition.is_null() {
                current["metadata"].as_object_mut().map(|m| m.remove("resourceVersion"));
            }
            s.update(t, version, ns, name, current, status_only)
        }
    }
}

fn query(uri: &Uri) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes()).into_owned().collect()
}

async fn handle(State(api): State<FakeApi>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path();
    if let Some(answer) = discovery::answer(&api.lock(), path) {
        return respond(200, &answer);
    }
    let target = match api.target(path) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    let q = query(&uri);
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !body.is_empty() && (content_type.contains("protobuf") || content_type.contains("cbor")) {
        return error(&ApiError::new(415, "UnsupportedMediaType", "only JSON is supported by this fake API server"));
    }
    let parse_body = || -> Result<Value, ApiError> {
        // Server-side apply bodies are YAML (JSON is YAML too).
        serde_yaml::from_slice::<Value>(&body)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("cannot decode the body: {e}")))
    };
    let Target { t, version, namespace, name, subresource } = target;
    let ns = namespace.as_deref();
    let status_only = subresource.as_deref() == Some("status");
    if subresource.is_some() && !(status_only && t.status) {
        return error(&ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    }
    let result = match (&method, name.as_deref()) {
        (&Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            return watch(&api, &t, &version, ns, &q);
        }
        (&Method::GET, None) => list(&api, &t, &version, ns, &q),
        (&Method::GET, Some(name)) => api
            .lock()
            .get(&t, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", t.plural))),
        (&Method::POST, None) if t.virtual_create => parse_body().map(|b| token_review(&api, b)),
        (&Method::POST, None) => {
            return match parse_body().and_then(|b| api.write(|s| s.create(&t, &version, ns, b))) {
                Ok(created) => respond(201, &created),
                Err(e) => error(&e),
            };
        }
        (&Method::PUT, Some(name)) => {
            parse_body().and_then(|b| api.write(|s| s.update(&t, &version, ns, name, b, status_only)))
        }
        (&Method::PATCH, Some(name)) => {
            if content_type.contains("json-patch") {
                Err(ApiError::new(415, "UnsupportedMediaType", "json-patch is not supported; use a merge patch"))
            } else {
                let is_apply = content_type.contains("apply-patch");
                parse_body().and_then(|b| {
                    api.write(|s| {
                        if !is_apply && s.get(&t, ns, name).is_none() {
                            return Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", t.plural)));
                        }
                        apply_patch(s, &t, &version, ns, name, &b, status_only)
                    })
                })
            }
        }
        (&Method::DELETE, Some(name)) => api.write(|s| s.delete(&t, ns, name)),
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported here"))),
    };
    match result {
        Ok(v) => respond(200, &v),
        Err(e) => error(&e),
    }
}

fn selector(q: &std::collections::HashMap<String, String>) -> Result<Selector, ApiError> {
    Selector::parse(q.get("labelSelector").map(String::as_str), q.get("fieldSelector").map(String::as_str))
        .map_err(|e| ApiError::new(400, "BadRequest", e))
}

fn list(
    api: &FakeApi,
    t: &ResourceType,
    version: &str,
    ns: Option<&str>,
    q: &std::collections::HashMap<String, String>,
) -> Result<Value, ApiError> {
    let sel = selector(q)?;
    let store = api.lock();
    let mut items: Vec<Value> = store.list(t, ns).into_iter().filter(|o| sel.matches(o)).collect();
    for item in &mut items {
        item["apiVersion"] = json!(t.api_version(version));
    }
    if let Some(limit) = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0) {
        items.truncate(limit);
    }
    Ok(json!({"apiVersion": t.api_version(version), "kind": format!("{}List", t.kind),
              "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}))
}

/// The API server's own audience: what a review without `spec.audiences` asks for.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// As the real server: a token is authenticated only for audiences it was minted for, and the answer names the
/// requested ones it is valid for.
fn token_review(api: &FakeApi, review: Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let requested: Vec<Value> = match review["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => vec![json!(API_AUDIENCE)],
    };
    let status = match api.lock().tokens.get(token) {
        Some(minted) => {
            let valid: Vec<&Value> =
                requested.iter().filter(|a| minted["audiences"].as_array().is_some_and(|m| m.contains(a))).collect();
            if valid.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({"authenticated": true, "user": minted["user"], "audiences": valid})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {"creationTimestamp": null},
           "spec": review["spec"], "status": status})
}

/// What a watcher with this selector sees of an event: objects that start or stop matching appear as ADDED or
/// DELETED, as on the real server.
fn translate(e: &Event, sel: &Selector, ns: Option<&str>) -> Option<(&'static str, Value)> {
    if ns.is_some_and(|ns| e.object["metadata"]["namespace"].as_str() != Some(ns)) {
        return None;
    }
    let was = e.old.as_ref().is_some_and(|o| sel.matches(o));
    let is = sel.matches(&e.object);
    let kind = match (e.kind, was, is) {
        ("ADDED", _, true) => "ADDED",
        ("MODIFIED", true, true) => "MODIFIED",
        ("MODIFIED", false, true) => "ADDED",
        ("MODIFIED", true, false) => "DELETED",
        ("DELETED", w, i) if w || i => "DELETED",
        _ => return None,
    };
    Some((kind, e.object.clone()))
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(
    api: &FakeApi,
    t: &ResourceType,
    version: &str,
    ns: Option<&str>,
    q: &std::collections::HashMap<String, String>,
) -> Response {
    let sel = match selector(q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800u64);
    let ns = ns.map(String::from);
    let api_version = t.api_version(version);
    let (mut initial, mut live, last) = {
        let store = api.lock();
        let live = api.events.subscribe();
        let mut initial = Vec::new();
        match q.get("resourceVersion").map(String::as_str).filter(|rv| !rv.is_empty() && *rv != "0") {
            Some(rv) => {
                let Ok(rv) = rv.parse::<u64>() else {
                    return error(&ApiError::new(400, "BadRequest", format!("invalid resourceVersion {rv:?}")));
                };
                let oldest = store.log.front().map_or(store.rv, |e| e.rv);
                if rv + 1 < oldest {
                    let gone = ApiError::new(410, "Expired", format!("too old resource version: {rv} ({oldest})"));
                    initial.push(line("ERROR", &gone.status()));
                    return Response::builder()
                        .status(200)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Body::from(initial.concat()))
                        .unwrap_or_default();
                }
                for e in store.log.iter().filter(|e| e.rv > rv && e.type_id == t.id()) {
                    if let Some((kind, obj)) = translate(e, &sel, ns.as_deref()) {
                        initial.push(line(kind, &obj));
                    }
                }
            }
            // No resourceVersion: the current state as ADDED events, then changes.
            None => {
                for obj in store.list(t, ns.as_deref()).into_iter().filter(|o| sel.matches(o)) {
                    initial.push(line("ADDED", &obj));
                }
            }
        }
        (initial, live, store.rv)
    };
    let type_id = t.id();
    let stream = async_stream(move |tx| async move {
        for chunk in initial.drain(..) {
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                event = live.recv() => match event {
                    Ok(e) if e.rv <= last || e.type_id != type_id => {}
                    Ok(e) => {
                        if let Some((kind, mut obj)) = translate(&e, &sel, ns.as_deref()) {
                            obj["apiVersion"] = json!(api_version);
                            if tx.send(Ok(line(kind, &obj))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let gone = ApiError::new(410, "Expired", "the watch fell behind");
                        let _ = tx.send(Ok(line("ERROR", &gone.status()))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

type Chunk = Result<Bytes, std::io::Error>;

/// A stream fed by a task: the task ends when the client goes away.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Chunk> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Chunk>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
