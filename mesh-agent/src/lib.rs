//! nodemesh node agent: captures enrolled pods' TCP traffic with eBPF and proxies it from inside each pod's
//! network namespace. See docs/ARCHITECTURE.md for the data path.

pub mod abort;
pub mod admin;
pub mod allocator;
pub mod body;
pub mod capture;
pub mod cni_install;
pub mod cni_plugin;
pub mod cni_server;
pub mod controller;
pub mod copy;
pub mod dataplane;
pub mod drain;
pub mod handover;
pub mod hbone;
pub mod http_message;
pub mod identity;
pub mod inpod;
pub mod l7;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod netns;
pub mod node;
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod scrape;
pub mod snapshot;
pub mod socket;
pub mod state;
pub mod state_dir;
pub mod telemetry;
pub mod tunnels;
pub mod uninstall;
