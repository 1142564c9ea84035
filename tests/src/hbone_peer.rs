//! An HBONE server that is not a nodemesh agent: what Istio's ztunnel (or any other implementation) does at its
//! core, written with h2 and rustls only. TLS 1.3 with a client certificate that must chain to the mesh's root,
//! ALPN `h2`, a `CONNECT` per tunnel whose `:authority` is dialled over TCP and answered `200` (or `503` when
//! the dial fails), then the stream's bytes relayed both ways unchanged. It knows nothing of nodemesh's own
//! headers, so a calling agent that needs it to understand them fails visibly.
//!
//! Each CONNECT's request headers are printed as one JSON line (`{"connect": AUTHORITY, "headers": {..},
//! "keyExchange": GROUP}`, the TLS key exchange group of its connection) so a test can see what travelled on it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use mesh_agent::identity::Identity;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the peer behaves beyond plain HBONE.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Every client certificate is refused (clients must chain to a root nobody has), as by a peer of another mesh.
    pub refuse_clients: bool,
    pub key_exchange: KeyExchange,
}

/// The key exchange groups the peer accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyExchange {
    /// rustls' defaults (aws-lc-rs: X25519MLKEM768 first, classical after).
    #[default]
    Any,
    /// X25519MLKEM768 only, as ztunnel with `COMPLIANCE_POLICY=pqc`.
    PostQuantumOnly,
    /// No post-quantum group (ring), as an older peer.
    ClassicalOnly,
}

/// Serves HBONE on `listener` as `identity`, with a certificate signed by the CA in `ca_dir`, until the
/// process ends. Clients must chain to that CA's root (see [`Behaviour`]).
pub async fn serve(listener: TcpListener, ca_dir: &Path, identity: &Identity, behaviour: Behaviour) -> Result<()> {
    let cert = crate::probe::from_ca(ca_dir, identity, |_| {})?;
    let root = if behaviour.refuse_clients {
        let (foreign, _) = mesh_agent::identity::ca::new_root("elsewhere.local", std::time::Duration::from_secs(3600))?;
        foreign.der().clone()
    } else {
        CertificateDer::from_pem_file(ca_dir.join("ca.crt")).context("reading the mesh root")?
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let provider = Arc::new(match behaviour.key_exchange {
        KeyExchange::Any => rustls::crypto::aws_lc_rs::default_provider(),
        KeyExchange::PostQuantumOnly => rustls::crypto::CryptoProvider {
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
            ..rustls::crypto::aws_lc_rs::default_provider()
        },
        KeyExchange::ClassicalOnly => rustls::crypto::ring::default_provider(),
    });
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("client verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain, cert.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(acceptor, tcp).await {
                eprintln!("hbone-peer: connection from {peer}: {e:#}");
            }
        });
    }
}

async fn connection(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Result<()> {
    let tls = acceptor.accept(tcp).await.context("TLS")?;
    let group = tls.get_ref().1.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()));
    let group: Arc<str> = group.unwrap_or_default().into();
    let mut conn = h2::server::handshake(tls).await.context("HTTP/2 handshake")?;
    while let Some(stream) = conn.accept().await {
        let (request, respond) = stream.context("HTTP/2")?;
        let group = group.clone();
        tokio::spawn(async move {
            if let Err(e) = tunnel(request, respond, &group).await {
                eprintln!("hbone-peer: tunnel: {e:#}");
            }
        });
    }
    Ok(())
}

async fn tunnel(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    key_exchange: &str,
) -> Result<()> {
    let headers: serde_json::Map<String, serde_json::Value> =
        request.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into())).collect();
    let authority = request.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    println!("{}", serde_json::json!({"connect": authority, "headers": headers, "keyExchange": key_exchange}));
    let target: Option<SocketAddr> = authority.parse().ok();
    let app = match (request.method() == Method::CONNECT, target) {
        (true, Some(target)) => TcpStream::connect(target).await.ok(),
        _ => None,
    };
    let Some(app) = app else {
        let refusal = Response::builder().status(StatusCode::SERVICE_UNAVAILABLE).body(())?;
        respond.send_response(refusal, true)?;
        return Ok(());
    };
    let mut send = respond.send_response(Response::new(()), false)?;
    let mut recv = request.into_body();
    let (mut app_read, mut app_write) = app.into_split();
    let upstream = async move {
        while let Some(data) = recv.data().await {
            let data = data?;
            let _ = recv.flow_control().release_capacity(data.len());
            app_write.write_all(&data).await?;
        }
        app_write.shutdown().await?;
        anyhow::Ok(())
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = app_read.read(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true)?;
                return anyhow::Ok(());
            }
            // h2 queues what exceeds the peer's window; a test's responses are small.
            send.send_data(Bytes::copy_from_slice(&buf[..n]), false)?;
        }
    };
    let (up, down) = tokio::join!(upstream, downstream);
    up.and(down)
}
