//! End-to-end tests of the mTLS (HBONE) tunnel and policy, on the real kernel with real agents.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_agent::identity::Identity;
use mesh_tests::sniff::{Sniffer, contains};
use mesh_tests::{Cluster, Pod, probe};
use mesh_tests::{addr, cluster, ip_of};
use serde_json::Value;

const KIB: u64 = 1024;
const MARKER: &str = "NODEMESH-PLAINTEXT-MARKER-7f3a";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Starts every node's agent with the CA and the shared config.
fn start_mesh(c: &mut Cluster, ca: &Path, config: &Path, extra: &[&str]) {
    for node in 0..c.nodes.len() {
        let mut args = vec!["--ca-dir", ca.to_str().unwrap(), "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        c.start_agent_with(node, &args).unwrap();
    }
}

/// Pods `client` and `server` on the given nodes, listed in the config with service accounts `client-sa` and
/// `server-sa` (plus `extra` YAML), agents started with the CA (plus `agent_args`), both enrolled, server
/// listening on 8080.
fn meshed_pair(
    c: &mut Cluster,
    client_node: usize,
    server_node: usize,
    extra: &str,
    agent_args: &[&str],
) -> (Pod, Pod) {
    let client = c.add_pod(client_node, "client").unwrap();
    let server = c.add_pod(server_node, "server").unwrap();
    let ca = c.init_ca().unwrap();
    let config = c.write_config(&[(&client, "client-sa"), (&server, "server-sa")], extra).unwrap();
    start_mesh(c, &ca, &config, agent_args);
    c.enroll(&client).unwrap();
    c.enroll(&server).unwrap();
    c.serve(&server, 8080).unwrap();
    (client, server)
}

/// One node: pod `server` (service account `server-sa`, an echo server on 8080) in the config with `extra`,
/// enrolled, and pod `prober`, outside the config and the mesh, to speak HBONE to it with certificates of its
/// own making.
fn server_and_prober(c: &mut Cluster, extra: &str) -> (Pod, Pod, std::path::PathBuf) {
    server_and_prober_serving(c, extra, |c, server| c.serve(server, 8080).unwrap())
}

/// [`server_and_prober`] with the server pod's application started by `serve`.
fn server_and_prober_serving(
    c: &mut Cluster,
    extra: &str,
    serve: impl FnOnce(&mut Cluster, &Pod),
) -> (Pod, Pod, std::path::PathBuf) {
    let server = c.add_pod(0, "server").unwrap();
    let prober = c.add_pod(0, "prober").unwrap();
    let ca = c.init_ca().unwrap();
    let config = c.write_config(&[(&server, "server-sa")], extra).unwrap();
    start_mesh(c, &ca, &config, &[]);
    c.enroll(&server).unwrap();
    serve(c, &server);
    (server, prober, ca)
}

fn inbound_tunnels(c: &Cluster, node: usize, pod: &Pod) -> Vec<Value> {
    let name = format!("{}/{}", pod.namespace, pod.name);
    c.admin(node, "/tunnels")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["direction"] == "inbound" && t["pod"] == name.as_str())
        .cloned()
        .collect()
}

fn opened(c: &Cluster, node: usize, pod: &Pod, direction: &str, security: &str) -> f64 {
    let (reporter, workload) =
        if direction == "outbound" { ("source", "source_workload") } else { ("destination", "destination_workload") };
    let labels = [("reporter", reporter), (workload, &pod.name), ("connection_security_policy", security)];
    c.metric(node, "nodemesh_tcp_connections_opened_total", &labels).unwrap()
}

/// Meshed pods on two nodes: nothing readable crosses the node-to-node link; a non-meshed destination gets
/// plaintext passthrough, which the same capture does see.
#[test]
fn meshed_traffic_is_encrypted_on_the_wire() {
    let mut c = cluster!(2);
    let (client, server) = meshed_pair(&mut c, 0, 1, "", &[]);
    let outside = c.add_pod(1, "outside").unwrap();
    c.serve(&outside, 8080).unwrap();
    let marker = [("MESH_TESTBIN_MARKER", MARKER)];

    let sniffer = Sniffer::start(&c.fabric).unwrap();
    let r = c.client_with(&client, addr(server.ipv4, 8080), 256 * KIB, 1, &marker).unwrap();
    let wire = sniffer.finish().unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert_eq!(ip_of(&r.field("serverSawPeer")), IpAddr::from(client.ipv4));
    assert!(wire.len() > (512 * KIB) as usize, "the tunnel's bytes were captured ({} bytes)", wire.len());
    assert!(!contains(&wire, MARKER.as_bytes()), "plaintext marker seen between the nodes");

    let sniffer = Sniffer::start(&c.fabric).unwrap();
    let r = c.client_with(&client, addr(outside.ipv4, 8080), 64 * KIB, 1, &marker).unwrap();
    let wire = sniffer.finish().unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    assert!(contains(&wire, MARKER.as_bytes()), "passthrough to a non-meshed pod is plaintext, and visible");

    assert_eq!(opened(&c, 0, &client, "outbound", "mutual_tls"), 1.0);
    assert_eq!(opened(&c, 0, &client, "outbound", "none"), 1.0);
    assert_eq!(opened(&c, 1, &server, "inbound", "mutual_tls"), 1.0);
    let tunnels = inbound_tunnels(&c, 1, &server);
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0]["peerIdentity"], spiffe("default", "client-sa"));
    assert_eq!(tunnels[0]["localIdentity"], spiffe("default", "server-sa"));
    let certs = c.admin(0, "/certs").unwrap();
    assert_eq!(certs["certificates"][0]["identity"], spiffe("default", "client-sa"), "{certs}");
}

/// Sustained short connections from one client all reach the application with the client's own address. The
/// agent closes first towards the application whenever the client does, leaving TIME_WAIT behind; with the
/// kernel's choice of source port it ran out after about 14,000 in a minute and fell back to the pod's own address.
#[test]
fn sustained_short_connections_keep_the_client_address() {
    let mut c = cluster!(2);
    let (client, server) = meshed_pair(&mut c, 0, 1, "", &[]);
    let report = c.testbin(&client, &["cps", &format!("{}:8080", server.ipv4), "100", "15000"]).unwrap();
    assert_eq!(report["connections"], 15000, "{report}");
    assert_eq!(report["serverSawPeers"], serde_json::json!({client.ipv4.to_string(): 15000}), "{report}");
}

/// Pods on the same node also talk through the tunnel, over IPv4 and IPv6.
#[test]
fn same_node_traffic_goes_through_the_tunnel() {
    let mut c = cluster!(1);
    let (client, server) = meshed_pair(&mut c, 0, 0, "", &[]);
    for target in [addr(server.ipv4, 8080), addr(server.ipv6, 8080)] {
        let r = c.client(&client, target, 1024 * KIB, 1).unwrap();
        assert!(r.success && r.ok_connections() == 1, "{target}: {:?} {}", r.json, r.stderr);
        assert_eq!(r.field("peername"), target.to_string());
    }
    assert_eq!(opened(&c, 0, &server, "inbound", "mutual_tls"), 2.0);
    assert_eq!(opened(&c, 0, &server, "inbound", "none"), 0.0);
    let tunnels = inbound_tunnels(&c, 0, &server);
    assert!(!tunnels.is_empty());
    assert!(tunnels.iter().all(|t| t["peerIdentity"] == spiffe("default", "client-sa")), "{tunnels:?}");
}

#[test]
fn bad_peer_certificates_are_refused() {
    let mut c = cluster!(1);
    let (server, prober, ca) = server_and_prober(&mut c, "");
    let gateway = addr(server.ipv4, 15008);
    let target = addr(server.ipv4, 8080);
    let me = Identity::new("cluster.local", "default", "prober");

    let expired = probe::from_ca(&ca, &me, |p| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(2);
        p.not_after = now - time::Duration::hours(1);
    })
    .unwrap();
    let two_uris = probe::from_ca(&ca, &me, |p| {
        p.subject_alt_names.push(rcgen::SanType::URI("spiffe://cluster.local/ns/default/sa/other".try_into().unwrap()))
    })
    .unwrap();
    let foreign = probe::from_foreign_ca(&me).unwrap();
    for (what, cert) in [("foreign CA", foreign), ("expired", expired), ("two URI SANs", two_uris)] {
        let outcome = probe::connect(&prober.netns, gateway, target, cert);
        assert!(!matches!(outcome, Ok((200, _))), "{what}: accepted: {outcome:?}");
    }
    let failures =
        c.metric(0, "nodemesh_hbone_failures_total", &[("direction", "inbound"), ("reason", "tls")]).unwrap();
    assert_eq!(failures, 3.0, "the server refused all three handshakes");

    // The same path with a good certificate works, so the refusals above were about the certificates.
    let good = probe::from_ca(&ca, &me, |_| {}).unwrap();
    let (status, first_line) = probe::connect(&prober.netns, gateway, target, good).unwrap();
    assert_eq!(status, 200);
    assert!(first_line.contains(&prober.ipv4.to_string()), "app saw the prober as peer: {first_line}");
    // A CONNECT for an address the pod does not own is a bad request.
    let good = probe::from_ca(&ca, &me, |_| {}).unwrap();
    let (status, _) = probe::connect(&prober.netns, gateway, addr(prober.ipv4, 8080), good).unwrap();
    assert_eq!(status, 400);
}

#[test]
fn strict_refuses_plaintext_and_permissive_accepts_it() {
    let mut c = cluster!(1);
    let server = c.add_pod(0, "server").unwrap();
    let meshed = c.add_pod(0, "meshed").unwrap();
    let plain = c.add_pod(0, "plain").unwrap();
    let ca = c.init_ca().unwrap();
    let workloads = [(&server, "server-sa"), (&meshed, "meshed-sa")];
    let strict = "peerAuthentications: [{namespace: default, name: strict, mode: STRICT}]\n";
    let config = c.write_config(&workloads, strict).unwrap();
    start_mesh(&mut c, &ca, &config, &[]);
    c.enroll(&server).unwrap();
    c.enroll(&meshed).unwrap();
    c.serve(&server, 8080).unwrap();
    let target = addr(server.ipv4, 8080);

    let refused = c.client(&plain, target, 4 * KIB, 1).unwrap();
    assert!(!refused.success, "STRICT must refuse plaintext: {:?}", refused.json);
    let denied = [("pod", "server"), ("reason", "peer_authentication_strict")];
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_denied_total", &denied).unwrap(), 1.0);
    let ok = c.client(&meshed, target, 64 * KIB, 1).unwrap();
    assert!(ok.success, "mTLS passes STRICT: {:?} {}", ok.json, ok.stderr);

    c.write_config(&workloads, "defaultPeerAuthentication: PERMISSIVE\n").unwrap();
    c.signal_agent(0, libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.admin(0, "/config_dump").unwrap()["config"]["peerAuthentications"].as_array().is_some_and(|a| !a.is_empty())
    {
        assert!(Instant::now() < deadline, "config was not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let accepted = c.client(&plain, target, 64 * KIB, 1).unwrap();
    assert!(accepted.success, "PERMISSIVE accepts plaintext: {:?} {}", accepted.json, accepted.stderr);
    assert_eq!(ip_of(&accepted.field("serverSawPeer")), IpAddr::from(plain.ipv4));
}

#[test]
fn authorization_by_principal_namespace_cidr_and_port() {
    let mut c = cluster!(2);
    let server = c.add_pod(1, "server").unwrap();
    let frontend = c.add_pod(0, "frontend").unwrap();
    let admin = c.add_pod_in(0, "admin", "ops").unwrap();
    let other = c.add_pod(0, "other").unwrap();
    let ca = c.init_ca().unwrap();
    let policies = format!(
        r#"authorizationPolicies:
  - namespace: default
    name: allow-some
    selector: {{app: server}}
    rules:
      - from: [{{principals: ["cluster.local/ns/default/sa/frontend"]}}]
        to: [{{ports: [8080]}}]
      - from: [{{namespaces: [ops]}}]
      - from: [{{ipBlocks: ["{}/32"]}}]
        to: [{{ports: [9090]}}]
  - namespace: default
    name: no-admin-on-9090
    selector: {{app: server}}
    action: DENY
    rules: [{{from: [{{principals: ["*/sa/admin"]}}], to: [{{ports: [9090]}}]}}]
"#,
        other.ipv4
    );
    let config = c
        .write_config(&[(&server, "server"), (&frontend, "frontend"), (&admin, "admin"), (&other, "other")], &policies)
        .unwrap();
    start_mesh(&mut c, &ca, &config, &[]);
    for pod in [&server, &frontend, &admin, &other] {
        c.enroll(pod).unwrap();
    }
    c.serve(&server, 8080).unwrap();
    c.serve(&server, 9090).unwrap();
    let cases = [
        (&frontend, 8080, true, "principal + port"),
        (&frontend, 9090, false, "principal on another port"),
        (&admin, 8080, true, "namespace"),
        (&admin, 9090, false, "DENY overrides the namespace ALLOW"),
        (&other, 9090, true, "ipBlock + port"),
        (&other, 8080, false, "ipBlock on another port"),
    ];
    for (client, port, allowed, why) in cases {
        let r = c.client(client, addr(server.ipv4, port), 4 * KIB, 1).unwrap();
        assert_eq!(r.success, allowed, "{} -> :{port} ({why}): {:?} {}", client.name, r.json, r.stderr);
    }
    let denied = |reason| c.metric(1, "nodemesh_tcp_connections_denied_total", &[("reason", reason)]).unwrap();
    assert_eq!(denied("authz_deny_policy"), 1.0);
    assert_eq!(denied("authz_no_allow_match"), 2.0);
    let refused_at_source = c.metric(0, "nodemesh_tcp_connection_failures_total", &[("reason", "denied")]).unwrap();
    assert_eq!(refused_at_source, 3.0, "the source agent saw HTTP 401 three times");
}

/// Certificates renew at half-life; a connection made before stays up, new ones present the new certificate.
#[test]
fn certificate_rotation_keeps_connections_and_renews() {
    let mut c = cluster!(1);
    let (client, server) = meshed_pair(&mut c, 0, 0, "", &["--cert-lifetime", "6s"]);
    let target = addr(server.ipv4, 8080);
    let client_id = spiffe("default", "client-sa");
    let serial = || -> String {
        let certs = c.admin(0, "/certs").unwrap();
        let list = certs["certificates"].as_array().unwrap().clone();
        let cert = list.iter().find(|x| x["identity"] == client_id.as_str()).cloned().unwrap_or_default();
        cert["serial"].as_str().unwrap_or("").to_string()
    };

    let long = c.client_start(&client, target, 1024 * KIB, &[("MESH_TESTBIN_HOLD_MS", "5000")]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let peers: Vec<String> =
            inbound_tunnels(&c, 0, &server).iter().filter_map(|t| t["peerSerial"].as_str().map(String::from)).collect();
        if let Some(s) = peers.first() {
            break s.clone();
        }
        assert!(Instant::now() < deadline, "the long-lived connection never reached the server");
        std::thread::sleep(Duration::from_millis(50));
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while serial() == first {
        assert!(Instant::now() < deadline, "certificate was not renewed at half of its 6 s lifetime");
        std::thread::sleep(Duration::from_millis(100));
    }
    let renewed = serial();
    let r = c.client(&client, target, 64 * KIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    let peers: Vec<Value> = inbound_tunnels(&c, 0, &server);
    assert!(peers.iter().any(|t| t["peerSerial"] == renewed.as_str()), "new connection with the new cert: {peers:?}");
    let r = long.wait().unwrap();
    assert!(r.success && r.ok_connections() == 1, "the connection from before the renewal survived: {:?}", r.json);
}

#[test]
fn thousand_streams_share_pooled_connections() {
    let mut c = cluster!(2);
    let (client, server) = meshed_pair(&mut c, 0, 1, "", &[]);
    // Each connection waits 3 s after its tunnel is up, so all 1000 streams are open at the same time.
    let r =
        c.client_with(&client, addr(server.ipv4, 8080), 64 * KIB, 1000, &[("MESH_TESTBIN_HOLD_MS", "3000")]).unwrap();
    assert!(r.success && r.ok_connections() == 1000, "{:?} {}", r.json, r.stderr);
    assert_eq!(opened(&c, 1, &server, "inbound", "mutual_tls"), 1000.0);
    let dialled = c.metric(0, "nodemesh_hbone_connections_opened_total", &[("direction", "outbound")]).unwrap();
    let accepted = c.metric(1, "nodemesh_hbone_connections_opened_total", &[("direction", "inbound")]).unwrap();
    assert_eq!(dialled, accepted);
    // 1000 concurrent streams at 100 per connection: 10 connections (a couple more if a pooled one died).
    assert!((10.0..=12.0).contains(&dialled), "{dialled} HBONE connections for 1000 streams");
}

/// `outboundTrafficPolicy: REGISTRY_ONLY`: destinations the config does not know are refused, known ones pass.
#[test]
fn registry_only_refuses_unknown_destinations() {
    let mut c = cluster!(1);
    let (client, server) = meshed_pair(&mut c, 0, 0, "outboundTrafficPolicy: REGISTRY_ONLY\n", &[]);
    let unknown = c.add_pod(0, "unknown").unwrap();
    c.serve(&unknown, 8080).unwrap();
    let known = c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(known.success, "{:?} {}", known.json, known.stderr);
    let refused = c.client(&client, addr(unknown.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(!refused.success, "unknown destination reached: {:?}", refused.json);
    let denied = [("pod", "client"), ("direction", "outbound"), ("reason", "registry_only")];
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_denied_total", &denied).unwrap(), 1.0);
}

/// The source agent insists on the destination identity it expects: a destination presenting another one
/// (here: the two agents disagree about the server's service account) gets no traffic.
#[test]
fn destination_with_unexpected_identity_is_refused() {
    let mut c = cluster!(2);
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let ca = c.init_ca().unwrap();
    let expected = c.write_config_as("source.yaml", &[(&client, "client-sa"), (&server, "expected-sa")], "").unwrap();
    let actual =
        c.write_config_as("destination.yaml", &[(&client, "client-sa"), (&server, "impostor-sa")], "").unwrap();
    c.start_agent_with(0, &["--ca-dir", ca.to_str().unwrap(), "--config", expected.to_str().unwrap()]).unwrap();
    c.start_agent_with(1, &["--ca-dir", ca.to_str().unwrap(), "--config", actual.to_str().unwrap()]).unwrap();
    c.enroll(&client).unwrap();
    c.enroll(&server).unwrap();
    c.serve(&server, 8080).unwrap();
    let r = c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(!r.success, "reached a server with the wrong identity: {:?}", r.json);
    let tls = c.metric(0, "nodemesh_tcp_connection_failures_total", &[("pod", "client"), ("reason", "tls")]).unwrap();
    assert_eq!(tls, 1.0);
    assert_eq!(opened(&c, 1, &server, "inbound", "mutual_tls"), 0.0);
}

/// A closed port behind the tunnel: the destination agent answers the CONNECT with 503 as soon as the
/// application's kernel refuses, and the calling agent resets its client — within milliseconds, where the
/// refusal used to be lost and the destination agent's connect waited 10 s.
#[test]
fn closed_port_behind_the_tunnel_is_reset_at_once() {
    let mut c = cluster!(2);
    let (client, server) = meshed_pair(&mut c, 0, 1, "", &[]);
    let r = c.testbin(&client, &["probe", &addr(server.ipv4, 9999).to_string()]).unwrap();
    assert_eq!(r["outcome"], "reset", "{r}");
    assert!(r["ms"].as_u64().unwrap() < 1000, "{r}");
    let failed = c.metric(1, "nodemesh_tcp_connection_failures_total", &[("reason", "connect")]).unwrap();
    assert_eq!(failed, 1.0, "the destination agent counts the refused connect");
    let r = c.testbin(&client, &["probe", &addr(server.ipv4, 8080).to_string()]).unwrap();
    assert_eq!(r["outcome"], "greeted", "{r}");
}

/// A CNI call is a claim, not proof: a network namespace announced as `default/client` gets client's identity
/// only when its addresses are the ones the config (the control plane) knows for client, and a call claiming
/// addresses its namespace does not have is refused. Before, the name alone was enough.
#[test]
fn a_claimed_pod_name_gets_no_identity_the_control_plane_does_not_confirm() {
    let mut c = cluster!(2);
    let (client, server) = meshed_pair(&mut c, 0, 1, "", &[]);
    let impostor = c.add_pod(0, "impostor").unwrap();
    c.serve(&impostor, 8080).unwrap();
    let claim = Pod { name: "client".into(), ..impostor.clone() };
    c.enroll(&claim).unwrap();
    let workloads = c.admin(0, "/workloads").unwrap();
    let identities: Vec<(String, Value)> = workloads
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["containerId"].as_str().unwrap().to_string(), w["identity"].clone()))
        .collect();
    assert!(identities.contains(&(client.container_id.clone(), Value::from(spiffe("default", "client-sa")))));
    assert!(identities.contains(&(impostor.container_id.clone(), Value::Null)), "{identities:?}");
    assert_eq!(c.admin(0, "/certs").unwrap()["certificates"][0]["users"], 1, "one pod uses client-sa");

    // Without an identity the impostor's connections to a meshed workload are refused, never sent in plaintext.
    let r = c.client(&impostor, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(!r.success, "{:?}", r.json);
    let denied = c.metric(0, "nodemesh_tcp_connections_denied_total", &[("reason", "no_identity")]).unwrap();
    assert_eq!(denied, 1.0);
    assert!(c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap().success, "the real client is unaffected");

    // Claiming the client's addresses, which its namespace does not have, fails the CNI call.
    let other = c.add_pod(0, "other").unwrap();
    let lying = Pod { name: "client".into(), ipv4: client.ipv4, ipv6: client.ipv6, ..other };
    let out = c.cni("ADD", &lying).unwrap();
    assert!(!out.exit_ok, "{}", out.stdout);
    assert!(out.stdout.contains("is not configured in its network namespace"), "{}", out.stdout);
}

/// A connection admitted under one config is decided again under the next, as ztunnel does: a DENY for one
/// principal and STRICT, written while meshed and plaintext connections stream, end those they refuse with a reset
/// (counted as cut) and leave the others streaming, their bytes intact.
#[test]
fn a_policy_written_later_ends_the_open_connections_it_refuses() {
    let mut c = cluster!(2);
    let server = c.add_pod(1, "server").unwrap();
    let (denied, allowed) = (c.add_pod(0, "denied").unwrap(), c.add_pod(0, "allowed").unwrap());
    let plain = c.add_pod(0, "plain").unwrap();
    let ca = c.init_ca().unwrap();
    let workloads = [(&server, "server-sa"), (&denied, "denied-sa"), (&allowed, "allowed-sa")];
    let config = c.write_config(&workloads, "").unwrap();
    start_mesh(&mut c, &ca, &config, &[]);
    for pod in [&server, &denied, &allowed] {
        c.enroll(pod).unwrap();
    }
    c.serve(&server, 8080).unwrap();
    let target = addr(server.ipv4, 8080).to_string();
    let streams = |pod: &Pod| c.testbin_start(pod, &["streams", &target, "2", "6"]).unwrap();
    let (from_denied, from_allowed, from_plain) = (streams(&denied), streams(&allowed), streams(&plain));
    let open = || c.metric(1, "nodemesh_tcp_connections_opened_total", &[("reporter", "destination")]).unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() < 6.0 {
        assert!(Instant::now() < deadline, "the six connections did not open");
        std::thread::sleep(Duration::from_millis(50));
    }

    let policies = "\
peerAuthentications: [{namespace: default, name: strict, mode: STRICT}]
authorizationPolicies:
  - {namespace: default, name: no-denied, action: DENY, rules: [{from: [{principals: [cluster.local/ns/default/sa/denied-sa]}]}]}
";
    c.write_config(&workloads, policies).unwrap();
    c.signal_agent(1, libc::SIGHUP).unwrap();

    let (denied_report, allowed_report, plain_report) =
        (from_denied.wait().unwrap(), from_allowed.wait().unwrap(), from_plain.wait().unwrap());
    assert_eq!(denied_report.json["ok"], 0, "the DENY ends both: {:?}", denied_report.json);
    assert_eq!(plain_report.json["ok"], 0, "STRICT ends plaintext: {:?}", plain_report.json);
    assert_eq!(allowed_report.json["ok"], 2, "the others stream on: {:?}", allowed_report.json);
    for report in [&denied_report, &plain_report] {
        let failures = report.json["failures"].as_array().unwrap();
        assert!(failures.iter().all(|f| f.as_str().unwrap().contains("reset")), "ended by a reset: {failures:?}");
    }
    let cut = c.metric(1, "nodemesh_connections_cut_total", &[("reason", "policy_changed")]).unwrap();
    assert_eq!(cut, 4.0, "two meshed and two plaintext connections cut");
    let log = c.log_of("agent-n2");
    assert!(log.contains("the config now in force does not admit it"), "logged");
    assert!(!c.client(&denied, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap().success, "new ones refused too");
}

/// A client certificate from the mesh's own root but another trust domain is refused on the HBONE listener (a
/// root may sign for several trust domains: chaining to it is not membership), counted by reason and logged.
/// Once that trust domain is an alias its peers are admitted, and a policy principal written with the mesh's
/// trust domain matches them too (Istio's `trustDomainAliases`).
#[test]
fn peers_of_other_trust_domains_are_refused_unless_aliased() {
    let mut c = cluster!(1);
    let policy = "authorizationPolicies:\n  - {namespace: default, name: only-prober, selector: {app: server}, \
                  rules: [{from: [{principals: [cluster.local/ns/default/sa/prober]}]}]}\n";
    let (server, prober, ca) = server_and_prober(&mut c, policy);
    let (gateway, target) = (addr(server.ipv4, 15008), addr(server.ipv4, 8080));
    let connect = |td: &str, sa: &str| {
        let cert = probe::from_ca(&ca, &Identity::new(td, "default", sa), |_| {}).unwrap();
        probe::connect(&prober.netns, gateway, target, cert).map(|(status, _)| status)
    };

    let foreign = connect("other.td", "prober");
    assert!(foreign.is_err(), "a peer of another trust domain got past the handshake: {foreign:?}");
    let reason = [("direction", "inbound"), ("reason", "foreign_trust_domain")];
    assert_eq!(c.metric(0, "nodemesh_hbone_failures_total", &reason).unwrap(), 1.0);
    assert!(c.log_of("agent-n1").contains("spiffe://other.td/ns/default/sa/prober"), "the refusal names the peer");
    assert_eq!(connect("cluster.local", "prober").unwrap(), 200, "the mesh's own trust domain is admitted");

    c.write_config(&[(&server, "server-sa")], &format!("{policy}trustDomainAliases: [other.td]\n")).unwrap();
    c.signal_agent(0, libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.config_len(0, "trustDomainAliases") != 1 {
        assert!(Instant::now() < deadline, "config was not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(connect("other.td", "prober").unwrap(), 200, "aliased, and the policy's principal matches it");
    assert_eq!(connect("other.td", "stranger").unwrap(), 401, "the policy still decides");
    assert!(connect("third.td", "prober").is_err(), "only the aliases");
}

/// A caller the config does not know (a workload of another cluster behind its ztunnel) is labelled from the
/// `baggage` on its CONNECT — its namespace still the one its certificate proves — and the 200 carries the
/// destination pod's own baggage, as ztunnel's answer does.
#[test]
fn a_caller_the_config_does_not_know_is_labelled_from_its_baggage() {
    let mut c = cluster!(1);
    let (server, prober, ca) = server_and_prober(&mut c, "");
    let cert = probe::from_ca(&ca, &Identity::new("cluster.local", "remote", "prober-sa"), |_| {}).unwrap();
    let baggage = "k8s.cluster.name=east,k8s.namespace.name=claimed,k8s.deployment.name=prober-app,\
                   service.name=prober,service.version=v9";
    let (gateway, target) = (addr(server.ipv4, 15008), addr(server.ipv4, 8080));
    let answer = probe::connect_with(&prober.netns, gateway, target, cert, (&[("baggage", baggage)], b"")).unwrap();
    assert_eq!(answer.status, 200);
    let theirs = answer.headers.get("baggage").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(theirs, "k8s.namespace.name=default,k8s.pod.name=server,service.name=server,service.version=latest");
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "prober-app"),
        ("source_workload_namespace", "remote"),
        ("source_canonical_service", "prober"),
        ("source_version", "v9"),
        ("source_principal", "spiffe://cluster.local/ns/remote/sa/prober-sa"),
    ];
    assert_eq!(c.metric(0, "nodemesh_tcp_connections_opened_total", &labels).unwrap(), 1.0);
}

/// The same caller's HTTP requests, served one by one because the pod's policy looks at them, are labelled from
/// its baggage in the request metrics too.
#[test]
fn requests_of_a_caller_the_config_does_not_know_are_labelled_from_its_baggage() {
    let mut c = cluster!(1);
    let policy = "authorizationPolicies: [{namespace: default, name: get-only, rules: [{to: [{methods: [GET]}]}]}]\n";
    let http = Path::new(env!("CARGO_BIN_EXE_mesh-http"));
    let (server, prober, ca) = server_and_prober_serving(&mut c, policy, |c, server| {
        c.start_server(server, http, &["serve", "8080", "server"], "http-server").unwrap()
    });
    let cert = probe::from_ca(&ca, &Identity::new("cluster.local", "remote", "prober-sa"), |_| {}).unwrap();
    let baggage = "k8s.namespace.name=remote,k8s.deployment.name=prober-app,service.name=prober,service.version=v9";
    let (gateway, target) = (addr(server.ipv4, 15008), addr(server.ipv4, 8080));
    let request = b"GET /hello HTTP/1.1\r\nhost: server\r\n\r\n";
    let answer = probe::connect_with(&prober.netns, gateway, target, cert, (&[("baggage", baggage)], request)).unwrap();
    assert!(answer.first_line.starts_with("HTTP/1.1 200"), "{}", answer.first_line);
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "prober-app"),
        ("source_canonical_service", "prober"),
        ("source_version", "v9"),
        ("response_code", "200"),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.metric(0, "nodemesh_requests_total", &labels).unwrap_or(0.0) != 1.0 {
        assert!(Instant::now() < deadline, "request not counted with the caller's labels:\n{}", c.metrics(0).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both agents' access log lines of one tunnelled connection carry the same trace id: the one the calling agent
/// put on its CONNECT's `traceparent`, read back by the destination agent.
#[test]
fn both_sides_of_a_tunnel_log_the_trace_id_of_its_connect() {
    let mut c = cluster!(2);
    let logs = "telemetry: [{namespace: nodemesh-system, name: logs, settings: {accessLogging: {enabled: true}}}]\n";
    let (client, server) = meshed_pair(&mut c, 0, 1, logs, &[]);
    let r = c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    let trace_of = |agent: &str, reporter: &str| -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = c.log_lines(agent).into_iter().find_map(|l| {
                let v: Value = serde_json::from_str(&l).ok()?;
                (v["kind"] == "tcp" && v["reporter"] == reporter).then_some(v)
            });
            if let Some(v) = line {
                return v["traceId"].as_str().map(String::from);
            }
            assert!(Instant::now() < deadline, "no tcp access log line from {agent}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let (sent, received) = (trace_of("agent-n1", "source"), trace_of("agent-n2", "destination"));
    assert!(sent.as_ref().is_some_and(|t| t.len() == 32), "{sent:?}");
    assert_eq!(sent, received);
}
