//! `cargo xtask bench control-plane`: a real `mesh-controller` process (directory source) serving many agents,
//! simulated as lightweight in-process gRPC clients that acknowledge what they receive. Measures the initial sync,
//! then the time from a change on disk to every affected agent having it (p50/p99), which agents received it,
//! bytes sent, and the controller's memory and CPU. A benchmark: it reports, it asserts nothing.
//!
//! Scale: `NODEMESH_CP_NODES` (default 1000) and `NODEMESH_CP_PODS` (default 10000), on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_common::proto::config_discovery_client::ConfigDiscoveryClient;
use mesh_common::proto::{Ack, ConfigRequest, Hello, config_request};
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const NAMESPACES: usize = 100;
const TOKEN: &str = "control-plane-bench-token-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one simulated agent saw: arrival time and size of every update.
#[derive(Default)]
struct Seen {
    updates: Vec<(Instant, usize)>,
}

fn pods_yaml(nodes: usize, pods: usize) -> String {
    let mut out = String::new();
    for ns in 0..NAMESPACES {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{nodemesh.io/mesh: enabled}}}}\n"
        ));
    }
    for i in 0..pods {
        let ns = i % NAMESPACES;
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{ns}, labels: {{app: app-{}}}}}\n\
             spec: {{nodeName: node-{}, serviceAccountName: sa-{}}}\n\
             status: {{phase: Running, podIP: 10.{}.{}.{}}}\n",
            i % 50,
            i % nodes,
            i % 20,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    out
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn proc_stats(pid: u32) -> (f64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    // utime + stime, in clock ticks (100 Hz on Linux).
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .map_or(0.0, |ticks| ticks / 100.0);
    (rss, cpu)
}

async fn agent(url: String, ca: PathBuf, node: String, seen: Arc<Mutex<Seen>>) -> Result<()> {
    // Over TLS, as real agents connect.
    let channel = mesh_agent::controller::channel::channel(&url, Some(&ca))?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
    let node_header: tonic::metadata::MetadataValue<_> = node.parse()?;
    let mut client = ConfigDiscoveryClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", auth.clone());
        req.metadata_mut().insert("x-nodemesh-node", node_header.clone());
        Ok(req)
    })
    .max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(4);
    tx.send(ConfigRequest { kind: Some(config_request::Kind::Hello(Hello { node, accepts_packed: true })) }).await?;
    let mut updates = client.stream_config(ReceiverStream::new(rx)).await?.into_inner();
    while let Some(update) = updates.message().await? {
        seen.lock().unwrap_or_else(|p| p.into_inner()).updates.push((Instant::now(), update.encoded_len()));
        let ack = Ack { version: update.version, error: String::new() };
        if tx.send(ConfigRequest { kind: Some(config_request::Kind::Ack(ack)) }).await.is_err() {
            break;
        }
    }
    Ok(())
}

struct Round {
    name: &'static str,
    affected: usize,
    received: usize,
    p50_ms: f64,
    p99_ms: f64,
    bytes: usize,
    cpu_seconds: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// Waits until `expected` agents have more than `before` updates (or 120 s), then summarises.
async fn measure(
    name: &'static str,
    agents: &[Arc<Mutex<Seen>>],
    before: &[usize],
    expected: usize,
    started: Instant,
    pid: u32,
    cpu_before: f64,
) -> Round {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = agents
            .iter()
            .zip(before)
            .filter(|(a, b)| a.lock().unwrap_or_else(|p| p.into_inner()).updates.len() > **b)
            .count();
        if done >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let stragglers (agents that should not get the change) show up if they are going to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    let mut bytes = 0;
    for (a, b) in agents.iter().zip(before) {
        let seen = a.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, size)) = seen.updates.get(*b) {
            latencies.push(at.duration_since(started).as_secs_f64() * 1000.0);
            bytes += size;
        }
    }
    latencies.sort_by(f64::total_cmp);
    Round {
        name,
        affected: expected,
        received: latencies.len(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        bytes,
        cpu_seconds: proc_stats(pid).1 - cpu_before,
    }
}

struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    mesh_agent::identity::crypto::install_process_default();
    let nodes = env_usize("NODEMESH_CP_NODES", 1000);
    let pods = env_usize("NODEMESH_CP_PODS", 10000);
    let exe_dir = std::env::current_exe()?.parent().context("no bin dir")?.to_path_buf();
    let work = std::env::temp_dir().join(format!("nodemesh-cp-bench-{}", std::process::id()));
    let objects = work.join("objects");
    std::fs::create_dir_all(&objects)?;
    std::fs::write(work.join("token"), TOKEN)?;
    write_atomically(&objects.join("pods.yaml"), &pods_yaml(nodes, pods))?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("https://127.0.0.1:{port}");
    let ca = work.join("ca").join(mesh_agent::identity::ca::CA_CERT);
    let child = Command::new(exe_dir.join("mesh-controller"))
        .args(["serve", "--source", &format!("dir:{}", objects.display()), "--listen", &format!("127.0.0.1:{port}")])
        .arg("--ca-dir")
        .arg(work.join("ca"))
        .arg("--token-file")
        .arg(work.join("token"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting mesh-controller (build it with `cargo build --release --bins`)")?;
    let pid = child.id();
    let _controller = Controller(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("controller did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("--> {nodes} agents, {pods} pods; controller pid {pid}");

    let agents: Vec<Arc<Mutex<Seen>>> = (0..nodes).map(|_| Arc::default()).collect();
    let zero = vec![0; nodes];
    let (_, cpu0) = proc_stats(pid);
    let start = Instant::now();
    for (i, seen) in agents.iter().enumerate() {
        let (url, ca, seen) = (url.clone(), ca.clone(), seen.clone());
        tokio::spawn(async move {
            if let Err(e) = agent(url, ca, format!("node-{i}"), seen).await {
                eprintln!("agent node-{i}: {e}");
            }
        });
    }
    let mut rounds = vec![measure("initial sync", &agents, &zero, nodes, start, pid, cpu0).await];
    let (rss_synced, _) = proc_stats(pid);

    // A policy in one namespace: only nodes running pods of that namespace need it.
    let counts = |agents: &[Arc<Mutex<Seen>>]| -> Vec<usize> {
        agents.iter().map(|a| a.lock().unwrap_or_else(|p| p.into_inner()).updates.len()).collect()
    };
    let affected_by_ns7: usize =
        (0..nodes).filter(|n| (0..pods).any(|i| i % NAMESPACES == 7 && i % nodes == *n)).count();
    let before = counts(&agents);
    let (_, cpu) = proc_stats(pid);
    let started = Instant::now();
    write_atomically(
        &objects.join("policy.yaml"),
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns-7}\nspec: {action: DENY, rules: [{from: [{namespaces: [ns-8]}]}]}\n",
    )?;
    rounds.push(measure("policy in one namespace", &agents, &before, affected_by_ns7, started, pid, cpu).await);

    // A new pod: every agent learns every meshed workload.
    let before = counts(&agents);
    let (_, cpu) = proc_stats(pid);
    let started = Instant::now();
    write_atomically(
        &objects.join("extra.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: ns-1}\nspec: {nodeName: node-0}\nstatus: {phase: Running, podIP: 10.250.0.1}\n",
    )?;
    rounds.push(measure("one new pod", &agents, &before, nodes, started, pid, cpu).await);
    let (rss_end, _) = proc_stats(pid);

    println!(
        "\n{:<26} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "change", "affected", "received", "p50 ms", "p99 ms", "bytes sent", "bytes/agent", "ctrl CPU s"
    );
    for r in &rounds {
        println!(
            "{:<26} {:>9} {:>9} {:>10.1} {:>10.1} {:>12} {:>12} {:>10.2}",
            r.name,
            r.affected,
            r.received,
            r.p50_ms,
            r.p99_ms,
            r.bytes,
            r.bytes / r.received.max(1),
            r.cpu_seconds
        );
    }
    println!("controller RSS: {rss_synced:.1} MiB after initial sync, {rss_end:.1} MiB at the end");
    let report = json!({
        "nodes": nodes,
        "pods": pods,
        "controllerRssMiB": {"afterSync": rss_synced, "end": rss_end},
        "rounds": rounds.iter().map(|r| json!({
            "change": r.name, "affectedAgents": r.affected, "agentsReceived": r.received,
            "p50Ms": r.p50_ms, "p99Ms": r.p99_ms, "bytesSent": r.bytes, "bytesPerAgent": r.bytes / r.received.max(1),
            "controllerCpuSeconds": r.cpu_seconds,
        })).collect::<Vec<_>>(),
    });
    let out: PathBuf =
        std::env::var_os("NODEMESH_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "target/bench".into());
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("control-plane.json"), serde_json::to_string_pretty(&report)?)?;
    println!("written to {}", out.join("control-plane.json").display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
