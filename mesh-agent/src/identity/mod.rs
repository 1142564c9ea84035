//! Workload identities: SPIFFE IDs, X.509-SVIDs, the CA that signs them and the manager that keeps one
//! certificate per service account on this node fresh.
//!
//! Keys are generated here and never leave the agent, which keeps them in memory and, with a state dir, in
//! root-only files so a restart resumes without the CA (`store`). TLS is rustls with the `ring` provider, TLS 1.3
//! only (docs/identity.md says why).

pub mod ca;
pub mod crypto;
pub mod manager;
pub mod store;
pub mod svid;
pub mod verifier;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use ca::{CaError, CertificateAuthority, LocalCa};
pub use manager::{SecretManager, WorkloadCert};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<account>)")]
pub struct BadIdentity(pub String);

impl FromStr for Identity {
    type Err = BadIdentity;

    fn from_str(s: &str) -> Result<Self, BadIdentity> {
        let bad = || BadIdentity(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| valid_segment(p)) => Ok(Identity::new(td, ns, sa)),
            _ => Err(bad()),
        }
    }
}

/// SPIFFE path segments and trust domains: non-empty, no `.`/`..`, only letters, digits, `.-_`.
fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
}

/// The default crypto provider (aws-lc-rs, post-quantum key exchange preferred, classical accepted): the
/// controller channel's, and HBONE's unless `--tls-provider`/`--require-pqc` say otherwise ([`crypto`]).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(crypto::aws_lc_rs(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "cart"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        for bad in
            ["spiffe://cluster.local/ns/shop", "http://x/ns/a/sa/b", "spiffe://x/ns/../sa/b", "spiffe:///ns/a/sa/b"]
        {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
