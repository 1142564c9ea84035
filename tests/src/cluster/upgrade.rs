//! Replacing a node's agent the way a DaemonSet rolling update does, for the upgrade tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{ADMIN, Cluster, tail};
use crate::sys;

/// How a rolling update replaces the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// `maxSurge: 1, maxUnavailable: 0`: the new agent starts beside the old one, which gets SIGTERM once the
    /// new one answers ready on the node's admin port.
    Surge,
    /// `maxUnavailable: 1`: SIGTERM first; the new agent starts once the old one has exited.
    Replace,
}

/// An upgrade under way: the old agent got SIGTERM and may still be draining.
#[derive(Debug)]
pub struct Upgraded {
    old: usize,
    terminated_at: Instant,
}

impl Cluster {
    /// Replaces the node's agent by a new process with the same arguments.
    pub fn upgrade_agent(&mut self, node: usize, rollout: Rollout) -> Result<Upgraded> {
        let old = self.nodes[node].agent.context("agent not running")?;
        let old_pid = self.processes[old].as_ref().context("agent gone")?.child.id();
        let args = self.nodes[node].agent_args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if rollout == Rollout::Replace {
            let upgraded = self.terminate(old)?;
            self.wait_exited(&upgraded)?;
            self.spawn_agent(node, &args, true)?;
            return Ok(upgraded);
        }
        let mut cmd = self.agent_command(node);
        cmd.args(&args);
        let new = self.place_agent(node, "agent", &mut cmd)?;
        self.nodes[node].agent = Some(new);
        let netns = self.nodes[node].netns.clone();
        let admin: SocketAddr = ADMIN.parse()?;
        // Ready as the kubelet's probe sees it: the node's admin port answers ready, from the new process.
        let new_pid = self.processes[new].as_ref().context("new agent gone")?.child.id();
        self.wait_started(new, "new agent not ready on the node's admin port", || {
            let answer = sys::http_get(&netns, admin, "/server_info");
            Ok(answer.ok().and_then(|(status, body)| (status == 200).then_some(body)).is_some_and(|body| {
                serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|v| v["pid"] == new_pid && v["ready"] == true)
            }))
        })?;
        if !sys::pid_alive(old_pid) {
            bail!("the old agent exited before it was told to:\n{}", self.old_log(old));
        }
        self.terminate(old)
    }

    fn terminate(&mut self, idx: usize) -> Result<Upgraded> {
        let p = self.processes[idx].as_mut().context("agent gone")?;
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(Upgraded { old: idx, terminated_at: Instant::now() })
    }

    /// Waits (at most 60 s after its SIGTERM) until the old agent has exited, successfully; returns how long
    /// after its SIGTERM it did.
    pub fn wait_exited(&mut self, upgraded: &Upgraded) -> Result<Duration> {
        let start = upgraded.terminated_at;
        let status =
            self.exit_status(upgraded.old, start + Duration::from_secs(60), "the old agent, 60 s after SIGTERM")?;
        let p = self.processes[upgraded.old].as_ref().context("agent gone")?;
        if !status.success() {
            bail!("the old agent exited with {status}:\n{}", tail(&p.log, 30));
        }
        Ok(start.elapsed())
    }

    /// Runs a second agent for `node` beside the running one, on other host ports and without a handover, until
    /// it exits (at most 30 s): its exit status and log.
    pub fn run_rival_agent(&mut self, node: usize) -> Result<(std::process::ExitStatus, String)> {
        let args = self.nodes[node].agent_args.clone();
        let mut cmd = self.agent_command_on(node, "127.0.0.1:15100", "127.0.0.1:15120");
        cmd.args(&args);
        let idx = self.place_agent(node, "rival-agent", &mut cmd)?;
        let status = self.exit_status(idx, Instant::now() + Duration::from_secs(30), "the rival agent, after 30 s")?;
        let p = self.processes[idx].as_ref().context("rival gone")?;
        Ok((status, std::fs::read_to_string(&p.log)?))
    }

    /// Waits until the process `idx` has exited, at most until `deadline` (`what` names it when it has not).
    fn exit_status(&mut self, idx: usize, deadline: Instant, what: &str) -> Result<std::process::ExitStatus> {
        let p = self.processes[idx].as_mut().context("process gone")?;
        loop {
            if let Some(status) = p.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{what} still runs:\n{}", tail(&p.log, 30));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn old_log(&self, idx: usize) -> String {
        self.processes[idx].as_ref().map(|p| tail(&p.log, 30)).unwrap_or_default()
    }
}
