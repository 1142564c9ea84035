//! Calls of the real `nodemesh-cni` binary, as a container runtime makes them.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Cluster, Pod};
use crate::sys;

/// Result of one `nodemesh-cni` invocation.
#[derive(Debug)]
pub struct CniOutcome {
    pub exit_ok: bool,
    pub stdout: String,
}

impl CniOutcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
    pub fn error_code(&self) -> Option<u64> {
        self.json().get("code").and_then(Value::as_u64)
    }
}

impl Cluster {
    /// Invokes the real `nodemesh-cni` binary as a container runtime would.
    pub fn cni_raw(&self, env: &[(&str, &str)], stdin: &str) -> Result<CniOutcome> {
        use std::io::Write;
        let mut child = Command::new(self.bin_dir.join("nodemesh-cni"))
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        Ok(CniOutcome {
            exit_ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    /// The network config a runtime passes to a chained plugin, with the main plugin's result.
    pub fn cni_config(&self, pod: &Pod) -> String {
        let socket = self.nodes[pod.node].cni_socket.display();
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"nodemesh-cni","agentSocket":"{socket}",
                "prevResult":{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"{netns}"}}],
                "ips":[{{"address":"{v4}/24","interface":0}},{{"address":"{v6}/64","interface":0}}]}}}}"#,
            netns = sys::netns_path(&pod.netns).display(),
            v4 = pod.ipv4,
            v6 = pod.ipv6,
        )
    }

    pub fn cni(&self, command: &str, pod: &Pod) -> Result<CniOutcome> {
        let netns = sys::netns_path(&pod.netns);
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}",
            pod.namespace, pod.name, pod.name
        );
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", pod.container_id.as_str()),
            ("CNI_NETNS", netns.to_str().unwrap_or_default()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", args.as_str()),
        ];
        self.cni_raw(&env, &self.cni_config(pod))
    }

    /// CNI ADD that must succeed.
    pub fn enroll(&self, pod: &Pod) -> Result<()> {
        let out = self.cni("ADD", pod)?;
        if !out.exit_ok {
            bail!("CNI ADD for {} failed: {}", pod.name, out.stdout);
        }
        Ok(())
    }
}
