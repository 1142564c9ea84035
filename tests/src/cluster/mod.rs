//! A test cluster made of network namespaces on this machine.
//!
//! ```text
//!  fabric netns: bridge br0 ───────────────┬───────────────────────────┐
//!                                          │ 10.200.0.1 / fd00:200::1   │ 10.200.0.2 ...
//!  node netns n1: eth0, bridge cbr0 10.244.1.1/24, fd00:244:1::1/64, agent ...
//!                    └─ pod netns: eth0 10.244.1.K/24, fd00:244:1::K/64 (default via cbr0)
//! ```
//! Each node has a cgroup subtree (`<cgroup2>/nodemesh-test/<id>/n<i>`) holding its pods, its agent and its
//! "host" processes; the agent's programs attach there, never to the machine's root cgroup. Dropping the
//! cluster — also while a test panics — kills every process, removes pins, namespaces, cgroups and files.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::sys::{self, Placement, ip, pid_alive};

mod clients;
mod cni;
pub mod libcni;
mod upgrade;

pub use upgrade::{Rollout, Upgraded};

pub use clients::{ClientReport, PendingClient};
pub use cni::CniOutcome;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();
const PREFIX: &str = "nmt";
pub const ADMIN: &str = "127.0.0.1:15000";
/// The controller runs in the fabric netns, reachable from every node.
pub const CONTROLLER_IP: &str = "10.200.0.254";
/// A second controller replica, beside the first.
pub const REPLICA_IP: &str = "10.200.0.253";
pub const CONTROLLER_PORT: u16 = 15012;
pub const METRICS: &str = "127.0.0.1:15020";

pub struct Node {
    pub name: String,
    pub netns: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub cni_socket: PathBuf,
    pub ipv4: Ipv4Addr,
    /// Address the node's pods see node-originated traffic come from (kubelet probes).
    pub pod_gateway: Ipv4Addr,
    agent: Option<usize>,
    /// The extra arguments the node's agent was last started with (an upgrade starts the next one alike).
    agent_args: Vec<String>,
    pods: u8,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub container_id: String,
}

struct Process {
    label: String,
    child: Child,
    log: PathBuf,
}

pub struct Cluster {
    pub id: String,
    tmp: PathBuf,
    cgroup_root: PathBuf,
    pub fabric: String,
    pub nodes: Vec<Node>,
    netns: Vec<String>,
    processes: Vec<Option<Process>>,
    bin_dir: PathBuf,
    testbin: PathBuf,
    /// `RUST_LOG` of the agents: debug for tests (post-mortems), quieter for the bench.
    pub agent_log: String,
    controller: Option<usize>,
}

/// Checks what the tests need (and mounts bpffs when it is not). Missing pieces skip the test locally and fail
/// it in CI.
pub fn prerequisites() -> Result<PathBuf, String> {
    // SAFETY: trivial libc call.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (network namespaces, cgroups, BPF)".into());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let cgroup2 = mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.starts_with("cgroup2 ")).then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or("no cgroup v2 mount")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf ")) {
        std::fs::create_dir_all("/sys/fs/bpf").map_err(|e| e.to_string())?;
        sys::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).map_err(|e| format!("cannot mount bpffs: {e}"))?;
    }
    sys::run("ip", &["-V"]).map_err(|e| format!("iproute2 missing: {e}"))?;
    Ok(cgroup2)
}

/// A binary of the workspace (`meshctl`, `mesh-controller`, ...), built next to the tests.
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    anyhow::ensure!(path.is_file(), "{} not found: `cargo build --bins` first", path.display());
    Ok(path)
}

/// Locates binaries next to the running test executable (target/<profile>/).
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NODEMESH_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // Tests run from target/<profile>/deps/, binaries (the bench) from target/<profile>/.
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in ["mesh-agent", "nodemesh-cni"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} not found: build the binaries first (`cargo build --bins`; `cargo xtask test` does)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

impl Cluster {
    /// A cluster of `nodes` nodes, or `None` (test skipped) when prerequisites are missing outside CI.
    pub fn new(nodes: usize, testbin: &str) -> Result<Option<Self>> {
        let cgroup2 = match prerequisites() {
            Ok(c) => c,
            Err(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("CI=true but {why}"),
            Err(why) => {
                eprintln!("SKIPPED: {why}");
                return Ok(None);
            }
        };
        SWEEP.call_once(|| sweep_stale(&cgroup2));
        let id = format!("{PREFIX}{}x{}", std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let tmp = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&tmp)?;
        let cgroup_root = cgroup2.join("nodemesh-test").join(&id);
        std::fs::create_dir_all(&cgroup_root)?;
        let mut cluster = Cluster {
            fabric: format!("{id}-fab"),
            id,
            tmp,
            cgroup_root,
            nodes: Vec::new(),
            netns: Vec::new(),
            processes: Vec::new(),
            bin_dir: bin_dir()?,
            testbin: PathBuf::from(testbin),
            agent_log: "info,mesh_agent=debug".into(),
            controller: None,
        };
        cluster.build(nodes)?;
        Ok(Some(cluster))
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        sys::run("ip", &["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(name, "link set lo up")
    }

    fn build(&mut self, count: usize) -> Result<()> {
        let fabric = self.fabric.clone();
        self.add_netns(&fabric)?;
        ip(&fabric, "link add br0 type bridge")?;
        ip(&fabric, &format!("addr add {CONTROLLER_IP}/24 dev br0"))?;
        ip(&fabric, "link set br0 up")?;
        for i in 1..=count as u8 {
            let netns = format!("{}-n{i}", self.id);
            self.add_netns(&netns)?;
            sys::in_netns(&netns, || -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            })??;
            ip(&netns, &format!("link add eth0 type veth peer name n{i} netns {fabric}"))?;
            ip(&fabric, &format!("link set n{i} master br0 up"))?;
            ip(&netns, &format!("addr add 10.200.0.{i}/24 dev eth0"))?;
            ip(&netns, &format!("addr add fd00:200::{i}/64 dev eth0 nodad"))?;
            ip(&netns, "link set eth0 up")?;
            ip(&netns, "link add cbr0 type bridge")?;
            ip(&netns, &format!("addr add 10.244.{i}.1/24 dev cbr0"))?;
            ip(&netns, &format!("addr add fd00:244:{i}::1/64 dev cbr0 nodad"))?;
            ip(&netns, "link set cbr0 up")?;
            let cgroup = self.cgroup_root.join(format!("n{i}"));
            for sub in ["agent", "host"] {
                std::fs::create_dir_all(cgroup.join(sub))?;
            }
            let state_dir = self.tmp.join(format!("n{i}"));
            std::fs::create_dir_all(&state_dir)?;
            self.nodes.push(Node {
                name: format!("node-{i}"),
                netns,
                bpffs: PathBuf::from(format!("/sys/fs/bpf/{}-n{i}", self.id)),
                cni_socket: state_dir.join("cni.sock"),
                state_dir,
                cgroup,
                ipv4: Ipv4Addr::new(10, 200, 0, i),
                pod_gateway: Ipv4Addr::new(10, 244, i, 1),
                agent: None,
                agent_args: Vec::new(),
                pods: 0,
            });
        }
        for (a, node) in self.nodes.iter().enumerate() {
            for b in 1..=count as u8 {
                if b as usize != a + 1 {
                    ip(&node.netns, &format!("route add 10.244.{b}.0/24 via 10.200.0.{b}"))?;
                    ip(&node.netns, &format!("route add fd00:244:{b}::/64 via fd00:200::{b}"))?;
                }
            }
        }
        Ok(())
    }

    /// A pod (netns + veth on the node's bridge + cgroup) in namespace `default`, not yet enrolled.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        self.add_pod_in(node, name, "default")
    }

    pub fn add_pod_in(&mut self, node: usize, name: &str, namespace: &str) -> Result<Pod> {
        self.nodes[node].pods += 1;
        let k = self.nodes[node].pods + 1;
        let i = node as u8 + 1;
        let (ipv4, ipv6) = (Ipv4Addr::new(10, 244, i, k), format!("fd00:244:{i}::{k}").parse()?);
        let pod = self.new_sandbox(node, name, namespace, ipv4, ipv6)?;
        let node_ns = self.nodes[node].netns.clone();
        ip(&node_ns, &format!("link add p{k} type veth peer name eth0 netns {}", pod.netns))?;
        ip(&node_ns, &format!("link set p{k} master cbr0 up"))?;
        ip(&pod.netns, &format!("addr add {}/24 dev eth0", pod.ipv4))?;
        ip(&pod.netns, &format!("addr add {}/64 dev eth0 nodad", pod.ipv6))?;
        ip(&pod.netns, "link set eth0 up")?;
        ip(&pod.netns, &format!("route add default via 10.244.{i}.1"))?;
        ip(&pod.netns, &format!("-6 route add default via fd00:244:{i}::1"))?;
        Ok(pod)
    }

    /// A pod's network namespace (loopback up, nothing else) and cgroup on `node`.
    fn new_sandbox(&mut self, node: usize, name: &str, namespace: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<Pod> {
        let n = &self.nodes[node];
        let pod = Pod {
            name: name.to_string(),
            namespace: namespace.into(),
            node,
            netns: format!("{}-{name}", n.netns),
            cgroup: n.cgroup.join(format!("pod-{name}")),
            ipv4,
            ipv6,
            container_id: format!("{}-{name}", self.id),
        };
        std::fs::create_dir_all(&pod.cgroup)?;
        self.add_netns(&pod.netns)?;
        Ok(pod)
    }

    fn spawn(&mut self, label: &str, placement: &Placement<'_>, cmd: &mut Command) -> Result<usize> {
        let log = self.tmp.join(format!("{label}.log"));
        let child = sys::spawn_in(placement, cmd, &log)?;
        self.processes.push(Some(Process { label: label.to_string(), child, log }));
        Ok(self.processes.len() - 1)
    }

    pub fn agent_command(&self, node: usize) -> Command {
        self.agent_command_on(node, ADMIN, METRICS)
    }

    /// The node's agent command with its admin and metrics API on other addresses.
    pub fn agent_command_on(&self, node: usize, admin: &str, metrics: &str) -> Command {
        let n = &self.nodes[node];
        let mut cmd = Command::new(self.bin_dir.join("mesh-agent"));
        cmd.arg("run")
            .args(["--node", &n.name, "--admin", admin, "--metrics", metrics])
            .arg("--cgroup-root")
            .arg(&n.cgroup)
            .arg("--bpffs")
            .arg(&n.bpffs)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .arg("--cni-socket")
            .arg(&n.cni_socket)
            .env("RUST_LOG", &self.agent_log);
        cmd
    }

    /// Starts the node's agent (in the node netns and the node's cgroup subtree) and waits until it is ready.
    pub fn start_agent(&mut self, node: usize) -> Result<()> {
        self.start_agent_with(node, &[])
    }

    pub fn start_agent_with(&mut self, node: usize, extra_args: &[&str]) -> Result<()> {
        self.spawn_agent(node, extra_args, true)
    }

    /// Starts the node's agent fed by the controller, waiting only until its admin API answers (ready or not):
    /// for agents that are meant to stay unready.
    pub fn start_agent_unready(&mut self, node: usize) -> Result<()> {
        let args = self.controller_args(&self.token_file()?, CONTROLLER_IP)?;
        self.spawn_agent(node, &args.iter().map(String::as_str).collect::<Vec<_>>(), false)
    }

    /// Starts the node's agent (in the node netns and the node's cgroup subtree) and waits until its admin API
    /// says it is ready (`ready`) or merely answers.
    fn spawn_agent(&mut self, node: usize, extra_args: &[&str], ready: bool) -> Result<()> {
        self.nodes[node].agent_args = extra_args.iter().map(|a| a.to_string()).collect();
        let mut cmd = self.agent_command(node);
        cmd.args(extra_args);
        let idx = self.place_agent(node, "agent", &mut cmd)?;
        self.nodes[node].agent = Some(idx);
        let netns = self.nodes[node].netns.clone();
        let admin: SocketAddr = ADMIN.parse()?;
        let what = if ready { "agent not ready" } else { "agent admin API not up" };
        self.wait_started(idx, what, || {
            let answer = sys::http_get(&netns, admin, "/healthz/ready");
            Ok(if ready { matches!(answer, Ok((200, _))) } else { answer.is_ok() })
        })
    }

    /// Spawns an agent command in the node's netns and its cgroup subtree, labelled `prefix-nN-K`.
    fn place_agent(&mut self, node: usize, prefix: &str, cmd: &mut Command) -> Result<usize> {
        let (netns, cgroup) = (self.nodes[node].netns.clone(), self.nodes[node].cgroup.join("agent"));
        let label = format!("{prefix}-n{}-{}", node + 1, self.processes.len());
        self.spawn(&label, &Placement { netns: &netns, cgroup: &cgroup }, cmd)
    }

    /// Waits (at most 20 s) until `ready` holds for the process `idx` just spawned; an error naming `what` when
    /// it does not, or with its last log lines when it exits first.
    fn wait_started(&mut self, idx: usize, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready()? {
            if let Some(Some(p)) = self.processes.get_mut(idx) {
                if let Some(status) = p.child.try_wait()? {
                    bail!("{} exited during start-up ({status}):\n{}", p.label, tail(&p.log, 30));
                }
            }
            if Instant::now() > deadline {
                bail!("{what} after 20s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILLs the node's agent, as a crash would.
    pub fn kill_agent(&mut self, node: usize) -> Result<()> {
        let idx = self.nodes[node].agent.take().context("agent not running")?;
        if let Some(mut p) = self.processes[idx].take() {
            p.child.kill()?;
            p.child.wait()?;
            self.processes[idx] = None;
            // Keep its log for post-mortems.
            std::fs::rename(&p.log, p.log.with_extension("killed.log")).ok();
        }
        Ok(())
    }

    /// Starts `mesh-testbin serve PORT` (an echo server) in the pod and waits until it listens.
    pub fn serve(&mut self, pod: &Pod, port: u16) -> Result<()> {
        self.serve_mode(pod, port, "echo")
    }

    /// `mode`: `echo`, or `sink` (reads everything, answers with the byte count).
    pub fn serve_mode(&mut self, pod: &Pod, port: u16, mode: &str) -> Result<()> {
        let testbin = self.testbin.clone();
        self.start_server(pod, &testbin, &["serve", &port.to_string(), mode], &format!("server-{}-{port}", pod.name))
    }

    /// Starts a server program in a pod and waits until it prints `listening`. It runs until the cluster drops.
    pub fn start_server(&mut self, pod: &Pod, exe: &Path, args: &[&str], label: &str) -> Result<()> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let idx = self.spawn(label, &Placement { netns: &pod.netns, cgroup: &pod.cgroup }, &mut cmd)?;
        let log = self.processes[idx].as_ref().map(|p| p.log.clone()).context("server vanished")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("listening") {
            if Instant::now() > deadline {
                bail!("server in {} did not start: {}", pod.name, tail(&log, 10));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        Some(self.processes[self.nodes[node].agent?].as_ref()?.child.id())
    }

    /// Creates a CA with `mesh-agent ca init`; agents get it with `--ca-dir`.
    pub fn init_ca(&self) -> Result<PathBuf> {
        let dir = self.tmp.join("ca");
        let out = Command::new(self.bin_dir.join("mesh-agent")).arg("ca").arg("init").arg(&dir).output()?;
        if !out.status.success() {
            bail!("ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(dir)
    }

    /// Writes a NodeConfig listing `workloads` (pod, service account) plus `extra` YAML; returns its path.
    /// Every pod gets the label `app: <pod name>`.
    pub fn write_config(&self, workloads: &[(&Pod, &str)], extra: &str) -> Result<PathBuf> {
        self.write_config_as("node-config.yaml", workloads, extra)
    }

    /// The same under another file name (agents with different views of the mesh).
    pub fn write_config_as(&self, file: &str, workloads: &[(&Pod, &str)], extra: &str) -> Result<PathBuf> {
        let mut yaml = String::from("workloads:\n");
        for (pod, sa) in workloads {
            yaml.push_str(&format!(
                "  - {{namespace: {}, name: {}, serviceAccount: {sa}, ips: [{}, \"{}\"], node: {}, labels: {{app: {}}}}}\n",
                pod.namespace, pod.name, pod.ipv4, pod.ipv6, self.nodes[pod.node].name, pod.name
            ));
        }
        yaml.push_str(extra);
        let path = self.tmp.join(file);
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    /// Directory the controller's `dir:` source watches (created on first use).
    pub fn objects_dir(&self) -> Result<PathBuf> {
        let dir = self.tmp.join("objects");
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Writes (or with `None` removes) one YAML file of Kubernetes objects for the controller.
    pub fn write_objects(&self, file: &str, yaml: Option<&str>) -> Result<()> {
        let path = self.objects_dir()?.join(file);
        match yaml {
            // Write then rename: the controller never reads half a file.
            Some(yaml) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, yaml)?;
                std::fs::rename(&tmp, &path)?;
            }
            None => std::fs::remove_file(&path)?,
        }
        Ok(())
    }

    /// Pod objects as the API server would show them (node, service account, IPs, `app` label).
    pub fn pod_objects(&self, pods: &[(&Pod, &str)]) -> String {
        pods.iter()
            .map(|(p, sa)| {
                format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: uid-{}, labels: {{app: {}}}}}\n\
                     spec: {{nodeName: {}, serviceAccountName: {sa}}}\n\
                     status: {{phase: Running, podIPs: [{{ip: {}}}, {{ip: \"{}\"}}]}}\n",
                    p.name, p.namespace, p.name, p.name, self.nodes[p.node].name, p.ipv4, p.ipv6
                )
            })
            .collect()
    }

    /// The bootstrap token file agents and controller share.
    pub fn token_file(&self) -> Result<PathBuf> {
        let path = self.tmp.join("bootstrap-token");
        if !path.exists() {
            std::fs::write(&path, format!("token-{}-0123456789abcdef", self.id))?;
        }
        Ok(path)
    }

    /// Starts `mesh-controller --source dir:<objects>` in the fabric netns and waits until it accepts connections.
    pub fn start_controller(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.bin_dir.join("mesh-controller"));
        cmd.arg("serve")
            .arg("--source")
            .arg(format!("dir:{}", self.objects_dir()?.display()))
            .arg("--ca-dir")
            .arg(self.tmp.join("controller-ca"))
            .arg("--token-file")
            .arg(self.token_file()?);
        self.controller = Some(self.run_controller(cmd, CONTROLLER_IP)?);
        // The CA exists once the controller listens: agents verify the controller against its certificate.
        std::fs::copy(self.tmp.join("controller-ca").join("ca.crt"), self.controller_root())?;
        Ok(())
    }

    /// The root certificate agents verify the controller's TLS certificate with. `start_controller` writes it;
    /// with the Kubernetes source the test copies it from the ConfigMap the controller publishes.
    pub fn controller_root(&self) -> PathBuf {
        self.tmp.join("controller-root.pem")
    }

    /// The agent arguments that point it at the controller at `ip`, verified with [`Cluster::controller_root`].
    fn controller_args(&self, token_file: &Path, ip: &str) -> Result<Vec<String>> {
        Ok(vec![
            "--controller".into(),
            format!("https://{ip}:{CONTROLLER_PORT}"),
            "--controller-ca".into(),
            self.controller_root().to_str().context("path")?.into(),
            "--token-file".into(),
            token_file.to_str().context("path")?.into(),
        ])
    }

    /// Starts `mesh-controller --source kubernetes` against the API server in `kubeconfig` (reachable from the
    /// fabric netns).
    pub fn start_controller_kubernetes(&mut self, kubeconfig: &Path) -> Result<()> {
        let mut cmd = Command::new(self.bin_dir.join("mesh-controller"));
        // Strict: the test agents present tokens minted for the controller's audience, as the DaemonSet's.
        cmd.args(["serve", "--source", "kubernetes", "--legacy-api-tokens", "false"]).env("KUBECONFIG", kubeconfig);
        let idx = self.run_controller(cmd, CONTROLLER_IP)?;
        self.controller = Some(idx);
        Ok(())
    }

    /// A second `mesh-controller --source kubernetes`, on [`REPLICA_IP`], as a Deployment's second replica.
    pub fn start_controller_replica(&mut self, kubeconfig: &Path) -> Result<()> {
        ip(&self.fabric, &format!("addr add {REPLICA_IP}/24 dev br0"))?;
        let mut cmd = Command::new(self.bin_dir.join("mesh-controller"));
        // Strict: the test agents present tokens minted for the controller's audience, as the DaemonSet's.
        cmd.args(["serve", "--source", "kubernetes", "--legacy-api-tokens", "false"]).env("KUBECONFIG", kubeconfig);
        self.run_controller(cmd, REPLICA_IP).map(drop)
    }

    /// Starts the controller in the fabric netns on `ip`; its process index once it accepts connections.
    fn run_controller(&mut self, mut cmd: Command, ip: &str) -> Result<usize> {
        let cgroup = self.cgroup_root.join("controller");
        std::fs::create_dir_all(&cgroup)?;
        cmd.arg("--listen")
            .arg(format!("{ip}:{CONTROLLER_PORT}"))
            .arg("--metrics")
            .arg(format!("{ip}:15014"))
            .env("RUST_LOG", "info,mesh_controller=debug");
        let label = format!("controller-{}", self.processes.len());
        let fabric = self.fabric.clone();
        let idx = self.spawn(&label, &Placement { netns: &fabric, cgroup: &cgroup }, &mut cmd)?;
        let target: SocketAddr = format!("{ip}:{CONTROLLER_PORT}").parse()?;
        self.wait_started(idx, "controller not listening", || {
            sys::in_netns(&fabric, move || {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
            })
        })?;
        Ok(idx)
    }

    pub fn kill_controller(&mut self) -> Result<()> {
        let idx = self.controller.take().context("controller not running")?;
        if let Some(mut p) = self.processes[idx].take() {
            p.child.kill()?;
            p.child.wait()?;
        }
        Ok(())
    }

    /// Starts the node's agent fed by the controller.
    pub fn start_agent_with_controller(&mut self, node: usize) -> Result<()> {
        let token = self.token_file()?;
        self.start_agent_with_token(node, &token)
    }

    /// Starts the node's agent fed by the controller, with more agent arguments.
    pub fn start_agent_with_controller_args(&mut self, node: usize, extra: &[&str]) -> Result<()> {
        let token = self.token_file()?;
        let mut args = self.controller_args(&token, CONTROLLER_IP)?;
        args.extend(extra.iter().map(|a| a.to_string()));
        self.start_agent_with(node, &args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Starts the node's agent fed by the controller, presenting the token in `token_file`.
    pub fn start_agent_with_token(&mut self, node: usize, token_file: &Path) -> Result<()> {
        self.start_agent_with_token_via(node, token_file, CONTROLLER_IP)
    }

    /// The same, fed by the controller replica listening on `controller_ip`.
    pub fn start_agent_with_token_via(&mut self, node: usize, token_file: &Path, controller_ip: &str) -> Result<()> {
        let args = self.controller_args(token_file, controller_ip)?;
        self.start_agent_with(node, &args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Scratch directory of this cluster (removed with it).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Sends `signal` to the node's agent (SIGHUP reloads its config).
    pub fn signal_agent(&self, node: usize, signal: i32) -> Result<()> {
        self.signal_process(self.nodes[node].agent.context("agent not running")?, signal)
    }

    /// Sends `signal` to the controller (SIGSTOP: it stops answering, connections stay open; SIGCONT resumes).
    pub fn signal_controller(&self, signal: i32) -> Result<()> {
        self.signal_process(self.controller.context("controller not running")?, signal)
    }

    fn signal_process(&self, idx: usize, signal: i32) -> Result<()> {
        let pid = self.processes[idx].as_ref().context("process gone")?.child.id();
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn admin(&self, node: usize, path: &str) -> Result<Value> {
        let (status, body) = sys::http_get(&self.nodes[node].netns, ADMIN.parse()?, path)?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// A POST to the agent's admin API: status and body.
    /// A POST to the node's full admin API: its root-only Unix socket.
    pub fn admin_post(&self, node: usize, path: &str) -> Result<(u16, String)> {
        sys::unix_http_request(&self.admin_socket(node), "POST", path)
    }

    /// A POST to the node's read-only admin API on node loopback, where host-network pods can reach it.
    pub fn admin_post_loopback(&self, node: usize, path: &str) -> Result<(u16, String)> {
        sys::http_request(&self.nodes[node].netns, ADMIN.parse()?, "POST", path)
    }

    pub fn admin_socket(&self, node: usize) -> PathBuf {
        mesh_agent::admin::socket_path(&self.nodes[node].state_dir)
    }

    /// How many entries the agent's config has in the list `field` (`routes`, `authorizationPolicies`, ...).
    pub fn config_len(&self, node: usize, field: &str) -> usize {
        self.admin(node, "/config_dump").map_or(0, |d| d["config"][field].as_array().map_or(0, Vec::len))
    }

    pub fn metrics(&self, node: usize) -> Result<String> {
        Ok(sys::http_get(&self.nodes[node].netns, METRICS.parse()?, "/metrics")?.1)
    }

    /// The value of one metric sample, e.g. `nodemesh_tcp_connections_opened_total{direction="outbound",...}`;
    /// every label given must match. 0 when absent.
    /// The status the node's readiness endpoint answers with (0 when nothing answers).
    pub fn ready_status(&self, node: usize) -> u16 {
        ADMIN
            .parse()
            .ok()
            .and_then(|a| sys::http_get(&self.nodes[node].netns, a, "/healthz/ready").ok())
            .map_or(0, |r| r.0)
    }

    /// Connections the node's agent opened in mTLS as the calling side.
    pub fn mutual_tls_opened(&self, node: usize) -> f64 {
        let labels = [("reporter", "source"), ("connection_security_policy", "mutual_tls")];
        self.metric(node, "nodemesh_tcp_connections_opened_total", &labels).unwrap_or(f64::NAN)
    }

    pub fn metric(&self, node: usize, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(crate::metric_sum(&self.metrics(node)?, name, labels))
    }

    /// Every line the processes labelled `label_prefix...` wrote (stdout and stderr).
    pub fn log_lines(&self, label_prefix: &str) -> Vec<String> {
        self.processes
            .iter()
            .flatten()
            .filter(|p| p.label.starts_with(label_prefix))
            .flat_map(|p| {
                std::fs::read_to_string(&p.log).unwrap_or_default().lines().map(String::from).collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn log_of(&self, label_prefix: &str) -> String {
        self.processes
            .iter()
            .flatten()
            .filter(|p| p.label.starts_with(label_prefix))
            .map(|p| tail(&p.log, 200))
            .collect()
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.processes.iter().flatten() {
                eprintln!("----- {} (last lines of {}) -----\n{}", p.label, p.log.display(), tail(&p.log, 40));
            }
        }
        for p in self.processes.iter_mut().flatten() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        for node in &self.nodes {
            let _ = Command::new(self.bin_dir.join("mesh-agent"))
                .arg("cleanup")
                .arg("--bpffs")
                .arg(&node.bpffs)
                .arg("--state-dir")
                .arg(&node.state_dir)
                .output();
            let _ = std::fs::remove_dir_all(&node.bpffs);
        }
        for ns in self.netns.iter().rev() {
            let _ = sys::run("ip", &["netns", "del", ns]);
        }
        remove_cgroup_tree(&self.cgroup_root);
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Removes a cgroup subtree bottom-up; killed processes may take a moment to leave.
fn remove_cgroup_tree(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path());
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(root).is_ok() || !root.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes what earlier, killed test processes left behind (names carry the creator's pid).
fn sweep_stale(cgroup2: &Path) {
    let owner_dead = |name: &str| -> bool {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !pid_alive(pid))
    };
    if let Ok(list) = sys::run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if owner_dead(name) {
                let _ = sys::run("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_dead(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(cgroup2.join("nodemesh-test")) {
        for e in entries.flatten() {
            if owner_dead(&e.file_name().to_string_lossy()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}
