//! `cargo xtask demo`: Bookinfo on a two-node nodemesh cluster made of network namespaces on this machine,
//! with the controller on its directory source and one agent per node, and a walk-through of what the mesh
//! does (see `walkthrough`). Interactive by default: afterwards it keeps running, with port forwards to the
//! agents and the app, until Ctrl-C. `--smoke` runs the walk-through only and fails on the first step that does
//! not behave.

pub mod bookinfo;
pub mod forward;
mod walkthrough;

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Cluster;
use crate::cluster::{ADMIN, METRICS, built_binary, prerequisites};
use bookinfo::Bookinfo;

pub struct Options {
    /// Walk through once, non-interactively, and exit.
    pub smoke: bool,
}

/// Where the demo can be reached from this machine.
struct Endpoints {
    admin: Vec<SocketAddr>,
    metrics: Vec<SocketAddr>,
    productpage: SocketAddr,
}

/// Everything a walk-through step needs.
struct Demo<'a> {
    c: Cluster,
    app: Bookinfo,
    bookinfo: PathBuf,
    meshctl: PathBuf,
    endpoints: Endpoints,
    progress: Progress,
    stop: &'a AtomicBool,
}

/// Runs the demo; `stop` is set by the caller's Ctrl-C handler.
pub fn run(options: &Options, stop: &AtomicBool) -> Result<()> {
    let mut progress = Progress::new();
    println!("nodemesh demo: Bookinfo on a two-node mesh, on this machine\n");
    prerequisites().map_err(anyhow::Error::msg).context("the demo needs root, cgroup v2, bpffs and iproute2")?;
    let testbin = built_binary("mesh-testbin")?;
    let bookinfo = built_binary("bookinfo")?;
    let meshctl = built_binary("meshctl")?;

    let mut c = progress.timed("creating two nodes (network namespaces, bridges, cgroups)", || {
        Cluster::new(2, testbin.to_str().unwrap_or_default())?.context("prerequisites missing")
    })?;
    c.agent_log = "info".into();
    for (i, n) in c.nodes.iter().enumerate() {
        progress.say(format!("node-{} is network namespace {} at {}", i + 1, n.netns, n.ipv4));
    }
    c.write_objects("namespace.yaml", Some(&bookinfo::namespace(false)))?;
    let objects = c.objects_dir()?;
    progress.timed(&format!("starting the controller on the directory source {}", objects.display()), || {
        c.start_controller()
    })?;
    for node in 0..c.nodes.len() {
        progress.timed(&format!("starting the agent of node-{} (eBPF capture, HBONE, L7)", node + 1), || {
            c.start_agent_with_controller_args(node, &[])
        })?;
    }
    let app = progress.timed("starting Bookinfo: productpage, details, reviews v1/v2/v3, ratings, and curl", || {
        bookinfo::deploy(&mut c, &bookinfo)
    })?;
    for (d, pod) in &app.pods {
        progress.say(format!("  {:<15} pod {} on node-{} at {}", d.name, pod.name, d.node + 1, pod.ipv4));
    }
    let endpoints = forwards(&c, &app, options.smoke)?;
    let mut demo = Demo { c, app, bookinfo, meshctl, endpoints, progress, stop };

    let outcome = walkthrough::run(&mut demo);
    if outcome.is_err() && demo.stopped() {
        println!("\nInterrupted.");
    } else if let Err(e) = &outcome {
        println!("\nThe demo FAILED: {e:#}\n");
        for prefix in ["controller", "agent-n1", "agent-n2"] {
            let lines = demo.c.log_lines(prefix);
            println!("--- last lines of {prefix} ---\n{}", lines[lines.len().saturating_sub(15)..].join("\n"));
        }
    } else if !options.smoke {
        demo.interactive()?;
    }
    let Demo { c, mut progress, .. } = demo;
    progress.timed("cleaning up: processes, network namespaces, cgroups, bpffs pins", || {
        drop(c);
        Ok(())
    })?;
    if outcome.is_ok() {
        println!("\nnodemesh demo: every step behaved as expected ({:.0}s)", progress.start.elapsed().as_secs_f64());
    }
    outcome
}

/// Port forwards from loopback: fixed, memorable ports when interactive (another free port where one is taken),
/// any free port for the smoke run.
fn forwards(c: &Cluster, app: &Bookinfo, smoke: bool) -> Result<Endpoints> {
    let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], if smoke { 0 } else { p }));
    let mut endpoints = Endpoints { admin: vec![], metrics: vec![], productpage: port(0) };
    for (i, node) in c.nodes.iter().enumerate() {
        let base = 15000 + 100 * (i as u16 + 1);
        endpoints.admin.push(forward::start(port(base), &node.netns, ADMIN.parse()?)?);
        endpoints.metrics.push(forward::start(port(base + 20), &node.netns, METRICS.parse()?)?);
    }
    // Like an ingress: from node-2 into the product page, which enrolled pods' agents accept (PERMISSIVE).
    let productpage = app.pod("productpage-v1");
    let target = SocketAddr::from((productpage.ipv4, bookinfo::PORT));
    endpoints.productpage = forward::start(port(bookinfo::PORT), &c.nodes[1].netns, target)?;
    Ok(endpoints)
}

impl Demo<'_> {
    /// `bookinfo fetch URL ARGS..` in the curl pod: its report.
    fn fetch(&self, url: &str, args: &[&str]) -> Result<Value> {
        let mut all = vec!["fetch", url];
        all.extend(args);
        self.c.run_in(&self.app.curl, &self.bookinfo, &all)
    }

    /// Applies (or with `None` deletes) one file of objects, the way `kubectl apply -f` would, and shows it.
    fn apply(&self, file: &str, yaml: Option<&str>) -> Result<()> {
        match yaml {
            Some(yaml) => {
                println!("   $ kubectl apply -f - <<EOF");
                for line in yaml.lines() {
                    println!("   │ {line}");
                }
                println!("   EOF");
            }
            None => println!("   $ kubectl delete -f {file}"),
        }
        self.c.write_objects(file, yaml)
    }

    /// Waits (at most 15 s) until every agent's config holds (or, with `present` false, no longer holds) `needle`.
    fn wait_config(&self, needle: &str, present: bool) -> Result<()> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(15);
        for node in 0..self.c.nodes.len() {
            loop {
                let dump = self.c.admin(node, "/config_dump")?;
                if dump["config"].to_string().contains(needle) == present {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node-{} never {} {needle:?} in its config",
                        node + 1,
                        if present { "got" } else { "dropped" }
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.progress.say(format!(
            "both agents applied it {:.0} ms later (controller → gRPC stream → agents)",
            started.elapsed().as_secs_f64() * 1000.0
        ));
        Ok(())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// After the walk-through: tell the user where everything is, keep a trickle of traffic going, wait for Ctrl-C.
    fn interactive(&self) -> Result<()> {
        let e = &self.endpoints;
        let (admin, metrics) = (&e.admin, &e.metrics);
        println!("\nThe mesh is running. From this machine:");
        println!("  curl http://{}/productpage                      Bookinfo (a browser works too)", e.productpage);
        println!("  curl -H 'end-user: jason' http://{}/productpage", e.productpage);
        println!(
            "  curl http://{}/config_dump      agent node-1 admin API (/workloads /services /certs /tunnels /stats)",
            admin[0]
        );
        println!("  curl http://{}/config_dump      agent node-2 admin API", admin[1]);
        println!(
            "  curl http://{}/metrics          agent node-1 Prometheus metrics (node-2: {})",
            metrics[0], metrics[1]
        );
        println!("  {} stat bookinfo --metrics {} --metrics {}", self.meshctl.display(), metrics[0], metrics[1]);
        println!("  {} proxy-config routes --agent {}", self.meshctl.display(), admin[0]);
        println!(
            "Change the mesh live: edit the YAML in {} (the controller's directory source).",
            self.c.objects_dir()?.display()
        );
        println!("Logs of every process: {}/*.log", self.c.tmp_dir().display());
        println!("A page a second keeps flowing from the curl pod. Ctrl-C stops the demo and removes everything.");
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let url = bookinfo::url("productpage", "/productpage");
                for i in 0u64.. {
                    if self.stopped() {
                        break;
                    }
                    let user = if i % 4 == 0 { "end-user: jason" } else { "end-user: guest" };
                    let _ = self.fetch(&url, &["-H", user]);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
            while !self.stopped() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        println!();
        Ok(())
    }
}

/// Progress lines with the time since the start.
struct Progress {
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress { start: Instant::now() }
    }

    fn say(&self, what: impl Display) {
        println!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
    }

    /// Runs `f`, saying what it is and how long it took.
    fn timed<T>(&mut self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let started = Instant::now();
        self.say(format!("{what} ..."));
        let value = f().with_context(|| what.to_string())?;
        self.say(format!("  done in {:.1}s", started.elapsed().as_secs_f64()));
        Ok(value)
    }

    /// A check of the walk-through: shown, and an error when it does not hold.
    fn check(&self, holds: bool, what: impl Display) -> Result<()> {
        if holds {
            println!("   ✓ {what}");
            Ok(())
        } else {
            println!("   ✗ {what}");
            bail!("expected: {what}")
        }
    }
}
