//! Metrics read from the agent's state at scrape time: the process (memory, file descriptors, threads, runtime
//! tasks), the eBPF side (map entries, program memory), the config in force and certificate expiry.

use std::collections::HashSet;
use std::sync::Arc;

use prometheus::proto::{MetricFamily, MetricType};

use crate::metrics::labels::Peer;
use crate::metrics::samples;
use crate::state::AgentState;

/// Drops, every few seconds, the traffic series of local workloads that left the node `grace` ago.
pub async fn prune_departed(state: AgentState, grace: std::time::Duration) {
    let every = (grace / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let config = state.config();
        let here: HashSet<(Arc<str>, Arc<str>)> =
            state.pods().values().map(|e| Peer::local(&config, &e.pod)).map(|p| (p.namespace, p.workload)).collect();
        state.metrics().traffic.prune(|p| here.contains(&(p.namespace.clone(), p.workload.clone())), grace);
    }
}

/// One gauge family with its samples (`labels`, value).
fn gauges(name: &str, help: &str, samples: Vec<(Vec<(&str, String)>, f64)>) -> MetricFamily {
    let mut f = samples::family(name, help, MetricType::GAUGE);
    f.set_metric(samples.into_iter().map(|(labels, value)| samples::gauge(&labels, value)).collect());
    f
}

fn counter(name: &str, help: &str, value: f64) -> MetricFamily {
    let mut f = samples::family(name, help, MetricType::COUNTER);
    f.set_metric(vec![samples::counter(&[], value)]);
    f
}

fn gauge(name: &str, help: &str, value: f64) -> MetricFamily {
    gauges(name, help, vec![(vec![], value)])
}

/// Resident memory from `/proc/self/statm` (pages).
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as f64)
}

/// The allocator's figures (`crate::allocator::stats`): RSS well above `allocated` is freed memory not returned
/// yet; `allocated` staying up is live objects.
fn allocator() -> Option<MetricFamily> {
    let kinds = crate::allocator::stats()?;
    Some(gauges(
        "nodemesh_allocator_bytes",
        "Memory as the agent's allocator (jemalloc) counts it",
        kinds.into_iter().map(|(kind, bytes)| (vec![("kind", kind.to_string())], bytes as f64)).collect(),
    ))
}

fn count_dir(path: &str) -> Option<f64> {
    Some(std::fs::read_dir(path).ok()?.count() as f64)
}

fn process() -> Vec<MetricFamily> {
    let mut out = Vec::new();
    if let Some(rss) = resident_bytes() {
        out.push(gauge("process_resident_memory_bytes", "Resident memory of the agent", rss));
    }
    out.extend(allocator());
    if let Some(fds) = count_dir("/proc/self/fd") {
        out.push(gauge("process_open_fds", "Open file descriptors of the agent", fds));
    }
    if let Some(threads) = count_dir("/proc/self/task") {
        out.push(gauge("process_threads", "Threads of the agent", threads));
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let tasks = runtime.metrics().num_alive_tasks() as f64;
        out.push(gauge("nodemesh_runtime_tasks", "Live tasks of the agent's async runtime", tasks));
    }
    out
}

pub fn families(state: &AgentState) -> Vec<MetricFamily> {
    let mut out = process();
    let stats = state.capture().stats();
    out.push(gauges(
        "nodemesh_ebpf_map_entries",
        "Entries in the capture programs' maps",
        stats.maps.into_iter().map(|(map, n)| (vec![("map", map.to_string())], n as f64)).collect(),
    ));
    out.push(gauges(
        "nodemesh_ebpf_program_memory_bytes",
        "Kernel memory locked by each loaded capture program",
        stats.programs.into_iter().map(|(program, bytes)| (vec![("program", program)], bytes as f64)).collect(),
    ));
    let config = state.config();
    out.push(gauges(
        "nodemesh_config_info",
        "The config in force (its version in the label)",
        vec![(vec![("version", config.version.clone())], 1.0)],
    ));
    let exporters = &state.telemetry().exporters;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    out.push(counter("nodemesh_spans_exported_total", "Spans sent to OTLP collectors", load(&exporters.exported)));
    out.push(counter(
        "nodemesh_spans_dropped_total",
        "Spans dropped (queue full, collector failing)",
        load(&exporters.dropped),
    ));
    out.push(gauge("nodemesh_config_workloads", "Workloads in the config", config.workloads.len() as f64));
    out.push(gauge("nodemesh_config_services", "Services in the config", config.services.len() as f64));
    out.push(gauge(
        "nodemesh_ready",
        "1 when capture, config and certificates are in place",
        f64::from(u8::from(state.ready())),
    ));
    if let Some(secrets) = state.secrets() {
        let expiry = secrets
            .certs()
            .into_iter()
            .filter_map(|c| Some((vec![("identity", c.identity)], c.not_after? as f64)))
            .collect();
        out.push(gauges(
            "nodemesh_certificate_expiration_timestamp_seconds",
            "When each workload certificate this agent holds expires (Unix seconds)",
            expiry,
        ));
    }
    out.into_iter().filter(|f| !f.get_metric().is_empty()).collect()
}
