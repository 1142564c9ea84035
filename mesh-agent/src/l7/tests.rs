//! The calling side's L7 pipeline on a fake data plane: a config written here (no controller), no eBPF capture
//! (a fake `Steering`), no second agent (backends are plaintext HTTP servers on loopback addresses, reached from
//! the test's own netns as a pod's connections would be). A loopback connection stands in for the pod's
//! connection to the Service, and is served by `outbound::serve` exactly as the agent serves one.
//!
//! Opening sockets "from the pod" enters its netns and marks them, which needs root: without it these tests
//! say so and pass, except under `CI=true`, where they fail.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_common::config::NodeConfig;
use tokio::net::{TcpListener, TcpStream};

use crate::dataplane::{DataPlane, Handles};
use crate::netns::NetNs;
use crate::pod::PodContext;
use crate::snapshot::Snapshot;
use crate::socket::Steering;

const SERVICE_IP: &str = "10.96.7.1";

struct NoCapture;

impl Steering for NoCapture {
    fn take_original_destination(&self, _: u64, _: SocketAddr) -> Option<SocketAddr> {
        None
    }
    fn announce_agent_connect(&self, _: SocketAddr, _: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn forget_agent_connect(&self, _: SocketAddr) {}
}

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "the L7 pipeline tests need root under CI=true");
        eprintln!("skipped: opening sockets from a pod's netns needs root");
    }
    root
}

fn data_plane(yaml: &str) -> DataPlane {
    let metrics = crate::metrics::Metrics::new(crate::capture::Counters::default, false);
    let telemetry = crate::telemetry::Telemetry::default();
    let sinks = crate::telemetry::Sinks {
        traffic: metrics.traffic.clone(),
        exporters: telemetry.exporters,
        node: "node-1".into(),
    };
    // The trigger is dropped: this data plane never drains.
    let (_, drain) = crate::drain::channel();
    let limits = crate::limits::Limits {
        header_timeout: Duration::from_secs(5),
        max_connections_per_pod: 100,
        hbone_idle_timeout: Duration::from_secs(60),
    };
    let handles = Handles {
        node: "node-1".into(),
        metrics,
        secrets: None,
        pool: crate::hbone::client::Pool::new(limits.hbone_idle_timeout),
        tunnels: Default::default(),
        l7: Default::default(),
        sinks,
        limits,
        drain,
        steering: Arc::new(NoCapture),
    };
    DataPlane::new(handles, Snapshot::new(NodeConfig::from_yaml(yaml).expect("test config")))
}

/// A backend on `ip`: answers `name` (and the path it saw); `/flaky` answers 503 on its first hit, `/slow`
/// after two seconds. Counts hits by path.
struct Backend {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Backend {
    async fn start(ip: &str, name: &'static str) -> Backend {
        let listener = TcpListener::bind((ip, 0)).await.expect("loopback address");
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Default::default();
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let hits = counted.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let hits = hits.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let n = {
                            let mut hits = hits.lock().unwrap();
                            let n = hits.entry(path.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        if path == "/slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let status = if path == "/flaky" && n == 1 { 503 } else { 200 };
                        let body = Full::new(Bytes::from(format!("{name} {path}")));
                        Ok::<_, Infallible>(Response::builder().status(status).body(body).unwrap())
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc));
            }
        });
        Backend { addr, hits }
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// Two backend Services behind `web` with an HTTPRoute: `/v2` to v2, `/only-v1` to v1 (the route has no
/// catch-all, so other paths match nothing), retries on 503, a 500 ms request timeout.
fn config(v1: &Backend, v2: &Backend) -> String {
    let service = |name: &str, ip: &str, backend: Option<&Backend>| match backend {
        Some(b) => format!(
            "  - {{namespace: shop, name: {name}, ips: [{ip}], ports: [{{name: http, port: 80, targetPort: {}}}], endpoints: [{{ip: {}}}]}}\n",
            b.addr.port(),
            b.addr.ip()
        ),
        None => format!("  - {{namespace: shop, name: {name}, ips: [{ip}], ports: [{{name: http, port: 80}}]}}\n"),
    };
    format!(
        "services:\n{}{}{}routes:\n  - {{namespace: shop, name: web, kind: HTTPRoute, parents: [{{namespace: shop, name: web}}], rules: [\n      {{matches: [{{path: {{type: PathPrefix, value: /v2}}}}], backends: [{{service: {{namespace: shop, name: v2}}, weight: 1}}]}},\n      {{matches: [{{path: {{type: PathPrefix, value: /only-v1}}}}, {{path: {{type: Exact, value: /flaky}}}}, {{path: {{type: Exact, value: /slow}}}}],\n       backends: [{{service: {{namespace: shop, name: v1}}, weight: 1}}], retry: {{attempts: 2, codes: [503]}}, timeouts: {{requestMs: 500}}}}]}}\n",
        service("web", SERVICE_IP, None),
        service("v1", "10.96.7.2", Some(v1)),
        service("v2", "10.96.7.3", Some(v2)),
    )
}

/// A pod connection to the Service, served by the pipeline; the pod's HTTP/1.1 client on it.
async fn connect(dp: &DataPlane) -> PodClient {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (conn, peer) = listener.accept().await.unwrap();
    let pod = Arc::new(PodContext::for_test(NetNs::current().unwrap(), "default", "client", &["127.0.0.1"]));
    let config = dp.config();
    let (service, port) = config.service_by_address(SERVICE_IP.parse().unwrap(), 80).expect("the Service");
    let (service, port, dp) = (service.clone(), port.clone(), dp.clone());
    tokio::spawn(async move {
        let handed_back = super::outbound::serve(conn, peer, pod, dp, &service, &port).await;
        assert!(handed_back.is_none(), "HTTP is served to its end, not handed back");
    });
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client)).await.unwrap();
    tokio::spawn(connection);
    sender
}

type PodClient = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Two backends, the data plane routing to them, and a pod connection served by it; `None` without root.
async fn setup() -> Option<(Backend, Backend, DataPlane, PodClient)> {
    if !privileged() {
        return None;
    }
    let (v1, v2) = (Backend::start("127.0.0.2", "v1").await, Backend::start("127.0.0.3", "v2").await);
    let dp = data_plane(&config(&v1, &v2));
    let pod = connect(&dp).await;
    Some((v1, v2, dp, pod))
}

async fn get(sender: &mut PodClient, path: &str) -> (StatusCode, String) {
    sender.ready().await.unwrap();
    let request = Request::get(path).header("host", "web.shop").body(Empty::new()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await.unwrap().unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn routes_pick_the_backend_by_path_and_a_path_no_rule_matches_gets_404() {
    let Some((v1, v2, _dp, mut pod)) = setup().await else { return };
    assert_eq!(get(&mut pod, "/v2/items").await, (StatusCode::OK, "v2 /v2/items".into()));
    assert_eq!(get(&mut pod, "/only-v1/a").await, (StatusCode::OK, "v1 /only-v1/a".into()));
    // The connection keeps serving after the agent's own answer.
    assert_eq!(get(&mut pod, "/elsewhere").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&mut pod, "/v2/again").await.0, StatusCode::OK);
    assert_eq!((v1.hits("/elsewhere"), v2.hits("/elsewhere")), (0, 0), "nothing reached a backend");
}

#[tokio::test]
async fn a_503_is_retried_and_a_slow_backend_hits_the_request_timeout() {
    let Some((v1, _v2, _dp, mut pod)) = setup().await else { return };
    assert_eq!(get(&mut pod, "/flaky").await, (StatusCode::OK, "v1 /flaky".into()));
    assert_eq!(v1.hits("/flaky"), 2, "the 503 was retried once");
    let started = Instant::now();
    assert_eq!(get(&mut pod, "/slow").await.0, StatusCode::GATEWAY_TIMEOUT);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500), "{waited:?}");
}

#[tokio::test]
async fn a_config_swapped_between_requests_applies_to_the_next_request_on_the_same_connection() {
    let Some((v1, v2, dp, mut pod)) = setup().await else { return };
    assert_eq!(get(&mut pod, "/v2/x").await.1, "v2 /v2/x");
    // Both routes now lead to v1: the connection's cached route table belongs to the old snapshot.
    let swapped = config(&v1, &v2).replace("name: v2}, weight: 1", "name: v1}, weight: 1");
    dp.replace_config(Snapshot::new(NodeConfig::from_yaml(&swapped).unwrap()));
    assert_eq!(get(&mut pod, "/v2/x").await.1, "v1 /v2/x");
}
