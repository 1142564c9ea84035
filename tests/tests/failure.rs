//! Fail closed and fail loud, end to end: agents and a controller on its directory, restarted and starved the
//! way production breaks them, with a sniffer on the node-to-node link. A mesh that leaks plaintext after a
//! restart, or turns a refusal into a hang, loses its users' trust; each test here failed before its fix.

use std::time::{Duration, Instant};

use mesh_tests::app::pod_object;
use mesh_tests::cluster::ADMIN;
use mesh_tests::sniff::{Sniffer, contains};
use mesh_tests::{Cluster, Pod, addr, cluster, wait_for};

const KIB: u64 = 1024;
const MARKER: &str = "NODEMESH-FAIL-CLOSED-MARKER-41c9";

/// `client` (service account client-sa) on node 1 and `server` (server-sa) on node 2, in the meshed `default`
/// namespace of the controller's directory; both agents fed by the controller, both pods enrolled, the server
/// echoing on 8080.
fn meshed_by_controller(c: &mut Cluster) -> (Pod, Pod) {
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod(1, "server").unwrap();
    let pods = [
        pod_object(c, &client, "client-sa", "{app: client}", None),
        pod_object(c, &server, "server-sa", "{app: server}", None),
    ]
    .concat();
    c.write_objects("namespaces.yaml", Some(mesh_tests::MESH_NAMESPACES)).unwrap();
    c.write_objects("pods.yaml", Some(&pods)).unwrap();
    c.start_controller().unwrap();
    for node in 0..2 {
        c.start_agent_with_controller(node).unwrap();
    }
    c.enroll(&client).unwrap();
    c.enroll(&server).unwrap();
    c.serve(&server, 8080).unwrap();
    (client, server)
}

fn ready_status(c: &Cluster, node: usize) -> u16 {
    mesh_tests::sys::http_get(&c.nodes[node].netns, ADMIN.parse().unwrap(), "/healthz/ready").map_or(0, |r| r.0)
}

fn mutual_tls_opened(c: &Cluster, node: usize) -> f64 {
    let labels = [("reporter", "source"), ("connection_security_policy", "mutual_tls")];
    c.metric(node, "nodemesh_tcp_connections_opened_total", &labels).unwrap()
}

/// Both agents restarted while the controller is down resume from the config and certificates they kept: ready
/// at once, traffic in mTLS with the very certificate issued before, not a byte of plaintext between the nodes.
/// (They used to come back with no workloads and forward everything as plaintext passthrough.)
#[test]
fn agents_restarted_without_the_controller_resume_their_last_config_and_certificates() {
    let mut c = cluster!(2);
    let (client, server) = meshed_by_controller(&mut c);
    let target = addr(server.ipv4, 8080);
    let marker = [("MESH_TESTBIN_MARKER", MARKER)];
    assert!(c.client_with(&client, target, 64 * KIB, 1, &marker).unwrap().success);
    let serial = |c: &Cluster| c.admin(0, "/certs").unwrap()["certificates"][0]["serial"].clone();
    let issued = serial(&c);
    assert!(issued.is_string(), "a certificate was issued");

    c.kill_controller().unwrap();
    for node in 0..2 {
        c.kill_agent(node).unwrap();
        // Waits for readiness: with the kept config and certificates, the controller is not needed for it.
        c.start_agent_with_controller(node).unwrap();
    }
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 1);
    let sniffer = Sniffer::start(&c.fabric).unwrap();
    let r = c.client_with(&client, target, 256 * KIB, 1, &marker).unwrap();
    let wire = sniffer.finish().unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert!(wire.len() > (256 * KIB) as usize, "the tunnel's bytes were captured ({} bytes)", wire.len());
    assert!(!contains(&wire, MARKER.as_bytes()), "plaintext between the nodes after a restart without the controller");
    assert_eq!(mutual_tls_opened(&c, 0), 1.0, "the connection went through the mTLS tunnel");
    assert_eq!(serial(&c), issued, "the kept certificate serves (the CA is down)");
}

/// An agent with nothing to decide by — fed by a controller that is down, no config kept — refuses the enrolled
/// pods' connections and stays unready; when the controller returns it has its config within seconds (jittered
/// reconnects capped at 3 s, no longer up to 30 s) and traffic flows in mTLS.
#[test]
fn agent_without_any_config_fails_closed_until_the_controller_returns() {
    let mut c = cluster!(2);
    let (client, server) = meshed_by_controller(&mut c);
    let target = addr(server.ipv4, 8080);
    c.kill_controller().unwrap();
    c.kill_agent(0).unwrap();
    // What an agent new to the node would have: the pods it enrolled, nothing from the controller.
    let state_dir = c.nodes[0].state_dir.clone();
    for kept in ["config.json", "trust-bundle.pem"] {
        std::fs::remove_file(state_dir.join(kept)).unwrap();
    }
    std::fs::remove_dir_all(state_dir.join("certs")).unwrap();
    c.start_agent_unready(0).unwrap();
    wait_for("re-adoption", || c.admin(0, "/workloads").is_ok_and(|w| w.as_array().is_some_and(|a| a.len() == 1)));
    assert_eq!(ready_status(&c, 0), 503);

    let marker = [("MESH_TESTBIN_MARKER", MARKER)];
    let sniffer = Sniffer::start(&c.fabric).unwrap();
    let r = c.client_with(&client, target, 64 * KIB, 1, &marker).unwrap();
    let wire = sniffer.finish().unwrap();
    assert!(!r.success, "no config, no traffic: {:?}", r.json);
    assert!(!contains(&wire, MARKER.as_bytes()), "plaintext left the node of an agent without config");
    let denied = c.metric(0, "nodemesh_tcp_connections_denied_total", &[("reason", "no_config")]).unwrap();
    assert_eq!(denied, 1.0);

    // Let the agent's reconnect delay grow to its cap first, as during a long controller outage.
    std::thread::sleep(Duration::from_secs(4));
    c.start_controller().unwrap();
    let back = Instant::now();
    wait_for("the agent ready again", || ready_status(&c, 0) == 200);
    assert!(back.elapsed() < Duration::from_secs(6), "config took {:?} after the controller returned", back.elapsed());
    let r = c.client(&client, target, 64 * KIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert_eq!(mutual_tls_opened(&c, 0), 1.0);
}

const HTTP: &str = env!("CARGO_BIN_EXE_mesh-http");

/// A Service whose endpoints' port has nothing listening.
const CLOSED_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: closed, namespace: default}
spec: {clusterIP: 10.96.5.1, selector: {app: server}, ports: [{name: http, port: 80, targetPort: 9999}]}
";

/// HTTP to a Service whose endpoint refuses the connection: 503 with response flag UF, in milliseconds.
#[test]
fn request_to_a_refusing_endpoint_is_a_fast_503_uf() {
    let mut c = cluster!(2);
    let (client, _server) = meshed_by_controller(&mut c);
    c.write_objects("closed.yaml", Some(CLOSED_SERVICE)).unwrap();
    wait_for("the Service on node 1", || c.config_len(0, "services") == 1);
    let r = mesh_tests::app::get(&c, std::path::Path::new(HTTP), &client, &["http://10.96.5.1/"]);
    assert_eq!(r["statuses"]["503"], 1, "{r}");
    assert_eq!(r["flags"]["UF"], 1, "{r}");
    assert!(r["max_ms"].as_f64().unwrap() < 1000.0, "{r}");
}
