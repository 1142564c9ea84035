//! The controller in Kubernetes mode: kube-rs watching the fake API server (real REST + watch), real agents fed
//! by it, agents authenticated by TokenReview, the CA kept in a Secret, status written back.

use mesh_tests::fakeapi::FakeApi;
use mesh_tests::{Cluster, Pod, addr, cluster, wait_for};
use serde_json::{Value, json};

const KIB: u64 = 1024;
const AGENT_SA: &str = "system:serviceaccount:nodemesh-system:nodemesh-agent";

/// The fake API server, bound inside the fabric netns where the controller runs, on a runtime of its own.
struct Api {
    api: FakeApi,
    _runtime: tokio::runtime::Runtime,
}

fn start_api(c: &Cluster) -> Api {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener =
        mesh_tests::sys::in_netns(&c.fabric, || std::net::TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
    let api = runtime.block_on(async { FakeApi::serve(listener) }).unwrap();
    for crd in mesh_tests::gateway_api::all_crds() {
        api.apply_yaml(&crd).unwrap();
    }
    Api { api, _runtime: runtime }
}

fn namespace(api: &FakeApi, name: &str, meshed: bool) {
    // A merge patch: null removes the label.
    let labels = json!({"nodemesh.io/mesh": if meshed { json!("enabled") } else { Value::Null }});
    api.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})).unwrap();
}

/// The Pod object for a test pod, Running with its IPs, as a kubelet would report it.
fn pod_object(api: &FakeApi, c: &Cluster, node: usize, pod: &Pod, service_account: &str, app: &str) {
    // The uid the test cluster's CNI calls claim (`K8S_POD_UID`).
    let meta = json!({"name": pod.name, "namespace": pod.namespace, "labels": {"app": app}, "uid": format!("uid-{}", pod.name)});
    let spec = json!({"nodeName": c.nodes[node].name, "serviceAccountName": service_account,
                      "containers": [{"name": "app", "image": "test"}]});
    api.apply(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})).unwrap();
    let ips: Vec<Value> = [pod.ipv4.to_string(), pod.ipv6.to_string()].iter().map(|ip| json!({"ip": ip})).collect();
    let status = json!({"phase": "Running", "podIP": pod.ipv4.to_string(), "podIPs": ips});
    api.set_status("v1", "Pod", Some(&pod.namespace), &pod.name, status).unwrap();
}

fn service(api: &FakeApi, namespace: &str, name: &str, ip: &str, app: &str) {
    api.apply(&json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": ip, "selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
    .unwrap();
}

/// A token TokenReview maps to the agent's service account on `node`, minted for the controller's audience as
/// the DaemonSet's projected token is, written to a file for the agent.
fn agent_token(api: &FakeApi, c: &Cluster, node: usize) -> std::path::PathBuf {
    let token = format!("agent-token-{node}-0123456789abcdef");
    let bound_to = [("authentication.kubernetes.io/node-name", c.nodes[node].name.as_str())];
    api.add_token_for(&token, AGENT_SA, &bound_to, &[mesh_controller::auth::DEFAULT_TOKEN_AUDIENCE]);
    let path = c.tmp_dir().join(format!("agent-token-{node}"));
    std::fs::write(&path, &token).unwrap();
    path
}

/// The controller publishes its CA's root in a ConfigMap for the agents to verify it with (the DaemonSet mounts
/// it); the agents here read the same text from a file.
fn mount_ca_root(api: &FakeApi, c: &Cluster) {
    let configmap = api.get("v1", "ConfigMap", Some("nodemesh-system"), "nodemesh-ca-root").expect("CA root published");
    let pem = configmap["data"]["root-cert.pem"].as_str().expect("root-cert.pem in the ConfigMap");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    std::fs::write(c.controller_root(), pem).unwrap();
}

fn condition(object: &Option<Value>, path: &[&str]) -> (String, String) {
    let mut v = object.clone().unwrap_or(Value::Null);
    for p in path {
        v = match p.parse::<usize>() {
            Ok(i) => v[i].clone(),
            Err(_) => v[*p].clone(),
        };
    }
    let accepted = v.as_array().into_iter().flatten().find(|c| c["type"] == "Accepted").cloned().unwrap_or_default();
    (accepted["status"].as_str().unwrap_or_default().into(), accepted["reason"].as_str().unwrap_or_default().into())
}

/// A client pod in `default` on node 1 and a server pod in `shop` on node 2, both namespaces meshed, as Pod
/// objects in the API server.
fn client_and_server(api: &FakeApi, c: &mut Cluster) -> (Pod, Pod) {
    let client = c.add_pod(0, "client").unwrap();
    let server = c.add_pod_in(1, "server", "shop").unwrap();
    namespace(api, "nodemesh-system", false);
    namespace(api, "default", true);
    namespace(api, "shop", true);
    pod_object(api, c, 0, &client, "client-sa", "client");
    pod_object(api, c, 1, &server, "server-sa", "server");
    (client, server)
}

/// A kubeconfig for the API server, written for the controller.
fn kubeconfig(api: &FakeApi, c: &Cluster) -> std::path::PathBuf {
    let path = c.tmp_dir().join("kubeconfig");
    std::fs::write(&path, api.kubeconfig()).unwrap();
    path
}

/// Enrolls both pods, serves on the server and checks that the client reaches it over mTLS (certificates from
/// the controller); the server's address.
fn enrolled_client_reaches_server(c: &mut Cluster, client: &Pod, server: &Pod) -> std::net::SocketAddr {
    c.enroll(client).unwrap();
    c.enroll(server).unwrap();
    c.serve(server, 8080).unwrap();
    let target = addr(server.ipv4, 8080);
    let r = c.client(client, target, 64 * KIB, 1).unwrap();
    assert!(r.success && r.ok_connections() == 1, "{:?} {}", r.json, r.stderr);
    let mtls =
        [("reporter", "destination"), ("destination_workload", "server"), ("connection_security_policy", "mutual_tls")];
    assert_eq!(c.metric(1, "nodemesh_tcp_connections_opened_total", &mtls).unwrap(), 1.0, "mTLS with SVIDs");
    target
}

const DENY_CLIENT: &str = "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n\
    metadata: {name: no-client, namespace: shop}\n\
    spec: {selector: {matchLabels: {app: server}}, action: DENY, \
    rules: [{from: [{principals: [cluster.local/ns/default/sa/client-sa]}]}]}\n";

/// Pods, policies and routes come from the API server; agents authenticate with service-account tokens; the
/// CA lives in a Secret; policy and route changes reach the agents they concern and no others; invalid objects
/// are reported in their status and change nothing.
#[test]
fn kubernetes_source_drives_agents() {
    let mut c = cluster!(2);
    let k8s = start_api(&c);
    let api = &k8s.api;
    let (client, server) = client_and_server(api, &mut c);
    service(api, "shop", "server", "10.96.0.20", "server");
    c.start_controller_kubernetes(&kubeconfig(api, &c)).unwrap();
    assert!(api.get("v1", "Secret", Some("nodemesh-system"), "nodemesh-ca").is_some(), "CA Secret created");
    mount_ca_root(api, &c);

    // An agent whose token is not the agent service account's gets nothing (and so never becomes ready).
    let stranger = c.tmp_dir().join("stranger-token");
    std::fs::write(&stranger, "not-a-known-token-at-all").unwrap();
    let err = c.start_agent_with_token(0, &stranger).unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err:#}");
    assert!(c.log_of("agent-n1").contains("invalid bearer token"), "{}", c.log_of("agent-n1"));
    c.kill_agent(0).unwrap();

    let tokens = [agent_token(api, &c, 0), agent_token(api, &c, 1)];
    c.start_agent_with_token(0, &tokens[0]).unwrap();
    c.start_agent_with_token(1, &tokens[1]).unwrap();
    let target = enrolled_client_reaches_server(&mut c, &client, &server);

    // A policy in `shop` reaches node 2 (the server's) only, takes effect, and is marked Accepted.
    api.apply_yaml(DENY_CLIENT).unwrap();
    wait_for("the policy to reach node 2", || c.config_len(1, "authorizationPolicies") == 1);
    assert_eq!(c.config_len(0, "authorizationPolicies"), 0, "node 1 has no pod in shop");
    assert!(!c.client(&client, target, 4 * KIB, 1).unwrap().success, "denied");
    let ap = || api.get("nodemesh.io/v1alpha1", "AuthorizationPolicy", Some("shop"), "no-client");
    wait_for("Accepted=True on the policy", || condition(&ap(), &["status", "conditions"]).0 == "True");

    // A consumer route (in `default`, for shop/server) reaches node 1 only: node 2 has no caller in `default`.
    api.apply_yaml(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: server-v2, namespace: default}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: server, namespace: shop, port: 80}]\n  \
         rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: server, namespace: shop, port: 80}]}]\n",
    )
    .unwrap();
    wait_for("the route to reach node 1", || c.config_len(0, "routes") == 1);
    assert_eq!(c.config_len(1, "routes"), 0, "consumer routes go to the consumers' nodes only");
    let route = || api.get("gateway.networking.k8s.io/v1", "HTTPRoute", Some("default"), "server-v2");
    wait_for("Accepted=True on the route's Service parent", || {
        condition(&route(), &["status", "parents", "0", "conditions"]).0 == "True"
    });
    assert_eq!(route().unwrap()["status"]["parents"][0]["controllerName"], "nodemesh.io/mesh-controller");

    // Schema-valid but wrong: a TrafficPolicy for a Service that does not exist. Reported, nothing else changes.
    let before: Vec<Value> = (0..2).map(|n| c.admin(n, "/config_dump").unwrap()["config"].clone()).collect();
    api.apply_yaml(
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: ghost, namespace: shop}\n\
         spec: {targetRef: {name: ghost}, rateLimit: {requestsPerSecond: 5}}\n",
    )
    .unwrap();
    let tp = || api.get("nodemesh.io/v1alpha1", "TrafficPolicy", Some("shop"), "ghost");
    wait_for("Accepted=False on the bad policy", || condition(&tp(), &["status", "conditions"]).0 == "False");
    assert_eq!(condition(&tp(), &["status", "conditions"]).1, "TargetNotFound");
    for (n, before) in before.iter().enumerate() {
        let mut now = c.admin(n, "/config_dump").unwrap()["config"].clone();
        now["version"] = before["version"].clone();
        assert_eq!(&now, before, "node {} config changed by an invalid object", n + 1);
    }

    // Mesh-wide settings: the cluster's MeshConfig `default` reaches every node and is marked Accepted; one of
    // another name changes nothing and says why.
    api.apply_yaml(
        "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
         spec: {defaultMtlsMode: STRICT, outboundTrafficPolicy: REGISTRY_ONLY}\n---\n\
         apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mine}\nspec: {defaultMtlsMode: PERMISSIVE}\n",
    )
    .unwrap();
    let setting = |c: &Cluster, n: usize, field: &str| c.admin(n, "/config_dump").unwrap()["config"][field].clone();
    for n in 0..2 {
        wait_for("the MeshConfig to reach every node", || setting(&c, n, "outboundTrafficPolicy") == "REGISTRY_ONLY");
        assert_eq!(setting(&c, n, "defaultPeerAuthentication"), "STRICT");
    }
    let mesh_config = |name: &str| api.get("nodemesh.io/v1alpha1", "MeshConfig", None, name);
    wait_for("Accepted=True on the MeshConfig", || {
        condition(&mesh_config("default"), &["status", "conditions"]).0 == "True"
    });
    wait_for("Accepted=False on the other one", || {
        condition(&mesh_config("mine"), &["status", "conditions"]).0 == "False"
    });
    assert_eq!(condition(&mesh_config("mine"), &["status", "conditions"]).1, "Ignored");

    // Unlabelling `shop` takes its policies away from node 2; the route stays with node 1's callers.
    namespace(api, "shop", false);
    wait_for("shop to leave the mesh", || c.config_len(1, "authorizationPolicies") == 0);
    let meshed = c.admin(1, "/config_dump").unwrap()["config"]["meshNamespaces"].clone();
    assert_eq!(meshed, json!(["default"]));
}

/// The CA refuses an agent that claims another node than its token is bound to.
#[test]
fn token_review_binds_agents_to_their_node() {
    let mut c = cluster!(2);
    let k8s = start_api(&c);
    let api = &k8s.api;
    let client = c.add_pod(0, "client").unwrap();
    namespace(api, "nodemesh-system", false);
    namespace(api, "default", true);
    pod_object(api, &c, 0, &client, "client-sa", "client");
    c.start_controller_kubernetes(&kubeconfig(api, &c)).unwrap();
    mount_ca_root(api, &c);
    // Node 2's agent presents node 1's token: the token names node 1, so node 2's claim is refused.
    let node1_token = agent_token(api, &c, 0);
    let err = c.start_agent_with_token(1, &node1_token).unwrap_err();
    assert!(err.to_string().contains("not ready"), "{err:#}");
    assert!(c.log_of("agent-n2").contains("belongs to node"), "{}", c.log_of("agent-n2"));
    c.kill_agent(1).unwrap();
    // With its own token, node 1's agent gets config and certificates.
    c.start_agent_with_token(0, &node1_token).unwrap();
    c.enroll(&client).unwrap();
    wait_for("the client's certificate", || {
        c.admin(0, "/certs").unwrap()["certificates"][0]["identity"] == "spiffe://cluster.local/ns/default/sa/client-sa"
    });
}

/// Two controller replicas (the Deployment runs two): the second adopts the CA Secret the first created and
/// publishes the same root; each serves agents on its own; workloads whose certificates come from different
/// replicas talk mTLS; when one replica goes away the other keeps serving changes and writing status.
#[test]
fn controller_replicas_share_one_ca_and_serve_independently() {
    let mut c = cluster!(2);
    let k8s = start_api(&c);
    let api = &k8s.api;
    let (client, server) = client_and_server(api, &mut c);
    let kubeconfig = kubeconfig(api, &c);
    c.start_controller_kubernetes(&kubeconfig).unwrap();
    mount_ca_root(api, &c);
    let root = std::fs::read_to_string(c.controller_root()).unwrap();
    c.start_controller_replica(&kubeconfig).unwrap();
    mount_ca_root(api, &c);
    assert_eq!(std::fs::read_to_string(c.controller_root()).unwrap(), root, "the second replica kept the CA");

    // Node 1's agent talks to the first replica, node 2's to the second.
    let tokens = [agent_token(api, &c, 0), agent_token(api, &c, 1)];
    c.start_agent_with_token(0, &tokens[0]).unwrap();
    c.start_agent_with_token_via(1, &tokens[1], mesh_tests::cluster::REPLICA_IP).unwrap();
    let target = enrolled_client_reaches_server(&mut c, &client, &server);

    // The first replica goes away: the second still carries a change to node 2 and marks it Accepted.
    c.kill_controller().unwrap();
    api.apply_yaml(DENY_CLIENT).unwrap();
    wait_for("the policy to reach node 2", || c.config_len(1, "authorizationPolicies") == 1);
    assert!(!c.client(&client, target, 4 * KIB, 1).unwrap().success, "denied");
    let ap = || api.get("nodemesh.io/v1alpha1", "AuthorizationPolicy", Some("shop"), "no-client");
    wait_for("Accepted=True on the policy", || condition(&ap(), &["status", "conditions"]).0 == "True");
}
