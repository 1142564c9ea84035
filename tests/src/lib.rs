//! nodemesh's test cluster: nodes and pods as network namespaces and cgroups on this machine, real agents,
//! the real CNI plugin, real kernel programs. See `cluster` for the topology.

pub mod cluster;
pub mod probe;
pub mod sniff;
pub mod sys;

pub use cluster::{Cluster, Pod};
