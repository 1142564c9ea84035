//! The gRPC channel to the controller: TLS (`https://`) verified against the mesh's root certificate and the
//! name or address dialled, or plaintext (`http://`) where the operator chose it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A lazily connecting channel to `url`. `https://` needs `ca_file`, the PEM root(s) the controller's certificate
/// must chain to (in Kubernetes the `nodemesh-ca-root` ConfigMap; with a directory CA its `ca.crt` or
/// `root.crt`).
pub fn channel(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("controller address {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    match endpoint.uri().scheme_str() {
        Some("https") => {
            let ca_file = ca_file.context("an https:// controller needs --controller-ca (its root certificate)")?;
            Ok(endpoint.connect_with_connector_lazy(TlsConnector { config: client_config(ca_file)? }))
        }
        Some("http") => {
            tracing::warn!(controller = url, "plaintext channel to the controller: the agent's token travels in clear");
            Ok(endpoint.connect_lazy())
        }
        _ => bail!("controller address {url:?}: expected https://HOST:PORT (or http:// for plaintext)"),
    }
}

fn client_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read_to_string(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::identity::ca::pem_certs(&pem, &ca_file.display().to_string())? {
        roots.add(cert).with_context(|| format!("a root certificate in {}", ca_file.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::identity::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Opens TCP, then TLS to the host of the URI, for tonic.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("controller URI without a host")?.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(443))).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
