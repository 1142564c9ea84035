//! Reading an agent's admin API (`proxy-config`), and the small HTTP client every command uses.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::output::{self, Format};

const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET http://addr/path`: the status and body.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path).header(hyper::header::HOST, addr).body(Empty::<Bytes>::new())?;
        let response = sender.send_request(req).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, work).await.with_context(|| format!("{addr}{path}: no answer in {TIMEOUT:?}"))?
}

/// `GET` of an admin endpoint that answers JSON.
pub async fn get_json(addr: &str, path: &str) -> anyhow::Result<Value> {
    let (status, body) = get(addr, path).await?;
    if status != 200 {
        bail!("{addr}{path} answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{addr}{path} did not answer JSON"))
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

pub async fn proxy_config(format: Format, what: What, agent: &str) -> anyhow::Result<bool> {
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
