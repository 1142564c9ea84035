//! A meshed application for L7 and observability tests: a client pod `default/client` on node 1, server pods in
//! namespace `shop` running `mesh-http`, the controller on a directory of objects and both agents.

use std::path::Path;

use serde_json::Value;

use crate::{Cluster, Pod, wait_for};

/// A server pod: node index, name, labels (YAML flow map), the `mesh-http` arguments after the port
/// (`["grpc"]`: the gRPC server; `["tcp"]`: a TCP echo server instead), and its owning ReplicaSet
/// (`name-hash`; the hash becomes the `pod-template-hash` label) when it belongs to a Deployment.
pub struct Server<'a> {
    pub node: usize,
    pub name: &'a str,
    pub labels: &'a str,
    pub args: &'a [&'a str],
    pub owner: Option<&'a str>,
}

/// A running Pod object with both addresses; `owner` is a ReplicaSet `deployment-hash`.
pub fn pod_object(c: &Cluster, pod: &Pod, sa: &str, labels: &str, owner: Option<&str>) -> String {
    let owner = match owner.and_then(|o| Some((o, o.rsplit_once('-')?.1))) {
        Some((rs, hash)) => {
            let labels = labels.trim_end_matches('}');
            format!(
                "{labels}, pod-template-hash: '{hash}'}}, \
                 ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {rs}, controller: true}}]"
            )
        }
        None => labels.to_string(),
    };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: uid-{}, labels: {owner}}}\n\
         spec: {{nodeName: {}, serviceAccountName: {sa}}}\n\
         status: {{phase: Running, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n",
        pod.name, pod.namespace, pod.name, c.nodes[pod.node].name, pod.ipv4, pod.ipv6
    )
}

/// A Service in `shop` on port 80 (endpoints on 8080); `port_extra` adds e.g. `appProtocol: grpc`.
pub fn service(name: &str, ip: &str, selector: &str, port_extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{clusterIP: {ip}, selector: {selector}, ports: [{{name: web, port: 80, targetPort: 8080{port_extra}}}]}}\n"
    )
}

/// Client `default/client` (labels `app: client, version: v1`) on node 1, the servers (in `shop`, listening on
/// 8080), the controller and both agents (with `agent_args`) with everything enrolled; `objects` (Services,
/// routes, policies) in the controller's directory. Waits until node 1 has `routes` routes. `http` is the
/// `mesh-http` binary.
pub fn mesh(
    c: &mut Cluster,
    http: &Path,
    servers: &[Server<'_>],
    objects: &str,
    routes: usize,
    agent_args: &[&str],
) -> Pod {
    let client = c.add_pod(0, "client").unwrap();
    let mut pods = vec![];
    let mut yaml = pod_object(c, &client, "client-sa", "{app: client, version: v1}", None);
    for s in servers {
        let pod = c.add_pod_in(s.node, s.name, "shop").unwrap();
        yaml.push_str(&pod_object(c, &pod, &format!("{}-sa", s.name), s.labels, s.owner));
        pods.push(pod);
    }
    c.write_objects("namespaces.yaml", Some(crate::MESH_NAMESPACES)).unwrap();
    c.write_objects("pods.yaml", Some(&yaml)).unwrap();
    c.write_objects("mesh.yaml", Some(objects)).unwrap();
    c.start_controller().unwrap();
    for node in 0..2 {
        c.start_agent_with_controller_args(node, agent_args).unwrap();
    }
    c.enroll(&client).unwrap();
    for (s, pod) in servers.iter().zip(&pods) {
        c.enroll(pod).unwrap();
        if s.args.first() == Some(&"tcp") {
            // A plain TCP echo server (mesh-testbin), for opaque traffic.
            c.serve(pod, 8080).unwrap();
            continue;
        }
        let mut args = vec![if s.args.first() == Some(&"grpc") { "grpc-serve" } else { "serve" }, "8080", s.name];
        args.extend(s.args.iter().skip_while(|a| **a == "grpc"));
        c.start_server(pod, http, &args, &format!("http-{}", s.name)).unwrap();
    }
    let services = objects.matches("kind: Service\n").count();
    wait_for("services and routes on node 1", || {
        c.config_len(0, "services") == services && c.config_len(0, "routes") == routes
    });
    client
}

/// `mesh-http get ARGS` in the client pod: its JSON report.
pub fn get(c: &Cluster, http: &Path, client: &Pod, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend(args);
    c.run_in(client, http, &all).unwrap()
}

/// How many requests of a `mesh-http get` report had `key` under `field` (`statuses`, `names`, `flags`).
pub fn count(report: &Value, field: &str, key: &str) -> u64 {
    report[field][key].as_u64().unwrap_or(0)
}
