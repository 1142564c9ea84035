//! Who signs workload certificates. The agent builds a CSR for a key it generated and asks a
//! [`CertificateAuthority`]; today that is [`LocalCa`] (a CA key and certificate in a directory), later the
//! controller's CA service implements the same trait.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};

use super::Identity;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Present when `ca.crt` is an intermediate: the roots peers are verified against.
pub const ROOT_CERT: &str = "root.crt";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {0}: {1}")]
    Io(String, std::io::Error),
    #[error("bad CA material in {0}: {1}")]
    Material(String, String),
    #[error("cannot sign a certificate for {0}: {1}")]
    Sign(String, String),
}

pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, CaError>> + Send + 'a>>;

pub trait CertificateAuthority: Send + Sync + 'static {
    /// Signs `csr` for `identity`. Returns the chain, leaf first. The CA decides the certificate's contents
    /// (SPIFFE ID, usages, lifetime); it only takes the public key from the CSR.
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: CertificateSigningRequestDer<'a>,
        lifetime: Duration,
    ) -> SignFuture<'a>;

    /// Root certificates peers' chains must lead to.
    fn trust_bundle(&self) -> Vec<CertificateDer<'static>>;
}

/// A CA whose key sits in a directory (`ca.key`, `ca.crt`, optional `root.crt`).
pub struct LocalCa {
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    /// Sent after the leaf: the issuing certificate when it is an intermediate.
    intermediates: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
}

fn read(dir: &Path, name: &str) -> Result<String, CaError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| CaError::Io(path.display().to_string(), e))
}

/// The CERTIFICATE blocks of a PEM text (`origin` names it in errors).
pub fn pem_certs(pem: &str, origin: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile_certs(pem);
    if certs.is_empty() {
        return Err(CaError::Material(origin.to_string(), "no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Minimal PEM reader for CERTIFICATE blocks (x509-parser does the decoding).
fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.contents))
        .collect()
}

impl LocalCa {
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let root = match read(dir, ROOT_CERT) {
            Ok(root_pem) => Some(root_pem),
            Err(CaError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let origin = dir.display().to_string();
        LocalCa::from_pem(&read(dir, CA_CERT)?, &read(dir, CA_KEY)?, root.as_deref(), &origin)
    }

    /// From PEM texts (the files of [`LocalCa::load`], or the keys of a Kubernetes Secret); `root_pem` is given
    /// when the CA is an intermediate. `origin` names the source in errors.
    pub fn from_pem(cert_pem: &str, key_pem: &str, root_pem: Option<&str>, origin: &str) -> Result<Self, CaError> {
        let material = |e: rcgen::Error| CaError::Material(origin.to_string(), e.to_string());
        let issuer_key = KeyPair::from_pem(key_pem).map_err(material)?;
        let issuer_der = pem_certs(cert_pem, origin)?.remove(0);
        // rcgen signs with a certificate object; rebuilding it from the CA's own DN and key yields the same
        // issuer name and key identifier as the real certificate.
        let issuer = CertificateParams::from_ca_cert_der(&issuer_der)
            .map_err(material)?
            .self_signed(&issuer_key)
            .map_err(material)?;
        let (intermediates, roots) = match root_pem {
            Some(root_pem) => (vec![issuer_der], pem_certs(root_pem, origin)?),
            None => (Vec::new(), vec![issuer_der]),
        };
        Ok(LocalCa { issuer, issuer_key, intermediates, roots })
    }

    /// Creates a new self-signed root CA in `dir` (`mesh-agent ca init`). Refuses to overwrite one.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
        let origin = dir.display().to_string();
        if dir.join(CA_KEY).exists() {
            return Err(CaError::Material(origin, format!("{CA_KEY} already exists; not overwriting a CA")));
        }
        std::fs::create_dir_all(dir).map_err(|e| CaError::Io(origin.clone(), e))?;
        let (cert, key) = new_root(trust_domain, Duration::from_secs(10 * 365 * 24 * 3600))
            .map_err(|e| CaError::Material(origin.clone(), e.to_string()))?;
        write_private(&dir.join(CA_KEY), &key.serialize_pem()).map_err(|e| CaError::Io(origin.clone(), e))?;
        std::fs::write(dir.join(CA_CERT), cert.pem()).map_err(|e| CaError::Io(origin, e))?;
        Ok(())
    }

    /// A TLS server certificate for `dns_names` and `ips` (the controller's own, for the agents' channel to it):
    /// the chain, leaf first, and its new key.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), CaError> {
        let fail =
            |e: rcgen::Error| CaError::Sign(format!("server certificate for {dns_names:?} {ips:?}"), e.to_string());
        let key = KeyPair::generate().map_err(fail)?;
        let sans = dns_names
            .iter()
            .map(|n| n.clone().try_into().map(SanType::DnsName))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        let (not_before, not_after) = validity(lifetime);
        let mut params = leaf_params(sans, vec![ExtendedKeyUsagePurpose::ServerAuth], not_before, not_after);
        params.distinguished_name.push(DnType::CommonName, dns_names.first().map_or("nodemesh-controller", |n| n));
        let leaf = params.signed_by(&key, &self.issuer, &self.issuer_key).map_err(fail)?;
        Ok((self.chain(leaf), PrivatePkcs8KeyDer::from(key.serialize_der())))
    }

    /// `leaf` followed by the intermediates up to (not including) the root.
    fn chain(&self, leaf: rcgen::Certificate) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        chain
    }
}

/// From a minute ago, which absorbs clock skew between nodes, for `lifetime` from now.
fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (now - time::Duration::minutes(1), now + lifetime)
}

/// An end-entity certificate nodemesh issues: no subject name of its own, `sans`, signature use, `usages`.
fn leaf_params(
    sans: Vec<SanType>,
    usages: Vec<ExtendedKeyUsagePurpose>,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}

/// A root CA certificate and key (also used by tests to make foreign CAs).
pub fn new_root(trust_domain: &str, lifetime: Duration) -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nodemesh");
    dn.push(DnType::CommonName, format!("nodemesh root CA ({trust_domain})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    Ok((params.self_signed(&key)?, key))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())
}

pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).expect("the system RNG works");
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

/// The certificate contents nodemesh issues for a workload: an X.509-SVID.
pub fn svid_params(
    identity: &Identity,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let sans = vec![SanType::URI(identity.to_string().try_into()?)];
    let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(leaf_params(sans, usages, not_before, not_after))
}

impl CertificateAuthority for LocalCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: CertificateSigningRequestDer<'a>,
        lifetime: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let fail = |e: rcgen::Error| CaError::Sign(identity.to_string(), e.to_string());
            let mut request = CertificateSigningRequestParams::from_der(&csr).map_err(fail)?;
            let (not_before, not_after) = validity(lifetime);
            request.params = svid_params(identity, not_before, not_after).map_err(fail)?;
            Ok(self.chain(request.signed_by(&self.issuer, &self.issuer_key).map_err(fail)?))
        })
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}
