//! nodemesh controller: reads the cluster's objects (Kubernetes, or a directory of YAML), computes
//! what each node's agent needs, streams it over gRPC and signs workload certificates for the pods on each node.

pub mod auth;
pub mod ca_secret;
pub mod crds;
pub mod gateway;
pub mod gateway_api;
pub mod mesh;
pub mod metrics;
pub mod server;
pub mod source;
pub mod tls;
