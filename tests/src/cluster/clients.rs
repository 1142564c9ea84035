//! Client programs run inside pods (and on nodes) for a bounded time, and their JSON reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;

use super::{Cluster, Pod, SEQUENCE};
use crate::sys::{self, Placement};

/// What `mesh-testbin client` reported.
#[derive(Debug)]
pub struct ClientReport {
    pub success: bool,
    pub json: Value,
    pub stderr: String,
}

impl ClientReport {
    pub fn field(&self, name: &str) -> String {
        self.json.get(name).and_then(Value::as_str).unwrap_or("").to_string()
    }
    pub fn ok_connections(&self) -> u64 {
        self.json.get("ok").and_then(Value::as_u64).unwrap_or(0)
    }
}

/// A client started with [`Cluster::client_start`].
pub struct PendingClient {
    child: Child,
    log: PathBuf,
}

impl PendingClient {
    /// Waits (at most 120 s) for the report.
    pub fn wait(mut self) -> Result<ClientReport> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                bail!("client timed out after 120s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = std::fs::read_to_string(&self.log)?;
        let json_line = text.lines().find(|l| l.starts_with('{')).unwrap_or("null");
        Ok(ClientReport {
            success: status.success(),
            json: serde_json::from_str(json_line).unwrap_or(Value::Null),
            stderr: text.lines().filter(|l| !l.starts_with('{')).collect::<Vec<_>>().join("\n"),
        })
    }
}

impl Drop for PendingClient {
    fn drop(&mut self) {
        // Reaped already when `wait` returned; otherwise (timeout, panic) it must not outlive the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Runs `mesh-testbin client` in a pod and waits (bounded) for its report.
    pub fn client(&self, pod: &Pod, target: SocketAddr, bytes: u64, conns: usize) -> Result<ClientReport> {
        self.client_with(pod, target, bytes, conns, &[])
    }

    /// The same with `MESH_TESTBIN_*` settings (marker payload, hold time).
    pub fn client_with(
        &self,
        pod: &Pod,
        target: SocketAddr,
        bytes: u64,
        conns: usize,
        env: &[(&str, &str)],
    ) -> Result<ClientReport> {
        self.client_in(&Placement { netns: &pod.netns, cgroup: &pod.cgroup }, target, bytes, conns, env)
    }

    /// The same from the node itself (its netns, its "host" cgroup), like a kubelet probe.
    pub fn client_from_node(&self, node: usize, target: SocketAddr, bytes: u64) -> Result<ClientReport> {
        let n = &self.nodes[node];
        self.client_in(&Placement { netns: &n.netns, cgroup: &n.cgroup.join("host") }, target, bytes, 1, &[])
    }

    fn client_in(
        &self,
        place: &Placement<'_>,
        target: SocketAddr,
        bytes: u64,
        conns: usize,
        env: &[(&str, &str)],
    ) -> Result<ClientReport> {
        let mut cmd = Command::new(&self.testbin);
        cmd.args(["client", &target.to_string(), &bytes.to_string(), &conns.to_string()]).envs(env.iter().copied());
        let log = self.tmp.join(format!("client-{}.log", SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        let child = sys::spawn_in(place, &mut cmd, &log)?;
        PendingClient { child, log }.wait()
    }

    /// Starts a client without waiting; [`PendingClient::wait`] collects its report.
    pub fn client_start(
        &self,
        pod: &Pod,
        target: SocketAddr,
        bytes: u64,
        env: &[(&str, &str)],
    ) -> Result<PendingClient> {
        let mut cmd = Command::new(&self.testbin);
        cmd.args(["client", &target.to_string(), &bytes.to_string(), "1"]).envs(env.iter().copied());
        let log = self.tmp.join(format!("client-{}.log", SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        let child = sys::spawn_in(&Placement { netns: &pod.netns, cgroup: &pod.cgroup }, &mut cmd, &log)?;
        Ok(PendingClient { child, log })
    }

    /// Starts `mesh-testbin ARGS...` in a pod without waiting; [`PendingClient::wait`] collects its report.
    pub fn testbin_start(&self, pod: &Pod, args: &[&str]) -> Result<PendingClient> {
        self.start_in(pod, &self.testbin, args)
    }

    /// Starts a client program in a pod without waiting; [`PendingClient::wait`] collects its report.
    pub fn start_in(&self, pod: &Pod, exe: &Path, args: &[&str]) -> Result<PendingClient> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let log = self.tmp.join(format!("testbin-{}.log", SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        let child = sys::spawn_in(&Placement { netns: &pod.netns, cgroup: &pod.cgroup }, &mut cmd, &log)?;
        Ok(PendingClient { child, log })
    }

    /// Runs `mesh-testbin ARGS...` in a pod; returns its JSON report.
    pub fn testbin(&self, pod: &Pod, args: &[&str]) -> Result<Value> {
        self.run_in(pod, &self.testbin, args)
    }

    /// Runs a client program in a pod to the end (bounded) and parses the JSON it prints.
    pub fn run_in(&self, pod: &Pod, exe: &Path, args: &[&str]) -> Result<Value> {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        let log = self.tmp.join(format!("testbin-{}.log", SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        let child = sys::spawn_in(&Placement { netns: &pod.netns, cgroup: &pod.cgroup }, &mut cmd, &log)?;
        let report = PendingClient { child, log }.wait()?;
        if !report.success {
            bail!("{} {} failed: {}", exe.display(), args.join(" "), report.stderr);
        }
        Ok(report.json)
    }
}
