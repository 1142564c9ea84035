//! What a CNI invocation passes the plugin (`CNI_*` variables, then the network configuration on stdin) and what
//! the agent reads from its CNI socket: decoded without panicking, and an ADD only with a pod that has a name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::cni_plugin::{Invocation, parse};
use mesh_common::cni::AgentRequest;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<AgentRequest>(data);
    // `KEY=VALUE` lines up to an empty line are the environment; the rest is stdin.
    let split = data.windows(2).position(|w| w == b"\n\n").map_or(data.len(), |i| i + 2);
    let (env_part, stdin) = data.split_at(split.min(data.len()));
    let env_text = String::from_utf8_lossy(env_part);
    let vars: Vec<(String, String)> =
        env_text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let env = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let Ok(Invocation::Add { pod, .. }) = parse(env, stdin) {
        assert!(!pod.container_id.is_empty() && !pod.netns.is_empty());
    }
});
