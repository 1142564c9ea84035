//! The protocol between the `nodemesh-cni` plugin and the node agent: one JSON request and one JSON response,
//! each a single line, over a unix stream socket (default [`DEFAULT_AGENT_SOCKET`]).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_AGENT_SOCKET: &str = "/run/nodemesh/cni.sock";

/// A pod as the container runtime describes it to CNI plugins.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodNetwork {
    pub container_id: String,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl PodNetwork {
    /// `namespace/name`, for logs and messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "camelCase")]
pub enum AgentRequest {
    /// Capture this pod; answered only once capture is active.
    Add(PodNetwork),
    /// Stop capturing; succeeds when the pod is not (or no longer) enrolled.
    Del { container_id: String, netns: Option<String> },
    /// Is capture for this pod in place, or the pod known to be outside the mesh?
    Check { container_id: String },
    /// Can the agent take pods now (CNI 1.1 `STATUS`)? Agents before it answer with a decode error, which the
    /// plugin reports as "not available" too.
    Status,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentResponse {
    /// Whether the pod's traffic is captured after this request.
    pub captured: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AgentError>,
}

/// Failure reported back to the runtime as a CNI error result.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AgentError {
    /// CNI error code (spec section "Error"): 3 unknown container, 7 invalid config, 11 try again later,
    /// 100+ nodemesh-specific.
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}
