//! Observability through the mesh: a client pod on node 1 calls `reviews` (a Deployment's pod on node 2) over
//! HTTP and `ratings` over opaque TCP; both agents report Istio-labelled metrics (native and Istio names,
//! checked by promtool), export spans to an OTLP receiver in the test, write JSON access logs, and show the
//! traffic in their admin API.

use std::path::Path;
use std::process::Command;

use mesh_tests::app::{self, Server, service};
use mesh_tests::cluster::{CONTROLLER_IP, METRICS};
use mesh_tests::otlp::Receiver;
use mesh_tests::{Cluster, Pod, addr, cluster, metric_sum, sys, wait_for};
use serde_json::Value;

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const OTLP_PORT: u16 = 4317;

const SERVERS: [Server<'static>; 2] = [
    Server {
        node: 1,
        name: "reviews",
        labels: "{app: reviews, version: v2}",
        args: &[],
        owner: Some("reviews-v2-5d8f7c9b4"),
    },
    Server { node: 1, name: "ratings", labels: "{app: ratings}", args: &["tcp"], owner: None },
];

fn objects() -> String {
    let telemetry = format!(
        "---\napiVersion: nodemesh.io/v1alpha1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: nodemesh-system}}\n\
         spec:\n  accessLogging: {{enabled: true}}\n  tracing: {{collector: '{CONTROLLER_IP}:{OTLP_PORT}', samplingPercentage: 100}}\n"
    );
    let route = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: shop}\n\
                 spec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 80}]\n  \
                 rules: [{backendRefs: [{name: reviews, port: 80}]}]\n";
    [
        service("reviews", "10.96.0.20", "{app: reviews}", ""),
        route.to_string(),
        service("ratings", "10.96.0.21", "{app: ratings}", ""),
        telemetry,
    ]
    .concat()
}

/// The labels every request from the client to reviews carries, on both reporters.
fn call_labels(reporter: &'static str, code: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("reporter", reporter),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", "spiffe://cluster.local/ns/default/sa/client-sa"),
        ("source_app", "client"),
        ("source_version", "v1"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", "spiffe://cluster.local/ns/shop/sa/reviews-sa"),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("destination_service", "reviews.shop.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "shop"),
        ("request_protocol", "http"),
        ("response_code", code),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
}

fn scrape(c: &Cluster, node: usize, path: &str) -> String {
    let (status, body) = sys::http_get(&c.nodes[node].netns, METRICS.parse().unwrap(), path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

fn access_log(c: &Cluster, node: usize) -> Vec<Value> {
    c.log_lines(&format!("agent-n{}", node + 1))
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"].is_string())
        .collect()
}

fn get(c: &Cluster, client: &Pod, args: &[&str]) -> Value {
    app::get(c, Path::new(HTTP), client, args)
}

#[test]
fn metrics_traces_access_logs_and_admin_api_show_the_traffic() {
    let mut c = cluster!(2);
    let receiver = Receiver::start(&c.fabric, addr(CONTROLLER_IP.parse::<std::net::Ipv4Addr>().unwrap(), OTLP_PORT))
        .expect("OTLP receiver");
    let client = app::mesh(&mut c, Path::new(HTTP), &SERVERS, &objects(), 1, &["--metrics-compat", "istio"]);
    wait_for("Telemetry on both nodes", || c.config_len(0, "telemetry") == 1 && c.config_len(1, "telemetry") == 1);

    // HTTP: five plain requests, one failing, one traced.
    let r = get(&c, &client, &["http://10.96.0.20/", "-n", "5"]);
    assert_eq!(r["statuses"]["200"], 5, "{r}");
    let r = get(&c, &client, &["http://10.96.0.20/fail", "-H", "x-test-status: 503"]);
    assert_eq!(r["statuses"]["503"], 1, "{r}");
    let traceparent = format!("traceparent: 00-{TRACE_ID}-{CALLER_SPAN}-01");
    let r = get(&c, &client, &["http://10.96.0.20/traced", "-H", &traceparent, "-H", "tracestate: vendor=kept"]);
    assert_eq!(r["statuses"]["200"], 1, "{r}");
    let seen = &r["last"]["body"]["headers"];
    let app_traceparent = seen["traceparent"].as_str().unwrap().to_string();
    assert!(app_traceparent.starts_with(&format!("00-{TRACE_ID}-")), "{app_traceparent}");
    assert!(!app_traceparent.contains(CALLER_SPAN), "each hop has its own span id: {app_traceparent}");
    assert_eq!(seen["tracestate"], "vendor=kept");
    let request_id = seen["x-request-id"].as_str().expect("x-request-id added").to_string();
    assert_eq!(request_id.len(), 36);

    // Metrics: the exact label set, counted once per request on each reporter, in both naming schemes.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        wait_for("request metrics", || {
            metric_sum(&scrape(&c, node, "/metrics"), "nodemesh_requests_total", &call_labels(reporter, "200")) == 6.0
        });
        let native = scrape(&c, node, "/metrics");
        assert_eq!(metric_sum(&native, "nodemesh_requests_total", &call_labels(reporter, "503")), 1.0);
        let ok = call_labels(reporter, "200");
        assert_eq!(metric_sum(&native, "nodemesh_request_duration_seconds_count", &ok), 6.0);
        assert_eq!(metric_sum(&native, "nodemesh_response_size_bytes_count", &ok), 6.0);
        assert!(metric_sum(&native, "nodemesh_response_size_bytes_sum", &ok) > 6.0 * 50.0, "JSON echo bodies");
        let (passed, said) = sys::promtool_check(&native).unwrap();
        assert!(passed, "promtool on node {node}'s /metrics:\n{said}");

        let istio = scrape(&c, node, "/stats/prometheus");
        assert_eq!(metric_sum(&istio, "istio_requests_total", &ok), 6.0);
        assert_eq!(metric_sum(&istio, "istio_request_duration_milliseconds_count", &ok), 6.0);
        let native_sum = metric_sum(&native, "nodemesh_request_duration_seconds_sum", &ok);
        let istio_sum = metric_sum(&istio, "istio_request_duration_milliseconds_sum", &ok);
        assert!(istio_sum >= native_sum * 1000.0 * 0.999, "milliseconds: {istio_sum} vs {native_sum} s");
        // Istio's own names break one promtool lint (milliseconds are not a base unit); nothing else may fail.
        let (_, said) = sys::promtool_check(&istio).unwrap();
        let problems: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            problems.iter().all(|l| l.starts_with("istio_request_duration_milliseconds") && l.contains("base unit")),
            "promtool on node {node}'s /stats/prometheus:\n{said}"
        );
        for name in ["process_resident_memory_bytes", "process_open_fds", "nodemesh_runtime_tasks"] {
            assert!(metric_sum(&native, name, &[]) > 0.0, "{name}");
        }
        assert!(metric_sum(&native, "nodemesh_ebpf_map_entries", &[("map", "ENROLLED")]) >= 1.0);
    }

    // The controller's metrics.
    let controller = addr(CONTROLLER_IP.parse::<std::net::Ipv4Addr>().unwrap(), 15014);
    let (status, text) = sys::http_get(&c.fabric, controller, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric_sum(&text, "nodemesh_controller_connected_agents", &[]), 2.0, "{text}");
    let signed = metric_sum(&text, "nodemesh_controller_certificate_requests_total", &[("result", "signed")]);
    assert_eq!(signed, 3.0, "one certificate per identity: client, reviews, ratings");
    assert_eq!(metric_sum(&text, "nodemesh_controller_objects", &[("kind", "Telemetry")]), 1.0);
    let (passed, said) = sys::promtool_check(&text).unwrap();
    assert!(passed, "promtool on the controller:\n{said}");

    // Spans: one per agent for the traced request, chained caller → source agent → destination agent → app.
    wait_for("both spans of the traced request", || {
        receiver.spans().iter().filter(|s| hex(&s.span.trace_id) == TRACE_ID).count() == 2
    });
    let spans: Vec<_> = receiver.spans().into_iter().filter(|s| hex(&s.span.trace_id) == TRACE_ID).collect();
    let client_span = spans.iter().find(|s| s.service == "client.default").expect("the source agent's span");
    let server_span = spans.iter().find(|s| s.service == "reviews.shop").expect("the destination agent's span");
    assert_eq!(hex(&client_span.span.parent_span_id), CALLER_SPAN);
    assert_eq!(server_span.span.parent_span_id, client_span.span.span_id);
    assert!(app_traceparent.contains(&hex(&server_span.span.span_id)), "the app is the destination span's child");
    assert_eq!(client_span.span.kind, 3, "CLIENT");
    assert_eq!(server_span.span.kind, 2, "SERVER");

    // Access logs: the traced request on both agents, as JSON with the expected fields.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let lines = access_log(&c, node);
        let line = lines
            .iter()
            .find(|l| l["kind"] == "http" && l["traceId"] == TRACE_ID)
            .unwrap_or_else(|| panic!("no access-log line for the traced request on node {node}: {lines:?}"));
        assert_eq!(line["reporter"], reporter);
        assert_eq!(line["path"], "/traced");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["responseCode"], 200);
        assert_eq!(line["responseFlags"], "-");
        // The calling agent routes; the destination agent only serves.
        assert_eq!(line["route"], if reporter == "source" { "shop/reviews".into() } else { Value::Null });
        assert_eq!(line["requestId"], request_id.as_str());
        assert_eq!(line["source"]["workload"], "client");
        assert_eq!(line["destination"]["workload"], "reviews-v2");
        assert_eq!(line["destinationService"], "reviews.shop.svc.cluster.local");
        assert_eq!(line["connectionSecurityPolicy"], "mutual_tls");
        assert!(line["durationMs"].as_f64().is_some() && line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }

    // Opaque TCP to ratings: a live connection in /connections with identities and bytes, then the TCP metrics
    // and an access-log line when it ends.
    let held =
        c.client_start(&client, addr([10, 96, 0, 21], 80), 64 * 1024, &[("MESH_TESTBIN_HOLD_MS", "2000")]).unwrap();
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        wait_for("the live connection in /connections", || {
            c.admin(node, "/connections").unwrap().as_array().unwrap().iter().any(|conn| {
                conn["flow"]["reporter"] == reporter
                    && conn["flow"]["source"]["workload"] == "client"
                    && conn["flow"]["destination"]["workload"] == "ratings"
                    && conn["flow"]["destination"]["principal"] == "spiffe://cluster.local/ns/shop/sa/ratings-sa"
                    // The test server greets first; the client holds its bytes back while the test looks.
                    && conn["bytesSent"].as_u64() > Some(0)
            })
        });
    }
    let report = held.wait().unwrap();
    assert!(report.success, "{:?} {}", report.json, report.stderr);
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let tcp = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "ratings"),
            ("destination_service", "ratings.shop.svc.cluster.local"),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls"),
        ];
        wait_for("TCP metrics", || {
            metric_sum(&scrape(&c, node, "/metrics"), "nodemesh_tcp_connections_closed_total", &tcp) == 1.0
        });
        let native = scrape(&c, node, "/metrics");
        assert_eq!(metric_sum(&native, "nodemesh_tcp_connections_opened_total", &tcp), 1.0);
        assert!(metric_sum(&native, "nodemesh_tcp_received_bytes_total", &tcp) >= 65536.0);
        assert!(metric_sum(&native, "nodemesh_tcp_sent_bytes_total", &tcp) >= 65536.0, "echoed back");
        assert_eq!(metric_sum(&scrape(&c, node, "/stats/prometheus"), "istio_tcp_connections_opened_total", &tcp), 1.0);
        let lines = access_log(&c, node);
        let line = lines
            .iter()
            .find(|l| l["kind"] == "tcp" && l["destination"]["workload"] == "ratings")
            .unwrap_or_else(|| panic!("no TCP access-log line on node {node}"));
        assert_eq!(line["reporter"], reporter);
        assert!(line["bytesReceived"].as_u64() >= Some(65536), "{line}");
    }

    // The admin API agrees with the state.
    let certs = c.admin(0, "/certs").unwrap();
    let cert = certs["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["identity"] == "spiffe://cluster.local/ns/default/sa/client-sa")
        .expect("the client's certificate")
        .clone();
    assert!(cert["serial"].as_str().is_some_and(|s| !s.is_empty()));
    let not_after = cert["notAfter"].as_i64().unwrap();
    let expiry = metric_sum(
        &scrape(&c, 0, "/metrics"),
        "nodemesh_certificate_expiration_timestamp_seconds",
        &[("identity", "spiffe://cluster.local/ns/default/sa/client-sa")],
    );
    assert_eq!(expiry as i64, not_after);
    let stats = c.admin(0, "/stats").unwrap();
    assert_eq!(stats["enrolledPods"], 1);
    wait_for("spans exported", || c.admin(0, "/stats").unwrap()["spansExported"].as_u64() >= Some(7));
    assert_eq!(c.admin(0, "/workloads").unwrap()[0]["name"], "client");
    let services = c.admin(0, "/services").unwrap();
    assert!(services.as_array().unwrap().iter().any(|s| s["name"] == "reviews"));
    let dump = c.admin(0, "/config_dump").unwrap();
    assert_eq!(dump["config"]["telemetry"][0]["name"], "mesh-default");
    let tunnels = c.admin(0, "/tunnels").unwrap();
    assert!(
        tunnels.as_array().unwrap().iter().any(|t| t["peerIdentity"] == "spiffe://cluster.local/ns/shop/sa/reviews-sa")
    );
    drop(receiver);
    meshctl_reads_the_agents(&c, &client);
}

/// `meshctl proxy-config`, `check --agent` and `stat` against the live agents (run in the nodes' netns, where
/// the admin API and metrics listen on loopback).
fn meshctl_reads_the_agents(c: &Cluster, client: &Pod) {
    let meshctl = mesh_tests::cluster::built_binary("meshctl").unwrap();
    let run = |node: usize, args: &[&str]| {
        let out = sys::output_in_netns(&c.nodes[node].netns, Command::new(&meshctl).args(args)).unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, table) = run(0, &["proxy-config", "workloads"]);
    assert_eq!(code, 0, "{table}");
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("default") && l.contains("client") && l.contains("/sa/client-sa")),
        "{table}"
    );
    let (code, json) = run(0, &["proxy-config", "services", "-o", "json"]);
    assert_eq!(code, 0, "{json}");
    let services: Value = serde_json::from_str(&json).unwrap();
    assert!(services.as_array().unwrap().iter().any(|s| s["name"] == "reviews" && s["ips"][0] == "10.96.0.20"));
    let (code, yaml) = run(0, &["proxy-config", "certs", "-o", "yaml"]);
    assert_eq!(code, 0, "{yaml}");
    let certs: Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(certs[0]["identity"], "spiffe://cluster.local/ns/default/sa/client-sa");
    let (code, routes) = run(0, &["proxy-config", "routes"]);
    assert_eq!(code, 0, "{routes}");
    assert!(
        routes.lines().any(|l| l.starts_with("shop") && l.contains("reviews") && l.contains("shop/reviews")),
        "{routes}"
    );
    let (code, said) = run(0, &["proxy-config", "dump", "--agent", "127.0.0.1:1"]);
    assert_eq!(code, 1, "an unreachable agent is an error: {said}");
    let (_runtime, _api, kubeconfig) = meshctl_reaches_agents_through_kubernetes(c, &meshctl);

    let (code, said) = run(0, &["check", "--no-kubernetes", "--agent", "127.0.0.1:15000"]);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("all checks passed"), "{said}");
    let (code, said) = run(0, &["check", "--no-kubernetes", "--agent", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{said}");
    assert!(said.lines().any(|l| l.starts_with("FAIL") && l.contains("agent 127.0.0.1:1")), "{said}");

    // stat over a 3 s window while the client sends 40 requests per second for 4 s: once from node 2 with its
    // metrics endpoint, once with no endpoint at all, reading every agent through the Kubernetes API.
    let args = ["stat", "shop/reviews-v2", "--window", "3s", "-o", "json"];
    let (netns, exe) = (c.nodes[1].netns.clone(), meshctl.clone());
    let direct = std::thread::spawn(move || {
        let args = [&args[..], &["--metrics", "127.0.0.1:15020"]].concat();
        sys::output_in_netns(&netns, Command::new(exe).args(args)).unwrap()
    });
    let exe = meshctl.clone();
    let through_api =
        std::thread::spawn(move || Command::new(exe).args(args).env("KUBECONFIG", kubeconfig).output().unwrap());
    c.run_in(client, Path::new(HTTP), &["load", "http://10.96.0.20/", "40", "4"]).unwrap();
    for out in [direct.join().unwrap(), through_api.join().unwrap()] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!((row["namespace"].as_str(), row["workload"].as_str()), (Some("shop"), Some("reviews-v2")));
        assert_eq!(row["successRate"], 1.0, "{row}");
        let rps = row["rps"].as_f64().unwrap();
        assert!((25.0..=55.0).contains(&rps), "about 40 rps: {row}");
        assert!(row["latencyP50Ms"].as_f64().is_some_and(|ms| ms > 0.0), "{row}");
    }
}

/// `proxy-config --node`: the agent pod of a node found through the Kubernetes API (the fake one, whose
/// port-forward reaches the node's loopback, as the kubelet does for a hostNetwork pod). Returns the API server
/// (alive while its runtime is) and its kubeconfig.
fn meshctl_reaches_agents_through_kubernetes(
    c: &Cluster,
    meshctl: &Path,
) -> (tokio::runtime::Runtime, mesh_tests::fakeapi::FakeApi, std::path::PathBuf) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let api = runtime.block_on(async { mesh_tests::fakeapi::FakeApi::spawn() }).unwrap();
    api.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: nodemesh-system}\n").unwrap();
    for (i, node) in c.nodes.iter().enumerate() {
        let pod = format!("nodemesh-agent-{i}");
        api.apply_yaml(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: nodemesh-system, labels: {{app: nodemesh-agent}}}}\n\
             spec: {{nodeName: {}, hostNetwork: true, containers: [{{name: agent, image: nodemesh}}]}}\n",
            node.name
        ))
        .unwrap();
        api.forward_pod("nodemesh-system", &pod, &node.netns);
    }
    let kubeconfig = c.tmp_dir().join("meshctl-kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let run = |args: &[&str]| Command::new(meshctl).args(args).env("KUBECONFIG", &kubeconfig).output().unwrap();
    for (i, node) in c.nodes.iter().enumerate() {
        let out = run(&["proxy-config", "workloads", "--node", &node.name, "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let workloads: Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected = if i == 0 { vec!["client"] } else { vec!["reviews", "ratings"] };
        let mut names: Vec<&str> = workloads.as_array().unwrap().iter().filter_map(|w| w["name"].as_str()).collect();
        names.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(names, expected, "node {}", node.name);
    }
    let out = run(&["proxy-config", "certs", "--node", "no-such-node"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runs on node no-such-node"));
    (runtime, api, kubeconfig)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
