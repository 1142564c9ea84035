//! nodemesh next to HBONE servers that are not nodemesh agents (Istio's ztunnel, or any other implementation):
//! the pods on node 2 have no nodemesh agent, each runs `mesh_tests::hbone_peer` on its 15008 instead, with a
//! certificate from the mesh's CA. The client pod on node 1 is enrolled in a nodemesh agent that routes its
//! requests at L7.

use std::path::Path;

use mesh_tests::app::{self, count};
use mesh_tests::{Cluster, Pod, cluster, wait_for};
use serde_json::Value;

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");
const FRONT: &str = "10.96.7.1";

/// A Service `web` whose HTTPRoute splits 3:1 between Services `web-a` and `web-b` and retries 503s; each of
/// those has one endpoint, a pod on node 2.
fn routes(c: &Cluster, a: &Pod, b: &Pod) -> String {
    let node = &c.nodes[1].name;
    let service = |name: &str, ip: &str, endpoint: Option<&Pod>| {
        let endpoints = endpoint
            .map(|p| format!("[{{ip: {}, workload: default/{}, node: {node}}}]", p.ipv4, p.name))
            .unwrap_or_else(|| "[]".into());
        format!(
            "  - {{namespace: default, name: {name}, ips: [{ip}], ports: [{{name: http, port: 80, targetPort: 8080}}], \
             endpoints: {endpoints}}}\n"
        )
    };
    let mut yaml = String::from("services:\n");
    yaml += &service("web", FRONT, None);
    yaml += &service("web-a", "10.96.7.2", Some(a));
    yaml += &service("web-b", "10.96.7.3", Some(b));
    yaml += "routes:\n  - {namespace: default, name: web, kind: HTTPRoute, parents: [{namespace: default, name: web}],\n\
             \x20    rules: [{backends: [{service: {namespace: default, name: web-a}, weight: 3}, \
             {service: {namespace: default, name: web-b}, weight: 1}], retry: {attempts: 2, codes: [503]}, \
             timeouts: {requestMs: 1000}}]}\n";
    yaml
}

/// The client (enrolled, node 1) and two web pods on node 2, each an HTTP/1.1 + h2c server on 8080 behind a
/// foreign HBONE server on 15008 (`mesh-http hbone-peer` with `peer_args` more); web-b's certificate is in
/// trust domain `b_trust_domain`. Only node 1 runs an agent.
fn foreign_peers(c: &mut Cluster, peer_args: &[&str], b_trust_domain: &str) -> (Pod, Pod, Pod) {
    foreign_peers_for(c, &[], peer_args, b_trust_domain)
}

/// [`foreign_peers`] with `agent_args` more for the agent.
fn foreign_peers_for(
    c: &mut Cluster,
    agent_args: &[&str],
    peer_args: &[&str],
    b_trust_domain: &str,
) -> (Pod, Pod, Pod) {
    let client = c.add_pod(0, "client").unwrap();
    let a = c.add_pod(1, "web-a").unwrap();
    let b = c.add_pod(1, "web-b").unwrap();
    let ca = c.init_ca().unwrap();
    let config = write_config(c, (&client, &a, &b), "").unwrap();
    let args = [&["--ca-dir", ca.to_str().unwrap(), "--config", config.to_str().unwrap()][..], agent_args].concat();
    c.start_agent_with(0, &args).unwrap();
    c.enroll(&client).unwrap();
    for (pod, sa, td) in [(&a, "web-a-sa", "cluster.local"), (&b, "web-b-sa", b_trust_domain)] {
        c.start_server(pod, Path::new(HTTP), &["serve", "8080", &pod.name], &format!("http-{}", pod.name)).unwrap();
        let ca = ca.to_str().unwrap();
        let peer = [&["hbone-peer", "15008", ca, td, "default", sa][..], peer_args].concat();
        c.start_server(pod, Path::new(HTTP), &peer, &format!("hbone-{}", pod.name)).unwrap();
    }
    wait_for("routes on node 1", || c.config_len(0, "routes") == 1);
    (client, a, b)
}

/// The agent's config: the three workloads (web-b's service account `b_account`, which may carry more of its
/// fields) and the routes, plus `extra`.
fn write_config(c: &Cluster, (client, a, b): (&Pod, &Pod, &Pod), extra: &str) -> std::io::Result<std::path::PathBuf> {
    write_config_with(c, (client, a, b), "web-b-sa", extra)
}

fn write_config_with(
    c: &Cluster,
    (client, a, b): (&Pod, &Pod, &Pod),
    b_account: &str,
    extra: &str,
) -> std::io::Result<std::path::PathBuf> {
    let workloads = [(client, "client-sa"), (a, "web-a-sa"), (b, b_account)];
    c.write_config(&workloads, &(routes(c, a, b) + extra)).map_err(std::io::Error::other)
}

fn get(c: &Cluster, client: &Pod, args: &[&str]) -> Value {
    app::get(c, Path::new(HTTP), client, args)
}

/// Every CONNECT the foreign servers took, as they printed them.
fn connects(c: &Cluster) -> Vec<Value> {
    c.log_lines("hbone-").iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
}

/// Requests routed at L7 to endpoints behind a foreign HBONE server arrive in the protocol the client spoke —
/// HTTP/1.1 as HTTP/1.1 (before, the agent's own HTTP/2 arrived, and an HTTP/1.1-only server answered 505),
/// h2c as HTTP/2 — split by the route's weights, retried on 503, timed out by the route, with trace headers passed through and counted
/// by the calling agent. The CONNECTs carry no nodemesh header the peer would have to understand beyond an
/// offer it ignores.
#[test]
fn l7_requests_reach_endpoints_behind_an_hbone_server_that_is_not_a_nodemesh_agent() {
    let mut c = cluster!(2);
    let (client, ..) = foreign_peers(&mut c, &[], "cluster.local");
    let url = format!("http://{FRONT}/hello");
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    for (protocol, extra, version) in [("HTTP/1.1", &[][..], "HTTP/1.1"), ("h2c", &["--h2"][..], "HTTP/2.0")] {
        let header = format!("traceparent: {traceparent}");
        let args = [&[url.as_str(), "-n", "40", "-H", &header][..], extra].concat();
        let r = get(&c, &client, &args);
        assert_eq!(count(&r, "statuses", "200"), 40, "{protocol}: {r}");
        let (on_a, on_b) = (count(&r, "names", "web-a"), count(&r, "names", "web-b"));
        assert!(on_a > on_b && on_b > 0, "{protocol}: the 3:1 split: {r}");
        let arrived = &r["last"]["body"];
        assert_eq!(arrived["version"], version, "{protocol}: what the application received: {r}");
        let forwarded = arrived["headers"]["traceparent"].as_str().unwrap_or_default();
        assert!(forwarded.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{protocol}: trace lost: {r}");
    }

    // Retries: the first try fails with 503 and the retry answers (whichever endpoint it lands on).
    let retried = get(&c, &client, &[&url, "-H", "x-test-fail-first: 1", "-H", "x-test-key: r"]);
    assert_eq!(count(&retried, "statuses", "200"), 1, "{retried}");
    // The route's request timeout: 504 after one second, not the application's three.
    let timed_out = get(&c, &client, &[&url, "-H", "x-test-delay-ms: 3000"]);
    assert_eq!(count(&timed_out, "statuses", "504"), 1, "{timed_out}");
    assert!(timed_out["max_ms"].as_f64().unwrap() < 2500.0, "{timed_out}");

    // The calling agent counts them as the source reporter, per destination workload.
    let labels = |w| [("reporter", "source"), ("destination_workload", w), ("response_code", "200")];
    let requests = |w| c.metric(0, "nodemesh_requests_total", &labels(w)).unwrap();
    let (a, b) = (requests("web-a"), requests("web-b"));
    assert!(a + b >= 81.0 && b > 0.0, "requests counted: web-a {a}, web-b {b}");
    // The offer to send requests straight on the connection was not taken: the requests went in tunnels.
    assert!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "tunnel")]).unwrap() >= 2.0);
    assert_eq!(c.metric(0, "nodemesh_hbone_l7_channels_opened_total", &[("mode", "direct")]).unwrap_or(0.0), 0.0);
    let seen = connects(&c);
    assert!(!seen.is_empty(), "the foreign servers printed their CONNECTs");
    for connect in &seen {
        let names: Vec<&str> = connect["headers"].as_object().unwrap().keys().map(String::as_str).collect();
        assert!(!names.contains(&"nodemesh-l7"), "a CONNECT asked the peer for nodemesh's own framing: {connect}");
        // What ztunnel sends on its CONNECTs: the source's metadata, the original client, a trace context.
        let header = |name: &str| connect["headers"][name].as_str().unwrap_or_default().to_string();
        assert_eq!(
            header("baggage"),
            "k8s.namespace.name=default,k8s.pod.name=client,service.name=client,service.version=latest",
            "{connect}"
        );
        assert_eq!(header("forwarded"), format!("for={}", client.ipv4), "{connect}");
        let traceparent = header("traceparent");
        assert!(traceparent.len() == 55 && traceparent.starts_with("00-") && traceparent.ends_with("-00"), "{connect}");
    }
}

/// A foreign HBONE server that refuses the calling agent's certificate: the request fails at once with 503 and
/// the agent counts a TLS failure. TLS 1.3 tells the client of the refusal only after its side of the handshake,
/// as an alert read inside HTTP/2, which the agent used to count as `reason="http2"`.
#[test]
fn a_peer_that_refuses_the_agents_certificate_is_a_tls_failure() {
    let mut c = cluster!(2);
    let (client, ..) = foreign_peers(&mut c, &["refuse-clients"], "cluster.local");
    let r = get(&c, &client, &["http://10.96.7.2/"]);
    assert_eq!(count(&r, "statuses", "503"), 1, "{r}");
    assert!(r["max_ms"].as_f64().unwrap() < 2000.0, "refused at once: {r}");
    let failures = |reason| {
        c.metric(0, "nodemesh_hbone_failures_total", &[("direction", "outbound"), ("reason", reason)]).unwrap_or(0.0)
    };
    assert!(failures("tls") >= 1.0, "tls {}, http2 {}", failures("tls"), failures("http2"));
    assert_eq!(failures("http2"), 0.0);
}

/// An endpoint whose certificate is in another trust domain (a cluster or mesh behind its own ztunnel, sharing
/// the root): refused while that trust domain is not the mesh's, as a foreign-trust-domain failure; reached once
/// the config lists it as an alias and the workload in it, the agent expecting the peer's own identity there.
#[test]
fn an_endpoint_of_another_trust_domain_is_reached_only_once_aliased() {
    let mut c = cluster!(2);
    let (client, a, b) = foreign_peers(&mut c, &[], "other.td");
    let refused = get(&c, &client, &["http://10.96.7.3/"]);
    assert_eq!(count(&refused, "statuses", "503"), 1, "{refused}");
    let failures = |reason| {
        c.metric(0, "nodemesh_hbone_failures_total", &[("direction", "outbound"), ("reason", reason)]).unwrap_or(0.0)
    };
    assert!(failures("foreign_trust_domain") >= 1.0, "tls {}", failures("tls"));

    // web-b's entry names its trust domain (one more field in its flow map), which the mesh now aliases.
    write_config_with(&c, (&client, &a, &b), "web-b-sa, trustDomain: other.td", "trustDomainAliases: [other.td]\n")
        .unwrap();
    c.signal_agent(0, libc::SIGHUP).unwrap();
    wait_for("the alias on node 1", || c.config_len(0, "trustDomainAliases") == 1);
    let reached = get(&c, &client, &["http://10.96.7.3/", "-n", "3"]);
    assert_eq!(count(&reached, "names", "web-b"), 3, "{reached}");
    let labels = [("reporter", "source"), ("destination_workload", "web-b"), ("response_code", "200")];
    let principal = c.metrics(0).unwrap();
    assert!(principal.contains("destination_principal=\"spiffe://other.td/ns/default/sa/web-b-sa\""), "labelled");
    assert_eq!(c.metric(0, "nodemesh_requests_total", &labels).unwrap(), 3.0);
}

/// Post-quantum key exchange: the agent offers X25519MLKEM768 first, so a peer that accepts nothing else (as
/// ztunnel under `COMPLIANCE_POLICY=pqc`) handshakes with it, and so does one that accepts anything. With
/// `--require-pqc` a classical-only peer is refused; on the ring provider (no ML-KEM) a PQC-only one is.
#[test]
fn post_quantum_key_exchange_with_peers_that_require_it_or_lack_it() {
    let tls_failures = |c: &Cluster| {
        let labels = [("direction", "outbound"), ("reason", "tls")];
        c.metric(0, "nodemesh_hbone_failures_total", &labels).unwrap_or(0.0)
    };
    for (agent, peer) in [(&[][..], &[][..]), (&[][..], &["pqc-only"][..])] {
        let mut c = cluster!(2);
        let (client, ..) = foreign_peers_for(&mut c, agent, peer, "cluster.local");
        let r = get(&c, &client, &["http://10.96.7.2/", "-n", "2"]);
        assert_eq!(count(&r, "statuses", "200"), 2, "peer {peer:?}: {r}");
        let groups: Vec<Value> = connects(&c).iter().map(|connect| connect["keyExchange"].clone()).collect();
        assert!(!groups.is_empty() && groups.iter().all(|g| g == "X25519MLKEM768"), "peer {peer:?}: {groups:?}");
    }
    for (agent, peer) in
        [(&["--require-pqc"][..], &["classical-only"][..]), (&["--tls-provider", "ring"], &["pqc-only"])]
    {
        let mut c = cluster!(2);
        let (client, ..) = foreign_peers_for(&mut c, agent, peer, "cluster.local");
        let r = get(&c, &client, &["http://10.96.7.2/"]);
        assert_eq!(count(&r, "statuses", "503"), 1, "agent {agent:?}, peer {peer:?}: {r}");
        assert!(tls_failures(&c) >= 1.0, "agent {agent:?}, peer {peer:?}: a TLS failure");
    }
}
