//! `cargo xtask bench`: the same client and server pods measured over three paths in one run — direct (no
//! mesh), plaintext through both agents, and mTLS HBONE through both agents — on a two-node namespace cluster.
//! Prints a table with ratios to direct and writes JSON to `target/bench/`. A benchmark, not a test.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mesh_tests::{Cluster, Pod};
use serde_json::{Value, json};

const THROUGHPUT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
const ROUND_TRIPS: &str = "20000";
const CPS_SECONDS: &str = "3";
const RUNS: usize = 3;

struct PathResult {
    name: &'static str,
    gbit_per_second: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    connections_per_second: f64,
    agent_rss_mib: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn number(v: &Value, key: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).with_context(|| format!("no {key} in {v}"))
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn measure(c: &Cluster, name: &'static str, client: &Pod, server: &Pod) -> Result<PathResult> {
    eprintln!("--> {name}");
    let sink = format!("{}:5201", server.ipv4);
    let echo = format!("{}:8080", server.ipv4);
    let mut tput = Vec::new();
    for _ in 0..RUNS {
        let r = c.testbin(client, &["throughput", &sink, &THROUGHPUT_BYTES.to_string()])?;
        tput.push(number(&r, "gbitPerSecond")?);
    }
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let r = c.testbin(client, &["rr", &echo, ROUND_TRIPS])?;
        p50.push(number(&r, "p50Us")?);
        p99.push(number(&r, "p99Us")?);
    }
    let cps = number(&c.testbin(client, &["cps", &echo, CPS_SECONDS])?, "perSecond")?;
    let agent_rss_mib = c.agent_pid(0).and_then(rss_mib);
    Ok(PathResult {
        name,
        gbit_per_second: median(tput),
        rr_p50_us: median(p50),
        rr_p99_us: median(p99),
        connections_per_second: cps,
        agent_rss_mib,
    })
}

fn pair(c: &mut Cluster, tag: &str) -> Result<(Pod, Pod)> {
    let client = c.add_pod(0, &format!("{tag}-client"))?;
    let server = c.add_pod(1, &format!("{tag}-server"))?;
    c.serve(&server, 8080)?;
    c.serve_mode(&server, 5201, "sink")?;
    Ok((client, server))
}

fn main() -> Result<()> {
    let bin_dir = std::env::current_exe()?.parent().context("no bin dir")?.to_path_buf();
    let testbin = bin_dir.join("mesh-testbin");
    let testbin = testbin.to_str().context("path")?;
    let mut results = Vec::new();
    // NODEMESH_BENCH_ONLY=mtls skips the first two paths (for profiling the tunnel alone).
    let only_mtls = std::env::var("NODEMESH_BENCH_ONLY").as_deref() == Ok("mtls");
    if !only_mtls {
        let mut c = Cluster::new(2, testbin)?.context("the bench needs root, cgroup v2 and bpffs")?;
        c.agent_log = "warn".into();
        let (dc, ds) = pair(&mut c, "direct")?;
        let (pc, ps) = pair(&mut c, "plain")?;
        c.start_agent(0)?;
        c.start_agent(1)?;
        c.enroll(&pc)?;
        c.enroll(&ps)?;
        results.push(measure(&c, "direct", &dc, &ds)?);
        results.push(measure(&c, "plaintext via agents", &pc, &ps)?);
    }
    {
        let mut c = Cluster::new(2, testbin)?.context("the bench needs root, cgroup v2 and bpffs")?;
        c.agent_log = "warn".into();
        let (hc, hs) = pair(&mut c, "mtls")?;
        let ca = c.init_ca()?;
        let config = c.write_config(&[(&hc, "client"), (&hs, "server")], "")?;
        for node in 0..2 {
            c.start_agent_with(
                node,
                &["--ca-dir", ca.to_str().context("path")?, "--config", config.to_str().context("path")?],
            )?;
        }
        c.enroll(&hc)?;
        c.enroll(&hs)?;
        results.push(measure(&c, "mTLS HBONE via agents", &hc, &hs)?);
    }

    let direct = &results[0];
    if only_mtls {
        println!(
            "mTLS HBONE: {:.2} Gbit/s, RTT p50 {:.0} µs, {:.0} conn/s",
            direct.gbit_per_second, direct.rr_p50_us, direct.connections_per_second
        );
        return Ok(());
    }
    println!(
        "\n{:<24} {:>14} {:>16} {:>16} {:>14} {:>10}",
        "path", "Gbit/s (1 TCP)", "RTT p50 µs", "RTT p99 µs", "conn/s", "agent MiB"
    );
    for r in &results {
        println!(
            "{:<24} {:>7.2} ({:>4.2}x) {:>8.0} ({:>4.2}x) {:>8.0} ({:>4.2}x) {:>7.0} ({:>3.2}x) {:>10}",
            r.name,
            r.gbit_per_second,
            r.gbit_per_second / direct.gbit_per_second,
            r.rr_p50_us,
            r.rr_p50_us / direct.rr_p50_us,
            r.rr_p99_us,
            r.rr_p99_us / direct.rr_p99_us,
            r.connections_per_second,
            r.connections_per_second / direct.connections_per_second,
            r.agent_rss_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into()),
        );
    }
    let json = json!({
        "timestamp": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "throughputBytes": THROUGHPUT_BYTES,
        "paths": results.iter().map(|r| json!({
            "name": r.name,
            "gbitPerSecond": r.gbit_per_second,
            "rttP50Us": r.rr_p50_us,
            "rttP99Us": r.rr_p99_us,
            "connectionsPerSecond": r.connections_per_second,
            "agentRssMiB": r.agent_rss_mib,
            "ratioToDirect": {
                "throughput": r.gbit_per_second / direct.gbit_per_second,
                "rttP50": r.rr_p50_us / direct.rr_p50_us,
                "connectionsPerSecond": r.connections_per_second / direct.connections_per_second,
            },
        })).collect::<Vec<_>>(),
    });
    let out: PathBuf =
        std::env::var_os("NODEMESH_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| "target/bench".into());
    std::fs::create_dir_all(&out)?;
    let file = out.join("latest.json");
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("\nwritten to {}", file.display());
    Ok(())
}
