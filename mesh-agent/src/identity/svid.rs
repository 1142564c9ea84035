//! X.509-SVID rules (SPIFFE X509-SVID §4/§5), applied to every peer certificate nodemesh accepts on top of
//! chain validation: exactly one URI SAN holding a workload SPIFFE ID, not a CA, key usage `digitalSignature`
//! in a critical extension, extended key usage allowing both `serverAuth` and `clientAuth`.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SvidError {
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("an SVID has exactly one URI SAN; this one has {0}")]
    UriSanCount(usize),
    #[error("URI SAN {0:?} is not a workload SPIFFE ID")]
    NotSpiffe(String),
    #[error("a workload certificate must not be a CA")]
    IsCa,
    #[error("key usage must be present, critical, with digitalSignature and without certificate signing")]
    KeyUsage,
    #[error("extended key usage must allow serverAuth and clientAuth")]
    ExtendedKeyUsage,
}

/// Facts about an accepted SVID, for logs and the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svid {
    pub identity: Identity,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

pub fn check(der: &CertificateDer<'_>) -> Result<Svid, SvidError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| SvidError::Parse(e.to_string()))?;
    let parse = |e: x509_parser::error::X509Error| SvidError::Parse(e.to_string());
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(parse)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
                .collect()
        })
        .unwrap_or_default();
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    let identity: Identity = uris[0].parse().map_err(|_| SvidError::NotSpiffe(uris[0].to_string()))?;
    if cert.is_ca() {
        return Err(SvidError::IsCa);
    }
    match cert.key_usage().map_err(parse)? {
        Some(ku)
            if ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign() => {}
        _ => return Err(SvidError::KeyUsage),
    }
    match cert.extended_key_usage().map_err(parse)? {
        Some(eku) if eku.value.any || (eku.value.server_auth && eku.value.client_auth) => {}
        _ => return Err(SvidError::ExtendedKeyUsage),
    }
    Ok(Svid {
        identity,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{new_root, svid_params};
    use rcgen::{KeyPair, SanType};

    fn issue(edit: impl FnOnce(&mut rcgen::CertificateParams)) -> CertificateDer<'static> {
        let (root, root_key) = new_root("cluster.local", std::time::Duration::from_secs(3600)).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let mut params =
            svid_params(&Identity::new("cluster.local", "shop", "cart"), now, now + time::Duration::hours(1)).unwrap();
        edit(&mut params);
        params.signed_by(&KeyPair::generate().unwrap(), &root, &root_key).unwrap().der().clone()
    }

    #[test]
    fn accepts_what_nodemesh_issues() {
        let svid = check(&issue(|_| {})).unwrap();
        assert_eq!(svid.identity.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert!(svid.not_after > svid.not_before);
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        let two_uris =
            issue(|p| p.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/x/sa/y".try_into().unwrap())));
        assert_eq!(check(&two_uris), Err(SvidError::UriSanCount(2)));
        let no_uri = issue(|p| p.subject_alt_names = vec![SanType::DnsName("cart".try_into().unwrap())]);
        assert_eq!(check(&no_uri), Err(SvidError::UriSanCount(0)));
        let not_spiffe =
            issue(|p| p.subject_alt_names = vec![SanType::URI("https://example.com/".try_into().unwrap())]);
        assert!(matches!(check(&not_spiffe), Err(SvidError::NotSpiffe(_))));
        let ca = issue(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
        assert_eq!(check(&ca), Err(SvidError::IsCa));
        let no_ku = issue(|p| p.key_usages.clear());
        assert_eq!(check(&no_ku), Err(SvidError::KeyUsage));
        let server_only = issue(|p| p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]);
        assert_eq!(check(&server_only), Err(SvidError::ExtendedKeyUsage));
    }
}
