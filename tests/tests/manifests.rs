//! The Kubernetes install (`manifests/`, kustomize): every object renders, parses into its typed k8s-openapi
//! object without unknown fields, carries the settings the install depends on, and `kubectl apply
//! --server-side` against the fake API server accepts the whole install.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_tests::fakeapi::FakeApi;
use mesh_tests::install::{checkov, kubectl, kustomize, manifests};
use serde_json::Value;

/// Parses `object` as `T` and back: a field `T` does not know (a typo, a wrong level) is lost on the way and
/// fails the comparison.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> T {
    let parsed: T = serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    let back = serde_json::to_value(&parsed).unwrap();
    assert_eq!(normalized(back), normalized(object.clone()), "fields lost in parsing");
    parsed
}

/// Without nulls, numbers as floats (a schema's `maximum: 65535` comes back as `65535.0`).
fn normalized(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, normalized(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(normalized).collect()),
        Value::Number(n) => n.as_f64().map_or(Value::Number(n), |f| serde_json::json!(f)),
        other => other,
    }
}

#[test]
fn every_manifest_parses_into_its_type_and_carries_the_install_settings() {
    let Some(kubectl) = kubectl() else { return };
    let objects = kustomize(&kubectl, &manifests());
    let mut kinds = Vec::new();
    for o in &objects {
        let kind = o["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(o)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(o)),
            "ClusterRole" => drop(typed::<ClusterRole>(o)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(o)),
            "Role" => drop(typed::<Role>(o)),
            "RoleBinding" => drop(typed::<RoleBinding>(o)),
            "Service" => drop(typed::<Service>(o)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(o)),
            "Deployment" => drop(typed::<Deployment>(o)),
            "DaemonSet" => drop(typed::<DaemonSet>(o)),
            "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(o)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(o)),
            other => panic!("unexpected kind {other} in the install"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.iter().filter(|k| *k == "CustomResourceDefinition").count(), mesh_controller::crds::all().len());

    // The controller runs replicated, drained one replica at a time.
    let controller: Deployment = typed(objects.iter().find(|o| o["kind"] == "Deployment").unwrap());
    assert_eq!(controller.spec.as_ref().and_then(|s| s.replicas), Some(2));
    // Its limit stays above the 1.7 GiB RSS measured at 1,000 nodes (docs/controller.md).
    let controller_pod = controller.spec.as_ref().and_then(|s| s.template.spec.as_ref()).unwrap();
    let limits = controller_pod.containers[0].resources.as_ref().and_then(|r| r.limits.as_ref()).unwrap();
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("2Gi"));
    assert!(kinds.iter().any(|k| k == "PodDisruptionBudget"));

    let agent: DaemonSet = typed(objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap());
    let spec = agent.spec.unwrap();
    // Upgrades start the new agent beside the old one, which hands its sockets over (tests/tests/upgrade.rs).
    let rolling = spec.update_strategy.and_then(|s| s.rolling_update).unwrap();
    let int = |v: Option<IntOrString>| match v {
        Some(IntOrString::Int(n)) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!((int(rolling.max_surge), int(rolling.max_unavailable)), (1, 0));
    let pod = spec.template.spec.unwrap();
    // The kubelet's grace outlasts the agent's own drain timeout, so the agent ends its drain itself.
    let drain = pod.containers[0].env.iter().flatten().find(|e| e.name == "NODEMESH_DRAIN_TIMEOUT").unwrap();
    let drain = humantime::parse_duration(drain.value.as_deref().unwrap()).unwrap().as_secs() as i64;
    assert!(pod.termination_grace_period_seconds.unwrap() > drain, "grace {:?}", pod.termination_grace_period_seconds);
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.host_network, Some(true));
    let container = &pod.containers[0];
    let caps = container.security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.clone().unwrap(), ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"]);
    assert_ne!(container.security_context.as_ref().unwrap().privileged, Some(true));
    let probe = container.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let live = container.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!((live.path.as_deref(), &live.port), (Some("/healthz/live"), &IntOrString::Int(15020)));
    let context = container.security_context.as_ref().unwrap();
    // allowPrivilegeEscalation: false beside SYS_ADMIN promises nothing (the API server refuses it beside CAP_SYS_ADMIN).
    assert_eq!(context.allow_privilege_escalation, None);
    let seccomp = |c: &k8s_openapi::api::core::v1::Container| {
        c.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.clone())
    };
    assert_eq!(seccomp(container).as_deref(), Some("RuntimeDefault"));
    assert_eq!(pod.node_selector.unwrap_or_default().get("kubernetes.io/os").map(String::as_str), Some("linux"));
    let installer = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(installer.command.as_ref().unwrap()[..3], ["mesh-agent", "cni", "install"]);
    assert_eq!(seccomp(installer).as_deref(), Some("RuntimeDefault"));
    let bounded =
        installer.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some_and(|l| l.contains_key("memory"));
    assert!(bounded, "the init container has a memory limit");
    // Namespaces whose pods must start without an agent: the node's system pods and the controller.
    let command = installer.command.as_ref().unwrap().join(" ");
    assert!(command.contains("--exclude-namespaces kube-system,nodemesh-system"), "{command}");
    // The agent's namespace admits privileged pods where Pod Security Admission enforces a level.
    let namespace: Namespace = typed(objects.iter().find(|o| o["kind"] == "Namespace").unwrap());
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
    // Secrets: the CA's by name, and creating it.
    let roles: Vec<Role> = objects.iter().filter(|o| o["kind"] == "Role").map(typed).collect();
    for rule in roles.iter().flat_map(|r| r.rules.iter().flatten()) {
        if rule.resources.iter().flatten().any(|r| r == "secrets") {
            let named = rule.resource_names.as_ref().is_some_and(|n| n == &["nodemesh-ca".to_string()]);
            assert!(named || rule.verbs == ["create"], "secrets rule too wide: {rule:?}");
        }
    }
    assert!(container.image.as_deref().is_some_and(|i| i.starts_with("ghcr.io/nodemesh/nodemesh:")));
    // The channel to the controller is TLS, verified with the root the controller publishes in a ConfigMap.
    let env = |name: &str| {
        container.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone()).unwrap_or_default()
    };
    assert!(env("NODEMESH_CONTROLLER").starts_with("https://nodemesh-controller.nodemesh-system.svc:"));
    let mount =
        container.volume_mounts.iter().flatten().find(|m| env("NODEMESH_CONTROLLER_CA").starts_with(&m.mount_path));
    let volume =
        pod.volumes.iter().flatten().find(|v| Some(&v.name) == mount.map(|m| &m.name)).expect("CA root mounted");
    assert_eq!(volume.config_map.as_ref().map(|c| c.name.as_str()), Some("nodemesh-ca-root"));
    // The agent's credential for the controller: a projected token for the controller's audience, at most 12 h.
    let token = env("NODEMESH_TOKEN_FILE");
    let mount = container.volume_mounts.iter().flatten().find(|m| token.starts_with(&format!("{}/", m.mount_path)));
    let volume = pod.volumes.iter().flatten().find(|v| Some(&v.name) == mount.map(|m| &m.name)).expect("token mounted");
    let projected = volume.projected.as_ref().and_then(|p| p.sources.as_ref()).expect("a projected volume");
    let sa_token = projected.iter().find_map(|s| s.service_account_token.as_ref()).expect("a service-account token");
    assert_eq!(sa_token.audience.as_deref(), Some(mesh_controller::auth::DEFAULT_TOKEN_AUDIENCE));
    assert!(sa_token.expiration_seconds.is_some_and(|s| s <= 12 * 3600), "{sa_token:?}");
    assert!(token.ends_with(&format!("/{}", sa_token.path)), "{token}");
}

/// Runs kubectl against `kubeconfig`; its status and what it said.
async fn kubectl_with(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(kubectl);
    command.args(args).env("KUBECONFIG", kubeconfig);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Applies the install server-side, then uninstalls it as the docs say: nodemesh's objects go, the cluster's
/// Gateway API CRDs (from upstream's bundle) and its routes stay.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_applies_the_install_server_side_and_its_delete_leaves_gateway_api_alone() {
    let Some(kubectl) = kubectl() else { return };
    let api = FakeApi::spawn().unwrap();
    for crd in mesh_tests::gateway_api::bundle_crds() {
        api.apply_yaml(&crd).unwrap();
    }
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: default}\n\
                 spec: {parentRefs: [{group: '', kind: Service, name: web}]}\n";
    api.apply_yaml(route).unwrap();
    let dir = std::env::temp_dir().join(format!("nodemesh-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let install = manifests().display().to_string();
    let (applied, said) =
        kubectl_with(&kubectl, &kubeconfig, &["apply", "--server-side", "--validate=false", "-k", &install]).await;
    assert!(applied, "{said}");
    let installed = [
        ("apps/v1", "DaemonSet", Some("nodemesh-system"), "nodemesh-agent"),
        ("apps/v1", "Deployment", Some("nodemesh-system"), "nodemesh-controller"),
        ("rbac.authorization.k8s.io/v1", "ClusterRole", None, "nodemesh-controller"),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "telemetries.nodemesh.io"),
    ];
    for (api_version, kind, ns, name) in installed {
        assert!(api.get(api_version, kind, ns, name).is_some(), "{kind} {name} not applied: {said}");
    }

    let (deleted, said) = kubectl_with(&kubectl, &kubeconfig, &["delete", "--wait=false", "-k", &install]).await;
    assert!(deleted, "{said}");
    for (api_version, kind, ns, name) in installed {
        assert!(api.get(api_version, kind, ns, name).is_none(), "{kind} {name} left after uninstall: {said}");
    }
    for crd in mesh_controller::gateway_api::CRDS {
        assert!(api.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, crd).is_some(), "{crd} deleted");
    }
    let kept = api.get("gateway.networking.k8s.io/v1", "HTTPRoute", Some("default"), "web");
    assert!(kept.is_some(), "the cluster's HTTPRoute went with the uninstall: {said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The optional Gateway API kustomization installs upstream's bundle, unmodified, at the version nodemesh is
/// built against and `meshctl check` names.
#[test]
fn the_gateway_api_kustomization_pins_the_upstream_bundle_nodemesh_is_built_against() {
    let text = std::fs::read_to_string(manifests().join("gateway-api/kustomization.yaml")).unwrap();
    let kustomization: Value = serde_yaml::from_str(&text).unwrap();
    let version = mesh_controller::gateway_api::BUNDLE_VERSION;
    let upstream =
        format!("https://github.com/kubernetes-sigs/gateway-api/releases/download/{version}/experimental-install.yaml");
    assert_eq!(kustomization["resources"], serde_json::json!([upstream]), "{text}");
    assert!(!kustomization.as_object().unwrap().contains_key("patches"), "the bundle is applied unmodified");
    // Not part of the nodemesh install itself, so its uninstall never reaches it.
    let root: Value =
        serde_yaml::from_str(&std::fs::read_to_string(manifests().join("kustomization.yaml")).unwrap()).unwrap();
    assert_eq!(root["resources"], serde_json::json!(["crds", "base"]));
    for crd in std::fs::read_dir(manifests().join("crds")).unwrap() {
        let name = crd.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains("gateway.networking.k8s.io"), "nodemesh ships a Gateway API CRD: {name}");
    }
}

#[test]
fn the_servicemonitor_overlay_renders() {
    let Some(kubectl) = kubectl() else { return };
    let objects = kustomize(&kubectl, &manifests().join("overlays/servicemonitor"));
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(kinds.contains(&"PodMonitor") && kinds.contains(&"ServiceMonitor") && kinds.contains(&"DaemonSet"));
}

/// The rendered install against a policy linter: every finding is in `manifests/policy-allowlist.yaml` with its
/// reason, and every entry there still fires.
#[test]
fn the_policy_linter_finds_nothing_beyond_the_allow_list() {
    let (Some(kubectl), Some(checkov)) = (kubectl(), checkov()) else { return };
    let dir = std::env::temp_dir().join(format!("nodemesh-checkov-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rendered: String = kustomize(&kubectl, &manifests())
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
        .collect();
    std::fs::write(dir.join("install.yaml"), rendered).unwrap();
    let out = Command::new(checkov)
        .args(["--framework", "kubernetes", "--quiet", "--compact", "-o", "json", "-f"])
        .arg(dir.join("install.yaml"))
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let report = if report.is_array() { report[0].clone() } else { report };
    assert!(report["summary"]["passed"].as_u64().unwrap_or(0) > 100, "checkov checked little: {}", report["summary"]);
    assert_eq!(report["summary"]["parsing_errors"], 0);
    let found: std::collections::BTreeSet<(String, String)> = report["results"]["failed_checks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| (f["check_id"].as_str().unwrap().to_string(), f["resource"].as_str().unwrap().to_string()))
        .collect();
    let allowed: Vec<Value> =
        serde_yaml::from_str(&std::fs::read_to_string(manifests().join("policy-allowlist.yaml")).unwrap()).unwrap();
    let mut listed = std::collections::BTreeSet::new();
    for entry in &allowed {
        assert!(entry["why"].as_str().is_some_and(|w| w.len() > 20), "an allow-list entry without its reason: {entry}");
        for resource in entry["resources"].as_array().unwrap() {
            listed.insert((entry["check"].as_str().unwrap().to_string(), resource.as_str().unwrap().to_string()));
        }
    }
    let new: Vec<_> = found.difference(&listed).collect();
    assert!(new.is_empty(), "policy findings not in manifests/policy-allowlist.yaml: {new:?}");
    let stale: Vec<_> = listed.difference(&found).collect();
    assert!(stale.is_empty(), "allow-list entries that no longer fire (delete them): {stale:?}");
}
