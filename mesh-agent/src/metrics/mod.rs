//! Prometheus metrics of the agent (`--metrics`: `/metrics`, and `/stats/prometheus` with Istio's names).
//!
//! Traffic metrics carry Istio's label set ([`labels`], [`traffic`]); the agent's own counters here are labelled
//! by namespace, pod, direction and reason. Every label value comes from enrollment, config or certificates,
//! never from traffic, so cardinality is bounded by the workloads of the mesh.

pub mod labels;
pub mod samples;
pub mod traffic;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub use labels::{DestinationService, Flow, Peer, Reporter, Security};
pub use traffic::{Naming, Traffic};

/// Which side of the workload a connection is on, from the workload's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Request and TCP metrics with Istio's labels.
    pub traffic: Traffic,
    /// Serve Istio's metric names too (`--metrics-compat istio`).
    pub istio_names: bool,
    /// Connections the agent accepted but could not carry (`reason`).
    pub connection_failures: IntCounterVec,
    /// Connections refused by policy (`reason`).
    pub connections_denied: IntCounterVec,
    /// HBONE (mTLS HTTP/2) connections, not streams.
    pub hbone_connections: IntCounterVec,
    pub hbone_failures: IntCounterVec,
    /// Ways opened for one pod's requests to one workload through its agent (`mode`: `direct`, straight on the
    /// HBONE connection; `tunnel`, inside a CONNECT stream, when the peer does not take them directly).
    pub hbone_l7_channels: IntCounterVec,
    /// Connections the agent closed to bound its resources (`reason`: `header_timeout`, `connection_limit`).
    pub connections_cut: IntCounterVec,
    pub enrolled_pods: IntGauge,
    pub original_destination_missing: IntCounter,
}

const REASON_LABELS: &[&str] = &["namespace", "pod", "direction", "reason"];

fn labelled(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definitions are static and valid");
    registry.register(Box::new(c.clone())).expect("each metric is registered once");
    c
}

impl Metrics {
    pub fn new(
        capture_stats: impl Fn() -> crate::capture::Counters + Send + Sync + 'static,
        istio_names: bool,
    ) -> Self {
        let registry = Registry::new();
        let enrolled_pods = IntGauge::new("nodemesh_enrolled_pods", "Pods whose traffic this agent captures")
            .expect("static metric definition");
        registry.register(Box::new(enrolled_pods.clone())).expect("registered once");
        let original_destination_missing = IntCounter::new(
            "nodemesh_original_destination_missing_total",
            "Connections accepted on the outbound listener without a recorded original destination",
        )
        .expect("static metric definition");
        registry.register(Box::new(original_destination_missing.clone())).expect("registered once");
        registry.register(Box::new(CaptureCollector::new(capture_stats))).expect("registered once");
        Metrics {
            traffic: Traffic::default(),
            istio_names,
            connection_failures: labelled(
                &registry,
                "nodemesh_tcp_connection_failures_total",
                "Captured connections the agent could not carry, by reason",
                REASON_LABELS,
            ),
            connections_denied: labelled(
                &registry,
                "nodemesh_tcp_connections_denied_total",
                "Connections refused by policy, by reason",
                REASON_LABELS,
            ),
            hbone_connections: labelled(
                &registry,
                "nodemesh_hbone_connections_opened_total",
                "mTLS HTTP/2 tunnel connections established (each carries many streams)",
                &["direction"],
            ),
            connections_cut: labelled(
                &registry,
                "nodemesh_connections_cut_total",
                "Connections the agent closed to bound its resources (limits in docs/ARCHITECTURE.md), by reason",
                REASON_LABELS,
            ),
            hbone_failures: labelled(
                &registry,
                "nodemesh_hbone_failures_total",
                "Tunnel connections that failed before carrying traffic, by reason",
                &["direction", "reason"],
            ),
            hbone_l7_channels: labelled(
                &registry,
                "nodemesh_hbone_l7_channels_opened_total",
                "Ways opened for a pod's requests to a workload through its agent, by mode (direct or tunnel)",
                &["mode"],
            ),
            enrolled_pods,
            original_destination_missing,
            registry,
        }
    }

    pub fn denied(&self, pod: &crate::pod::PodContext, direction: Direction, reason: &str) {
        self.connections_denied
            .with_label_values(&[&pod.net.namespace, &pod.net.name, direction.as_str(), reason])
            .inc();
    }

    pub fn failed(&self, pod: &crate::pod::PodContext, direction: Direction, reason: &str) {
        self.connection_failures
            .with_label_values(&[&pod.net.namespace, &pod.net.name, direction.as_str(), reason])
            .inc();
    }

    pub fn cut(&self, pod: &crate::pod::PodContext, direction: Direction, reason: &str) {
        self.connections_cut.with_label_values(&[&pod.net.namespace, &pod.net.name, direction.as_str(), reason]).inc();
    }

    pub fn hbone_failed(&self, direction: Direction, reason: &str) {
        self.hbone_failures.with_label_values(&[direction.as_str(), reason]).inc();
    }

    /// The exposition text: the agent's own metrics, `scraped` (read from its state at scrape time) and the
    /// traffic metrics in the naming scheme asked for.
    pub fn encode(&self, naming: Naming, scraped: Vec<MetricFamily>) -> String {
        let mut families = self.registry.gather();
        families.extend(scraped);
        families.extend(self.traffic.families(naming));
        TextEncoder::new().encode_to_string(&families).unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Exposes the eBPF programs' own counters, read from the per-CPU map at scrape time.
struct CaptureCollector<F> {
    read: F,
    desc: Vec<Desc>,
}

impl<F: Fn() -> crate::capture::Counters> CaptureCollector<F> {
    const NAME: &'static str = "nodemesh_capture_events_total";
    const HELP: &'static str = "Decisions taken by the eBPF capture programs";

    fn new(read: F) -> Self {
        let desc = Desc::new(Self::NAME.into(), Self::HELP.into(), vec!["event".into()], Default::default())
            .expect("static metric definition");
        CaptureCollector { read, desc: vec![desc] }
    }
}

impl<F: Fn() -> crate::capture::Counters + Send + Sync> Collector for CaptureCollector<F> {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = (self.read)();
        let vec = IntCounterVec::new(Opts::new(Self::NAME, Self::HELP), &["event"]).expect("static metric definition");
        for (event, value) in [
            ("outbound_redirected", c.outbound_redirected),
            ("outbound_excluded", c.outbound_skipped_excluded),
            ("inbound_steered", c.inbound_steered),
            ("inbound_no_listener", c.inbound_no_listener),
            ("original_destination_recorded", c.orig_dst_recorded),
        ] {
            vec.with_label_values(&[event]).inc_by(value);
        }
        vec.collect()
    }
}
