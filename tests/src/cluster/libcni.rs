//! Pods set up the way a container runtime sets them up: through libcni (the Go library containerd and CRI-O
//! call plugins with; `tests/cni-driver` is a small driver over it) running a real chain of Debian's
//! `containernetworking-plugins` — `bridge` with `host-local` IPAM — followed by `nodemesh-cni`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::cni::CniOutcome;
use super::{Cluster, Pod};
use crate::sys;

/// Where Debian's containernetworking-plugins put `bridge`, `host-local` and the others.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// Builds the libcni driver (Go, against Debian's golang-github-appc-cni-dev) into the target dir. `None`
/// outside CI when Go, libcni or the plugins are missing (the test returns early); under `CI=true` a missing
/// prerequisite fails the test.
pub fn cni_driver() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let libcni = Path::new("/usr/share/gocode/src/github.com/containernetworking/cni/libcni");
    let present =
        Path::new("/usr/bin/go").exists() && libcni.is_dir() && Path::new(DEBIAN_CNI_BIN).join("bridge").exists();
    if !present {
        assert!(
            std::env::var("CI").is_err(),
            "golang-go, golang-github-appc-cni-dev or containernetworking-plugins missing"
        );
        return None;
    }
    let out = workspace.join("target/cni-driver");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(workspace.join("tests/cni-driver/main.go"))
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOCACHE", workspace.join("target/go-cache"))
        .output()
        .expect("running go build");
    assert!(built.status.success(), "building the libcni driver: {}", String::from_utf8_lossy(&built.stderr));
    Some(out)
}

impl Cluster {
    /// A pod sandbox as the runtime creates it before calling CNI: a network namespace (loopback down, no
    /// interfaces) and a cgroup. Its address comes from the CNI result ([`Cluster::libcni`]).
    pub fn add_bare_pod(&mut self, node: usize, name: &str, namespace: &str) -> Result<Pod> {
        let pod = self.new_sandbox(node, name, namespace, Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED)?;
        // As a runtime leaves it until its loopback plugin runs (the cluster's namespaces come with lo up).
        sys::ip(&pod.netns, "link set lo down")?;
        Ok(pod)
    }

    /// The node's network config as a runtime finds it in /etc/cni/net.d, in `version`: the node's bridge with
    /// host-local addresses from the top of the node's pod subnet, then nodemesh-cni.
    pub fn write_libcni_conflist(&self, node: usize, version: &str) -> Result<PathBuf> {
        let i = node + 1;
        let dir = self.tmp_dir().join("libcni");
        std::fs::create_dir_all(&dir)?;
        let conflist = serde_json::json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cbr0",
                    "isGateway": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("10.244.{i}.0/24"), "rangeStart": format!("10.244.{i}.200"),
                                     "rangeEnd": format!("10.244.{i}.250"), "gateway": format!("10.244.{i}.1")}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("ipam"),
                    },
                },
                {"type": "nodemesh-cni", "agentSocket": self.nodes[node].cni_socket},
            ],
        });
        let path = dir.join(format!("10-bridge-{version}.conflist"));
        std::fs::write(&path, serde_json::to_vec_pretty(&conflist)?)?;
        Ok(path)
    }

    /// `command` (ADD, CHECK, DEL) for `pod` through libcni, run in the node's network namespace as the
    /// runtime runs on the node.
    pub fn libcni(&self, driver: &Path, command: &str, conflist: &Path, pod: &Pod) -> Result<CniOutcome> {
        let node_netns = format!("--net={}", sys::netns_path(&self.nodes[pod.node].netns).display());
        let out = Command::new("nsenter")
            .arg(node_netns)
            .arg(driver)
            .arg(command)
            .arg(conflist)
            .arg(&pod.container_id)
            .arg(sys::netns_path(&pod.netns))
            .args([&pod.namespace, &pod.name])
            .env("CNI_PATH", format!("{DEBIAN_CNI_BIN}:{}", self.bin_dir.display()))
            .env("CNI_CACHE_DIR", self.tmp_dir().join("libcni/cache"))
            .output()
            .context("running the libcni driver")?;
        Ok(CniOutcome {
            exit_ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}
