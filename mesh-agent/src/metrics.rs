//! Prometheus metrics of the agent (`--metrics`, `/metrics`).
//!
//! Labels come from enrollment and config (namespace, pod, direction), never from traffic, so cardinality is
//! bounded by the pods on the node.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

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
    pub connections_opened: IntCounterVec,
    pub connections_closed: IntCounterVec,
    /// Connections the agent accepted but could not carry (`reason`).
    pub connection_failures: IntCounterVec,
    /// Connections refused by policy (`reason`).
    pub connections_denied: IntCounterVec,
    /// HBONE (mTLS HTTP/2) connections, not streams.
    pub hbone_connections: IntCounterVec,
    pub hbone_failures: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub received_bytes: IntCounterVec,
    pub enrolled_pods: IntGauge,
    pub original_destination_missing: IntCounter,
}

/// `security`: `mutual_tls` (HBONE) or `none` (plaintext), like Istio's `connection_security_policy`.
const LABELS: &[&str] = &["namespace", "pod", "direction", "security"];
const REASON_LABELS: &[&str] = &["namespace", "pod", "direction", "reason"];

fn counter_vec(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    labelled(registry, name, help, LABELS)
}

fn labelled(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definitions are static and valid");
    registry.register(Box::new(c.clone())).expect("each metric is registered once");
    c
}

impl Metrics {
    pub fn new(capture_stats: impl Fn() -> crate::capture::Counters + Send + Sync + 'static) -> Self {
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
            connections_opened: counter_vec(
                &registry,
                "nodemesh_tcp_connections_opened_total",
                "TCP connections the agent proxied for a workload",
            ),
            connections_closed: counter_vec(
                &registry,
                "nodemesh_tcp_connections_closed_total",
                "Proxied TCP connections that have ended",
            ),
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
            hbone_failures: labelled(
                &registry,
                "nodemesh_hbone_failures_total",
                "Tunnel connections that failed before carrying traffic, by reason",
                &["direction", "reason"],
            ),
            sent_bytes: counter_vec(&registry, "nodemesh_tcp_sent_bytes_total", "Bytes the workload sent"),
            received_bytes: counter_vec(&registry, "nodemesh_tcp_received_bytes_total", "Bytes the workload received"),
            enrolled_pods,
            original_destination_missing,
            registry,
        }
    }

    pub fn denied(&self, pod: &crate::inpod::PodContext, direction: Direction, reason: &str) {
        self.connections_denied
            .with_label_values(&[&pod.net.namespace, &pod.net.name, direction.as_str(), reason])
            .inc();
    }

    pub fn failed(&self, pod: &crate::inpod::PodContext, direction: Direction, reason: &str) {
        self.connection_failures
            .with_label_values(&[&pod.net.namespace, &pod.net.name, direction.as_str(), reason])
            .inc();
    }

    pub fn hbone_failed(&self, direction: Direction, reason: &str) {
        self.hbone_failures.with_label_values(&[direction.as_str(), reason]).inc();
    }

    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
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
