//! `meshctl check` against the fake API server: CRDs, controller Deployment and agent DaemonSet, with the
//! exit code scripts rely on and a fix for each failure. (proxy-config and stat run against live agents in
//! observability.rs.)

use std::process::Command;

use mesh_tests::fakeapi::FakeApi;
use serde_json::{Value, json};

fn check(kubeconfig: &std::path::Path) -> (i32, Value) {
    let meshctl = mesh_tests::cluster::built_binary("meshctl").unwrap();
    let out = Command::new(meshctl).args(["check", "-o", "json"]).env("KUBECONFIG", kubeconfig).output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.code().unwrap_or(-1), report)
}

fn status_of<'a>(report: &'a Value, name: &str) -> &'a Value {
    report.as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_crds_controller_and_agents() {
    // The kernel checks look at this machine: the same prerequisites the cluster tests have (bpffs mounted).
    match mesh_tests::cluster::prerequisites() {
        Ok(_) => {}
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("CI=true but {why}"),
        Err(why) => return eprintln!("skipped: {why}"),
    }
    let api = FakeApi::spawn().unwrap();
    let dir = std::env::temp_dir().join(format!("meshctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    // Nothing installed: every cluster check fails, with the install command as the fix.
    let (code, report) = tokio::task::spawn_blocking({
        let k = kubeconfig.clone();
        move || check(&k)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{report}");
    for name in ["CRDs", "Gateway API", "controller", "agents"] {
        assert_eq!(status_of(&report, name)["status"], "fail", "{report}");
    }
    assert!(status_of(&report, "Gateway API")["fix"].as_str().unwrap().contains("manifests/gateway-api"), "{report}");
    assert!(status_of(&report, "CRDs")["fix"].as_str().unwrap().contains("kubectl apply -k manifests/"));
    for name in ["kernel", "bpf", "sk_lookup", "cgroup v2", "bpffs"] {
        assert_eq!(status_of(&report, name)["status"], "ok", "{report}");
    }

    for yaml in mesh_tests::gateway_api::all_crds() {
        api.apply_yaml(&yaml).unwrap();
    }
    api.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: nodemesh-system}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: nodemesh-controller, namespace: nodemesh-system}\nspec: {replicas: 1}\n---\n\
         apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: nodemesh-agent, namespace: nodemesh-system}\nspec: {}\n",
    )
    .unwrap();
    let ns = Some("nodemesh-system");
    api.set_status("apps/v1", "Deployment", ns, "nodemesh-controller", json!({"readyReplicas": 1})).unwrap();
    api.set_status(
        "apps/v1",
        "DaemonSet",
        ns,
        "nodemesh-agent",
        json!({"desiredNumberScheduled": 3, "numberReady": 2}),
    )
    .unwrap();
    let (code, report) = tokio::task::spawn_blocking({
        let k = kubeconfig.clone();
        move || check(&k)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "one node's agent is not ready: {report}");
    assert_eq!(status_of(&report, "CRDs")["status"], "ok", "{report}");
    let gateway = status_of(&report, "Gateway API");
    assert_eq!((&gateway["status"], &gateway["detail"]), (&json!("ok"), &json!("v1.4.0 (experimental channel)")));
    assert_eq!(status_of(&report, "controller")["status"], "ok", "{report}");
    assert_eq!(status_of(&report, "agents")["detail"], "2/3 nodes ready");

    api.set_status(
        "apps/v1",
        "DaemonSet",
        ns,
        "nodemesh-agent",
        json!({"desiredNumberScheduled": 3, "numberReady": 3}),
    )
    .unwrap();
    let (code, report) = tokio::task::spawn_blocking(move || check(&kubeconfig)).await.unwrap();
    assert_eq!(code, 0, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
