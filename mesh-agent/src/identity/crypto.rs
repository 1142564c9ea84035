//! The TLS crypto of HBONE and the controller channel. aws-lc-rs by default: it has the post-quantum hybrid key
//! exchange X25519MLKEM768, offered first (X25519 and P-256 after it, for peers without it) — what ztunnel offers,
//! and the only group ztunnel accepts under `COMPLIANCE_POLICY=pqc`. `--require-pqc` is that policy here: only
//! X25519MLKEM768, so a classical-only peer fails the handshake. ring stays selectable (`--tls-provider ring`,
//! no post-quantum exchange) to compare the two in the benchmark and for builds that want it; TLS 1.3 only with
//! either.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// Which library does the cryptography.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    #[default]
    AwsLcRs,
    Ring,
}

/// How HBONE's TLS is set up (`mesh-agent run --tls-provider`, `--require-pqc`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    pub provider: Provider,
    /// Refuse peers that cannot do post-quantum key exchange.
    pub require_pqc: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("--require-pqc needs the aws-lc-rs provider: ring has no post-quantum key exchange")]
pub struct NoPostQuantum;

impl TlsPolicy {
    pub fn crypto_provider(&self) -> Result<Arc<CryptoProvider>, NoPostQuantum> {
        match (self.provider, self.require_pqc) {
            (Provider::Ring, true) => Err(NoPostQuantum),
            (Provider::Ring, false) => Ok(Arc::new(rustls::crypto::ring::default_provider())),
            (Provider::AwsLcRs, require_pqc) => Ok(Arc::new(aws_lc_rs(require_pqc))),
        }
    }
}

/// Libraries that build their own TLS (the Kubernetes client, OTLP over gRPC) take rustls' process default,
/// which rustls cannot pick with two providers built in: every binary installs the default one first.
pub fn install_process_default() {
    // Err only when one is installed already, which is as good.
    let _ = aws_lc_rs(false).install_default();
}

/// aws-lc-rs with X25519MLKEM768 first; alone when `require_pqc`. Without it, the default
/// (`identity::crypto_provider`).
pub(super) fn aws_lc_rs(require_pqc: bool) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
    let kx_groups = if require_pqc { vec![X25519MLKEM768] } else { vec![X25519MLKEM768, X25519, SECP256R1] };
    CryptoProvider { kx_groups, ..rustls::crypto::aws_lc_rs::default_provider() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_quantum_first_and_only_when_required() {
        let names = |p: &CryptoProvider| p.kx_groups.iter().map(|g| format!("{:?}", g.name())).collect::<Vec<_>>();
        let preferred = TlsPolicy::default().crypto_provider().unwrap();
        assert_eq!(names(&preferred), ["X25519MLKEM768", "X25519", "secp256r1"]);
        let required = TlsPolicy { require_pqc: true, ..Default::default() }.crypto_provider().unwrap();
        assert_eq!(names(&required), ["X25519MLKEM768"]);
        assert!(TlsPolicy { provider: Provider::Ring, require_pqc: true }.crypto_provider().is_err());
        assert_eq!(names(&super::super::crypto_provider()), names(&preferred));
    }
}
