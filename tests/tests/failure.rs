//! Fail closed and fail loud, end to end: agents and a controller on its directory, restarted and starved the
//! way production breaks them, with a sniffer on the node-to-node link. A mesh that leaks plaintext after a
//! restart, or turns a refusal into a hang, loses its users' trust; each test here failed before its fix.

use std::time::{Duration, Instant};

use mesh_tests::app::pod_object;
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
    assert_eq!(c.mutual_tls_opened(0), 1.0, "the connection went through the mTLS tunnel");
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
    assert_eq!(c.ready_status(0), 503);
    // Not ready, but alive: the kubelet's liveness probe (on the metrics port) does not restart it for waiting.
    let metrics: std::net::SocketAddr = mesh_tests::cluster::METRICS.parse().unwrap();
    let live = mesh_tests::sys::http_get(&c.nodes[0].netns, metrics, "/healthz/live").unwrap();
    assert_eq!(live.0, 200, "{live:?}");

    let marker = [("MESH_TESTBIN_MARKER", MARKER)];
    let sniffer = Sniffer::start(&c.fabric).unwrap();
    let r = c.client_with(&client, target, 64 * KIB, 1, &marker).unwrap();
    let wire = sniffer.finish().unwrap();
    assert!(!r.success, "no config, no traffic: {:?}", r.json);
    assert!(!contains(&wire, MARKER.as_bytes()), "plaintext left the node of an agent without config");
    let denied = c.metric(0, "nodemesh_tcp_connections_denied_total", &[("reason", "no_config")]).unwrap();
    assert_eq!(denied, 1.0);
    // A pod created meanwhile is neither captured nor let out uncaptured: its ADD says "try again later" (it was
    // enrolled before, whatever its namespace); once the config is there, the runtime's retry enrolls it.
    let newcomer = c.add_pod(0, "newcomer").unwrap();
    let add = c.cni("ADD", &newcomer).unwrap();
    assert!(!add.exit_ok, "ADD before the first config: {}", add.stdout);
    assert_eq!(add.error_code(), Some(11), "{}", add.stdout);
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 1, "nothing enrolled meanwhile");

    // Let the agent's reconnect delay grow to its cap first, as during a long controller outage.
    std::thread::sleep(Duration::from_secs(4));
    c.start_controller().unwrap();
    let back = Instant::now();
    wait_for("the agent ready again", || c.ready_status(0) == 200);
    assert!(back.elapsed() < Duration::from_secs(6), "config took {:?} after the controller returned", back.elapsed());
    let r = c.client(&client, target, 64 * KIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    assert_eq!(c.mutual_tls_opened(0), 1.0);
    c.enroll(&newcomer).unwrap();
    assert_eq!(c.admin(0, "/workloads").unwrap().as_array().unwrap().len(), 2, "the retried ADD enrolled it");
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

/// The controller's own metrics (it listens in the fabric netns).
fn controller_metric(c: &Cluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    let at = addr(mesh_tests::cluster::CONTROLLER_IP.parse::<std::net::Ipv4Addr>().unwrap(), 15014);
    let (_, text) = mesh_tests::sys::http_get(&c.fabric, at, "/metrics").unwrap();
    mesh_tests::metric_sum(&text, name, labels)
}

const ECHO_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {clusterIP: 10.96.5.2, selector: {app: server}, ports: [{name: tcp, port: 7000, targetPort: 8080}]}
";

fn traffic_policy(name: &str, fault: &str) -> String {
    format!(
        "---\napiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{targetRef: {{name: echo}}, faultInjection: {fault}}}\n"
    )
}

/// What the CRD schema forbids is refused in directory mode too, with reason Invalid, counted, and applied
/// nowhere: a 150 % abort, an HTTP status 999, a delay of "2 seconds", and an ALLOW policy whose `rules` is
/// misspelled (which used to be read as "no rules": deny everything).
#[test]
fn invalid_objects_are_refused_loudly_and_change_nothing() {
    let mut c = cluster!(2);
    let (client, server) = meshed_by_controller(&mut c);
    let bad = [
        ECHO_SERVICE.to_string(),
        traffic_policy("abort-too-often", "{abort: {httpStatus: 503, percent: 150}}"),
        traffic_policy("abort-negative", "{abort: {httpStatus: 503, percent: -10}}"),
        traffic_policy("odd-status", "{abort: {httpStatus: 999, percent: 10}}"),
        traffic_policy("wordy-delay", "{delay: {fixedDelay: 2 seconds, percent: 100}}"),
        "---\napiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: default}\n\
         spec: {action: ALLOW, selector: {matchLabels: {app: server}}, rulez: [{from: [{source: {namespaces: [default]}}]}]}\n"
            .to_string(),
    ]
    .concat();
    c.write_objects("bad.yaml", Some(&bad)).unwrap();
    wait_for("the Service on node 1", || c.config_len(0, "services") == 1);
    wait_for("the rejections counted", || {
        controller_metric(&c, "nodemesh_controller_rejected_objects", &[("reason", "Invalid")]) == 5.0
    });
    let by_kind = |kind| controller_metric(&c, "nodemesh_controller_rejected_objects", &[("kind", kind)]);
    assert_eq!(by_kind("TrafficPolicy"), 4.0);
    assert_eq!(by_kind("AuthorizationPolicy"), 1.0);
    for node in 0..2 {
        assert_eq!(c.config_len(node, "trafficPolicies"), 0);
        assert_eq!(c.config_len(node, "authorizationPolicies"), 0);
    }
    let log = c.log_of("controller");
    assert!(log.contains("spec.faultInjection.abort.percent: 150 is above the maximum 100"), "the reason is logged");
    assert!(log.contains("spec.rulez: unknown field"), "the typo is named");
    let r = c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(r.success, "the misspelled policy must not deny everything: {:?}", r.json);
}

/// A controller restarted while one of its files does not parse serves nothing rather than a mesh without that
/// file's objects: agents keep their config (and traffic) until the file is fixed, then get the new one.
#[test]
fn controller_restarted_with_a_broken_file_withholds_config_instead_of_dropping_it() {
    let mut c = cluster!(2);
    let (client, server) = meshed_by_controller(&mut c);
    c.write_objects("services.yaml", Some(ECHO_SERVICE)).unwrap();
    wait_for("the Service on node 1", || c.config_len(0, "services") == 1);

    c.kill_controller().unwrap();
    c.write_objects("services.yaml", Some("apiVersion: v1\nkind: Service\nmetadata: {name: [broken\n")).unwrap();
    c.start_controller().unwrap();
    wait_for("the snapshot withheld", || controller_metric(&c, "nodemesh_controller_snapshot_withheld", &[]) == 1.0);
    // The agents reconnect (at most 3 s apart) and are sent nothing.
    wait_for("both agents back", || controller_metric(&c, "nodemesh_controller_connected_agents", &[]) == 2.0);
    std::thread::sleep(Duration::from_millis(500));
    for node in 0..2 {
        assert_eq!(c.config_len(node, "services"), 1, "node {} lost the Service", node + 1);
        assert_eq!(c.config_len(node, "workloads"), 2, "node {} lost its workloads", node + 1);
    }
    let r = c.client(&client, addr(server.ipv4, 8080), 4 * KIB, 1).unwrap();
    assert!(r.success, "{:?}", r.json);
    assert!(c.log_of("controller").contains("not serving config until every file parses"));

    let fixed = format!("{ECHO_SERVICE}---\n{}", ECHO_SERVICE.replace("echo", "echo-2").replace("5.2", "5.3"));
    c.write_objects("services.yaml", Some(&fixed)).unwrap();
    wait_for("the fixed file served", || c.config_len(0, "services") == 2);
    assert_eq!(controller_metric(&c, "nodemesh_controller_snapshot_withheld", &[]), 0.0);
}
