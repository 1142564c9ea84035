//! Stopping the agent: a restart or an upgrade keeps the chained CNI plugin and the pinned capture (new pods
//! wait for the next agent instead of escaping), an uninstall — its DaemonSet gone from the API — removes both.
//! While it runs, the agent keeps the plugin chained when the node's network plugin rewrites its config.

use mesh_tests::cluster::CONTROLLER_IP;
use mesh_tests::fakeapi::FakeApi;
use mesh_tests::{cluster, sys, wait_for};
use serde_json::Value;

const CONFLIST: &str =
    r#"{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "ptp"}, {"type": "nodemesh-cni"}]}"#;

fn chained(conf: &std::path::Path) -> bool {
    let config: Value = serde_json::from_slice(&std::fs::read(conf.join("10-k8s.conflist")).unwrap()).unwrap();
    config["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "nodemesh-cni")
}

#[test]
fn cni_plugin_and_capture_are_removed_only_when_the_daemonset_is_deleted() {
    let mut c = cluster!(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let ip: std::net::IpAddr = CONTROLLER_IP.parse().unwrap();
    let listener = sys::in_netns(&c.fabric, move || std::net::TcpListener::bind((ip, 0))).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = runtime.block_on(async { FakeApi::serve(listener) }).unwrap();
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: nodemesh-system}\n---\n\
         apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: nodemesh-agent, namespace: nodemesh-system}\nspec: {}\n",
    )
    .unwrap();

    let (bin, conf) = (c.tmp_dir().join("cni-bin"), c.tmp_dir().join("cni-conf"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("10-k8s.conflist"), CONFLIST).unwrap();
    std::fs::write(bin.join("nodemesh-cni"), b"plugin").unwrap();
    c.write_objects("namespaces.yaml", Some(mesh_tests::MESH_NAMESPACES)).unwrap();
    c.start_controller().unwrap();
    let api_url = format!("http://{CONTROLLER_IP}:{port}");
    let api_token = c.tmp_dir().join("api-token");
    std::fs::write(&api_token, "default-service-account-token").unwrap();
    let api_token = api_token.to_str().unwrap().to_string();
    let (bin_arg, conf_arg) = (bin.to_str().unwrap().to_string(), conf.to_str().unwrap().to_string());
    let args = [
        "--daemonset",
        "nodemesh-system/nodemesh-agent",
        "--kube-api",
        &api_url,
        "--kube-token-file",
        &api_token,
        "--cni-bin-dir",
        &bin_arg,
        "--cni-conf-dir",
        &conf_arg,
    ];
    let bpffs = c.nodes[0].bpffs.clone();
    let stop = |c: &mesh_tests::Cluster| {
        let pid = c.agent_pid(0).unwrap();
        c.signal_agent(0, libc::SIGTERM).unwrap();
        wait_for("the agent to exit", || !sys::pid_running(pid));
    };

    c.start_agent_with_controller_args(0, &args).unwrap();
    // The node's network plugin writes its config again, without nodemesh-cni: the running agent chains it back.
    std::fs::write(conf.join("10-k8s.conflist"), CONFLIST.replace(r#", {"type": "nodemesh-cni"}"#, "")).unwrap();
    assert!(!chained(&conf));
    wait_for("nodemesh-cni chained back", || chained(&conf));
    assert!(c.log_of("agent-n1").contains("chained it back"), "{}", c.log_of("agent-n1"));
    stop(&c);
    assert!(chained(&conf), "a restart keeps the plugin chained");
    assert!(bin.join("nodemesh-cni").exists());
    assert!(bpffs.exists(), "and the capture pinned");
    assert!(c.log_of("agent-n1").contains("Staying"), "{}", c.log_of("agent-n1"));

    c.start_agent_with_controller_args(0, &args).unwrap();
    api.delete("apps/v1", "DaemonSet", Some("nodemesh-system"), "nodemesh-agent").unwrap();
    stop(&c);
    assert!(!chained(&conf), "uninstalled: the plugin is gone from the conflist");
    assert!(!bin.join("nodemesh-cni").exists());
    assert!(!bpffs.exists(), "and the capture is unpinned");
}
