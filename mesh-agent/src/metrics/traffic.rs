//! Request and TCP metrics with Istio's labels ([`Flow`]), reported by both agents of a call, in two naming
//! schemes from one store: native `nodemesh_*` names in base units (`/metrics`), and Istio's standard names
//! (`istio_requests_total`, `istio_request_duration_milliseconds`, ...) for Kiali and the Istio dashboards
//! (`/stats/prometheus` with `--metrics-compat istio`).
//!
//! Live connections are part of the store: their bytes count in the TCP totals at every scrape, not only
//! when they close, and `/connections` lists them. Series of workloads that left the node are dropped once
//! they have been idle for a grace period.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::proto::{Bucket, Histogram, MetricFamily, MetricType};
use serde::Serialize;

use super::labels::{Flow, Peer};
use super::samples::{counter, family, histogram};

/// Istio's default duration buckets, in milliseconds (seconds for the native names).
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
/// Istio's default size buckets, in bytes.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// The labels of one request series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    pub flow: Flow,
    /// `http`, `grpc`
    pub protocol: &'static str,
    pub response_code: u16,
    /// gRPC status, for gRPC requests.
    pub grpc_status: Option<u16>,
    /// Envoy response flags, `-` when none.
    pub flags: Arc<str>,
}

#[derive(Clone, Debug)]
struct Buckets<const N: usize> {
    counts: [u64; N],
    sum: f64,
    count: u64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets { counts: [0; N], sum: 0.0, count: 0 }
    }
}

impl<const N: usize> Buckets<N> {
    fn observe(&mut self, bounds: &[f64; N], value: f64) {
        if let Some(i) = bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// A Prometheus histogram, with bounds and sum multiplied by `scale` (unit conversion).
    fn proto(&self, bounds: &[f64; N], scale: f64) -> Histogram {
        let mut cumulative = 0;
        let buckets = bounds
            .iter()
            .zip(self.counts)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = Bucket::default();
                b.set_upper_bound(bound * scale);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_sum(self.sum * scale);
        h.set_sample_count(self.count);
        h
    }
}

#[derive(Clone, Debug, Default)]
struct RequestSeries {
    /// Milliseconds.
    duration: Buckets<19>,
    request_size: Buckets<9>,
    response_size: Buckets<9>,
}

#[derive(Clone, Debug, Default)]
struct TcpSeries {
    opened: u64,
    closed: u64,
    /// Bytes from the server to the client (Istio's "sent during response").
    sent: u64,
    /// Bytes from the client to the server.
    received: u64,
}

struct Entry<T> {
    series: T,
    touched: Instant,
}

/// Bytes of a live connection, counted by the copy loop without a lock.
#[derive(Default, Debug)]
pub struct ByteCounts {
    /// Client to server.
    pub received: AtomicU64,
    /// Server to client.
    pub sent: AtomicU64,
}

/// A proxied connection as `/connections` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub flow: Flow,
    /// The address that opened the connection, and the one it is for.
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Unix milliseconds.
    pub opened_at_ms: u64,
    /// The trace of a tunnel's `CONNECT`, sent or received (both sides log the same id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<Arc<str>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub id: u64,
    #[serde(flatten)]
    pub info: ConnectionInfo,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

struct Live {
    info: ConnectionInfo,
    bytes: Arc<ByteCounts>,
}

/// Keyed by label sets of the agent's own making (from its config and the responses it relays), hashed on every
/// request and connection: a fast seeded hash rather than SipHash.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Store {
    requests: Map<RequestKey, Entry<RequestSeries>>,
    tcp: Map<Flow, Entry<TcpSeries>>,
    live: Map<u64, Live>,
    next_id: u64,
}

/// Both agents' view of the traffic they carry.
#[derive(Clone)]
pub struct Traffic {
    store: Arc<Mutex<Store>>,
}

/// A connection counted as open until dropped; its bytes go into the totals then.
pub struct OpenConnection {
    store: Arc<Mutex<Store>>,
    id: u64,
    bytes: Arc<ByteCounts>,
    info: ConnectionInfo,
}

impl OpenConnection {
    pub fn bytes(&self) -> &Arc<ByteCounts> {
        &self.bytes
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.info
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut store = lock(&self.store);
        // Under the same lock as the scrape, so a closing connection is never counted twice or not at all.
        if let Some(live) = store.live.remove(&self.id) {
            let entry = store
                .tcp
                .entry(live.info.flow)
                .or_insert_with(|| Entry { series: Default::default(), touched: Instant::now() });
            entry.series.closed += 1;
            entry.series.sent += live.bytes.sent.load(Ordering::Relaxed);
            entry.series.received += live.bytes.received.load(Ordering::Relaxed);
            entry.touched = Instant::now();
        }
        // After a burst the table would keep its peak size (3,000 connections: about 1 MiB) for good.
        let live = &mut store.live;
        if live.capacity() > 4 * live.len().max(64) {
            live.shrink_to(2 * live.len());
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic { store: Arc::new(Mutex::new(Store::default())) }
    }
}

impl Traffic {
    /// Counts a connection as opened and lists it until the returned handle is dropped.
    pub fn open(
        &self,
        flow: Flow,
        (client, server): (SocketAddr, SocketAddr),
        trace_id: Option<Arc<str>>,
    ) -> OpenConnection {
        let mut store = lock(&self.store);
        let entry = store
            .tcp
            .entry(flow.clone())
            .or_insert_with(|| Entry { series: Default::default(), touched: Instant::now() });
        entry.series.opened += 1;
        entry.touched = Instant::now();
        store.next_id += 1;
        let id = store.next_id;
        let bytes = Arc::new(ByteCounts::default());
        let info = ConnectionInfo { flow, client, server, opened_at_ms: unix_ms(), trace_id };
        store.live.insert(id, Live { info: info.clone(), bytes: bytes.clone() });
        OpenConnection { store: self.store.clone(), id, bytes, info }
    }

    /// Records one finished request.
    pub fn request(&self, key: RequestKey, duration: Duration, request_bytes: u64, response_bytes: u64) {
        let mut store = lock(&self.store);
        let entry =
            store.requests.entry(key).or_insert_with(|| Entry { series: Default::default(), touched: Instant::now() });
        let s = &mut entry.series;
        s.duration.observe(&DURATION_BUCKETS_MS, duration.as_secs_f64() * 1000.0);
        s.request_size.observe(&SIZE_BUCKETS, request_bytes as f64);
        s.response_size.observe(&SIZE_BUCKETS, response_bytes as f64);
        entry.touched = Instant::now();
    }

    pub fn connections(&self) -> Vec<ConnectionView> {
        let store = lock(&self.store);
        let mut list: Vec<ConnectionView> = store
            .live
            .iter()
            .map(|(id, l)| ConnectionView {
                id: *id,
                info: l.info.clone(),
                bytes_received: l.bytes.received.load(Ordering::Relaxed),
                bytes_sent: l.bytes.sent.load(Ordering::Relaxed),
            })
            .collect();
        list.sort_by_key(|c| c.id);
        list
    }

    /// Drops the series of local workloads that `present` no longer knows, once idle for `grace`.
    pub fn prune(&self, present: impl Fn(&Peer) -> bool, grace: Duration) {
        let mut store = lock(&self.store);
        let Store { requests, tcp, live, .. } = &mut *store;
        let now = Instant::now();
        // A set, not a scan per series: this runs under the lock the data path takes.
        let live_flows: HashSet<&Flow> = live.values().map(|l| &l.info.flow).collect();
        let keep = |flow: &Flow, touched: Instant| {
            present(flow.local()) || now.duration_since(touched) < grace || live_flows.contains(flow)
        };
        requests.retain(|k, e| keep(&k.flow, e.touched));
        tcp.retain(|k, e| keep(k, e.touched));
    }

    /// The metric families in one naming scheme.
    pub fn families(&self, names: Naming) -> Vec<MetricFamily> {
        let store = lock(&self.store);
        let n = names.names();
        let mut requests = family(n.requests, "Requests, by both reporters", MetricType::COUNTER);
        let mut duration = family(n.duration, n.duration_help, MetricType::HISTOGRAM);
        let mut request_size = family(n.request_size, "Request body sizes", MetricType::HISTOGRAM);
        let mut response_size = family(n.response_size, "Response body sizes", MetricType::HISTOGRAM);
        for (key, entry) in &store.requests {
            let labels = request_labels(key);
            let s = &entry.series;
            requests.mut_metric().push(counter(&labels, s.duration.count as f64));
            let scale = names.duration_scale();
            duration.mut_metric().push(histogram(&labels, s.duration.proto(&DURATION_BUCKETS_MS, scale)));
            request_size.mut_metric().push(histogram(&labels, s.request_size.proto(&SIZE_BUCKETS, 1.0)));
            response_size.mut_metric().push(histogram(&labels, s.response_size.proto(&SIZE_BUCKETS, 1.0)));
        }
        let mut totals: HashMap<&Flow, TcpSeries> =
            store.tcp.iter().map(|(flow, e)| (flow, e.series.clone())).collect();
        for live in store.live.values() {
            let t = totals.entry(&live.info.flow).or_default();
            t.sent += live.bytes.sent.load(Ordering::Relaxed);
            t.received += live.bytes.received.load(Ordering::Relaxed);
        }
        let mut opened = family(n.tcp_opened, "TCP connections opened", MetricType::COUNTER);
        let mut closed = family(n.tcp_closed, "TCP connections closed", MetricType::COUNTER);
        let mut sent = family(n.tcp_sent, "Bytes sent by the server side of TCP connections", MetricType::COUNTER);
        let mut received =
            family(n.tcp_received, "Bytes received from the client side of TCP connections", MetricType::COUNTER);
        for (flow, t) in totals {
            let labels = tcp_labels(flow);
            opened.mut_metric().push(counter(&labels, t.opened as f64));
            closed.mut_metric().push(counter(&labels, t.closed as f64));
            sent.mut_metric().push(counter(&labels, t.sent as f64));
            received.mut_metric().push(counter(&labels, t.received as f64));
        }
        [requests, duration, request_size, response_size, opened, closed, sent, received]
            .into_iter()
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }
}

/// Which metric names to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// `nodemesh_*`, base units.
    Native,
    /// Istio's standard metrics (milliseconds for durations, as Istio has them).
    Istio,
}

struct Names {
    requests: &'static str,
    duration: &'static str,
    duration_help: &'static str,
    request_size: &'static str,
    response_size: &'static str,
    tcp_opened: &'static str,
    tcp_closed: &'static str,
    tcp_sent: &'static str,
    tcp_received: &'static str,
}

impl Naming {
    fn names(self) -> Names {
        match self {
            Naming::Native => Names {
                requests: "nodemesh_requests_total",
                duration: "nodemesh_request_duration_seconds",
                duration_help: "Request durations, to the end of the response",
                request_size: "nodemesh_request_size_bytes",
                response_size: "nodemesh_response_size_bytes",
                tcp_opened: "nodemesh_tcp_connections_opened_total",
                tcp_closed: "nodemesh_tcp_connections_closed_total",
                tcp_sent: "nodemesh_tcp_sent_bytes_total",
                tcp_received: "nodemesh_tcp_received_bytes_total",
            },
            Naming::Istio => Names {
                requests: "istio_requests_total",
                duration: "istio_request_duration_milliseconds",
                duration_help: "Request durations in milliseconds",
                request_size: "istio_request_bytes",
                response_size: "istio_response_bytes",
                tcp_opened: "istio_tcp_connections_opened_total",
                tcp_closed: "istio_tcp_connections_closed_total",
                tcp_sent: "istio_tcp_sent_bytes_total",
                tcp_received: "istio_tcp_received_bytes_total",
            },
        }
    }

    fn duration_scale(self) -> f64 {
        match self {
            Naming::Native => 0.001,
            Naming::Istio => 1.0,
        }
    }
}

fn request_labels(key: &RequestKey) -> Vec<(&'static str, String)> {
    let mut labels: Vec<(&'static str, String)> =
        key.flow.label_pairs().iter().map(|(k, v)| (*k, v.to_string())).collect();
    labels.push(("request_protocol", key.protocol.to_string()));
    labels.push(("response_code", key.response_code.to_string()));
    labels.push(("grpc_response_status", key.grpc_status.map(|s| s.to_string()).unwrap_or_default()));
    labels.push(("response_flags", key.flags.to_string()));
    labels.push(("connection_security_policy", key.flow.security.as_str().to_string()));
    labels
}

fn tcp_labels(flow: &Flow) -> Vec<(&'static str, String)> {
    let mut labels: Vec<(&'static str, String)> = flow.label_pairs().iter().map(|(k, v)| (*k, v.to_string())).collect();
    labels.push(("request_protocol", "tcp".to_string()));
    labels.push(("response_flags", "-".to_string()));
    labels.push(("connection_security_policy", flow.security.as_str().to_string()));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::labels::{DestinationService, Reporter, Security};

    fn flow(local: &str) -> Flow {
        let mut source = Peer::unknown();
        source.workload = local.into();
        Flow {
            reporter: Reporter::Source,
            source,
            destination: Peer::unknown(),
            service: DestinationService::of("shop", "reviews"),
            security: Security::MutualTls,
        }
    }

    fn key(local: &str) -> RequestKey {
        RequestKey { flow: flow(local), protocol: "http", response_code: 200, grpc_status: None, flags: "-".into() }
    }

    fn samples(t: &Traffic, naming: Naming, name: &str) -> usize {
        t.families(naming).iter().filter(|f| f.name() == name).map(|f| f.get_metric().len()).sum()
    }

    #[test]
    fn requests_render_in_both_namings_with_unit_conversion() {
        let t = Traffic::default();
        t.request(key("a"), Duration::from_millis(3), 10, 2000);
        let native = t.families(Naming::Native);
        let duration = native.iter().find(|f| f.name() == "nodemesh_request_duration_seconds").unwrap();
        let h = duration.get_metric()[0].get_histogram();
        assert!((h.get_sample_sum() - 0.003).abs() < 1e-9);
        assert_eq!(h.get_bucket()[2].upper_bound(), 0.005);
        assert_eq!(h.get_bucket()[2].cumulative_count(), 1);
        let istio = t.families(Naming::Istio);
        let duration = istio.iter().find(|f| f.name() == "istio_request_duration_milliseconds").unwrap();
        assert!((duration.get_metric()[0].get_histogram().get_sample_sum() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn live_bytes_count_at_scrape_and_departed_workloads_are_pruned_after_grace() {
        let t = Traffic::default();
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let open = t.open(flow("gone"), (addr, addr), None);
        open.bytes().received.fetch_add(100, Ordering::Relaxed);
        let received = |t: &Traffic| {
            t.families(Naming::Native)
                .iter()
                .find(|f| f.name() == "nodemesh_tcp_received_bytes_total")
                .map(|f| f.get_metric()[0].get_counter().get_value())
        };
        assert_eq!(received(&t), Some(100.0), "a live connection's bytes show before it closes");
        t.request(key("left"), Duration::from_millis(1), 0, 0);
        t.request(key("here"), Duration::from_millis(1), 0, 0);
        t.prune(|p| &*p.workload == "here", Duration::ZERO);
        assert_eq!(samples(&t, Naming::Native, "nodemesh_requests_total"), 1, "the departed workload's series go");
        assert_eq!(received(&t), Some(100.0), "not while its connection lives");
        drop(open);
        assert_eq!(received(&t), Some(100.0), "closing moves the bytes into the totals");
        t.prune(|p| &*p.workload == "here", Duration::from_secs(60));
        assert_eq!(received(&t), Some(100.0), "kept within the grace period");
        t.prune(|p| &*p.workload == "here", Duration::ZERO);
        assert_eq!(received(&t), None);
    }
}
