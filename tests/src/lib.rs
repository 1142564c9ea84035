//! nodemesh's test cluster: nodes and pods as network namespaces and cgroups on this machine, real agents,
//! the real CNI plugin, real kernel programs. See `cluster` for the topology.

pub mod app;
pub mod cluster;
pub mod demo;
pub mod fakeapi;
pub mod gateway_api;
pub mod hbone_peer;
pub mod install;
pub mod otlp;
pub mod probe;
pub mod sniff;
pub mod sys;

pub use cluster::{Cluster, Pod};

use std::net::{IpAddr, SocketAddr};

/// A test cluster of `$nodes` nodes, or an early return (test skipped) where prerequisites are missing outside
/// CI. For integration tests of this crate (it needs their `mesh-testbin` binary).
#[macro_export]
macro_rules! cluster {
    ($nodes:expr) => {
        match $crate::Cluster::new($nodes, env!("CARGO_BIN_EXE_mesh-testbin")).expect("creating the test cluster") {
            Some(c) => c,
            None => return,
        }
    };
}

/// Namespaces `default` and `shop`, both labelled into the mesh (for the controller's directory source).
pub const MESH_NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {nodemesh.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {nodemesh.io/mesh: enabled}}
";

/// The sum of the samples of `name` in Prometheus exposition `text` whose labels include all of `labels`; 0 when
/// there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `done` every 50 ms for up to 15 s; panics naming `what` when it never holds.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The IP of an `ip:port` string from a report.
pub fn ip_of(endpoint: &str) -> IpAddr {
    endpoint.parse::<SocketAddr>().unwrap_or_else(|e| panic!("{endpoint:?} is not an endpoint: {e}")).ip()
}

/// The gRPC echo service of `mesh-http grpc-serve`.
pub mod echo {
    tonic::include_proto!("nodemesh.test.v1");
}
