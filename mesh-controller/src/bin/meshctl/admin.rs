//! Reading an agent's admin API (`proxy-config`), and the small HTTP client every command uses.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::output::{self, Format};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The agents' namespace, pod label and admin port in a Kubernetes install (manifests/).
const NAMESPACE: &str = "nodemesh-system";
const AGENT_SELECTOR: &str = "app=nodemesh-agent";
const ADMIN_PORT: u16 = 15000;

/// An agent's admin API: at an address, or the agent pod of a node reached through the Kubernetes API's
/// port-forward.
pub enum Agent {
    Direct(String),
    Node(String),
}

impl std::fmt::Display for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Agent::Direct(addr) => write!(f, "{addr}"),
            Agent::Node(node) => write!(f, "the agent on node {node}"),
        }
    }
}

/// `GET path` over `io` (HTTP/1.1): the status and body.
async fn request<I>(io: I, host: &str, path: &str) -> anyhow::Result<(u16, String)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path).header(hyper::header::HOST, host).body(Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `GET http://addr/path`: the status and body.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        request(stream, addr, path).await
    };
    tokio::time::timeout(TIMEOUT, work).await.with_context(|| format!("{addr}{path}: no answer in {TIMEOUT:?}"))?
}

/// The agent pods of a Kubernetes install: (node, pod name), and the API to reach them.
pub async fn agent_pods(
    client: kube::Client,
) -> anyhow::Result<(kube::Api<k8s_openapi::api::core::v1::Pod>, Vec<(String, String)>)> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let list = pods.list(&ListParams::default().labels(AGENT_SELECTOR)).await.context("listing agent pods")?;
    let agents = list.items.into_iter().filter_map(|p| Some((p.spec?.node_name?, p.metadata.name?))).collect();
    Ok((pods, agents))
}

/// `GET path` from `port` of agent pod `name`, through the API server's port-forward.
pub async fn get_through_pod(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let work = async {
        let mut forward = pods.portforward(name, &[port]).await.with_context(|| format!("port-forward to {name}"))?;
        let stream = forward.take_stream(port).context("the port-forward has no stream")?;
        let answer = request(stream, "localhost", path).await;
        forward.abort();
        answer
    };
    tokio::time::timeout(TIMEOUT, work).await.with_context(|| format!("pod {name}{path}: no answer in {TIMEOUT:?}"))?
}

/// `GET path` from the admin API of the agent pod on `node`, through a port-forward.
async fn get_from_node(node: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let client =
        kube::Client::try_default().await.context("--node needs Kubernetes access (in-cluster or KUBECONFIG)")?;
    let (pods, agents) = agent_pods(client).await?;
    let name = agents
        .into_iter()
        .find_map(|(n, pod)| (n == node).then_some(pod))
        .with_context(|| format!("no {AGENT_SELECTOR} pod in {NAMESPACE} runs on node {node}"))?;
    get_through_pod(&pods, &name, ADMIN_PORT, path).await
}

/// `GET` of an admin endpoint that answers JSON.
pub async fn get_json(agent: &Agent, path: &str) -> anyhow::Result<Value> {
    let (status, body) = match agent {
        Agent::Direct(addr) => get(addr, path).await?,
        Agent::Node(node) => get_from_node(node, path).await?,
    };
    if status != 200 {
        bail!("{agent}{path} answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{agent}{path} did not answer JSON"))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    Workloads,
    Services,
    Routes,
    Certs,
    Dump,
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn unix_time(v: &Value) -> String {
    v.as_i64()
        .and_then(|t| u64::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string())
        .unwrap_or_else(|| "-".into())
}

/// A list that config leaves out when empty.
fn list(v: &Value) -> Value {
    if v.is_null() { Value::Array(Vec::new()) } else { v.clone() }
}

pub async fn proxy_config(format: Format, what: What, agent: &Agent) -> anyhow::Result<bool> {
    let (path, pick): (&str, fn(Value) -> Value) = match what {
        What::Workloads => ("/workloads", |v| v),
        What::Services => ("/services", |v| v),
        What::Routes => ("/config_dump", |v| list(&v["config"]["routes"])),
        What::Certs => ("/certs", |v| list(&v["certificates"])),
        What::Dump => ("/config_dump", |v| v),
    };
    let value = pick(get_json(agent, path).await?);
    if output::structured(format, &value)? {
        return Ok(true);
    }
    let items = value.as_array().cloned().unwrap_or_default();
    match what {
        What::Workloads => output::table(
            &["NAMESPACE", "NAME", "IPS", "IDENTITY"],
            &items
                .iter()
                .map(|w| {
                    let ips: Vec<String> = w["ips"].as_array().into_iter().flatten().map(s).collect();
                    vec![s(&w["namespace"]), s(&w["name"]), ips.join(","), s(&w["identity"])]
                })
                .collect::<Vec<_>>(),
        ),
        What::Services => output::table(
            &["NAMESPACE", "NAME", "IPS", "PORTS", "ENDPOINTS"],
            &items
                .iter()
                .map(|v| {
                    let ips: Vec<String> = v["ips"].as_array().into_iter().flatten().map(s).collect();
                    let ports: Vec<String> =
                        v["ports"].as_array().into_iter().flatten().map(|p| s(&p["port"])).collect();
                    let endpoints = v["endpoints"].as_array().map_or(0, Vec::len);
                    vec![s(&v["namespace"]), s(&v["name"]), ips.join(","), ports.join(","), endpoints.to_string()]
                })
                .collect::<Vec<_>>(),
        ),
        What::Routes => output::table(
            &["NAMESPACE", "NAME", "KIND", "PARENTS", "RULES"],
            &items
                .iter()
                .map(|r| {
                    let parents: Vec<String> = r["parents"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| format!("{}/{}", s(&p["namespace"]), s(&p["name"])))
                        .collect();
                    let rules = r["rules"].as_array().map_or(0, Vec::len);
                    vec![s(&r["namespace"]), s(&r["name"]), s(&r["kind"]), parents.join(","), rules.to_string()]
                })
                .collect::<Vec<_>>(),
        ),
        What::Certs => output::table(
            &["IDENTITY", "SERIAL", "NOT AFTER", "PODS"],
            &items
                .iter()
                .map(|c| vec![s(&c["identity"]), s(&c["serial"]), unix_time(&c["notAfter"]), s(&c["users"])])
                .collect::<Vec<_>>(),
        ),
        What::Dump => println!("{}", serde_json::to_string_pretty(&value)?),
    }
    Ok(true)
}
