//! nodemesh controller: reads the cluster's objects (today from a directory of YAML; Kubernetes next), computes
//! what each node's agent needs, streams it over gRPC and signs workload certificates for the pods on each node.

pub mod crds;
pub mod gateway;
pub mod mesh;
pub mod server;
pub mod source;
