//! Telling an uninstall from a restart when the agent stops. A rolling update or a node drain must leave the
//! chained CNI plugin in place (new pods wait for the next agent instead of escaping capture), but after
//! `kubectl delete -k manifests/` the entry must go, or no pod could start on the node again. The difference is
//! visible in the API: the agent's DaemonSet is gone or being deleted. The agent asks with its own
//! service-account token (it may `get` that one DaemonSet, nothing else) and removes the CNI entry and its
//! pins only when the answer is clear; any doubt (API unreachable, an error) keeps them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the agent's own DaemonSet lives in the API.
pub struct OwnDaemonSet {
    /// `https://host:port` (in cluster) or `http://host:port` (tests).
    pub api: String,
    pub namespace: String,
    pub name: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl OwnDaemonSet {
    /// `api` or the in-cluster address (`KUBERNETES_SERVICE_HOST`/`_PORT`); `token_file` or the mounted
    /// service-account token. `None` without an API address.
    pub fn locate(api: Option<&str>, namespace: &str, name: &str, token_file: Option<&Path>) -> Option<Self> {
        let api = api.map(String::from).or_else(|| {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            Some(format!("https://{host}:{port}"))
        })?;
        let dir = Path::new(SA_DIR);
        Some(OwnDaemonSet {
            api,
            namespace: namespace.into(),
            name: name.into(),
            token_file: token_file.map_or_else(|| dir.join("token"), Path::to_path_buf),
            ca_file: dir.join("ca.crt"),
        })
    }
}

/// What the API said about the DaemonSet.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Gone, or has a deletion timestamp: nodemesh is being uninstalled.
    Uninstalling,
    /// Still there: a restart, an upgrade or a drain.
    Staying,
}

async fn get<I>(io: I, host: &str, path: &str, token: &str) -> anyhow::Result<(u16, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// Asks the API server about the agent's DaemonSet.
pub async fn check(ds: &OwnDaemonSet) -> anyhow::Result<Verdict> {
    let url: hyper::Uri = ds.api.parse()?;
    let host = url.host().ok_or_else(|| anyhow::anyhow!("no host in {}", ds.api))?.trim_matches(['[', ']']).to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let token = std::fs::read_to_string(&ds.token_file)?;
    let path = format!("/apis/apps/v1/namespaces/{}/daemonsets/{}", ds.namespace, ds.name);
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        if !https {
            return get(tcp, &host, &path, &token).await;
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&ds.ca_file)? {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::identity::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        get(tls, &host, &path, &token).await
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, work).await??;
    match status {
        404 => Ok(Verdict::Uninstalling),
        200 => {
            let object: serde_json::Value = serde_json::from_slice(&body)?;
            Ok(if object["metadata"]["deletionTimestamp"].is_string() {
                Verdict::Uninstalling
            } else {
                Verdict::Staying
            })
        }
        other => anyhow::bail!("the API server answered {other}: {}", String::from_utf8_lossy(&body)),
    }
}
