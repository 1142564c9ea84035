//! The fake API server speaks Kubernetes well enough for kube-rs and kubectl: these run the real clients against
//! it. No privileges needed.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use mesh_controller::crds::TrafficPolicy;
use mesh_tests::fakeapi::FakeApi;
use serde_json::json;

async fn client(api: &FakeApi) -> Client {
    mesh_agent::identity::crypto::install_process_default();
    let config = kube::Config::new(api.url.parse().expect("url"));
    Client::try_from(config).expect("client")
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for yaml in mesh_tests::gateway_api::all_crds() {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&yaml).expect("CRD yaml");
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("test").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(Duration::from_secs(5), established).await.expect("established").expect("wait");
    }
}

#[tokio::test]
async fn watcher_sees_custom_resources_change_and_bad_ones_get_422() {
    let api = FakeApi::spawn().unwrap();
    let client = client(&api).await;
    install_crds(&client).await;
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap())
        .await
        .unwrap();
    let policies: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
    let mut seen = watcher(policies.clone(), watcher::Config::default()).applied_objects().boxed();

    let tp = |rps: u32| -> TrafficPolicy {
        serde_json::from_value(json!({"apiVersion": "nodemesh.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "cart"}, "spec": {"targetRef": {"name": "cart"}, "rateLimit": {"requestsPerSecond": rps}}}))
        .unwrap()
    };
    policies.create(&PostParams::default(), &tp(10)).await.unwrap();
    let first = next(&mut seen).await;
    assert_eq!(first.spec.settings.rate_limit.unwrap().requests_per_second, 10);
    policies
        .patch(
            "cart",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rateLimit": {"requestsPerSecond": 20}}})),
        )
        .await
        .unwrap();
    let second = next(&mut seen).await;
    assert_eq!(second.spec.settings.rate_limit.unwrap().requests_per_second, 20);
    assert_eq!(second.metadata.generation, Some(2));

    // Schema validation: requestsPerSecond has minimum 1.
    let err = policies
        .patch("cart", &PatchParams::default(), &Patch::Merge(json!({"spec": {"rateLimit": {"requestsPerSecond": 0}}})))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains("spec.rateLimit.requestsPerSecond"), "{}", e.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // Status goes through the status subresource only; the main resource ignores it.
    let status = json!({"status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    policies.patch_status("cart", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    policies.patch("cart", &PatchParams::default(), &Patch::Merge(json!({"status": null}))).await.unwrap();
    let got = policies.get("cart").await.unwrap();
    assert_eq!(got.status.unwrap().conditions[0].type_, "Accepted");
    assert_eq!(got.metadata.generation, Some(2), "status changes do not bump the generation");
}

async fn next(s: &mut futures::stream::BoxStream<'static, Result<TrafficPolicy, watcher::Error>>) -> TrafficPolicy {
    tokio::time::timeout(Duration::from_secs(5), s.next()).await.expect("event").expect("stream").expect("watch")
}

#[tokio::test]
async fn selectors_resource_versions_and_token_reviews() {
    let api = FakeApi::spawn().unwrap();
    let client = client(&api).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (name, node, app) in [("a1", "n1", "cart"), ("a2", "n2", "cart"), ("b1", "n1", "web")] {
        let pod = json!({"metadata": {"name": name, "labels": {"app": app}},
                         "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}});
        pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<Pod>| list.items.iter().map(|p| p.name_any()).collect::<Vec<_>>();
    assert_eq!(names(pods.list(&ListParams::default().labels("app=cart")).await.unwrap()), ["a1", "a2"]);
    assert_eq!(names(pods.list(&ListParams::default().fields("spec.nodeName=n1")).await.unwrap()), ["a1", "b1"]);
    assert_eq!(names(pods.list(&ListParams::default().labels("app in (web)")).await.unwrap()), ["b1"]);
    let created = pods.get("a1").await.unwrap();
    assert_eq!(created.status.clone().unwrap().phase.as_deref(), Some("Pending"), "status is the kubelet's");

    // A stale resourceVersion in a replace is a conflict.
    let mut stale = created.clone();
    stale.status = None;
    pods.patch("a1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}})))
        .await
        .unwrap();
    match pods.replace("a1", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // A watch from a resourceVersion the log no longer covers gets 410; kube's watcher then relists.
    let old_rv = pods.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    api.set_log_size(2);
    for i in 0..4 {
        pods.patch("b1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"n": i.to_string()}}})))
            .await
            .unwrap();
    }
    let mut stream = pods.watch(&kube::api::WatchParams::default(), &old_rv).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap() {
        Some(Ok(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    api.add_token("secret-token", "system:serviceaccount:nodemesh-system:agent", &[("node", "n1")]);
    let reviews: Api<TokenReview> = Api::all(client);
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec { token: Some(token.into()), ..Default::default() },
        ..Default::default()
    };
    let ok = reviews.create(&PostParams::default(), &review("secret-token")).await.unwrap().status.unwrap();
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(ok.user.unwrap().username.as_deref(), Some("system:serviceaccount:nodemesh-system:agent"));
    let bad = reviews.create(&PostParams::default(), &review("guess")).await.unwrap().status.unwrap();
    assert_eq!(bad.authenticated, Some(false));
}

/// kubectl from the image, as a user would run it.
#[tokio::test]
async fn kubectl_apply_get_patch_delete() {
    let Ok(kubectl) = which("kubectl") else {
        assert!(std::env::var("CI").is_err(), "kubectl is missing");
        return;
    };
    let api = FakeApi::spawn().unwrap();
    let dir = std::env::temp_dir().join(format!("nodemesh-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
    let crds_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    std::fs::write(
        dir.join("objects.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: cart-1, namespace: shop, labels: {app: cart}}\n\
         spec: {nodeName: node-1, containers: [{name: c, image: x}]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: cart, namespace: shop}\n\
         spec: {targetRef: {name: cart}}\n",
    )
    .unwrap();
    let dir2 = dir.clone();
    let run = move |args: &[&str]| {
        let out = std::process::Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", dir2.join("kubeconfig"))
            .current_dir(&dir2)
            .output()
            .expect("kubectl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let crds = crds_dir.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let (ok, out) = run(&["apply", "--server-side", "--validate=false", "-k", &crds]);
        assert!(ok, "{out}");
        let (ok, out) = run(&["apply", "--validate=false", "-f", "objects.yaml"]);
        assert!(ok, "{out}");
        let (ok, out) = run(&["apply", "--validate=false", "-f", "policy.yaml"]);
        assert!(ok, "{out}");
        let (ok, out) =
            run(&["get", "pods", "-A", "-l", "app=cart", "--field-selector", "spec.nodeName=node-1", "-o", "name"]);
        assert!(ok && out.trim() == "pod/cart-1", "{out}");
        let (ok, out) = run(&["get", "ntp", "-n", "shop", "-o", "jsonpath={.items[0].spec.targetRef.name}"]);
        assert!(ok && out == "cart", "{out}");
        let (ok, out) = run(&[
            "patch",
            "ntp",
            "cart",
            "-n",
            "shop",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"faultInjection":{"abort":{"httpStatus":700,"percent":10}}}}"#,
        ]);
        assert!(!ok && out.contains("httpStatus") && out.contains("less than or equal to 599"), "{out}");
        let (ok, out) = run(&["delete", "-f", "policy.yaml"]);
        assert!(ok, "{out}");
        let (ok, out) = run(&["get", "ntp", "-n", "shop", "-o", "name"]);
        assert!(ok && out.trim().is_empty(), "{out}");
    })
    .await
    .unwrap();
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|p| p.is_file()))
        .ok_or(())
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
