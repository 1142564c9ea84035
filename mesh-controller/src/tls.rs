//! TLS on the agents' channel to the controller. The controller serves with a certificate from its own CA (the
//! one that signs workload certificates, whose root every agent already needs), renewed at half-life; agents
//! verify it against that root and the name they dialled, so their tokens and the config never cross the network
//! in the clear.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_agent::identity::{CaError, CertificateAuthority, LocalCa, crypto_provider};
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a serving certificate lives; a new one is issued at half-life.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A client that has not finished its handshake by then is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The controller's serving certificate, swapped in place when renewed.
pub struct ServingCert {
    ca: Arc<LocalCa>,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").field("dns_names", &self.dns_names).field("ips", &self.ips).finish()
    }
}

impl ServingCert {
    pub fn new(ca: Arc<LocalCa>, dns_names: Vec<String>, ips: Vec<IpAddr>) -> Result<Arc<Self>, TlsError> {
        let first = issue(&ca, &dns_names, &ips)?;
        Ok(Arc::new(ServingCert { ca, dns_names, ips, current: RwLock::new(first) }))
    }

    /// Renews the certificate at half-life for as long as the controller runs.
    pub fn spawn_renewal(self: &Arc<Self>) {
        let cert = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LIFETIME / 2).await;
                match issue(&cert.ca, &cert.dns_names, &cert.ips) {
                    Ok(fresh) => *cert.current.write().unwrap_or_else(|p| p.into_inner()) = fresh,
                    // The old certificate still has half its life: try again in a minute.
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the controller's serving certificate");
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            }
        });
    }

    /// A TLS 1.3 server config offering HTTP/2 (gRPC) with this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The CA's root certificates as PEM: what agents verify workload certificates and the controller with.
pub fn roots_pem(ca: &dyn CertificateAuthority) -> String {
    let blocks: Vec<pem::Pem> =
        ca.trust_bundle().iter().map(|der| pem::Pem::new("CERTIFICATE", der.to_vec())).collect();
    pem::encode_many(&blocks)
}

fn issue(ca: &LocalCa, dns_names: &[String], ips: &[IpAddr]) -> Result<Arc<CertifiedKey>, TlsError> {
    let (chain, key) = ca.issue_server_cert(dns_names, ips, LIFETIME)?;
    let key = crypto_provider().key_provider.load_private_key(PrivateKeyDer::Pkcs8(key))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

/// A connection whose handshake is done, as tonic's server takes it.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and completes each handshake on its own task, so one slow or bad client holds up no
/// other; finished connections come out of the stream.
pub fn incoming(listener: TcpListener, config: Arc<ServerConfig>) -> ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while !tx.is_closed() {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an agent connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let info = TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: Some(peer) };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(TlsConnection { stream, info })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake with a would-be agent failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
