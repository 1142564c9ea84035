//! The agent's resource bounds, end to end with real clients in pods: a slowloris client (connections with half
//! a request head, never finished) is cut after the header timeout on the calling side and on the receiving
//! side, and one pod cannot hold more connections than its cap. Each is counted in
//! `nodemesh_connections_cut_total`. Before, 500 stalled heads were all still held after 75 s.

use std::path::Path;

use mesh_tests::app::{self, Server, service};
use mesh_tests::{Cluster, Pod, cluster, wait_for};
use serde_json::Value;

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");
const HALF_A_HEAD: &str = "GET / HTTP/1.1\\r\\nHost: web\\r\\n";

const SERVERS: [Server<'static>; 2] = [
    Server { node: 1, name: "web", labels: "{app: web}", args: &[], owner: None },
    // A TCP echo server that greets each connection with a line (so a held connection reads, not EOF).
    Server { node: 1, name: "raw", labels: "{app: raw}", args: &["tcp"], owner: None },
];

/// Requests to `web` are authorized one by one (a method condition), so plaintext arriving at its node is
/// served as HTTP there too.
const POLICY: &str = "\
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: gets, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{to: [{methods: [GET]}]}]
";

fn bounded_mesh(c: &mut Cluster) -> Pod {
    let objects = [service("web", "10.96.7.1", "{app: web}", ""), POLICY.to_string()].concat();
    let args = ["--http-header-timeout", "1s", "--max-connections-per-pod", "40"];
    let client = app::mesh(c, Path::new(HTTP), &SERVERS, &objects, 0, &args);
    wait_for("the policy on node 2", || c.config_len(1, "authorizationPolicies") == 1);
    client
}

/// The first address of the workload `name` on node 2.
fn ip_of(c: &Cluster, name: &str) -> String {
    let workloads = c.admin(1, "/workloads").unwrap();
    let workload = workloads.as_array().unwrap().iter().find(|w| w["name"] == name).unwrap().clone();
    workload["ips"][0].as_str().unwrap().to_string()
}

fn stall(c: &Cluster, pod: &Pod, target: &str, conns: usize, seconds: u64, prefix: &str) -> Value {
    c.testbin(pod, &["stall", target, &conns.to_string(), &seconds.to_string(), prefix]).unwrap()
}

fn cut(c: &Cluster, node: usize, direction: &str, reason: &str) -> f64 {
    c.metric(node, "nodemesh_connections_cut_total", &[("direction", direction), ("reason", reason)]).unwrap()
}

#[test]
fn stalled_request_heads_are_cut_after_the_header_timeout() {
    let mut c = cluster!(2);
    let client = bounded_mesh(&mut c);
    let web = ip_of(&c, "web");

    // The calling side: half a head to the Service, on 30 connections.
    let r = stall(&c, &client, "10.96.7.1:80", 30, 8, HALF_A_HEAD);
    assert_eq!(r["closedByPeer"], 30, "{r}");
    assert!(r["lastClosedMs"].as_u64().unwrap() < 4000, "cut after about 1 s: {r}");
    assert_eq!(cut(&c, 0, "outbound", "header_timeout"), 30.0);

    // The receiving side: plaintext from a pod outside the mesh, straight to the pod.
    let outside = c.add_pod(0, "outside").unwrap();
    let r = stall(&c, &outside, &format!("{web}:8080"), 20, 8, HALF_A_HEAD);
    assert_eq!(r["closedByPeer"], 20, "{r}");
    assert!(r["lastClosedMs"].as_u64().unwrap() < 4000, "{r}");
    assert_eq!(cut(&c, 1, "inbound", "header_timeout"), 20.0);

    // Complete requests are unaffected.
    let ok = app::get(&c, Path::new(HTTP), &client, &["http://10.96.7.1/", "-n", "3"]);
    assert_eq!(ok["statuses"]["200"], 3, "{ok}");
}

#[test]
fn one_pod_cannot_hold_more_than_its_connection_cap() {
    let mut c = cluster!(2);
    let client = bounded_mesh(&mut c);
    // 50 silent connections to a TCP server's pod address (L4 through the tunnel): the cap of 40 resets 10 at
    // once; the other 40 are greeted and held.
    let r = stall(&c, &client, &format!("{}:8080", ip_of(&c, "raw")), 50, 2, "");
    assert_eq!(r["closedByPeer"], 10, "{r}");
    assert!(r["lastClosedMs"].as_u64().unwrap() < 1000, "{r}");
    assert_eq!(cut(&c, 0, "outbound", "connection_limit"), 10.0);
    // Their slots are free again once they close.
    wait_for("the held connections to close", || {
        c.admin(0, "/connections").is_ok_and(|v| v.as_array().is_some_and(Vec::is_empty))
    });
    let ok = app::get(&c, Path::new(HTTP), &client, &["http://10.96.7.1/", "-n", "3"]);
    assert_eq!(ok["statuses"]["200"], 3, "{ok}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_connections(c: &Cluster, node: usize) -> usize {
    c.admin(node, "/connections").map_or(0, |v| v.as_array().map_or(0, Vec::len))
}

const IDLE_CONNS: usize = 3000;
/// The agents close an HBONE connection this long after its last stream (`--hbone-idle-timeout`, 120 s by
/// default); the tunnel the burst used holds HTTP/2 stream tables of the burst's size until then.
const HBONE_IDLE: &str = "1s";

/// The agent's allocator figures in KiB, for the report: what live objects use, what thread caches hold.
fn allocator_kib(c: &Cluster, node: usize) -> String {
    let kib = |kind| c.metric(node, "nodemesh_allocator_bytes", &[("kind", kind)]).unwrap_or(f64::NAN) / 1024.0;
    format!(
        "allocated {:.0}, thread caches {:.0}, resident {:.0}",
        kib("allocated"),
        kib("thread_caches"),
        kib("resident")
    )
}

/// Holds [`IDLE_CONNS`] idle connections from `client` to `target` through both agents; returns both agents' RSS
/// while they are held and after they closed.
fn idle_burst(c: &Cluster, client: &Pod, target: &str, pids: [u32; 2]) -> ([u64; 2], [u64; 2]) {
    let held = c.testbin_start(client, &["stall", target, &IDLE_CONNS.to_string(), "30", ""]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while open_connections(c, 0) < IDLE_CONNS || open_connections(c, 1) < IDLE_CONNS {
        assert!(std::time::Instant::now() < deadline, "{} and {} open", open_connections(c, 0), open_connections(c, 1));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // What the burst of opens allocated in passing goes back within jemalloc's one-second decay.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let during = pids.map(rss_kib);
    for node in 0..2 {
        let tunnels = c.admin(node, "/tunnels").map_or(0, |v| v.as_array().map_or(0, Vec::len));
        eprintln!("agent {} with the connections open: {}, {tunnels} tunnels", node + 1, allocator_kib(c, node));
    }
    drop(held);
    wait_for("the connections to close", || open_connections(c, 0) == 0 && open_connections(c, 1) == 0);
    // jemalloc's decay, and the idle tunnel's close.
    std::thread::sleep(std::time::Duration::from_secs(4));
    for node in 0..2 {
        eprintln!("agent {} after close: {}", node + 1, allocator_kib(c, node));
    }
    (during, pids.map(rss_kib))
}

/// What an idle proxied connection costs each agent, and that the memory comes back when connections close
/// (glibc's allocator kept all of it: RSS after 10,000 connections closed stayed at its peak) and is reused by
/// the next burst instead of growing. The figures are printed for docs/ARCHITECTURE.md.
#[test]
fn idle_connections_are_cheap_and_their_memory_comes_back() {
    let mut c = cluster!(2);
    c.agent_log = "info".into();
    let client = app::mesh(&mut c, Path::new(HTTP), &SERVERS, "", 0, &["--hbone-idle-timeout", HBONE_IDLE]);
    let raw = format!("{}:8080", ip_of(&c, "raw"));
    // Warm up: the agents' pools, certificates and first allocations.
    let warm = stall(&c, &client, &raw, 10, 1, "");
    assert_eq!(warm["stillOpen"], 10, "{warm}");
    wait_for("the warm-up connections to close", || open_connections(&c, 0) == 0 && open_connections(&c, 1) == 0);
    let pids = [c.agent_pid(0).unwrap(), c.agent_pid(1).unwrap()];
    let before = pids.map(rss_kib);
    for node in 0..2 {
        eprintln!("agent {} before: {}", node + 1, allocator_kib(&c, node));
    }
    let (during, after) = idle_burst(&c, &client, &raw, pids);
    let (_, after_again) = idle_burst(&c, &client, &raw, pids);
    for node in 0..2 {
        let per_connection = during[node].saturating_sub(before[node]) as f64 / IDLE_CONNS as f64;
        eprintln!(
            "agent {}: {} KiB before, {per_connection:.1} KiB per idle connection, {} KiB after close, {} KiB after a second burst",
            node + 1,
            before[node],
            after[node],
            after_again[node]
        );
        assert!(per_connection <= 8.0, "agent {}: {per_connection:.1} KiB per idle connection", node + 1);
        assert!(
            after[node] * 10 <= before[node] * 12,
            "agent {}: {} KiB before, {} KiB after close",
            node + 1,
            before[node],
            after[node]
        );
        assert!(after_again[node] * 10 <= after[node] * 11, "agent {}: memory grows burst after burst", node + 1);
    }
}
