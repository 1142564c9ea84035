//! The admin API and the metrics endpoint (`--metrics`), plain HTTP/1.1 served by hyper. JSON field names are
//! stable; see docs/admin-api.md. The admin API is served twice: read-only on node loopback (`--admin`, default
//! 127.0.0.1:15000), which every host-network pod of the node can reach, and in full — `POST /quitquitquit` and
//! `POST /logging` too — on a Unix socket only root on the node can open (`<state dir>/admin.sock`, mode 0600).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::metrics::Naming;
use crate::scrape;
use crate::state::AgentState;

type Reply = Response<Full<Bytes>>;
/// A synchronous router: every endpoint here answers from in-memory state.
pub type Routes = Arc<dyn Fn(&Request<Incoming>) -> Reply + Send + Sync>;

/// Serves `route` on every connection accepted from `listener`.
pub async fn serve_http(listener: TcpListener, route: Routes) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve_connection(stream, route.clone()),
            Err(e) => accept_failed(e).await,
        }
    }
}

/// [`serve_http`] on a Unix socket.
pub async fn serve_unix(listener: UnixListener, route: Routes) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => serve_connection(stream, route.clone()),
            Err(e) => accept_failed(e).await,
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "admin accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S, route: Routes) {
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let reply = route(&req);
            async move { Ok::<_, Infallible>(reply) }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
        {
            tracing::debug!(error = %e, "admin connection error");
        }
    });
}

/// What an admin listener may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Node loopback: views only. A request that would change the agent is refused with where to send it.
    ReadOnly { socket: std::path::PathBuf },
    /// The root-only Unix socket: views and changes.
    Full,
}

/// The admin socket's place in the agent's state directory.
pub fn socket_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("admin.sock")
}

/// Binds the admin socket at `path` (a stale one from an earlier agent is replaced), readable and writable by
/// its owner, root, only.
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn refuse_change(socket: &std::path::Path) -> Reply {
    let body = format!(
        "changes go through the admin socket, root on the node only: curl --unix-socket {} -X POST http://agent<path>\n",
        socket.display()
    );
    reply(StatusCode::FORBIDDEN, "text/plain", body)
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn json(value: &impl Serialize) -> Reply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDump<'a> {
    node: &'a str,
    config: &'a mesh_common::config::NodeConfig,
    workloads: Vec<crate::pod::WorkloadView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CertsDump {
    /// Whether a CA is configured (otherwise all traffic is plaintext).
    mtls: bool,
    certificates: Vec<crate::identity::manager::CertView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    enrolled_pods: usize,
    outbound_redirected: u64,
    outbound_excluded: u64,
    inbound_steered: u64,
    inbound_no_listener: u64,
    original_destination_recorded: u64,
    /// Connections being proxied now.
    active_connections: usize,
    hbone_tunnels: usize,
    spans_exported: u64,
    spans_dropped: u64,
}

/// One Service as `/services` shows it: its config, and the balancer's live view of its endpoints once this
/// agent has sent traffic to it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceView {
    namespace: String,
    name: String,
    ips: Vec<std::net::IpAddr>,
    ports: Vec<mesh_common::config::ServicePort>,
    endpoints: Vec<mesh_common::config::Endpoint>,
    /// `None` until the agent has routed a request or connection to the Service.
    balancing: Option<Vec<crate::l7::destination::EndpointView>>,
}

/// A pod the config places on this node, in the mesh, that no CNI ADD enrolled.
#[derive(Serialize)]
struct Uncaptured {
    namespace: String,
    name: String,
    ips: Vec<std::net::IpAddr>,
}

/// Meshed workloads of this node running uncaptured: pods that started before nodemesh was installed (the CNI
/// plugin never saw them start, and the agent cannot capture a running pod's connections in place) — they
/// need a restart. A pod gets its addresses only after its ADD, so one with addresses and no enrollment is no
/// race with a starting pod.
fn uncaptured(state: &AgentState) -> Vec<Uncaptured> {
    let config = state.config();
    let pods = state.pods();
    let enrolled: std::collections::BTreeSet<(&str, &str)> =
        pods.values().map(|p| (p.pod.net.namespace.as_str(), p.pod.net.name.as_str())).collect();
    config
        .workloads
        .iter()
        .filter(|w| w.node == state.node() && !w.ips.is_empty())
        .filter(|w| !config.excluded_pods.contains(&format!("{}/{}", w.namespace, w.name)))
        .filter(|w| !enrolled.contains(&(w.namespace.as_str(), w.name.as_str())))
        .map(|w| Uncaptured { namespace: w.namespace.clone(), name: w.name.clone(), ips: w.ips.clone() })
        .collect()
}

fn services(state: &AgentState) -> Vec<ServiceView> {
    let config = state.config();
    let known = state.l7().destinations.known();
    config
        .services
        .iter()
        .map(|s| ServiceView {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            ips: s.ips.clone(),
            ports: s.ports.clone(),
            endpoints: s.endpoints.clone(),
            balancing: known
                .iter()
                .find(|d| d.namespace == s.namespace && d.name == s.name)
                .map(|d| d.endpoint_views()),
        })
        .collect()
}

#[derive(Serialize)]
struct LogLevels {
    levels: Option<String>,
}

/// `GET /logging`: the log directives in force; `POST /logging?level=DIRECTIVES`: new ones (400 when invalid).
fn logging(req: &Request<Incoming>) -> Reply {
    if req.method() == Method::POST {
        let level = req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "level").map(|(_, v)| v.into_owned())
        });
        let Some(level) = level else {
            return reply(StatusCode::BAD_REQUEST, "text/plain", "POST /logging?level=<RUST_LOG directives>\n");
        };
        if let Err(e) = crate::logging::set(&level) {
            return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"));
        }
    } else if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or POST\n");
    }
    json(&LogLevels { levels: crate::logging::current() })
}

pub fn admin_routes(state: AgentState, access: Access) -> Routes {
    Arc::new(move |req| {
        let changes = req.method() != Method::GET && matches!(req.uri().path(), "/logging" | "/quitquitquit");
        if let (Access::ReadOnly { socket }, true) = (&access, changes) {
            return refuse_change(socket);
        }
        if req.uri().path() == "/logging" {
            return logging(req);
        }
        if req.uri().path() == "/quitquitquit" {
            if req.method() != Method::POST {
                return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST /quitquitquit\n");
            }
            state.request_quit();
            return reply(StatusCode::OK, "text/plain", "draining, then exiting\n");
        }
        if req.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is supported here\n");
        }
        match req.uri().path() {
            "/workloads" => json(&state.workloads()),
            "/config_dump" => {
                let config = state.config();
                json(&ConfigDump { node: state.node(), config: &config, workloads: state.workloads() })
            }
            "/stats" => {
                let c = state.capture().counters();
                json(&Stats {
                    enrolled_pods: state.pods().len(),
                    outbound_redirected: c.outbound_redirected,
                    outbound_excluded: c.outbound_skipped_excluded,
                    inbound_steered: c.inbound_steered,
                    inbound_no_listener: c.inbound_no_listener,
                    original_destination_recorded: c.orig_dst_recorded,
                    active_connections: state.active_connections(),
                    hbone_tunnels: state.tunnels().list().len(),
                    spans_exported: state.telemetry().exporters.exported.load(std::sync::atomic::Ordering::Relaxed),
                    spans_dropped: state.telemetry().exporters.dropped.load(std::sync::atomic::Ordering::Relaxed),
                })
            }
            "/certs" => json(&CertsDump {
                mtls: state.secrets().is_some(),
                certificates: state.secrets().map(|s| s.certs()).unwrap_or_default(),
            }),
            "/connections" => json(&state.metrics().traffic.connections()),
            "/tunnels" => json(&state.tunnels().list()),
            "/services" => json(&services(&state)),
            "/uncaptured" => json(&uncaptured(&state)),
            "/healthz/ready" => readiness(&state),
            "/server_info" => json(&ServerInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION"),
                ready: state.ready(),
                active_connections: state.active_connections(),
            }),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /workloads, /uncaptured, /services, /config_dump, /certs, /connections, /tunnels, /stats, /server_info, /logging, /healthz/ready\n",
            ),
        }
    })
}

/// Which agent process answers: during an upgrade two run on the node, and the host ports move from one to the
/// other (`crate::handover`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServerInfo {
    pid: u32,
    version: &'static str,
    ready: bool,
    active_connections: usize,
}

fn readiness(state: &AgentState) -> Reply {
    if state.ready() {
        reply(StatusCode::OK, "text/plain", "ready\n")
    } else {
        reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
    }
}

const EXPOSITION: &str = "text/plain; version=0.0.4";

/// `/metrics` with `text` (the exposition), 404 elsewhere: for servers with one registry.
pub fn metrics_reply(req: &Request<Incoming>, text: String) -> Reply {
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, EXPOSITION, text),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n"),
    }
}

pub fn metrics_routes(state: AgentState) -> Routes {
    Arc::new(move |req| {
        let metrics = state.metrics();
        match req.uri().path() {
            "/metrics" => reply(StatusCode::OK, EXPOSITION, metrics.encode(Naming::Native, scrape::families(&state))),
            // For the kubelet's probes: the admin API listens on the node's loopback only.
            "/healthz/ready" => readiness(&state),
            // Liveness: the runtime answers. Not readiness (waiting for config or draining is alive).
            "/healthz/live" => reply(StatusCode::OK, "text/plain", "live\n"),
            "/stats/prometheus" if metrics.istio_names => {
                reply(StatusCode::OK, EXPOSITION, metrics.encode(Naming::Istio, scrape::families(&state)))
            }
            "/stats/prometheus" => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "Istio's metric names are served with --metrics-compat istio; native names are at /metrics\n",
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n"),
        }
    })
}
