//! The controller (directory source) feeding real agents over gRPC, and its CA.

use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_common::proto::SignRequest;
use mesh_common::proto::certificate_service_client::CertificateServiceClient;
use mesh_tests::cluster::{CONTROLLER_IP, CONTROLLER_PORT};
use mesh_tests::sniff::{Sniffer, contains};
use mesh_tests::{Cluster, Pod};
use mesh_tests::{addr, cluster, wait_for};

const KIB: u64 = 1024;

const DENY_CLIENT: &str = "\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{principals: [cluster.local/ns/default/sa/client-sa]}]}]
";

/// `default/client` on node 1 and `shop/server` on node 2 as objects in the controller's directory; controller
/// and agents (fed by it) started; the client enrolled; the server listening on 8080 but not enrolled yet.
fn controller_pair_before_server_enrolls(c: &mut Cluster) -> (Pod, Pod) {
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod_in(1, "server", "shop").unwrap();
    c.write_objects("namespaces.yaml", Some(mesh_tests::MESH_NAMESPACES)).unwrap();
    c.write_objects("pods.yaml", Some(&c.pod_objects(&[(&client, "client-sa"), (&server, "server-sa")]))).unwrap();
    c.start_controller().unwrap();
    c.start_agent_with_controller(0).unwrap();
    c.start_agent_with_controller(1).unwrap();
    c.enroll(&client).unwrap();
    c.serve(&server, 8080).unwrap();
    (client, server)
}

/// The same with both pods enrolled.
fn controller_pair(c: &mut Cluster) -> (Pod, Pod) {
    let (client, server) = controller_pair_before_server_enrolls(c);
    c.enroll(&server).unwrap();
    (client, server)
}

/// A pod called before its first certificate has come back from the controller: the destination agent holds the
/// caller's handshake until the certificate is there (within the handshake timeout) instead of refusing it for
/// want of one (the caller saw a reset). The controller is stopped (SIGSTOP) while the server pod enrolls, so its
/// certificate request waits, and resumed half a second after the call began.
#[test]
fn a_pod_called_before_its_first_certificate_arrives_answers_once_it_has_it() {
    let mut c = cluster!(2);
    let (client, server) = controller_pair_before_server_enrolls(&mut c);
    wait_for("the client's certificate", || c.ready_status(0) == 200);

    c.signal_controller(libc::SIGSTOP).unwrap();
    let resumed = resume_on_drop(&c);
    c.enroll(&server).unwrap();
    let call = c.client_start(&client, addr(server.ipv4, 8080), KIB, &[]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_ne!(c.ready_status(1), 200, "the server's agent is still waiting for the certificate");
    drop(resumed);
    let r = call.wait().unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
}

/// Resumes the controller when dropped (also when the test fails while it is stopped).
fn resume_on_drop(c: &Cluster) -> impl Drop + '_ {
    struct Resume<'a>(&'a Cluster);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            let _ = self.0.signal_controller(libc::SIGCONT);
        }
    }
    Resume(c)
}

fn policies_on(c: &Cluster, node: usize) -> usize {
    c.admin(node, "/config_dump").unwrap()["config"]["authorizationPolicies"].as_array().map_or(0, Vec::len)
}

/// Config and certificates come from the controller; a policy file added to (and removed from) the directory
/// reaches the agent whose pods it concerns, and only that one.
#[test]
fn directory_source_drives_agents_over_grpc() {
    let mut c = cluster!(2);
    let (client, server) = controller_pair(&mut c);
    let target = addr(server.ipv4, 8080);

    let r = c.client(&client, target, 256 * KIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    let mtls =
        [("reporter", "destination"), ("destination_workload", "server"), ("connection_security_policy", "mutual_tls")];
    assert_eq!(c.metric(1, "nodemesh_tcp_connections_opened_total", &mtls).unwrap(), 1.0);
    let certs = c.admin(0, "/certs").unwrap();
    assert_eq!(certs["certificates"][0]["identity"], "spiffe://cluster.local/ns/default/sa/client-sa", "{certs}");

    c.write_objects("policy.yaml", Some(DENY_CLIENT)).unwrap();
    wait_for("the policy to reach the server's agent", || policies_on(&c, 1) == 1);
    assert_eq!(policies_on(&c, 0), 0, "node 1 has no pod in namespace shop: it must not get shop's policies");
    let denied = c.client(&client, target, 4 * KIB, 1).unwrap();
    assert!(!denied.success, "the DENY policy from the controller did not apply: {:?}", denied.json);

    c.write_objects("policy.yaml", None).unwrap();
    wait_for("the policy to be withdrawn", || policies_on(&c, 1) == 0);
    let r = c.client(&client, target, 4 * KIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
}

/// While the controller is away agents keep their config, certificates and traffic; when it returns they
/// resync, including what changed in the meantime.
#[test]
fn agents_keep_forwarding_while_the_controller_is_away() {
    let mut c = cluster!(2);
    let (client, server) = controller_pair(&mut c);
    let target = addr(server.ipv4, 8080);
    assert!(c.client(&client, target, 64 * KIB, 1).unwrap().success);

    c.kill_controller().unwrap();
    for _ in 0..3 {
        let r = c.client(&client, target, 64 * KIB, 1).unwrap();
        assert!(r.success, "traffic must not depend on the controller being up: {:?} {}", r.json, r.stderr);
    }
    c.write_objects("policy.yaml", Some(DENY_CLIENT)).unwrap();
    c.start_controller().unwrap();
    wait_for("the agents to resync", || policies_on(&c, 1) == 1);
    assert!(!c.client(&client, target, 4 * KIB, 1).unwrap().success, "the change made while away now applies");
}

fn sign(c: &Cluster, token: Option<String>, node: &str, identity: &str) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let url = format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}");
    sign_via(c, &url, Some(c.controller_root()), token, node, identity)
}

/// A signing call to the controller at `url`, verifying it with the roots in `root` (https).
fn sign_via(
    c: &Cluster,
    url: &str,
    root: Option<PathBuf>,
    token: Option<String>,
    node: &str,
    identity: &str,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec();
    let (url, node, identity) = (url.to_string(), node.to_string(), identity.to_string());
    mesh_tests::sys::in_netns(&c.fabric, move || {
        // The socket must be created inside the fabric netns: a runtime on this very thread does that.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let channel = mesh_agent::controller::channel::channel(&url, root.as_deref()).unwrap();
            let mut client = CertificateServiceClient::new(channel);
            let mut request = tonic::Request::new(SignRequest { identity, csr_der: csr, lifetime_seconds: 3600 });
            if let Some(token) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            request.metadata_mut().insert("x-nodemesh-node", node.parse().unwrap());
            client.sign(request).await.map(|r| r.into_inner().chain_der)
        })
    })
    .unwrap()
}

/// The agents' channel is TLS with the mesh CA's certificate: the token never crosses the wire in clear, a client
/// trusting another root is refused, and a plaintext client gets nowhere.
#[test]
fn control_channel_is_tls_verified_by_the_mesh_root() {
    let mut c = cluster!(1);
    let (token, identity) = signing_controller(&mut c);
    let node = c.nodes[0].name.clone();

    let sniffer = Sniffer::start(&c.fabric).unwrap();
    assert!(sign(&c, Some(token.clone()), &node, identity).is_ok(), "signed over TLS");
    let wire = sniffer.finish().unwrap();
    assert!(contains(&wire, &[0x16, 0x03]), "a TLS handshake crossed the wire");
    assert!(!contains(&wire, token.as_bytes()), "the bootstrap token was readable on the wire");

    let (foreign, _) =
        mesh_agent::identity::ca::new_root("elsewhere.example", std::time::Duration::from_secs(3600)).unwrap();
    let foreign_root = c.tmp_dir().join("foreign-root.pem");
    std::fs::write(&foreign_root, foreign.pem()).unwrap();
    let https = format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}");
    let refused = sign_via(&c, &https, Some(foreign_root), Some(token.clone()), &node, identity).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let http = format!("http://{CONTROLLER_IP}:{CONTROLLER_PORT}");
    assert!(sign_via(&c, &http, None, Some(token), &node, identity).is_err(), "plaintext to a TLS controller");
    wait_for("the controller to log the failed handshakes", || {
        c.log_lines("controller").iter().filter(|l| l.contains("TLS handshake with a would-be agent failed")).count()
            >= 2
    });
}

/// The controller on the directory source with one pod, `default/client` on node 1: the bootstrap token and the
/// pod's identity.
fn signing_controller(c: &mut Cluster) -> (String, &'static str) {
    let client = c.add_pod(0, "client").unwrap();
    c.write_objects("namespaces.yaml", Some(mesh_tests::MESH_NAMESPACES)).unwrap();
    c.write_objects("pods.yaml", Some(&c.pod_objects(&[(&client, "client-sa")]))).unwrap();
    c.start_controller().unwrap();
    let token = std::fs::read_to_string(c.token_file().unwrap()).unwrap();
    (token, "spiffe://cluster.local/ns/default/sa/client-sa")
}

#[test]
fn controller_ca_signs_only_for_pods_on_the_calling_node() {
    let mut c = cluster!(2);
    let (token, identity) = signing_controller(&mut c);
    let node1 = c.nodes[0].name.clone();
    let node2 = c.nodes[1].name.clone();

    let unauthenticated = sign(&c, None, &node1, identity).unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated, "{unauthenticated:?}");
    let wrong_token = sign(&c, Some("not-the-token".into()), &node1, identity).unwrap_err();
    assert_eq!(wrong_token.code(), tonic::Code::Unauthenticated);
    let other_node = sign(&c, Some(token.clone()), &node2, identity).unwrap_err();
    assert_eq!(other_node.code(), tonic::Code::PermissionDenied, "{other_node:?}");
    let unknown_sa = sign(&c, Some(token.clone()), &node1, "spiffe://cluster.local/ns/default/sa/nobody").unwrap_err();
    assert_eq!(unknown_sa.code(), tonic::Code::PermissionDenied);

    let chain = sign(&c, Some(token), &node1, identity).unwrap();
    let leaf = rustls::pki_types::CertificateDer::from(chain[0].clone());
    let svid = mesh_agent::identity::svid::check(&leaf).unwrap();
    assert_eq!(svid.identity.to_string(), identity);
}

/// `/healthz/ready` waits for the certificates of enrolled pods: while the controller refuses to sign (it
/// believes the pod runs elsewhere) the agent is not ready, and it turns ready once the certificate is issued.
#[test]
fn readiness_waits_for_workload_certificates() {
    let mut c = cluster!(1);
    let pod = c.add_pod(0, "client").unwrap();
    let here = c.pod_objects(&[(&pod, "client-sa")]);
    let elsewhere = here.replace(&format!("nodeName: {}", c.nodes[0].name), "nodeName: elsewhere");
    assert_ne!(here, elsewhere);
    c.write_objects("namespaces.yaml", Some(mesh_tests::MESH_NAMESPACES)).unwrap();
    c.write_objects("pods.yaml", Some(&elsewhere)).unwrap();
    c.start_controller().unwrap();
    c.start_agent_with_controller(0).unwrap();
    c.enroll(&pod).unwrap();
    let ready = |c: &Cluster| {
        mesh_tests::sys::http_get(&c.nodes[0].netns, mesh_tests::cluster::ADMIN.parse().unwrap(), "/healthz/ready")
            .map(|(status, _)| status)
            .unwrap()
    };
    wait_for("the identity wanted", || {
        c.admin(0, "/certs").unwrap()["certificates"].as_array().is_some_and(|a| !a.is_empty())
    });
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(ready(&c), 503, "no certificate yet: {}", c.admin(0, "/certs").unwrap());
    assert!(c.admin(0, "/certs").unwrap()["certificates"][0]["serial"].is_null());
    c.write_objects("pods.yaml", Some(&here)).unwrap();
    wait_for("readiness after the certificate is issued", || ready(&c) == 200);
    assert!(c.admin(0, "/certs").unwrap()["certificates"][0]["serial"].is_string());
}

fn captured(c: &Cluster, pod: &Pod, target: SocketAddr) -> bool {
    let r = c.client(pod, target, 4 * KIB, 1).unwrap();
    assert!(r.success, "{:?} {}", r.json, r.stderr);
    r.field("local").starts_with("127.0.0.1:")
}

fn workload_names(c: &Cluster, node: usize) -> Vec<String> {
    let list = c.admin(node, "/workloads").unwrap();
    list.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap_or("").to_string()).collect()
}

/// Labelling a namespace captures its pods, unlabelling releases them; a pod with the opt-out label stays out.
#[test]
fn namespace_label_controls_capture() {
    let mut c = cluster!(1);
    let app = c.add_pod_in(0, "app", "apps").unwrap();
    let optout = c.add_pod_in(0, "optout", "apps").unwrap();
    let server = c.add_pod(0, "server").unwrap();
    let unlabelled = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps}\n";
    let labelled = "apiVersion: v1\nkind: Namespace\nmetadata: {name: apps, labels: {nodemesh.io/mesh: enabled}}\n";
    let optout_pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: optout, namespace: apps, labels: {{nodemesh.io/mesh: disabled}}}}\n\
         spec: {{nodeName: {}}}\nstatus: {{phase: Running, podIP: {}}}\n",
        c.nodes[0].name, optout.ipv4
    );
    c.write_objects("namespaces.yaml", Some(unlabelled)).unwrap();
    c.write_objects("pods.yaml", Some(&c.pod_objects(&[(&app, "app")]))).unwrap();
    c.write_objects("optout.yaml", Some(&optout_pod)).unwrap();
    c.start_controller().unwrap();
    c.start_agent_with_controller(0).unwrap();
    c.serve(&server, 8080).unwrap();
    let target = addr(server.ipv4, 8080);

    c.enroll(&app).unwrap();
    c.enroll(&optout).unwrap();
    assert!(workload_names(&c, 0).is_empty(), "nothing is captured in an unlabelled namespace");
    assert!(!captured(&c, &app, target));

    c.write_objects("namespaces.yaml", Some(labelled)).unwrap();
    wait_for("the labelled namespace's pod to be captured", || workload_names(&c, 0) == ["app"]);
    assert!(captured(&c, &app, target));
    assert!(!captured(&c, &optout, target), "the opted-out pod stays out");

    c.write_objects("namespaces.yaml", Some(unlabelled)).unwrap();
    wait_for("capture to be released", || workload_names(&c, 0).is_empty());
    assert!(!captured(&c, &app, target));
}
