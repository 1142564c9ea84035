//! `cargo xtask bench`: the same client and server pods measured over three paths in one run — direct (no
//! mesh), plaintext through both agents, and mTLS HBONE through both agents — on a two-node namespace cluster.
//! Then HTTP/1.1 keep-alive and HTTP/2 at a fixed rate and at maximum rate over direct, plaintext via the
//! agents (L4), L4 mTLS, and L7 mTLS (a Service with an HTTPRoute with retries): added latency, agent CPU per
//! 1,000 requests and agent memory. Prints tables with ratios to direct, then issue 16's targets (L7 against L4
//! in the same run, CPU per unit of work), and writes JSON to `target/bench/`. A benchmark, not a test.
//!
//! Placement, as in the measurements: each agent runs one worker thread, every agent thread on CPU 0,
//! clients and servers on CPU 1 (the bench pins itself there before it starts anything; children inherit it).
//! CPU per unit of work is what both agents spent (utime + stime from /proc) over the work done.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mesh_tests::{Cluster, Pod};
use serde_json::{Value, json};

const THROUGHPUT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
const ROUND_TRIPS: &str = "20000";
const CPS_SECONDS: &str = "3";
const RUNS: usize = 3;
const HTTP_PORT: u16 = 8081;
const FIXED_RATE: &str = "1000";
const LOAD_SECONDS: &str = "5";
/// Connections (HTTP/1.1) or concurrent streams (HTTP/2) of the maximum-rate runs.
const MAX_RATE_CONCURRENCY: &str = "8";
const BENCH_SERVICE_IP: &str = "10.96.9.1";

struct HttpResult {
    path: &'static str,
    protocol: &'static str,
    fixed_p50_us: f64,
    fixed_p99_us: f64,
    max_rps: f64,
    max_p50_us: f64,
    /// Both agents' CPU per 1,000 requests at the fixed rate.
    cpu_ms_per_1k: f64,
    /// The same at the maximum rate.
    max_cpu_ms_per_1k: f64,
    agent_rss_mib: Option<f64>,
}

/// The CPU the bench and everything it starts runs on; the agents get the other one.
const LOAD_CPU: usize = 1;
const AGENT_CPU: usize = 0;

fn pin(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    anyhow::ensure!(rc == 0, "sched_setaffinity({tid}, {cpu}): {}", std::io::Error::last_os_error());
    Ok(())
}

/// Moves every thread of both agents to [`AGENT_CPU`] (threads they start later inherit it).
fn pin_agents(c: &Cluster) -> Result<()> {
    for pid in (0..2).filter_map(|n| c.agent_pid(n)) {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
                pin(tid, AGENT_CPU)?;
            }
        }
    }
    Ok(())
}

/// User + system CPU time of a process, in milliseconds.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at state; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

fn agents_cpu_ms(c: &Cluster) -> f64 {
    (0..2).filter_map(|n| c.agent_pid(n).and_then(cpu_ms)).sum()
}

fn http_measure(c: &Cluster, path: &'static str, client: &Pod, url: &str, h2: bool) -> Result<HttpResult> {
    let protocol = if h2 { "http2" } else { "http1" };
    eprintln!("--> {path} {protocol}");
    let http = std::env::current_exe()?.with_file_name("mesh-http");
    let run = |rate: &str, concurrency: &str| -> Result<Value> {
        let mut args = vec!["load", url, rate, LOAD_SECONDS, "-c", concurrency];
        if h2 {
            args.push("--h2");
        }
        let r = c.run_in(client, &http, &args)?;
        anyhow::ensure!(r["errors"].as_u64() == Some(0), "{path} {protocol}: failed requests: {r}");
        Ok(r)
    };
    let cpu_before = agents_cpu_ms(c);
    // NODEMESH_BENCH_RATE changes the fixed rate (for looking at latency under lighter or heavier load).
    let rate = std::env::var("NODEMESH_BENCH_RATE").unwrap_or_else(|_| FIXED_RATE.into());
    let fixed = run(&rate, "4")?;
    let cpu_ms_per_1k = (agents_cpu_ms(c) - cpu_before) / (number(&fixed, "requests")? / 1000.0);
    let cpu_before = agents_cpu_ms(c);
    let max = run("0", MAX_RATE_CONCURRENCY)?;
    let max_cpu_ms_per_1k = (agents_cpu_ms(c) - cpu_before) / (number(&max, "requests")? / 1000.0);
    Ok(HttpResult {
        path,
        protocol,
        fixed_p50_us: number(&fixed, "p50Us")?,
        fixed_p99_us: number(&fixed, "p99Us")?,
        max_rps: number(&max, "rps")?,
        max_p50_us: number(&max, "p50Us")?,
        cpu_ms_per_1k,
        max_cpu_ms_per_1k,
        agent_rss_mib: c.agent_pid(0).and_then(rss_mib),
    })
}

fn http_suite(c: &Cluster, path: &'static str, client: &Pod, url: &str, out: &mut Vec<HttpResult>) -> Result<()> {
    out.push(http_measure(c, path, client, url, false)?);
    out.push(http_measure(c, path, client, url, true)?);
    Ok(())
}

/// The L7 path: a Service in front of the server with an HTTPRoute that retries.
fn l7_config(server: &Pod) -> String {
    format!(
        "services:\n  - {{namespace: default, name: bench, ips: [{BENCH_SERVICE_IP}], ports: [{{name: http, port: 80, targetPort: {HTTP_PORT}}}],\n     endpoints: [{{ip: {}, workload: default/{}, node: node-2}}]}}\n\
         routes:\n  - {{namespace: default, name: bench, kind: HTTPRoute, parents: [{{namespace: default, name: bench}}],\n     rules: [{{backends: [{{service: {{namespace: default, name: bench}}, weight: 1}}], retry: {{attempts: 2, codes: [503]}}, timeouts: {{requestMs: 5000}}}}]}}\n",
        server.ipv4, server.name
    )
}

struct PathResult {
    name: &'static str,
    gbit_per_second: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    connections_per_second: f64,
    /// Both agents' CPU seconds per GB of bulk transfer (over the throughput runs).
    cpu_s_per_gb: f64,
    /// Both agents' CPU per 64-byte round trip, in µs (over the round-trip runs).
    cpu_us_per_round_trip: f64,
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
    let cpu_before = agents_cpu_ms(c);
    for _ in 0..RUNS {
        let r = c.testbin(client, &["throughput", &sink, &THROUGHPUT_BYTES.to_string()])?;
        tput.push(number(&r, "gbitPerSecond")?);
    }
    let gigabytes = (RUNS as u64 * THROUGHPUT_BYTES) as f64 / 1e9;
    let cpu_s_per_gb = (agents_cpu_ms(c) - cpu_before) / 1000.0 / gigabytes;
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    let cpu_before = agents_cpu_ms(c);
    for _ in 0..RUNS {
        let r = c.testbin(client, &["rr", &echo, ROUND_TRIPS])?;
        p50.push(number(&r, "p50Us")?);
        p99.push(number(&r, "p99Us")?);
    }
    let round_trips = RUNS as f64 * ROUND_TRIPS.parse::<f64>()?;
    let cpu_us_per_round_trip = (agents_cpu_ms(c) - cpu_before) * 1000.0 / round_trips;
    let cps = number(&c.testbin(client, &["cps", &echo, CPS_SECONDS])?, "perSecond")?;
    let agent_rss_mib = c.agent_pid(0).and_then(rss_mib);
    Ok(PathResult {
        name,
        gbit_per_second: median(tput),
        rr_p50_us: median(p50),
        rr_p99_us: median(p99),
        connections_per_second: cps,
        cpu_s_per_gb,
        cpu_us_per_round_trip,
        agent_rss_mib,
    })
}

fn pair(c: &mut Cluster, tag: &str) -> Result<(Pod, Pod)> {
    let client = c.add_pod(0, &format!("{tag}-client"))?;
    let server = c.add_pod(1, &format!("{tag}-server"))?;
    c.serve(&server, 8080)?;
    c.serve_mode(&server, 5201, "sink")?;
    let http = std::env::current_exe()?.with_file_name("mesh-http");
    c.start_server(&server, &http, &["serve", &HTTP_PORT.to_string(), tag], &format!("http-{tag}"))?;
    Ok((client, server))
}

/// The HTTP table: latencies added to direct's (same protocol) and throughput ratios, when direct was measured.
fn print_http(http: &[HttpResult]) {
    println!(
        "\n{:<26} {:<6} {:>22} {:>22} {:>18} {:>16} {:>16} {:>10}",
        "HTTP path",
        "proto",
        "p50 µs @1k rps",
        "p99 µs @1k rps",
        "max rps",
        "CPU ms/1k @1k",
        "CPU ms/1k @max",
        "agent MiB"
    );
    for r in http {
        let direct = http.iter().find(|d| d.path == "direct" && d.protocol == r.protocol).unwrap_or(r);
        println!(
            "{:<26} {:<6} {:>9.0} (+{:>6.0} µs) {:>9.0} (+{:>6.0} µs) {:>8.0} ({:>4.2}x) {:>16.1} {:>16.1} {:>10}",
            r.path,
            r.protocol,
            r.fixed_p50_us,
            r.fixed_p50_us - direct.fixed_p50_us,
            r.fixed_p99_us,
            r.fixed_p99_us - direct.fixed_p99_us,
            r.max_rps,
            r.max_rps / direct.max_rps,
            r.cpu_ms_per_1k,
            r.max_cpu_ms_per_1k,
            r.agent_rss_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into()),
        );
    }
}

fn print_paths(results: &[PathResult]) {
    let Some(direct) = results.first() else { return };
    println!(
        "\n{:<24} {:>14} {:>16} {:>16} {:>14} {:>12} {:>12} {:>10}",
        "path", "Gbit/s (1 TCP)", "RTT p50 µs", "RTT p99 µs", "conn/s", "CPU-s/GB", "CPU µs/RTT", "agent MiB"
    );
    for r in results {
        println!(
            "{:<24} {:>7.2} ({:>4.2}x) {:>8.0} ({:>4.2}x) {:>8.0} ({:>4.2}x) {:>7.0} ({:>3.2}x) {:>12.2} {:>12.1} {:>10}",
            r.name,
            r.gbit_per_second,
            r.gbit_per_second / direct.gbit_per_second,
            r.rr_p50_us,
            r.rr_p50_us / direct.rr_p50_us,
            r.rr_p99_us,
            r.rr_p99_us / direct.rr_p99_us,
            r.connections_per_second,
            r.connections_per_second / direct.connections_per_second,
            r.cpu_s_per_gb,
            r.cpu_us_per_round_trip,
            r.agent_rss_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into()),
        );
    }
}

/// One of issue 16's targets, as measured in this run.
struct Target {
    what: String,
    measured: f64,
    /// The measured value must be at least (`true`) or at most (`false`) `limit`.
    at_least: bool,
    limit: f64,
}

impl Target {
    fn met(&self) -> bool {
        if self.at_least { self.measured >= self.limit } else { self.measured <= self.limit }
    }
}

/// The targets: L7 against the L4 HBONE path in this run (request rate and CPU per request at the maximum rate,
/// both protocols), CPU per 1k requests at 1k rps, and the L4 CPU per round trip and per GB.
fn targets(paths: &[PathResult], http: &[HttpResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let find = |path: &str, protocol: &str| http.iter().find(|r| r.path == path && r.protocol == protocol);
    for protocol in ["http1", "http2"] {
        let (Some(l4), Some(l7)) = (find(MTLS_L4, protocol), find(MTLS_L7, protocol)) else { continue };
        out.push(Target {
            what: format!("L7 / L4 max rps, {protocol}"),
            measured: l7.max_rps / l4.max_rps,
            at_least: true,
            limit: 1.0,
        });
        out.push(Target {
            what: format!("L7 / L4 CPU per request at max rate, {protocol}"),
            measured: l7.max_cpu_ms_per_1k / l4.max_cpu_ms_per_1k,
            at_least: false,
            limit: 1.2,
        });
        out.push(Target {
            what: format!("L7 CPU ms per 1k requests at 1k rps, {protocol}"),
            measured: l7.cpu_ms_per_1k,
            at_least: false,
            limit: 120.0,
        });
        out.push(Target {
            what: format!("L4 CPU ms per 1k requests at 1k rps, {protocol}"),
            measured: l4.cpu_ms_per_1k,
            at_least: false,
            limit: 80.0,
        });
    }
    if let Some(hbone) = paths.iter().find(|p| p.name == MTLS_HBONE) {
        out.push(Target {
            what: "L4 HBONE CPU µs per 64 B round trip".into(),
            measured: hbone.cpu_us_per_round_trip,
            at_least: false,
            limit: 51.0,
        });
        out.push(Target {
            what: "L4 HBONE CPU-s per GB of bulk".into(),
            measured: hbone.cpu_s_per_gb,
            at_least: false,
            limit: 1.05,
        });
    }
    out
}

fn print_targets(targets: &[Target]) {
    println!("\n{:<52} {:>10} {:>10}  met", "target (issue 16)", "measured", "limit");
    for t in targets {
        let limit = format!("{} {}", if t.at_least { ">=" } else { "<=" }, t.limit);
        println!("{:<52} {:>10.2} {:>10}  {}", t.what, t.measured, limit, if t.met() { "yes" } else { "NO" });
    }
}

const MTLS_HBONE: &str = "mTLS HBONE via agents";
const MTLS_HBONE_RING: &str = "mTLS HBONE, ring provider";
const MTLS_L4: &str = "mTLS L4 via agents";
const MTLS_L7: &str = "mTLS L7 (route, retries)";
const MTLS_L7_TUNNEL: &str = "mTLS L7, dest. at L4";

/// Two agents with the bench's CA and L7 config (plus `extra_config`, and `args` for the agents), a client and a
/// server pod enrolled.
fn mtls_cluster(testbin: &str, extra_config: &str, args: &[&str]) -> Result<(Cluster, Pod, Pod)> {
    let mut c = Cluster::new(2, testbin)?.context("the bench needs root, cgroup v2 and bpffs")?;
    c.agent_log = "warn".into();
    let (hc, hs) = pair(&mut c, "mtls")?;
    let ca = c.init_ca()?;
    let config = c.write_config(&[(&hc, "client"), (&hs, "server")], &(l7_config(&hs) + extra_config))?;
    let mut all = vec!["--ca-dir", ca.to_str().context("path")?, "--config", config.to_str().context("path")?];
    all.extend_from_slice(args);
    start_agents(&mut c, &all)?;
    c.enroll(&hc)?;
    c.enroll(&hs)?;
    Ok((c, hc, hs))
}

/// Starts both agents (one worker thread each, `args` more) and moves them to [`AGENT_CPU`].
fn start_agents(c: &mut Cluster, args: &[&str]) -> Result<()> {
    let mut all = vec!["--worker-threads", "1"];
    all.extend_from_slice(args);
    for node in 0..2 {
        c.start_agent_with(node, &all)?;
    }
    pin_agents(c)
}

fn main() -> Result<()> {
    let bin_dir = std::env::current_exe()?.parent().context("no bin dir")?.to_path_buf();
    let testbin = bin_dir.join("mesh-testbin");
    let testbin = testbin.to_str().context("path")?;
    anyhow::ensure!(
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) > LOAD_CPU,
        "the bench places the agents and the load on two different CPUs"
    );
    pin(0, LOAD_CPU)?;
    let mut results = Vec::new();
    let mut http = Vec::new();
    // For profiling the agents: NODEMESH_BENCH_ONLY=mtls skips the direct and plaintext paths; =http measures only
    // the mTLS HTTP rows (L4, L7, L7 with the destination at L4).
    let only = std::env::var("NODEMESH_BENCH_ONLY").unwrap_or_default();
    let (only_mtls, only_http) = (only == "mtls" || only == "http", only == "http");
    if !only_mtls {
        let mut c = Cluster::new(2, testbin)?.context("the bench needs root, cgroup v2 and bpffs")?;
        c.agent_log = "warn".into();
        let (dc, ds) = pair(&mut c, "direct")?;
        let (pc, ps) = pair(&mut c, "plain")?;
        start_agents(&mut c, &[])?;
        c.enroll(&pc)?;
        c.enroll(&ps)?;
        results.push(measure(&c, "direct", &dc, &ds)?);
        results.push(measure(&c, "plaintext via agents", &pc, &ps)?);
        http_suite(&c, "direct", &dc, &format!("http://{}:{HTTP_PORT}/", ds.ipv4), &mut http)?;
        http_suite(&c, "plaintext L4 via agents", &pc, &format!("http://{}:{HTTP_PORT}/", ps.ipv4), &mut http)?;
    }
    {
        let (c, hc, hs) = mtls_cluster(testbin, "", &[])?;
        if !only_http {
            results.push(measure(&c, MTLS_HBONE, &hc, &hs)?);
        }
        http_suite(&c, MTLS_L4, &hc, &format!("http://{}:{HTTP_PORT}/", hs.ipv4), &mut http)?;
        http_suite(&c, MTLS_L7, &hc, &format!("http://{BENCH_SERVICE_IP}/"), &mut http)?;
    }
    {
        // Only the caller reports the server's requests (Telemetry `metrics: {reporters: source}`): the destination
        // agent declines them one by one, the client's HTTP travels inside a tunnel and is relayed there at L4.
        let callers_report =
            "telemetry: [{namespace: default, name: callers-report, settings: {metrics: {reporters: source}}}]\n";
        let (c, hc, _) = mtls_cluster(testbin, callers_report, &[])?;
        http_suite(&c, MTLS_L7_TUNNEL, &hc, &format!("http://{BENCH_SERVICE_IP}/"), &mut http)?;
    }
    if !only_http {
        // What the TLS provider costs: the default (aws-lc-rs, X25519MLKEM768) against ring (X25519).
        let (c, hc, hs) = mtls_cluster(testbin, "", &["--tls-provider", "ring"])?;
        results.push(measure(&c, MTLS_HBONE_RING, &hc, &hs)?);
    }

    print_paths(&results);
    print_http(&http);
    let targets = targets(&results, &http);
    print_targets(&targets);
    let http_json: Vec<Value> = http
        .iter()
        .map(|r| {
            let direct = http.iter().find(|d| d.path == "direct" && d.protocol == r.protocol).unwrap_or(r);
            json!({
                "path": r.path, "protocol": r.protocol, "fixedRate": FIXED_RATE.parse::<u32>().unwrap_or(0),
                "fixedP50Us": r.fixed_p50_us, "fixedP99Us": r.fixed_p99_us,
                "addedP50Us": r.fixed_p50_us - direct.fixed_p50_us, "addedP99Us": r.fixed_p99_us - direct.fixed_p99_us,
                "maxRps": r.max_rps, "maxRpsRatioToDirect": r.max_rps / direct.max_rps, "maxP50Us": r.max_p50_us,
                "agentCpuMsPer1kRequests": r.cpu_ms_per_1k, "agentCpuMsPer1kRequestsAtMax": r.max_cpu_ms_per_1k,
                "agentRssMiB": r.agent_rss_mib,
            })
        })
        .collect();
    let json = json!({
        "http": http_json,
        "targets": targets.iter().map(|t| json!({
            "what": t.what, "measured": t.measured, "atLeast": t.at_least, "limit": t.limit, "met": t.met(),
        })).collect::<Vec<_>>(),
        "timestamp": SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "throughputBytes": THROUGHPUT_BYTES,
        "paths": results.iter().map(|r| (r, results.first().unwrap_or(r))).map(|(r, direct)| json!({
            "name": r.name,
            "gbitPerSecond": r.gbit_per_second,
            "rttP50Us": r.rr_p50_us,
            "rttP99Us": r.rr_p99_us,
            "connectionsPerSecond": r.connections_per_second,
            "agentRssMiB": r.agent_rss_mib,
            "agentCpuSecondsPerGB": r.cpu_s_per_gb,
            "agentCpuUsPerRoundTrip": r.cpu_us_per_round_trip,
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
