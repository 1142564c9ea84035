//! The Helm chart (`charts/nodemesh`), through a real Helm engine: it lints clean, renders exactly what the
//! kustomize install holds with its default values, its values take effect, and `kubectl apply --server-side`
//! accepts a non-default render against the fake API server.

use std::process::Command;

use mesh_tests::fakeapi::FakeApi;
use mesh_tests::install::{helm, helm_python, helm_render, kubectl, kustomize, manifests};
use serde_json::{Value, json};

fn key(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or(""),
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// kustomize writes a schema's `maximum: 65535` back as a float.
fn numbers_as_floats(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, numbers_as_floats(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_floats).collect()),
        Value::Number(n) => n.as_f64().map_or(Value::Number(n), |f| json!(f)),
        other => other,
    }
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

#[test]
fn the_chart_lints_clean_and_renders_what_kustomize_installs() {
    let (Some(python), Some(kubectl)) = (helm_python(), kubectl()) else { return };
    let (clean, report) = helm(&python, "lint", "nodemesh-system", &json!({}));
    assert!(clean, "helm lint --strict: {report}");
    assert_eq!(report["total_charts_linted"], 1, "{report}");
    // Values are checked against values.schema.json: a misspelt key or a wrong type is refused, not ignored.
    for bad in [
        json!({"controller": {"replica": 3}}),
        json!({"agent": {"drainTimeoutSeconds": "5m"}}),
        json!({"trustDomain": "Bad Domain"}),
    ] {
        let (clean, report) = helm(&python, "lint", "nodemesh-system", &bad);
        assert!(!clean, "{bad} passed lint: {report}");
    }

    let mut chart = helm_render(&python, "nodemesh-system", &json!({}));
    let mut kustomized = kustomize(&kubectl, &manifests());
    chart.sort_by_key(key);
    kustomized.sort_by_key(key);
    let keys = |v: &[Value]| v.iter().map(key).collect::<Vec<_>>();
    assert_eq!(keys(&chart), keys(&kustomized), "the chart and the kustomize install hold different objects");
    for (from_chart, from_kustomize) in chart.iter().zip(&kustomized) {
        let same = numbers_as_floats(from_chart.clone()) == numbers_as_floats(from_kustomize.clone());
        assert!(same, "{} differs: run `cargo xtask gen-manifests`\n{from_chart}\n{from_kustomize}", key(from_chart));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_values_take_effect_and_the_render_applies_server_side() {
    let (Some(python), Some(kubectl)) = (helm_python(), kubectl()) else { return };
    let values = json!({
        "image": {"repository": "registry.example/nodemesh", "tag": "9.9.9"},
        "logLevel": "debug",
        "trustDomain": "example.org",
        "trustDomainAliases": ["old.example.org"],
        "controller": {"replicas": 3, "resources": {"limits": {"memory": "3Gi"}}},
        "agent": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh"}], "drainTimeoutSeconds": 60},
        "cni": {"confDir": "/var/lib/rancher/k3s/agent/etc/cni/net.d", "excludeNamespaces": ["kube-system", "monitoring"]},
        "metrics": {"serviceMonitor": {"enabled": true, "interval": "30s"}},
        "meshConfig": {"defaultMtlsMode": "STRICT", "capture": {"excludeOutboundCidrs": ["169.254.169.254/32"]}},
    });
    let (clean, report) = helm(&python, "lint", "mesh", &values);
    assert!(clean, "{report}");
    let objects = helm_render(&python, "mesh", &values);

    assert_eq!(find(&objects, "Namespace")["metadata"]["name"], "mesh");
    let controller = find(&objects, "Deployment");
    assert_eq!(controller["spec"]["replicas"], 3);
    let c = &controller["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/nodemesh:9.9.9");
    assert_eq!(c["resources"]["limits"]["memory"], "3Gi");
    assert_eq!(env(c, "RUST_LOG"), Some("debug"));
    assert_eq!(env(c, "NODEMESH_TRUST_DOMAIN"), Some("example.org"));
    assert_eq!(env(c, "NODEMESH_TRUST_DOMAIN_ALIASES"), Some("old.example.org"));
    // Outside nodemesh-system the controller is told where its CA, root and agents live.
    assert_eq!(env(c, "NODEMESH_CA_SECRET"), Some("mesh/nodemesh-ca"));
    assert_eq!(env(c, "NODEMESH_AGENT_SERVICE_ACCOUNT"), Some("mesh:nodemesh-agent"));
    assert!(env(c, "NODEMESH_SERVER_NAMES").is_some_and(|n| n.starts_with("nodemesh-controller.mesh.svc,")));

    let agent = &find(&objects, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(agent["tolerations"], values["agent"]["tolerations"]);
    assert_eq!(agent["terminationGracePeriodSeconds"], 70, "grace outlasts the drain");
    let a = &agent["containers"][0];
    assert_eq!(a["image"], "registry.example/nodemesh:9.9.9");
    assert_eq!(env(a, "NODEMESH_DRAIN_TIMEOUT"), Some("60s"));
    assert_eq!(env(a, "NODEMESH_CONTROLLER"), Some("https://nodemesh-controller.mesh.svc:15012"));
    assert_eq!(env(a, "NODEMESH_DAEMONSET"), Some("mesh/nodemesh-agent"));
    let install = agent["initContainers"][0]["command"].as_array().unwrap();
    assert_eq!(install.last().unwrap(), "kube-system,monitoring,mesh", "nodemesh's own namespace is always excluded");
    let conf = agent["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "cni-conf").unwrap();
    assert_eq!(conf["hostPath"]["path"], "/var/lib/rancher/k3s/agent/etc/cni/net.d");
    let monitor = find(&objects, "ServiceMonitor");
    assert_eq!(
        (&monitor["metadata"]["namespace"], &monitor["spec"]["endpoints"][0]["interval"]),
        (&json!("mesh"), &json!("30s"))
    );
    assert!(objects.iter().any(|o| o["kind"] == "PodMonitor"));

    let mesh_config = find(&objects, "MeshConfig");
    assert_eq!(mesh_config["metadata"]["name"], "default");
    assert_eq!(mesh_config["spec"], values["meshConfig"]);
    assert!(!helm(&python, "lint", "mesh", &json!({"meshConfig": {"defaultMtlsMode": "LOOSE"}})).0);

    // Without the namespace: the chart writes none (nor a MeshConfig unless asked to).
    let bare = helm_render(&python, "mesh", &json!({"createNamespace": false}));
    assert!(bare.iter().all(|o| o["kind"] != "Namespace" && o["kind"] != "MeshConfig"));

    // The render, as `helm install` would send it (monitors aside: no Prometheus Operator CRDs here).
    let api = FakeApi::spawn().unwrap();
    let dir = std::env::temp_dir().join(format!("nodemesh-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
    // Helm installs the chart's CRDs first and waits for them, then the namespace before what lives in it.
    let is_crd = |o: &&Value| o["kind"] == "CustomResourceDefinition";
    let crds: Vec<&Value> = objects.iter().filter(is_crd).collect();
    let mut rest: Vec<&Value> =
        objects.iter().filter(|o| !is_crd(o) && !o["kind"].as_str().unwrap().ends_with("Monitor")).collect();
    rest.sort_by_key(|o| o["kind"] != "Namespace");
    for (file, batch) in [("crds.yaml", crds), ("install.yaml", rest)] {
        let yaml: String = batch.iter().map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap())).collect();
        std::fs::write(dir.join(file), yaml).unwrap();
        let mut apply = Command::new(&kubectl);
        apply.args(["apply", "--server-side", "--validate=false", "-f"]).arg(dir.join(file));
        apply.env("KUBECONFIG", dir.join("kubeconfig"));
        let out = tokio::task::spawn_blocking(move || apply.output().unwrap()).await.unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let daemonset = api.get("apps/v1", "DaemonSet", Some("mesh"), "nodemesh-agent").expect("DaemonSet applied");
    assert_eq!(daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 70);
    assert!(
        api.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "trafficpolicies.nodemesh.io").is_some()
    );
}
