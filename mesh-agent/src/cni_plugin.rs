//! `nodemesh-cni`: a chained CNI plugin (spec 0.3.0 to 1.1.0) that enrolls pods with the node agent.
//!
//! It runs after the main plugin, passes the previous result through unchanged, and tells the agent over its
//! unix socket which netns and addresses the pod has. ADD returns only when the agent reports capture active,
//! so the pod's first connection cannot escape. It answers in the version of the network configuration it was
//! given; a version it does not speak is refused, and `mesh-agent cni install` refuses to chain it into such a
//! configuration (a runtime would fail every pod's ADD on the node). 1.1's `STATUS` asks the agent whether it
//! takes pods; `GC` has nothing to collect (the agent forgets pods whose network namespace is gone by itself).

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mesh_common::cni::{AgentRequest, AgentResponse, DEFAULT_AGENT_SOCKET, PodNetwork};
use serde_json::{Value, json};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of them: what VERSION answers in.
const LATEST_VERSION: &str = "1.1.0";
/// The commands each version added beyond ADD, DEL and VERSION: CHECK in 0.4.0, STATUS and GC in 1.1.0.
fn knows(version: &str, command: &str) -> bool {
    match command {
        "CHECK" => !version.starts_with("0.3."),
        "STATUS" | "GC" => version == "1.1.0",
        _ => true,
    }
}
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Namespaces whose pods never wait for the agent (istio-cni's `exclude_namespaces`): the node's own system pods
/// must start while no agent runs, and so must nodemesh's own — the controller above all: until it runs, no agent
/// has a config, and an agent without one takes no pod. The config's `excludeNamespaces` replaces the list.
const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system", "nodemesh-system"];

/// A CNI error result (spec: "Error"), printed on stdout with a non-zero exit.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl ToString) -> Self {
        CniError { code, msg: msg.into(), details: details.to_string() }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

/// One plugin invocation, decoded and checked: everything `run` needs before it talks to the agent. Kept apart
/// so the decoding of what a runtime (or anyone who can run the binary) passes can be tested and fuzzed alone.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    Version,
    Add {
        socket: String,
        pod: PodNetwork,
        version: String,
        prev_result: Value,
    },
    /// ADD (or CHECK) of a pod in an excluded namespace: passed on without the agent.
    Excluded {
        version: String,
        prev_result: Option<Value>,
    },
    Del {
        socket: String,
        container_id: String,
        netns: Option<String>,
    },
    Check {
        socket: String,
        container_id: String,
    },
    Status {
        socket: String,
    },
    Gc,
}

/// Decodes an invocation from the `CNI_*` variables (`env`) and the network configuration (`stdin`).
pub fn parse(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Invocation, CniError> {
    let command = env("CNI_COMMAND").ok_or_else(|| CniError::new(4, "CNI_COMMAND is not set", ""))?;
    if command == "VERSION" {
        return Ok(Invocation::Version);
    }
    let config: Value =
        serde_json::from_slice(stdin).map_err(|e| CniError::new(6, "cannot decode the network configuration", e))?;
    let version = config.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            1,
            "incompatible CNI version",
            format!("{version:?} is not one of {SUPPORTED_VERSIONS:?}"),
        ));
    }
    if !knows(version, &command) {
        return Err(CniError::new(4, format!("{command} is not a command of CNI {version}"), ""));
    }
    let socket = config.get("agentSocket").and_then(Value::as_str).unwrap_or(DEFAULT_AGENT_SOCKET).to_string();
    let require = |name: &str| {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| CniError::new(4, format!("{name} is not set"), ""))
    };
    let excluded = || {
        let namespace = cni_arg(&env, "K8S_POD_NAMESPACE");
        let listed = |n: &str| namespace.as_deref() == Some(n);
        match config.get("excludeNamespaces").and_then(Value::as_array) {
            Some(list) => list.iter().filter_map(Value::as_str).any(listed),
            None => DEFAULT_EXCLUDED_NAMESPACES.iter().copied().any(listed),
        }
    };
    match command.as_str() {
        "ADD" | "CHECK" if excluded() => {
            require("CNI_CONTAINERID")?;
            require("CNI_IFNAME")?;
            let prev_result =
                (command == "ADD").then(|| config.get("prevResult").cloned().unwrap_or_else(|| json!({})));
            Ok(Invocation::Excluded { version: version.to_string(), prev_result })
        }
        "ADD" => {
            let pod = pod_network(&env, &config, require("CNI_CONTAINERID")?, require("CNI_NETNS")?)?;
            require("CNI_IFNAME")?;
            let prev_result = config.get("prevResult").cloned().unwrap_or_else(|| json!({}));
            Ok(Invocation::Add { socket, pod, version: version.to_string(), prev_result })
        }
        "DEL" => {
            let container_id = require("CNI_CONTAINERID")?;
            require("CNI_IFNAME")?;
            Ok(Invocation::Del { socket, container_id, netns: env("CNI_NETNS") })
        }
        "CHECK" => {
            let container_id = require("CNI_CONTAINERID")?;
            require("CNI_NETNS")?;
            require("CNI_IFNAME")?;
            Ok(Invocation::Check { socket, container_id })
        }
        "STATUS" => Ok(Invocation::Status { socket }),
        "GC" => Ok(Invocation::Gc),
        other => Err(CniError::new(
            4,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// Runs one plugin invocation. `env` looks up `CNI_*` variables; `stdin` is the network configuration.
/// Returns what to print on success (nothing for DEL and CHECK).
pub fn run(env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let unreachable = |e| CniError::new(11, "nodemesh agent is not reachable; try again later", e);
    match parse(env, stdin)? {
        Invocation::Version => {
            Ok(Some(json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })))
        }
        Invocation::Add { socket, pod, version, mut prev_result } => {
            let response = ask_agent(&socket, &AgentRequest::Add(pod)).map_err(unreachable)?;
            if let Some(e) = response.error {
                return Err(CniError::new(e.code, e.msg, e.details));
            }
            prev_result["cniVersion"] = json!(version);
            Ok(Some(prev_result))
        }
        Invocation::Del { socket, container_id, netns } => {
            // DEL must not block pod teardown: when the agent is down it cleans up on re-adoption instead.
            if let Ok(response) = ask_agent(&socket, &AgentRequest::Del { container_id, netns }) {
                if let Some(e) = response.error {
                    return Err(CniError::new(e.code, e.msg, e.details));
                }
            }
            Ok(None)
        }
        Invocation::Check { socket, container_id } => {
            let response = ask_agent(&socket, &AgentRequest::Check { container_id }).map_err(unreachable)?;
            match response.error {
                Some(e) => Err(CniError::new(e.code, e.msg, e.details)),
                None => Ok(None),
            }
        }
        Invocation::Status { socket } => {
            // 50: "the plugin is not available" — the runtime holds pod creation until it is.
            let not_available = |e: std::io::Error| CniError::new(50, "nodemesh agent is not reachable", e);
            match ask_agent(&socket, &AgentRequest::Status).map_err(not_available)?.error {
                Some(e) => Err(CniError::new(50, e.msg, e.details)),
                None => Ok(None),
            }
        }
        Invocation::Gc => Ok(None),
        Invocation::Excluded { version, prev_result } => Ok(prev_result.map(|mut result| {
            result["cniVersion"] = json!(version);
            result
        })),
    }
}

fn pod_network(
    env: &impl Fn(&str) -> Option<String>,
    config: &Value,
    container_id: String,
    netns: String,
) -> Result<PodNetwork, CniError> {
    let args = env("CNI_ARGS").unwrap_or_default();
    let arg = |key: &str| cni_arg(env, key);
    let namespace =
        arg("K8S_POD_NAMESPACE").ok_or_else(|| CniError::new(4, "CNI_ARGS has no K8S_POD_NAMESPACE", &args))?;
    let name = arg("K8S_POD_NAME").ok_or_else(|| CniError::new(4, "CNI_ARGS has no K8S_POD_NAME", &args))?;
    let prev = config.get("prevResult").ok_or_else(|| {
        CniError::new(7, "no prevResult", "nodemesh-cni is a chained plugin: list it after the main plugin")
    })?;
    let mut ips = Vec::new();
    for entry in prev.get("ips").and_then(Value::as_array).into_iter().flatten() {
        let address = entry.get("address").and_then(Value::as_str).unwrap_or("");
        let ip: IpAddr = address
            .split('/')
            .next()
            .unwrap_or("")
            .parse()
            .map_err(|_| CniError::new(7, "prevResult has an invalid IP address", address))?;
        ips.push(ip);
    }
    Ok(PodNetwork { container_id, netns, namespace, name, uid: arg("K8S_POD_UID"), ips })
}

/// One `KEY=value` of `CNI_ARGS`.
fn cni_arg(env: &impl Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    let args = env("CNI_ARGS")?;
    args.split(';').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
}

fn ask_agent(socket: &str, request: &AgentRequest) -> std::io::Result<AgentResponse> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {socket}: {e}")))?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer from agent: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap().unwrap();
        assert_eq!(out["supportedVersions"].as_array().unwrap().len(), SUPPORTED_VERSIONS.len());
    }

    #[test]
    fn bad_input_gets_spec_error_codes() {
        assert_eq!(run(env(&[]), b"{}").unwrap_err().code, 4);
        assert_eq!(run(env(&[("CNI_COMMAND", "ADD")]), b"not json").unwrap_err().code, 6);
        assert_eq!(run(env(&[("CNI_COMMAND", "ADD")]), br#"{"cniVersion":"9.9.9"}"#).unwrap_err().code, 1);
        let e = run(env(&[("CNI_COMMAND", "ADD")]), br#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (4, "CNI_CONTAINERID is not set"));
        assert_eq!(run(env(&[("CNI_COMMAND", "BOGUS")]), br#"{"cniVersion":"1.0.0"}"#).unwrap_err().code, 4);
    }

    #[test]
    fn pods_of_excluded_namespaces_never_wait_for_the_agent() {
        let vars = |command: &'static str, namespace: &'static str| {
            let args: &'static str = if namespace == "kube-system" {
                "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"
            } else {
                "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1"
            };
            env(&[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", args),
            ])
        };
        let config = |exclude: &str| {
            format!(
                r#"{{"cniVersion":"0.4.0","agentSocket":"/nonexistent/nodemesh.sock"{exclude},"prevResult":{{"cniVersion":"0.4.0","ips":[{{"version":"4","address":"10.0.0.2/24"}}]}}}}"#
            )
        };
        // No agent listens: kube-system (excluded by default, like nodemesh-system) passes, its previous result in
        // the config's version.
        let added = run(vars("ADD", "kube-system"), config("").as_bytes()).unwrap().unwrap();
        assert_eq!(added["ips"][0]["address"], "10.0.0.2/24");
        assert_eq!(added["cniVersion"], "0.4.0");
        assert_eq!(run(vars("CHECK", "kube-system"), config("").as_bytes()).unwrap(), None);
        // Other namespaces ask the agent; an explicit list replaces the default (empty: none excluded).
        assert_eq!(run(vars("ADD", "shop"), config("").as_bytes()).unwrap_err().code, 11);
        let shop_excluded = config(r#","excludeNamespaces":["shop"]"#);
        assert!(run(vars("ADD", "shop"), shop_excluded.as_bytes()).unwrap().is_some());
        assert_eq!(run(vars("ADD", "kube-system"), shop_excluded.as_bytes()).unwrap_err().code, 11);
        let none = config(r#","excludeNamespaces":[]"#);
        assert_eq!(run(vars("ADD", "kube-system"), none.as_bytes()).unwrap_err().code, 11);
    }

    #[test]
    fn each_version_gets_the_commands_it_has() {
        let socket = r#""agentSocket":"/nonexistent/nodemesh.sock""#;
        let config = |v: &str| format!(r#"{{"cniVersion":"{v}",{socket}}}"#);
        let call = |command: &str, v: &str| {
            run(
                env(&[("CNI_COMMAND", command), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/x"), ("CNI_IFNAME", "e")]),
                config(v).as_bytes(),
            )
        };
        // CHECK came with 0.4.0, STATUS and GC with 1.1.0: asked of an older version, the command is refused.
        assert_eq!(call("CHECK", "0.3.1").unwrap_err().code, 4);
        assert_eq!(call("STATUS", "1.0.0").unwrap_err().code, 4);
        assert_eq!(call("GC", "1.0.0").unwrap_err().code, 4);
        // 1.1.0: GC has nothing to collect; STATUS with no agent listening is "not available".
        assert_eq!(call("GC", "1.1.0").unwrap(), None);
        assert_eq!(call("STATUS", "1.1.0").unwrap_err().code, 50);
        assert_eq!(call("CHECK", "1.1.0").unwrap_err().code, 11, "known command, agent down");
        let version = run(env(&[("CNI_COMMAND", "VERSION")]), b"").unwrap().unwrap();
        assert_eq!(version["cniVersion"], "1.1.0");
    }

    #[test]
    fn pod_identity_comes_from_cni_args_and_prev_result() {
        let vars = env(&[("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u-1")]);
        let config = json!({"prevResult": {"ips": [{"address": "10.1.0.5/24"}, {"address": "fd00::5/64"}]}});
        let pod = pod_network(&vars, &config, "c1".into(), "/run/netns/x".into()).unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_deref()), ("shop", "cart-1", Some("u-1")));
        assert_eq!(pod.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        let missing = pod_network(&vars, &json!({}), "c1".into(), "/x".into()).unwrap_err();
        assert_eq!(missing.code, 7);
    }

    #[test]
    fn agent_down_is_try_again_later_for_add_and_ignored_for_del() {
        let config = br#"{"cniVersion":"1.0.0","agentSocket":"/nonexistent/nodemesh.sock","prevResult":{"ips":[{"address":"10.0.0.2/24"}]}}"#;
        let add = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b"),
        ]);
        assert_eq!(run(add, config).unwrap_err().code, 11);
        let del = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(run(del, config).unwrap(), None);
    }
}
