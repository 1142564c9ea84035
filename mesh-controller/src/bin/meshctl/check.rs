//! `meshctl check`: what nodemesh needs from this node's kernel, and — with Kubernetes access — from the
//! cluster: nodemesh's CRDs, an upstream Gateway API bundle it can read, a ready controller and ready agents. Every failed check says how to fix it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::ApiResource;
use mesh_controller::gateway_api;
use serde::Serialize;

use crate::output::{self, Format};

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    Skipped,
}

#[derive(Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(name: &str, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Ok, detail: detail.into(), fix: None }
}

fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

fn skipped(name: &str, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Skipped, detail: detail.into(), fix: None }
}

/// `(mount point, fs type)` of every mount.
fn mounts() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((point.to_string(), fstype.to_string()))
        })
        .collect()
}

fn kernel_release() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?.trim().to_string();
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

fn kernel_checks() -> Vec<Check> {
    let mut out = Vec::new();
    match kernel_release() {
        // sk_lookup (5.9) is the newest program type the capture needs.
        Some((major, minor, release)) if (major, minor) >= (5, 9) => out.push(ok("kernel", format!("Linux {release}"))),
        Some((_, _, release)) => {
            out.push(fail("kernel", format!("Linux {release}"), "nodemesh needs Linux 5.9 or newer (BPF sk_lookup)"))
        }
        None => out.push(fail("kernel", "cannot read /proc/sys/kernel/osrelease", "run meshctl on the node itself")),
    }
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    let has = |symbol: &[u8]| btf.windows(symbol.len()).any(|w| w == symbol);
    if btf.is_empty() {
        out.push(fail(
            "bpf",
            "no kernel BTF at /sys/kernel/btf/vmlinux",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        ));
    } else {
        out.push(ok("bpf", "BPF with kernel BTF"));
        if has(b"bpf_sk_lookup") {
            out.push(ok("sk_lookup", "BPF_PROG_TYPE_SK_LOOKUP available"));
        } else {
            out.push(fail(
                "sk_lookup",
                "the kernel has no sk_lookup programs",
                "use Linux 5.9+ with CONFIG_BPF_SYSCALL",
            ));
        }
    }
    let mounts = mounts();
    match mounts.iter().find(|(_, t)| t == "cgroup2") {
        Some((point, _)) => out.push(ok("cgroup v2", format!("mounted at {point}"))),
        None => out.push(fail(
            "cgroup v2",
            "no cgroup2 mount",
            "boot with systemd.unified_cgroup_hierarchy=1, or mount -t cgroup2 none /sys/fs/cgroup/unified",
        )),
    }
    match mounts.iter().find(|(p, t)| t == "bpf" && p == "/sys/fs/bpf") {
        Some(_) => out.push(ok("bpffs", "mounted at /sys/fs/bpf")),
        None => out.push(fail("bpffs", "/sys/fs/bpf is not a bpf filesystem", "mount -t bpf bpf /sys/fs/bpf")),
    }
    out
}

/// Pods of the agent's node that are in the mesh but were never captured: they started before nodemesh.
async fn uncaptured_check(agent: &str) -> Check {
    let name = format!("pods on {agent}");
    let pods = match crate::admin::get(agent, "/uncaptured").await {
        Ok((200, body)) => serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap_or_default(),
        Ok((status, _)) => return skipped(&name, format!("the agent does not list uncaptured pods ({status})")),
        Err(e) => return fail(&name, format!("{e:#}"), "is the agent running?"),
    };
    if pods.is_empty() {
        return ok(&name, "every meshed pod of the node is captured");
    }
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or("")))
        .collect();
    fail(
        &name,
        format!(
            "{} meshed pod(s) running uncaptured, in plaintext and outside policy: {}",
            names.len(),
            names.join(", ")
        ),
        "they started before nodemesh was installed, so the CNI plugin never saw them: restart them (kubectl rollout restart)",
    )
}

async fn agent_checks(agents: &[String]) -> Vec<Check> {
    let mut out = Vec::new();
    for agent in agents {
        let name = format!("agent {agent}");
        match crate::admin::get(agent, "/healthz/ready").await {
            Ok((200, _)) => {
                out.push(ok(&name, "ready"));
                out.push(uncaptured_check(agent).await);
            }
            Ok((status, body)) => out.push(fail(
                &name,
                format!("not ready ({status}: {})", body.trim()),
                "see the agent's log; it is ready once capture, config and certificates are in place",
            )),
            Err(e) => out.push(fail(
                &name,
                format!("{e:#}"),
                "is the agent running? its admin API listens on 127.0.0.1:15000",
            )),
        }
    }
    out
}

const NAMESPACE: &str = "nodemesh-system";
const CONTROLLER: &str = "nodemesh-controller";
const AGENT: &str = "nodemesh-agent";
const CRDS: &[&str] = &[
    "peerauthentications.nodemesh.io",
    "authorizationpolicies.nodemesh.io",
    "trafficpolicies.nodemesh.io",
    "telemetries.nodemesh.io",
    "meshconfigs.nodemesh.io",
];
const INSTALL: &str = "kubectl apply -k manifests/";

fn workload_api(client: &kube::Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "apps".into(),
        version: "v1".into(),
        api_version: "apps/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    Api::namespaced_with(client.clone(), NAMESPACE, &resource)
}

fn status_i64(o: &DynamicObject, field: &str) -> i64 {
    o.data["status"][field].as_i64().unwrap_or(0)
}

async fn kubernetes_checks() -> Vec<Check> {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => return vec![skipped("kubernetes", format!("no cluster access ({e}); set KUBECONFIG to check one"))],
    };
    let mut out = Vec::new();
    match Api::<CustomResourceDefinition>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => {
            let present: Vec<String> = list.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
            let missing: Vec<&str> = CRDS.iter().copied().filter(|c| !present.iter().any(|p| p == c)).collect();
            if missing.is_empty() {
                out.push(ok("CRDs", format!("{} installed", CRDS.len())));
            } else {
                out.push(fail("CRDs", format!("missing: {}", missing.join(", ")), INSTALL));
            }
            out.push(match gateway_api::assess(&list.items) {
                gateway_api::Assessment::Usable(detail) => ok("Gateway API", detail),
                gateway_api::Assessment::Unusable(why) => fail("Gateway API", why, gateway_api::install_hint()),
            });
        }
        Err(e) => {
            out.push(fail("CRDs", format!("cannot list CRDs: {e}"), "check your RBAC (list customresourcedefinitions)"))
        }
    }
    match workload_api(&client, "Deployment", "deployments").get_opt(CONTROLLER).await {
        Ok(Some(d)) => {
            let (want, ready) = (d.data["spec"]["replicas"].as_i64().unwrap_or(1), status_i64(&d, "readyReplicas"));
            if ready >= want && ready > 0 {
                out.push(ok("controller", format!("{ready}/{want} replicas ready")));
            } else {
                out.push(fail(
                    "controller",
                    format!("{ready}/{want} replicas ready"),
                    format!("kubectl -n {NAMESPACE} describe deployment {CONTROLLER}; kubectl -n {NAMESPACE} logs deploy/{CONTROLLER}"),
                ));
            }
        }
        Ok(None) => out.push(fail("controller", format!("no Deployment {NAMESPACE}/{CONTROLLER}"), INSTALL)),
        Err(e) => out.push(fail("controller", format!("{e}"), "check your RBAC (get deployments)")),
    }
    match workload_api(&client, "DaemonSet", "daemonsets").get_opt(AGENT).await {
        Ok(Some(ds)) => {
            let (want, ready) = (status_i64(&ds, "desiredNumberScheduled"), status_i64(&ds, "numberReady"));
            if ready >= want && want > 0 {
                out.push(ok("agents", format!("{ready}/{want} nodes ready")));
            } else {
                out.push(fail(
                    "agents",
                    format!("{ready}/{want} nodes ready"),
                    format!("kubectl -n {NAMESPACE} get pods -l app={AGENT} -o wide; meshctl check on a failing node"),
                ));
            }
        }
        Ok(None) => out.push(fail("agents", format!("no DaemonSet {NAMESPACE}/{AGENT}"), INSTALL)),
        Err(e) => out.push(fail("agents", format!("{e}"), "check your RBAC (get daemonsets)")),
    }
    out
}

pub async fn run(format: Format, agents: &[String], kubernetes: bool) -> anyhow::Result<bool> {
    let mut checks = kernel_checks();
    checks.extend(agent_checks(agents).await);
    if kubernetes {
        checks.extend(kubernetes_checks().await);
    }
    let passed = checks.iter().all(|c| c.status != Status::Fail);
    if !output::structured(format, &checks)? {
        let mark = |s: Status| match s {
            Status::Ok => "ok",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        };
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|c| {
                let detail = match &c.fix {
                    Some(fix) => format!("{} — fix: {fix}", c.detail),
                    None => c.detail.clone(),
                };
                vec![mark(c.status).to_string(), c.name.clone(), detail]
            })
            .collect();
        output::table(&["STATUS", "CHECK", "DETAIL"], &rows);
        println!("{}", if passed { "all checks passed" } else { "some checks failed" });
    }
    Ok(passed)
}
