//! The controller's Prometheus metrics (`--metrics`, default `:15014/metrics`, istiod's monitoring port):
//! connected agents, config updates sent and rejected, certificates signed or refused, and the accepted
//! objects of the current snapshot.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connected_agents: IntGauge,
    /// `type`: `full` or `delta`.
    pub config_updates: IntCounterVec,
    pub config_rejections: IntCounter,
    /// `result`: `signed`, `refused`, `invalid`.
    pub certificate_requests: IntCounterVec,
    pub snapshots: IntCounter,
    /// Objects of the last snapshot by kind.
    pub objects: IntGaugeVec,
    /// Objects the last snapshot left out, by kind and reason.
    pub rejected: IntGaugeVec,
    /// 1 while the current snapshot is withheld from agents (a source file that never parsed).
    pub withheld: IntGauge,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("each metric is registered once");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("static definition"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("static definition"))
        };
        Metrics {
            connected_agents: register(
                &registry,
                IntGauge::new("nodemesh_controller_connected_agents", "Agents with an open config stream")
                    .expect("static definition"),
            ),
            config_updates: counter_vec(
                "nodemesh_controller_config_updates_total",
                "Config updates sent to agents, by type (full, delta)",
                &["type"],
            ),
            config_rejections: register(
                &registry,
                IntCounter::new("nodemesh_controller_config_rejections_total", "Config updates agents rejected")
                    .expect("static definition"),
            ),
            certificate_requests: counter_vec(
                "nodemesh_controller_certificate_requests_total",
                "Certificate signing requests, by result (signed, refused, invalid)",
                &["result"],
            ),
            snapshots: register(
                &registry,
                IntCounter::new("nodemesh_controller_snapshots_total", "Snapshots of the mesh served to agents")
                    .expect("static definition"),
            ),
            objects: gauge_vec(
                "nodemesh_controller_objects",
                "Accepted objects in the current snapshot, by kind",
                &["kind"],
            ),
            rejected: gauge_vec(
                "nodemesh_controller_rejected_objects",
                "Objects left out of the current snapshot (Accepted=False), by kind and reason",
                &["kind", "reason"],
            ),
            withheld: register(
                &registry,
                IntGauge::new(
                    "nodemesh_controller_snapshot_withheld",
                    "1 while the snapshot is not served because a source file never parsed",
                )
                .expect("static definition"),
            ),
            registry,
        }
    }
}

impl Metrics {
    /// Counts a new snapshot and its objects.
    pub fn snapshot(&self, mesh: &crate::mesh::Mesh) {
        self.snapshots.inc();
        let pods = mesh.pods.len();
        for (kind, n) in [
            ("Namespace", mesh.meshed_namespaces.len()),
            ("Pod", pods),
            ("Service", mesh.services.len()),
            ("PeerAuthentication", mesh.peer_authentications.len()),
            ("AuthorizationPolicy", mesh.authorization_policies.len()),
            ("Route", mesh.routes.len()),
            ("TrafficPolicy", mesh.traffic_policies.len()),
            ("Telemetry", mesh.telemetry.len()),
        ] {
            self.objects.with_label_values(&[kind]).set(n as i64);
        }
        self.rejected.reset();
        for ((kind, reason), n) in &mesh.rejected {
            self.rejected.with_label_values(&[kind, reason]).set(*n as i64);
        }
        self.withheld.set(i64::from(mesh.withheld.is_some()));
    }

    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}
