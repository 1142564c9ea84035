//! An HBONE client that presents whatever certificate a test gives it, to check what the destination agent
//! accepts. It opens its TCP connection from inside a pod's netns, like a peer agent would.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Method, Request, Version};
use mesh_agent::identity::Identity;
use mesh_agent::identity::ca::{new_root, svid_params};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// A certificate and key to present.
pub struct ProbeCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

fn sign(params: CertificateParams, issuer: &rcgen::Certificate, issuer_key: &KeyPair) -> Result<ProbeCert> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer, issuer_key)?;
    Ok(ProbeCert {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// An SVID for `identity` signed by the CA in `ca_dir`, after `edit` (to break it on purpose).
pub fn from_ca(ca_dir: &Path, identity: &Identity, edit: impl FnOnce(&mut CertificateParams)) -> Result<ProbeCert> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key"))?)?;
    let pem = std::fs::read_to_string(ca_dir.join("ca.crt"))?;
    let issuer = CertificateParams::from_ca_cert_pem(&pem)?.self_signed(&key)?;
    let now = time::OffsetDateTime::now_utc();
    let mut params = svid_params(identity, now - time::Duration::minutes(1), now + time::Duration::hours(1))?;
    edit(&mut params);
    sign(params, &issuer, &key)
}

/// A valid-looking SVID from a CA nobody trusts.
pub fn from_foreign_ca(identity: &Identity) -> Result<ProbeCert> {
    let (root, root_key) = new_root("cluster.local", Duration::from_secs(3600))?;
    let now = time::OffsetDateTime::now_utc();
    sign(svid_params(identity, now, now + time::Duration::hours(1))?, &root, &root_key)
}

/// Opens an HBONE stream to `gateway` (a pod's 15008) for `authority`, from inside `netns`, presenting `cert`.
/// Returns the CONNECT status and, for 200, the first line the application sent back.
pub fn connect(netns: &str, gateway: SocketAddr, authority: SocketAddr, cert: ProbeCert) -> Result<(u16, String)> {
    connect_with(netns, gateway, authority, cert, (&[], b"")).map(|answer| (answer.status, answer.first_line))
}

/// What the server answered a probe's CONNECT.
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    /// For 200, the first line the application sent back.
    pub first_line: String,
}

/// [`connect`] with `headers` on the CONNECT (what ztunnel sends: `baggage`, ...) and, once it is answered 200,
/// `payload` sent in the tunnel before the first line is read (an HTTP request, for a server that speaks only
/// when asked); returns the answer's headers too.
pub fn connect_with(
    netns: &str,
    gateway: SocketAddr,
    authority: SocketAddr,
    cert: ProbeCert,
    (headers, payload): (&[(&'static str, &str)], &[u8]),
) -> Result<Answer> {
    let headers: Vec<(&'static str, String)> = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let payload = bytes::Bytes::copy_from_slice(payload);
    let tcp =
        crate::sys::in_netns(netns, move || std::net::TcpStream::connect_timeout(&gateway, Duration::from_secs(5)))??;
    tcp.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        tokio::time::timeout(Duration::from_secs(10), async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let mut config =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAny))
                    .with_client_auth_cert(cert.chain, cert.key)?;
            config.alpn_protocols = vec![b"h2".to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(gateway.ip().into()), tcp)
                .await
                .context("TLS")?;
            let (sender, connection) = h2::client::handshake(tls).await.context("HTTP/2 handshake")?;
            tokio::spawn(connection);
            let mut sender = sender.ready().await.context("HTTP/2 ready")?;
            let mut request =
                Request::builder().method(Method::CONNECT).uri(authority.to_string()).version(Version::HTTP_2);
            for (name, value) in &headers {
                request = request.header(*name, value);
            }
            let request = request.body(())?;
            let (response, mut send) = sender.send_request(request, false).context("CONNECT")?;
            let response = response.await.context("CONNECT response")?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            if status != 200 {
                return Ok(Answer { status, headers, first_line: String::new() });
            }
            if !payload.is_empty() {
                send.send_data(payload, false).context("tunnel data out")?;
            }
            let mut body = response.into_body();
            let first = body.data().await.context("tunnel closed")?.context("tunnel data")?;
            let first_line = String::from_utf8_lossy(&first).lines().next().unwrap_or("").to_string();
            Ok(Answer { status, headers, first_line })
        })
        .await
        .unwrap_or_else(|_| bail!("probe timed out"))
    })
}

/// The probe checks the server side only; it trusts whatever the server presents.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}
