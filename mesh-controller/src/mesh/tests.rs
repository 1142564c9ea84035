use super::*;

/// Meshed pods on two nodes, a Service and its policies (one of them invalid), and pods left out of the mesh
/// (also the controller server's test input).
pub(crate) const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-1, serviceAccountName: cart}
status: {phase: Running, podIPs: [{ip: 10.244.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-2}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {app: legacy, nodemesh.io/mesh: disabled}}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: other}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.7}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules: [{from: [{principals: ["cluster.local/ns/shop/sa/default"]}]}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec: {action: MAYBE}
"#;

#[test]
fn node_configs_follow_labels_and_locality() {
    let (mesh, verdicts) = Mesh::from_objects(&parse(OBJECTS));
    let errors: Vec<&Verdict> = verdicts.iter().filter(|v| v.is_problem()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key.name, "broken");
    assert_eq!(errors[0].rejected.as_ref().unwrap().reason, "Invalid");
    let n1 = mesh.node_config("node-1", "cluster.local");
    let names: Vec<&str> = n1.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["cart-1", "web-1"], "meshed namespace only, opt-out excluded");
    assert_eq!(n1.mesh_namespaces, Some(vec!["shop".to_string()]));
    assert_eq!(n1.excluded_pods, ["shop/legacy"]);
    assert_eq!(n1.services[0].endpoints.len(), 1);
    assert_eq!(n1.services[0].endpoints[0].ip, "10.244.1.2".parse::<IpAddr>().unwrap());
    assert_eq!(n1.authorization_policies.len(), 1);
    // node-3 runs nothing meshed: it still learns the workloads, but no policies.
    assert!(mesh.node_config("node-3", "cluster.local").authorization_policies.is_empty());
    assert!(mesh.has_pod("node-1", "shop", "cart"));
    assert!(!mesh.has_pod("node-2", "shop", "cart"), "node binding");
    assert!(!mesh.has_pod("node-1", "shop", "default"), "the opted-out pod has no identity");
}

const ROUTING: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: web, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: front-1, namespace: web}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.2}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: cart, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-beta, value: "1"}], method: GET}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: canary}]}}]
    backendRefs: [{name: cart, port: 80, weight: 95}, {name: cart-v2, port: 80, weight: 5}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [503], backoff: 100ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: from-web, namespace: web}
spec:
  parentRefs: [{kind: Service, name: cart, namespace: shop}]
  rules: [{matches: [{method: {service: shop.Cart, method: Get}}], backendRefs: [{name: cart-v2, namespace: shop}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-nowhere, namespace: shop}
spec: {parentRefs: [{kind: Service, name: nowhere}], rules: [{backendRefs: [{name: cart}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: dangling, namespace: shop}
spec: {parentRefs: [{kind: Service, name: cart}], rules: [{backendRefs: [{name: gone}]}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: for-a-gateway, namespace: shop}
spec: {parentRefs: [{name: ingress}], rules: [{backendRefs: [{name: cart}]}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: cart-limits, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {targetRef: {name: cart}, rateLimit: {requestsPerSecond: 100}}
---
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: cart-limits-2, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {targetRef: {name: cart}, rateLimit: {requestsPerSecond: 5}}
---
apiVersion: nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: ghost, namespace: shop}
spec: {targetRef: {name: ghost}}
"#;

pub(crate) fn parse(yaml: &str) -> Vec<Object> {
    serde_yaml::Deserializer::from_str(yaml).map(|d| Object::deserialize(d).unwrap()).collect()
}

fn reason_of<'a>(verdicts: &'a [Verdict], name: &str) -> Option<&'a str> {
    let v = verdicts.iter().find(|v| v.key.name == name).unwrap_or_else(|| panic!("no verdict for {name}"));
    v.rejected.as_ref().or(v.unresolved.as_ref()).map(|r| r.reason)
}

#[test]
fn routes_and_traffic_policies_are_checked_and_scoped() {
    use mesh_common::route::{Filter, PathMatch};
    let (mesh, verdicts) = Mesh::from_objects(&parse(ROUTING));
    assert_eq!(reason_of(&verdicts, "canary"), None);
    assert_eq!(reason_of(&verdicts, "from-web"), None);
    assert_eq!(reason_of(&verdicts, "to-nowhere"), Some("NoMatchingParent"));
    assert_eq!(reason_of(&verdicts, "dangling"), Some("BackendNotFound"), "accepted, refs unresolved");
    assert!(verdicts.iter().all(|v| v.key.name != "for-a-gateway"), "Gateway routes are not ours");
    assert_eq!(reason_of(&verdicts, "cart-limits"), None);
    assert_eq!(reason_of(&verdicts, "cart-limits-2"), Some("Conflicted"), "the older policy wins");
    assert_eq!(reason_of(&verdicts, "ghost"), Some("TargetNotFound"));

    let canary = mesh.routes.iter().find(|r| r.name == "canary").unwrap();
    let rule = &canary.rules[0];
    assert_eq!(rule.matches[0].path, Some(PathMatch::PathPrefix("/api".into())));
    assert_eq!(rule.matches[0].method.as_deref(), Some("GET"));
    assert_eq!(rule.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [95, 5]);
    assert_eq!(rule.timeouts.unwrap().backend_request_ms, Some(500));
    assert_eq!(rule.retry.as_ref().unwrap().codes, [503]);
    assert!(matches!(&rule.filters[0], Filter::RequestHeaderModifier(m) if m.set[0].1 == "canary"));
    let grpc = mesh.routes.iter().find(|r| r.name == "from-web").unwrap();
    assert_eq!(grpc.rules[0].matches[0].path, Some(PathMatch::Exact("/shop.Cart/Get".into())));

    let names = |node: &str| -> Vec<String> {
        let mut names: Vec<String> =
            mesh.node_config(node, "cluster.local").routes.iter().map(|r| r.name.clone()).collect();
        names.sort();
        names
    };
    // The producer routes reach every node with meshed pods; the consumer route in `web` only node-2.
    assert_eq!(names("node-1"), ["canary", "dangling"]);
    assert_eq!(names("node-2"), ["canary", "dangling", "from-web"]);
    assert!(names("node-3").is_empty(), "no meshed pods, no routes");
    assert_eq!(mesh.node_config("node-1", "cluster.local").traffic_policies.len(), 1);
}

fn yaml_blocks(markdown: &str) -> String {
    markdown.split("```yaml\n").skip(1).filter_map(|rest| rest.split("```").next()).collect::<Vec<_>>().join("---\n")
}

/// Every example in docs/l7/ is accepted, with all its references resolved, next to the example app of
/// docs/l7/README.md.
#[test]
fn documented_l7_examples_are_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/l7");
    let app = yaml_blocks(&std::fs::read_to_string(dir.join("README.md")).unwrap());
    let app_objects = parse(&app).len();
    let mut pages = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == "README.md") {
            continue;
        }
        let examples = yaml_blocks(&std::fs::read_to_string(&path).unwrap());
        let objects = parse(&format!("{app}---\n{examples}"));
        assert!(objects.len() > app_objects, "{} has no example", path.display());
        let (_, verdicts) = Mesh::from_objects(&objects);
        for v in &verdicts {
            assert!(v.rejected.is_none() && v.unresolved.is_none(), "{}: {:?}", path.display(), v);
        }
        pages += 1;
    }
    assert_eq!(pages, 7);
}

/// The examples of README.md's configuration reference are accepted, with every reference resolved, next to the
/// Services they name.
#[test]
fn readme_configuration_reference_is_accepted() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## Configuration reference").nth(1).unwrap().split("\n## ").next().unwrap();
    let examples = yaml_blocks(section);
    let mut app = String::new();
    for (namespace, services) in [
        ("bookinfo", &["reviews", "reviews-v1", "reviews-v2", "reviews-v3", "ratings", "details"][..]),
        ("shop", &["cart", "cart-v2"]),
    ] {
        app.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"));
        for (i, name) in services.iter().enumerate() {
            app.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec: {{clusterIP: 10.96.7.{i}, selector: {{app: {name}}}, ports: [{{port: 9080}}, {{port: 80}}]}}\n"
            ));
        }
    }
    let objects = parse(&format!("{app}---\n{examples}"));
    let (_, verdicts) = Mesh::from_objects(&objects);
    let checked = verdicts.len();
    for v in &verdicts {
        assert!(v.rejected.is_none() && v.unresolved.is_none(), "README example: {v:?}");
    }
    assert!(checked >= 7, "every kind of the reference has an example ({checked} verdicts)");
}

#[test]
fn workloads_are_named_after_their_owners_and_telemetry_is_checked() {
    let objects = parse(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v2-5d8f7c9b4-x7k2p
  namespace: shop
  labels: {app: reviews, pod-template-hash: 5d8f7c9b4}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v2-5d8f7c9b4, controller: true}]
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, controller: true}]
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: debug, namespace: shop}
spec: {nodeName: node-1}
status: {phase: Running, podIP: 10.244.1.4}
---
apiVersion: nodemesh.io/v1alpha1
kind: Telemetry
metadata: {name: logs, namespace: shop}
spec: {accessLogging: {enabled: true}, tracing: {samplingPercentage: 10}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Telemetry
metadata: {name: too-much, namespace: shop}
spec: {tracing: {samplingPercentage: 150}}
"#,
    );
    let (mesh, verdicts) = Mesh::from_objects(&objects);
    let config = mesh.node_config("node-1", "cluster.local");
    let name = |pod: &str| config.workload("shop", pod).map(|w| w.workload_name().to_string());
    assert_eq!(name("reviews-v2-5d8f7c9b4-x7k2p").as_deref(), Some("reviews-v2"));
    assert_eq!(name("db-0").as_deref(), Some("db"));
    assert_eq!(name("debug").as_deref(), Some("debug"), "no owner: the pod itself");
    assert_eq!(config.telemetry.len(), 1);
    assert_eq!(reason_of(&verdicts, "too-much"), Some("Invalid"));
}

/// The MeshConfig `default` sets the mesh-wide defaults in every node's config; another name is ignored (and
/// says so); a bad CIDR leaves the defaults as they were and is reported.
#[test]
fn the_default_mesh_config_sets_every_nodes_defaults() {
    use mesh_common::config::OutboundTrafficPolicy;
    use mesh_common::policy::MtlsMode;
    let mesh_config = |name: &str, cidr: &str| {
        format!(
            "---\napiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: {name}}}\n\
             spec: {{defaultMtlsMode: STRICT, outboundTrafficPolicy: REGISTRY_ONLY,\n\
             capture: {{excludeOutboundPorts: [53], excludeOutboundCidrs: [\"{cidr}\"]}}}}\n"
        )
    };
    let before = Mesh::from_objects(&parse(OBJECTS)).0.node_config("node-1", "cluster.local");
    assert_eq!(before.default_peer_authentication, MtlsMode::Permissive);
    assert_eq!(before.outbound_traffic_policy, OutboundTrafficPolicy::AllowAny);

    let objects =
        format!("{OBJECTS}{}{}", mesh_config("default", "169.254.169.254/32"), mesh_config("other", "10.0.0.0/8"));
    let (mesh, verdicts) = Mesh::from_objects(&parse(&objects));
    for node in ["node-1", "node-2"] {
        let config = mesh.node_config(node, "cluster.local");
        assert_eq!(config.default_peer_authentication, MtlsMode::Strict, "{node}");
        assert_eq!(config.outbound_traffic_policy, OutboundTrafficPolicy::RegistryOnly, "{node}");
        assert_eq!(config.capture.exclude_outbound_ports, [53]);
        assert_eq!(config.capture.exclude_outbound_cidrs, ["169.254.169.254/32".parse().unwrap()]);
    }
    let ignored = verdicts.iter().find(|v| v.key.kind == "MeshConfig" && v.key.name == "other").expect("a verdict");
    assert_eq!(ignored.rejected.as_ref().map(|r| r.reason), Some("Ignored"), "{ignored:?}");

    let (mesh, verdicts) = Mesh::from_objects(&parse(&format!("{OBJECTS}{}", mesh_config("default", "not-a-cidr"))));
    assert_eq!(mesh.node_config("node-1", "cluster.local").default_peer_authentication, MtlsMode::Permissive);
    let invalid = verdicts.iter().find(|v| v.key.kind == "MeshConfig").expect("a verdict");
    assert_eq!(invalid.rejected.as_ref().map(|r| r.reason), Some("Invalid"), "{invalid:?}");
}
