//! Bookinfo as Kubernetes objects for the controller's directory source, and its pods in the demo cluster.

use std::path::Path;

use anyhow::Result;

use crate::app::pod_object;
use crate::{Cluster, Pod};

pub const NAMESPACE: &str = "bookinfo";
pub const PORT: u16 = 9080;
pub const TITLE: &str = "The Comedy of Errors";

/// One Deployment of Bookinfo with its single pod.
pub struct Deployment {
    /// Deployment name, which meshctl and the metrics show as the workload.
    pub name: &'static str,
    pub app: &'static str,
    pub version: &'static str,
    pub node: usize,
    /// Its ReplicaSet's pod-template hash, so the pod is named and owned as Kubernetes would.
    hash: &'static str,
}

/// Spread over both nodes so that most calls cross between them.
pub const DEPLOYMENTS: &[Deployment] = &[
    Deployment { name: "productpage-v1", app: "productpage", version: "v1", node: 0, hash: "6b8c5f" },
    Deployment { name: "details-v1", app: "details", version: "v1", node: 1, hash: "7d4f9a" },
    Deployment { name: "reviews-v1", app: "reviews", version: "v1", node: 0, hash: "5c7d8b" },
    Deployment { name: "reviews-v2", app: "reviews", version: "v2", node: 1, hash: "8e2a4c" },
    Deployment { name: "reviews-v3", app: "reviews", version: "v3", node: 1, hash: "9f1b3d" },
    Deployment { name: "ratings-v1", app: "ratings", version: "v1", node: 0, hash: "4a6e2f" },
];

/// Services and their cluster IPs: one per app, and one per reviews version for weighted routing.
pub const SERVICES: &[(&str, &str, &str)] = &[
    ("productpage", "10.96.100.10", "{app: productpage}"),
    ("details", "10.96.100.11", "{app: details}"),
    ("reviews", "10.96.100.12", "{app: reviews}"),
    ("ratings", "10.96.100.13", "{app: ratings}"),
    ("reviews-v1", "10.96.100.21", "{app: reviews, version: v1}"),
    ("reviews-v2", "10.96.100.22", "{app: reviews, version: v2}"),
    ("reviews-v3", "10.96.100.23", "{app: reviews, version: v3}"),
];

pub fn service_ip(name: &str) -> &'static str {
    SERVICES.iter().find(|(n, _, _)| *n == name).map_or("0.0.0.0", |(_, ip, _)| ip)
}

pub fn url(service: &str, path: &str) -> String {
    format!("http://{}:{PORT}{path}", service_ip(service))
}

pub fn spiffe(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{service_account}")
}

/// The namespace, with or without the label that puts its pods in the mesh.
pub fn namespace(meshed: bool) -> String {
    let labels = if meshed { "{nodemesh.io/mesh: enabled}" } else { "{}" };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {labels}}}\n")
}

/// The running application.
pub struct Bookinfo {
    pub pods: Vec<(&'static Deployment, Pod)>,
    /// A pod to call from, like Istio's `curl` sample.
    pub curl: Pod,
}

impl Bookinfo {
    pub fn pod(&self, deployment: &str) -> &Pod {
        let found = self.pods.iter().find(|(d, _)| d.name == deployment);
        &found.unwrap_or_else(|| panic!("no deployment {deployment}")).1
    }
}

/// Creates the pods (CNI ADD included, as a kubelet would), writes pods and Services for the controller, and
/// starts every service. The namespace is written separately: until it is labelled the agents leave the pods
/// alone.
pub fn deploy(c: &mut Cluster, exe: &Path) -> Result<Bookinfo> {
    let mut pods = vec![];
    let mut yaml = String::new();
    for d in DEPLOYMENTS {
        let replica_set = format!("{}-{}", d.name, d.hash);
        let pod = c.add_pod_in(d.node, &format!("{replica_set}-{}", &d.hash[..4]), NAMESPACE)?;
        let labels = format!("{{app: {}, version: {}}}", d.app, d.version);
        yaml.push_str(&pod_object(c, &pod, &format!("bookinfo-{}", d.app), &labels, Some(&replica_set)));
        pods.push((d, pod));
    }
    let curl = c.add_pod_in(0, "curl", NAMESPACE)?;
    yaml.push_str(&pod_object(c, &curl, "curl", "{app: curl}", None));
    for (name, ip, selector) in SERVICES {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\n\
             spec: {{clusterIP: {ip}, selector: {selector}, ports: [{{name: http, port: {PORT}, targetPort: {PORT}}}]}}\n"
        ));
    }
    c.write_objects("bookinfo.yaml", Some(&yaml))?;
    for (d, pod) in &pods {
        c.enroll(pod)?;
        let port = PORT.to_string();
        let mut args = vec!["serve", d.app, &port, "--version", d.version, "--pod", &pod.name];
        let upstreams: Vec<String> = match d.app {
            "productpage" => ["details", "reviews"].iter().map(|s| format!("{s}={}:{PORT}", service_ip(s))).collect(),
            "reviews" => vec![format!("ratings={}:{PORT}", service_ip("ratings"))],
            _ => vec![],
        };
        for u in &upstreams {
            args.extend(["--upstream", u.as_str()]);
        }
        c.start_server(pod, exe, &args, &format!("bookinfo-{}", d.name))?;
    }
    c.enroll(&curl)?;
    Ok(Bookinfo { pods, curl })
}

/// The reviews HTTPRoute: `jason` (when given) goes to `jason_backend` with an optional request timeout; everyone
/// else to the weighted backends.
pub fn reviews_route(jason: Option<(&str, Option<&str>)>, weights: &[(&str, u32)]) -> String {
    let mut rules = String::new();
    if let Some((backend, timeout)) = jason {
        let timeouts = timeout.map(|t| format!("\n      timeouts: {{request: {t}}}")).unwrap_or_default();
        rules.push_str(&format!(
            "    - matches: [{{headers: [{{name: end-user, value: jason}}]}}]{timeouts}\n      \
             backendRefs: [{{name: {backend}, port: {PORT}}}]\n"
        ));
    }
    let backends: Vec<String> =
        weights.iter().map(|(name, weight)| format!("{{name: {name}, port: {PORT}, weight: {weight}}}")).collect();
    rules.push_str(&format!("    - backendRefs: [{}]\n", backends.join(", ")));
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: {NAMESPACE}}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: {PORT}}}]\n  rules:\n{rules}"
    )
}

/// A delay on every call to ratings.
pub fn ratings_delay(delay: &str) -> String {
    format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: ratings-delay, namespace: {NAMESPACE}}}\n\
         spec:\n  targetRef: {{kind: Service, name: ratings}}\n  faultInjection:\n    delay: {{fixedDelay: {delay}, percent: 100}}\n"
    )
}

/// Only productpage may read details.
pub fn details_policy() -> String {
    format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: details-viewer, namespace: {NAMESPACE}}}\n\
         spec:\n  selector: {{matchLabels: {{app: details}}}}\n  action: ALLOW\n  rules:\n    \
         - from: [{{principals: [cluster.local/ns/{NAMESPACE}/sa/bookinfo-productpage]}}]\n      \
         to: [{{methods: [GET, HEAD]}}]\n"
    )
}

/// Mutual TLS required for every workload of the namespace.
pub fn strict_mtls() -> String {
    format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: {NAMESPACE}}}\n\
         spec: {{mode: STRICT}}\n"
    )
}
