//! rustls certificate verifiers for SPIFFE peers: chain validation against the trust bundle (rustls-webpki),
//! then the X.509-SVID rules, then that the peer's trust domain is one of the mesh's (a root may sign for several
//! trust domains; chaining to it is not membership), then — for a server — that the peer is the workload we
//! meant to reach. Peer
//! certificates carry no DNS names, so rustls' hostname-based verifier does not apply.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme};

use super::Identity;
use super::svid::{self, Svid};

/// The roots peers must chain to, and the trust domains their SVIDs may name. Shared by every verifier and
/// replaceable at run time.
pub struct TrustBundle {
    anchors: RwLock<Arc<Vec<TrustAnchor<'static>>>>,
    /// None until the first config names them: until then every peer is refused.
    trust_domains: RwLock<Vec<String>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.anchors().len())
    }
}

impl TrustBundle {
    pub fn new(roots: &[CertificateDer<'_>]) -> Result<Self, webpki::Error> {
        let bundle = TrustBundle { anchors: RwLock::new(Arc::new(Vec::new())), trust_domains: Default::default() };
        bundle.set(roots)?;
        Ok(bundle)
    }

    /// Replaces the roots; connections already established are unaffected.
    pub fn set(&self, roots: &[CertificateDer<'_>]) -> Result<(), webpki::Error> {
        let anchors = roots
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        *self.anchors.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(anchors);
        Ok(())
    }

    /// The mesh's trust domain and its aliases (from the config in force); the next handshakes check them.
    pub fn set_trust_domains(&self, domains: Vec<String>) {
        *self.trust_domains.write().unwrap_or_else(|p| p.into_inner()) = domains;
    }

    fn accepts(&self, trust_domain: &str) -> bool {
        self.trust_domains.read().unwrap_or_else(|p| p.into_inner()).iter().any(|d| d == trust_domain)
    }

    fn anchors(&self) -> Arc<Vec<TrustAnchor<'static>>> {
        self.anchors.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Chain validation plus SVID rules.
    pub fn verify(
        &self,
        provider: &CryptoProvider,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<Svid, Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let anchors = self.anchors();
        cert.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let svid = svid::check(end_entity).map_err(other)?;
        if !self.accepts(&svid.identity.trust_domain) {
            return Err(other(ForeignTrustDomain { identity: svid.identity }));
        }
        Ok(svid)
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// A peer whose SVID is in none of the mesh's trust domains.
#[derive(Debug, thiserror::Error)]
#[error("peer {identity} is outside the mesh's trust domains")]
pub struct ForeignTrustDomain {
    pub identity: Identity,
}

impl ForeignTrustDomain {
    /// The refusal inside a failed handshake's error, when that is why it failed (this side refused the peer).
    pub fn cause_of(e: &std::io::Error) -> Option<&ForeignTrustDomain> {
        match e.get_ref()?.downcast_ref::<Error>()? {
            Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref(),
            _ => None,
        }
    }
}

/// Both verifiers speak TLS 1.3 only.
fn tls12_refused() -> Result<HandshakeSignatureValid, Error> {
    Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
}

fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider.signature_verification_algorithms)
}

fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// Client side of HBONE: the server must hold an SVID from our trust bundle and, when known, be `expected`.
#[derive(Debug)]
pub struct SvidServerVerifier {
    pub bundle: Arc<TrustBundle>,
    pub provider: Arc<CryptoProvider>,
    pub expected: Option<Identity>,
}

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let svid =
            self.bundle.verify(&self.provider, end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        match &self.expected {
            Some(expected) if *expected != svid.identity => {
                Err(other(WrongPeer { expected: expected.clone(), got: svid.identity }))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {expected}")]
pub struct WrongPeer {
    pub expected: Identity,
    pub got: Identity,
}

/// Server side of HBONE: every client must present an SVID from our trust bundle.
#[derive(Debug)]
pub struct SvidClientVerifier {
    pub bundle: Arc<TrustBundle>,
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.bundle.verify(&self.provider, end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
