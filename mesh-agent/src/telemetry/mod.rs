//! Telemetry beyond metrics: trace context and spans (OTLP), access logs, and the per-request observation
//! that feeds both and the request metrics. What applies to a workload comes from the Telemetry resources in
//! config ([`settings`]).

pub mod access_log;
pub mod context;
pub mod otlp;
pub mod request;

use std::collections::BTreeMap;

use mesh_common::telemetry::Effective;

use std::sync::Arc;

use crate::pod::PodContext;
use crate::snapshot::Snapshot;

/// The agent's telemetry state: span exporters by collector.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub exporters: otlp::Exporters,
}

/// Where an observed request reports (the traffic store, the span exporters, this node's name): handles,
/// cloned into each observation, so telemetry needs nothing else of the agent.
#[derive(Clone)]
pub struct Sinks {
    pub traffic: crate::metrics::traffic::Traffic,
    pub exporters: otlp::Exporters,
    pub node: Arc<str>,
}

/// Access logging and tracing in force for a local pod.
pub fn settings(config: &Snapshot, pod: &PodContext) -> Effective {
    if config.telemetry.is_empty() {
        return Effective::default();
    }
    let none = BTreeMap::new();
    let labels = config.workload(&pod.net.namespace, &pod.net.name).map_or(&none, |w| &w.labels);
    mesh_common::telemetry::effective(&config.telemetry, &pod.net.namespace, labels)
}
