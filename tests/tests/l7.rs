//! L7 through the mesh: real HTTP/1.1, HTTP/2, gRPC and WebSocket clients and servers (hyper, tonic) in pods,
//! agents fed by the controller from Gateway API routes and nodemesh CRDs in its directory. The client pod is on
//! node 1, servers mostly on node 2, so requests cross two agents inside HBONE.

use std::path::Path;

use mesh_tests::app::{self, Server, count, service};
use mesh_tests::{Cluster, Pod, cluster, wait_for};
use serde_json::Value;

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");

fn mesh(c: &mut Cluster, servers: &[Server<'_>], objects: &str, routes: usize) -> Pod {
    app::mesh(c, Path::new(HTTP), servers, objects, routes, &[])
}

fn get(c: &Cluster, client: &Pod, args: &[&str]) -> Value {
    app::get(c, Path::new(HTTP), client, args)
}

fn server_count(c: &Cluster, client: &Pod, url: &str) -> u64 {
    get(c, client, &[url])["last"]["body"]["count"].as_u64().unwrap()
}

const WEB_SERVERS: [Server<'static>; 3] = [
    Server { node: 1, name: "web-v1", labels: "{app: web, version: v1}", args: &[], owner: None },
    Server { node: 1, name: "web-v2", labels: "{app: web, version: v2}", args: &[], owner: None },
    Server { node: 1, name: "shadow", labels: "{app: shadow}", args: &[], owner: None },
];

const WEB_ROUTE: &str = "\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-user, value: beta}]}]
      backendRefs: [{name: web-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api/v2}}]
      backendRefs: [{name: web-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api/v1}}]
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /split}}]
      backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: x-added, value: 'yes'}], remove: [x-secret]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-response, value: modified}]}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /moved}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {hostname: elsewhere.example, statusCode: 301}
    - matches: [{path: {type: PathPrefix, value: /mirrored}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 80}}
      backendRefs: [{name: web-v1, port: 80}]
";

fn web_objects() -> String {
    [
        service("web", "10.96.0.10", "{app: web}", ""),
        service("web-v1", "10.96.0.11", "{app: web, version: v1}", ""),
        service("web-v2", "10.96.0.12", "{app: web, version: v2}", ""),
        service("shadow", "10.96.0.13", "{app: shadow}", ""),
        WEB_ROUTE.to_string(),
    ]
    .concat()
}

/// HTTPRoute matches, weights and filters, over HTTP/1.1 and HTTP/2, with requests crossing two agents in mTLS.
#[test]
fn routes_split_match_rewrite_redirect_and_mirror() {
    let mut c = cluster!(2);
    let client = mesh(&mut c, &WEB_SERVERS, &web_objects(), 1);

    // Canary 90/10 over 400 requests: the v2 share is binomial (mean 40, sd 6); ±20 is over three sd.
    let split = get(&c, &client, &["http://10.96.0.10/split", "-n", "400", "-c", "4"]);
    assert_eq!(count(&split, "statuses", "200"), 400, "{split}");
    let v2 = count(&split, "names", "web-v2");
    assert!((20..=60).contains(&v2), "v2 got {v2} of 400 for weight 10%: {split}");
    // The same over HTTP/2 (h2c from the client), multiplexed.
    let h2 = get(&c, &client, &["http://10.96.0.10/split", "-n", "200", "-c", "8", "--h2"]);
    assert_eq!(count(&h2, "statuses", "200"), 200, "{h2}");
    assert!(count(&h2, "names", "web-v1") > count(&h2, "names", "web-v2"), "{h2}");

    // Header routing of the beta user, path routing of /api/v1 and /api/v2.
    let beta = get(&c, &client, &["http://10.96.0.10/anything", "-n", "20", "-H", "x-user: beta"]);
    assert_eq!(count(&beta, "names", "web-v2"), 20, "{beta}");
    let v1 = get(&c, &client, &["http://10.96.0.10/api/v1/items", "-n", "20"]);
    assert_eq!(count(&v1, "names", "web-v1"), 20, "{v1}");
    let v2 = get(&c, &client, &["http://10.96.0.10/api/v2/items", "-n", "20"]);
    assert_eq!(count(&v2, "names", "web-v2"), 20, "{v2}");
    // The application sees the client pod's own address (preserved through both agents) and HTTP/1.1.
    assert_eq!(v2["last"]["body"]["peer"], client.ipv4.to_string(), "{v2}");
    // Routes attached but none matches: 404 from the agent.
    let none = get(&c, &client, &["http://10.96.0.10/nothing"]);
    assert_eq!(count(&none, "statuses", "404"), 1, "{none}");
    assert_eq!(count(&none, "flags", "NR"), 1, "{none}");

    // URLRewrite and header modifiers, seen by the backend and the client.
    let old = get(&c, &client, &["http://10.96.0.10/old/thing?q=1", "-H", "x-secret: s"]);
    let seen = &old["last"]["body"];
    assert_eq!(seen["path"], "/new/thing", "{old}");
    assert_eq!(seen["query"], "q=1", "{old}");
    assert_eq!(seen["headers"]["host"], "rewritten.example", "{old}");
    assert_eq!(seen["headers"]["x-added"], "yes", "{old}");
    assert!(seen["headers"].get("x-secret").is_none(), "{old}");
    assert_eq!(old["last"]["headers"]["x-response"], "modified", "{old}");

    // RequestRedirect answers from the client's agent.
    let moved = get(&c, &client, &["http://10.96.0.10/moved/a?x=1"]);
    assert_eq!(moved["last"]["status"], 301, "{moved}");
    assert_eq!(moved["last"]["headers"]["location"], "http://elsewhere.example/moved/a?x=1", "{moved}");

    // RequestMirror: the primary answers every request, the shadow gets a copy of each.
    let before = server_count(&c, &client, "http://10.96.0.13/_count");
    let mirrored = get(&c, &client, &["http://10.96.0.10/mirrored", "-n", "10", "-d", "payload"]);
    assert_eq!(count(&mirrored, "names", "web-v1"), 10, "{mirrored}");
    let mut copies = 0;
    for _ in 0..100 {
        copies = server_count(&c, &client, "http://10.96.0.13/_count") - before;
        if copies >= 10 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        copies,
        10,
        "the shadow got {copies} copies of 10 requests; routes: {}",
        c.admin(0, "/config_dump").unwrap()["config"]["routes"]
    );
}

const RESILIENCE_SERVERS: [Server<'static>; 7] = [
    Server { node: 1, name: "retry", labels: "{app: retry}", args: &[], owner: None },
    Server { node: 1, name: "flaky", labels: "{app: flaky}", args: &["503"], owner: None },
    Server { node: 1, name: "slow", labels: "{app: slow}", args: &[], owner: None },
    Server { node: 1, name: "pool-good", labels: "{app: pool}", args: &[], owner: None },
    Server { node: 1, name: "pool-bad", labels: "{app: pool}", args: &["503"], owner: None },
    Server { node: 0, name: "near", labels: "{app: sticky}", args: &[], owner: None },
    Server { node: 1, name: "far", labels: "{app: sticky}", args: &[], owner: None },
];

fn traffic_policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  targetRef: {{kind: Service, name: {service}}}\n{spec}"
    )
}

fn resilience_objects() -> String {
    let route = |name: &str, rule: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  parentRefs: [{{group: '', kind: Service, name: {name}, port: 80}}]\n  rules:\n{rule}"
        )
    };
    [
        service("retry", "10.96.1.1", "{app: retry}", ""),
        service("flaky", "10.96.1.2", "{app: flaky}", ""),
        service("slow", "10.96.1.3", "{app: slow}", ""),
        service("pool", "10.96.1.4", "{app: pool}", ""),
        service("sticky", "10.96.1.5", "{app: sticky}", ""),
        service("local", "10.96.1.6", "{app: sticky}", ""),
        service("limited", "10.96.1.7", "{app: retry}", ""),
        service("faulty", "10.96.1.8", "{app: retry}", ""),
        route(
            "retry",
            "    - matches: [{path: {type: PathPrefix, value: /timeout}}]\n      timeouts: {request: 300ms}\n      backendRefs: [{name: retry, port: 80}]\n    - timeouts: {backendRequest: 300ms}\n      retry: {attempts: 2, codes: [503], backoff: 10ms}\n      backendRefs: [{name: retry, port: 80}]\n",
        ),
        route("flaky", "    - retry: {attempts: 3, backoff: 1ms}\n      backendRefs: [{name: flaky, port: 80}]\n"),
        traffic_policy("flaky", "flaky", "  retryBudget: {percent: 20, minRetriesPerSecond: 0}\n"),
        traffic_policy("slow", "slow", "  connectionPool: {maxRequests: 1}\n"),
        traffic_policy(
            "pool",
            "pool",
            "  loadBalancer: {algorithm: RoundRobin}\n  outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 2s, maxEjectionPercent: 50}\n",
        ),
        traffic_policy("sticky", "sticky", "  loadBalancer: {algorithm: Maglev, hashKey: {header: x-user}}\n"),
        traffic_policy("local", "local", "  loadBalancer: {algorithm: RoundRobin, localityPreference: true}\n"),
        traffic_policy("limited", "limited", "  rateLimit: {requestsPerSecond: 5, burst: 5}\n"),
        traffic_policy(
            "faulty",
            "faulty",
            "  faultInjection:\n    abort: {httpStatus: 418, percent: 50}\n    delay: {fixedDelay: 300ms, percent: 50}\n",
        ),
    ]
    .concat()
}

/// Retries, timeouts, the retry budget, circuit breaking, outlier detection, consistent hashing, locality, rate
/// limits and fault injection, each from its route or TrafficPolicy.
#[test]
fn resilience_from_routes_and_traffic_policies() {
    let mut c = cluster!(2);
    let client = mesh(&mut c, &RESILIENCE_SERVERS, &resilience_objects(), 2);
    wait_for("traffic policies on node 1", || c.config_len(0, "trafficPolicies") == 7);

    // A backend failing twice with 503 is retried into a 200; failing three times exhausts two retries.
    let saved = get(&c, &client, &["http://10.96.1.1/", "-H", "x-test-fail-first: 2", "-H", "x-test-key: a"]);
    assert_eq!(count(&saved, "statuses", "200"), 1, "{saved}");
    let lost = get(&c, &client, &["http://10.96.1.1/", "-H", "x-test-fail-first: 3", "-H", "x-test-key: b"]);
    assert_eq!(count(&lost, "statuses", "503"), 1, "{lost}");
    // Per-try timeout: the first try hangs for 3 s, the retry after 300 ms answers.
    let slow_first = ["-H", "x-test-slow-first: 1", "-H", "x-test-key: c", "-H", "x-test-delay-ms: 3000"];
    let retried = get(&c, &client, &[&["http://10.96.1.1/"][..], &slow_first].concat());
    assert_eq!(count(&retried, "statuses", "200"), 1, "{retried}");
    assert!(retried["max_ms"].as_f64().unwrap() < 2000.0, "{retried}");
    // Request timeout: 504 after 300 ms, not 3 s.
    let timed_out = get(&c, &client, &["http://10.96.1.1/timeout", "-H", "x-test-delay-ms: 3000"]);
    assert_eq!(count(&timed_out, "statuses", "504"), 1, "{timed_out}");
    assert_eq!(count(&timed_out, "flags", "UT"), 1, "{timed_out}");
    assert!(timed_out["max_ms"].as_f64().unwrap() < 2000.0, "{timed_out}");

    // Sustained failure: 50 requests with 3 retries each would be 200 tries; the 20% budget allows 10 retries.
    let failing = get(&c, &client, &["http://10.96.1.2/", "-n", "50"]);
    assert_eq!(count(&failing, "statuses", "503"), 50, "{failing}");
    let tries = server_count(&c, &client, "http://10.96.1.2/_count");
    assert!((50..=61).contains(&tries), "the flaky backend saw {tries} tries for 50 requests");

    // Circuit breaker (maxRequests 1, no queue): of 8 concurrent slow requests one runs, the rest fail at once.
    let burst = get(
        &c,
        &client,
        &["http://10.96.1.3/", "-n", "8", "-c", "8", "-H", "x-test-delay-ms: 1500", "--slow-ms", "1000"],
    );
    assert!(count(&burst, "flags", "UO") >= 6, "{burst}");
    assert_eq!(count(&burst, "statuses", "503"), count(&burst, "flags", "UO"), "{burst}");
    assert!(burst["slow"].as_u64().unwrap() <= 2, "overflow must be answered at once: {burst}");

    // Outlier detection: after two 503s the bad endpoint is out, the good one takes everything; it comes back
    // when the 2 s ejection is over.
    let first = get(&c, &client, &["http://10.96.1.4/", "-n", "30"]);
    assert!(count(&first, "statuses", "503") <= 3, "{first}");
    assert!(count(&first, "names", "pool-good") >= 27, "{first}");
    // The admin API shows the balancer's view: exactly the bad endpoint is out.
    let dump = c.admin(0, "/config_dump").unwrap();
    let workloads = dump["config"]["workloads"].as_array().unwrap();
    let bad_ip = workloads.iter().find(|w| w["name"] == "pool-bad").unwrap()["ips"][0].clone();
    let services = c.admin(0, "/services").unwrap();
    let pool = services.as_array().unwrap().iter().find(|s| s["name"] == "pool").unwrap();
    let ejected: Vec<&Value> =
        pool["balancing"].as_array().unwrap().iter().filter(|e| e["ejected"] == true).map(|e| &e["ip"]).collect();
    assert_eq!(ejected, [&bad_ip], "{pool}");
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let later = get(&c, &client, &["http://10.96.1.4/", "-n", "6"]);
    assert!(count(&later, "names", "pool-bad") >= 1, "the ejected endpoint must return: {later}");

    // Consistent hashing (Maglev on x-user): each user sticks to one endpoint; users spread over both.
    let mut homes = std::collections::BTreeSet::new();
    for user in 0..12 {
        let r = get(&c, &client, &["http://10.96.1.5/", "-n", "5", "-H", &format!("x-user: user{user}")]);
        let names = r["names"].as_object().unwrap();
        assert_eq!(names.len(), 1, "user{user} moved between endpoints: {r}");
        homes.extend(names.keys().cloned());
    }
    assert_eq!(homes.len(), 2, "12 users all hashed to {homes:?}");
    // Locality preference: the endpoint on the client's own node takes every request.
    let local = get(&c, &client, &["http://10.96.1.6/", "-n", "10"]);
    assert_eq!(count(&local, "names", "near"), 10, "{local}");

    // Rate limit 5/s with a burst of 5: a quick run of 20 gets about 5 through and 429s with retry-after.
    let limited = get(&c, &client, &["http://10.96.1.7/", "-n", "20"]);
    assert!((5..=8).contains(&count(&limited, "statuses", "200")), "{limited}");
    assert_eq!(count(&limited, "statuses", "429"), count(&limited, "flags", "RL"), "{limited}");
    assert_eq!(limited["last"]["headers"]["retry-after"], "1", "{limited}");

    // Faults: abort 418 for half the requests (binomial: 100 ± 30 of 200 is over four sd), a 300 ms delay for
    // half (a delayed request may also be aborted).
    let faulty = get(&c, &client, &["http://10.96.1.8/", "-n", "200", "-c", "8", "--slow-ms", "300"]);
    let aborted = count(&faulty, "statuses", "418");
    assert!((70..=130).contains(&aborted), "{faulty}");
    assert_eq!(count(&faulty, "flags", "FI"), aborted, "{faulty}");
    let delayed = faulty["slow"].as_u64().unwrap();
    assert!((70..=130).contains(&delayed), "{faulty}");
}

const GRPC_SERVERS: [Server<'static>; 5] = [
    Server { node: 1, name: "echo-a", labels: "{app: echo, version: a}", args: &["grpc"], owner: None },
    Server { node: 1, name: "echo-b", labels: "{app: echo, version: b}", args: &["grpc"], owner: None },
    Server { node: 1, name: "chat", labels: "{app: chat}", args: &[], owner: None },
    Server { node: 1, name: "raw-1", labels: "{app: raw}", args: &["tcp"], owner: None },
    Server { node: 1, name: "raw-2", labels: "{app: raw}", args: &["tcp"], owner: None },
];

fn grpc_objects() -> String {
    [
        service("echo", "10.96.2.1", "{app: echo}", ", appProtocol: grpc"),
        service("echo-a", "10.96.2.2", "{app: echo, version: a}", ", appProtocol: grpc"),
        service("echo-b", "10.96.2.3", "{app: echo, version: b}", ", appProtocol: grpc"),
        service("chat", "10.96.2.4", "{app: chat}", ""),
        // Undeclared port, but the client speaks first with bytes that are not HTTP.
        service("raw", "10.96.2.5", "{app: raw}", ""),
        service("raw-declared", "10.96.2.6", "{app: raw}", ", appProtocol: tcp"),
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{method: {service: nodemesh.test.v1.Echo, method: Repeat}}]
      backendRefs: [{name: echo-b, port: 80}]
    - backendRefs: [{name: echo-a, port: 80}]
"
        .to_string(),
    ]
    .concat()
}

fn grpc(c: &Cluster, client: &Pod, args: &[&str]) -> Value {
    let mut all = vec!["grpc", "10.96.2.1:80"];
    all.extend(args);
    c.run_in(client, Path::new(HTTP), &all).unwrap()
}

const STICKY_SERVERS: [Server<'static>; 3] = [
    Server { node: 1, name: "home-a", labels: "{app: home}", args: &[], owner: None },
    Server { node: 1, name: "home-b", labels: "{app: home}", args: &[], owner: None },
    Server { node: 1, name: "home-c", labels: "{app: home}", args: &[], owner: None },
];

/// Consistent hashing on the caller's IP (`hashKey: {sourceIp: true}`) with several callers on two nodes: each
/// caller always reaches the same endpoint, whichever of its connections it uses, and the callers spread over
/// the endpoints.
#[test]
fn source_ip_hashing_keeps_each_caller_on_one_endpoint() {
    let mut c = cluster!(2);
    let objects = [
        service("home", "10.96.4.1", "{app: home}", ""),
        traffic_policy("home", "home", "  loadBalancer: {algorithm: Maglev, hashKey: {sourceIp: true}}\n"),
    ]
    .concat();
    let first = mesh(&mut c, &STICKY_SERVERS, &objects, 0);
    let mut callers = vec![first];
    let mut yaml = String::new();
    for i in 0..7 {
        let pod = c.add_pod(i % 2, &format!("caller-{i}")).unwrap();
        yaml.push_str(&app::pod_object(&c, &pod, "caller-sa", "{app: caller}", None));
        callers.push(pod);
    }
    c.write_objects("callers.yaml", Some(&yaml)).unwrap();
    wait_for("the callers on both nodes", || {
        (0..2).all(|n| c.config_len(n, "workloads") == STICKY_SERVERS.len() + callers.len())
    });
    let mut homes = std::collections::BTreeMap::new();
    for caller in &callers {
        c.enroll(caller).unwrap();
        // Eight requests over four connections: one endpoint for all of them.
        let r = get(&c, caller, &["http://10.96.4.1/", "-n", "8", "-c", "4"]);
        let names = r["names"].as_object().unwrap();
        assert_eq!(names.len(), 1, "{} ({}) moved between endpoints: {r}", caller.name, caller.ipv4);
        assert_eq!(count(&r, "statuses", "200"), 8, "{r}");
        homes.insert(caller.name.clone(), names.keys().next().unwrap().clone());
    }
    let used: std::collections::BTreeSet<&String> = homes.values().collect();
    assert!(used.len() >= 2, "8 callers all hashed to one endpoint: {homes:?}");
}

/// gRPC unary and server-streaming calls routed by GRPCRoute, with status codes and trailers preserved; a
/// WebSocket echo and an HTTP/1.1 CONNECT tunnel; opaque TCP to a Service balanced over its endpoints, detected or declared.
/// Unary gRPC to echo-a, with an application error whose code, message and trailer metadata arrive unchanged;
/// streaming to echo-b (method match): every message, then the final status from the trailers.
fn unary_and_streaming_grpc_arrive(c: &Cluster, client: &Pod) {
    let unary = grpc(c, client, &["say", "hello"]);
    assert_eq!(unary["code"], 0, "{unary}");
    assert_eq!(unary["replies"][0], "echo-a", "{unary}");
    let failed = grpc(c, client, &["say", "hello", "5"]);
    assert_eq!(failed["code"], 5, "{failed}");
    assert_eq!(failed["trailer_server"], "echo-a", "{failed}");
    assert!(failed["message"].as_str().unwrap().contains("failing as asked"), "{failed}");
    let stream = grpc(c, client, &["repeat", "hi", "25"]);
    assert_eq!(stream["code"], 0, "{stream}");
    assert_eq!(stream["replies"].as_array().unwrap().len(), 25, "{stream}");
    assert_eq!(stream["replies"][24]["server"], "echo-b", "{stream}");
}

#[test]
fn grpc_and_websocket_through_the_mesh() {
    let mut c = cluster!(2);
    let client = mesh(&mut c, &GRPC_SERVERS, &grpc_objects(), 1);

    unary_and_streaming_grpc_arrive(&c, &client);
    let stream_failed = grpc(&c, &client, &["repeat", "hi", "3", "9"]);
    assert_eq!(stream_failed["code"], 9, "{stream_failed}");
    assert_eq!(stream_failed["replies"].as_array().unwrap().len(), 3, "{stream_failed}");
    assert_eq!(stream_failed["trailer_server"], "echo-b", "{stream_failed}");

    // The calling agent sent those requests straight on its HBONE connection, each a stream of its own.
    assert!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "direct")]).unwrap() >= 1.0);
    assert_eq!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "tunnel")]).unwrap_or(0.0), 0.0);

    // WebSocket: the upgrade crosses both agents, then frames flow both ways.
    let ws = c.run_in(&client, Path::new(HTTP), &["ws", "10.96.2.4:80", "/chat", "hello"]).unwrap();
    assert_eq!(ws["status"], "101", "{ws}");
    assert_eq!(ws["accepted"], true, "{ws}");
    assert_eq!(ws["replies"], serde_json::json!(["chat: hello 0", "chat: hello 1"]), "{ws}");
    // HTTP/1.1 CONNECT: the tunnel the application asked for, spliced through both agents.
    let tunnel = c.run_in(&client, Path::new(HTTP), &["connect", "10.96.2.4:80", "example.com:443", "ping"]).unwrap();
    assert_eq!(tunnel["status"], "200", "{tunnel}");
    assert_eq!(tunnel["reply"], "chat: ping", "{tunnel}");
    // The calling agent counts each upgrade as a request, as Istio does: 101 for the WebSocket, 200 for CONNECT.
    // (It travels to the destination agent as an opaque stream, which counts it as a TCP connection.)
    for code in ["101", "200"] {
        let labels = [("reporter", "source"), ("destination_workload", "chat"), ("response_code", code)];
        wait_for(&format!("the source to count the {code} to chat"), || {
            c.metric(0, "nodemesh_requests_total", &labels).unwrap() == 1.0
        });
    }

    // Opaque TCP to Service addresses: bytes intact both ways (CRC-checked), connections spread over both
    // endpoints, through mTLS.
    for vip in ["10.96.2.5", "10.96.2.6"] {
        let r =
            c.client(&client, mesh_tests::addr(vip.parse::<std::net::Ipv4Addr>().unwrap(), 80), 64 * 1024, 8).unwrap();
        assert!(r.success && r.ok_connections() == 8, "{vip}: {:?} {}", r.json, r.stderr);
        let peers: std::collections::BTreeSet<&str> =
            r.json["serverSawLocals"].as_array().unwrap().iter().filter_map(|l| l.as_str()).collect();
        assert!(peers.len() == 2, "{vip}: all 8 connections went to {peers:?}");
    }
}

/// Against an agent that does not take requests straight on its HBONE connections (as agents before did; in a
/// rolling upgrade the peer may be one), the calling agent sends them inside a tunnel instead: gRPC unary and
/// streaming with their trailers, and plain HTTP, all still arrive.
#[test]
fn requests_travel_inside_a_tunnel_to_an_agent_that_does_not_take_them_directly() {
    let mut c = cluster!(2);
    let client = app::mesh(&mut c, Path::new(HTTP), &GRPC_SERVERS, &grpc_objects(), 1, &["--hbone-l7-direct=false"]);
    unary_and_streaming_grpc_arrive(&c, &client);
    assert!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "tunnel")]).unwrap() >= 1.0);
    assert_eq!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "direct")]).unwrap_or(0.0), 0.0);
}

const AUTHZ_SERVERS: [Server<'static>; 2] = [
    Server { node: 1, name: "site", labels: "{app: site}", args: &[], owner: None },
    Server { node: 1, name: "rpc", labels: "{app: rpc}", args: &["grpc"], owner: None },
];

const AUTHZ_OBJECTS: &str = "\
---
apiVersion: v1
kind: Service
metadata: {name: site, namespace: shop}
spec: {clusterIP: 10.96.3.1, selector: {app: site}, ports: [{name: web, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: rpc, namespace: shop}
spec: {clusterIP: 10.96.3.2, selector: {app: rpc}, ports: [{name: grpc, port: 80, targetPort: 8080}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: site-public, namespace: shop}
spec:
  selector: {matchLabels: {app: site}}
  action: ALLOW
  rules:
    - from: [{principals: [cluster.local/ns/default/sa/client-sa]}]
      to: [{methods: [GET], paths: ['/public*']}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: rpc-no-repeat, namespace: shop}
spec:
  selector: {matchLabels: {app: rpc}}
  action: DENY
  rules: [{to: [{paths: [/nodemesh.test.v1.Echo/Repeat]}]}]
";

/// Per-request authorization on the server's agent: the same client may GET /public but not POST /admin (403,
/// and its connection keeps serving), and a gRPC method denied by path gets PERMISSION_DENIED.
#[test]
fn authorization_per_request() {
    let mut c = cluster!(2);
    let client = mesh(&mut c, &AUTHZ_SERVERS, AUTHZ_OBJECTS, 0);
    wait_for("policies on node 2", || c.config_len(1, "authorizationPolicies") == 2);

    let public = get(&c, &client, &["http://10.96.3.1/public/index.html", "-n", "3"]);
    assert_eq!(count(&public, "statuses", "200"), 3, "{public}");
    // Three denials in a row on one keep-alive connection: the connection survives each of them.
    let admin = get(&c, &client, &["http://10.96.3.1/admin", "-X", "POST", "-n", "3"]);
    assert_eq!(count(&admin, "statuses", "403"), 3, "{admin}");
    assert_eq!(count(&admin, "flags", "RBAC"), 3, "{admin}");
    assert!(admin["errors"].as_array().unwrap().is_empty(), "{admin}");
    let post_public = get(&c, &client, &["http://10.96.3.1/public/form", "-X", "POST"]);
    assert_eq!(count(&post_public, "statuses", "403"), 1, "{post_public}");

    let rpc = |args: &[&str]| {
        let mut all = vec!["grpc", "10.96.3.2:80"];
        all.extend(args);
        c.run_in(&client, Path::new(HTTP), &all).unwrap()
    };
    assert_eq!(rpc(&["say", "hi"])["code"], 0);
    let denied = rpc(&["repeat", "hi", "2"]);
    assert_eq!(denied["code"], 7, "PERMISSION_DENIED expected: {denied}");
}

const SITE: [Server<'static>; 1] = [Server { node: 1, name: "site", labels: "{app: site}", args: &[], owner: None }];

const SITE_REPORTED_BY_CALLERS: &str = "\
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: site, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: site, port: 80}]
  rules: [{backendRefs: [{name: site, port: 80}]}]
---
apiVersion: nodemesh.io/v1alpha1
kind: Telemetry
metadata: {name: callers-report, namespace: shop}
spec: {metrics: {reporters: source}}
";

/// With Telemetry `metrics: {reporters: source}` on the called workload, its agent declines calling agents'
/// requests one by one: they come in a tunnel it relays at L4 (L7 done once, by the caller) and only the caller
/// reports them. A policy written later that decides per request ends those tunnels, so it holds for the pooled
/// connection opened before it: the caller's next requests are taken and authorized one by one.
#[test]
fn a_workload_its_callers_alone_report_is_relayed_at_l4_until_its_policy_needs_requests() {
    let mut c = cluster!(2);
    let objects = [service("site", "10.96.4.1", "{app: site}", ""), SITE_REPORTED_BY_CALLERS.to_string()].concat();
    let client = mesh(&mut c, &SITE, &objects, 1);
    wait_for("Telemetry on node 2", || c.config_len(1, "telemetry") == 1);
    let channels = |mode| c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", mode)]).unwrap_or(0.0);
    let requests = |node, reporter| {
        let labels = [("reporter", reporter), ("destination_workload", "site")];
        c.metric(node, "nodemesh_requests_total", &labels).unwrap_or(0.0)
    };

    let before = get(&c, &client, &["http://10.96.4.1/admin", "-n", "3"]);
    assert_eq!(count(&before, "statuses", "200"), 3, "{before}");
    assert_eq!((channels("tunnel"), channels("direct")), (1.0, 0.0), "declined: one tunnel, kept in the pool");
    assert_eq!(requests(0, "source"), 3.0);
    assert_eq!(requests(1, "destination"), 0.0, "the called workload's agent relays bytes");

    let deny_admin = "\
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: site}}
  action: DENY
  rules: [{to: [{paths: [/admin]}]}]
";
    c.write_objects("policy.yaml", Some(deny_admin)).unwrap();
    let cut = || c.metric(1, "nodemesh_connections_cut_total", &[("reason", "policy_changed")]).unwrap_or(0.0);
    wait_for("the pooled tunnel ended by the policy", || cut() == 1.0);
    let after = get(&c, &client, &["http://10.96.4.1/admin", "-n", "3"]);
    assert_eq!(count(&after, "statuses", "403"), 3, "{after}");
    assert_eq!(count(&after, "flags", "RBAC"), 3, "{after}");
    let public = get(&c, &client, &["http://10.96.4.1/public"]);
    assert_eq!(count(&public, "statuses", "200"), 1, "{public}");
    assert_eq!(channels("direct"), 1.0, "taken one by one now that the policy needs them");
    assert_eq!(requests(1, "destination"), 4.0, "and reported by its agent too");
}
