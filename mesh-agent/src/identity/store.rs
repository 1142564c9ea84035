//! Workload certificates kept on disk, so an agent restarted while its CA (the controller) is unreachable
//! serves its pods at once with the certificates it had, instead of failing every mTLS connection (or worse).
//! One PEM file per identity (`PRIVATE KEY` then the chain), mode 0600 in a 0700 directory under the state
//! dir. The manager takes a file back only while its leaf is still valid and names the expected identity; a
//! file it cannot use is deleted.

use std::io;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use super::Identity;
use crate::state_dir;

const KEY_LABEL: &str = "PRIVATE KEY";
const CERT_LABEL: &str = "CERTIFICATE";

/// A key and its certificate chain, leaf first.
pub struct StoredCert {
    pub key: PrivatePkcs8KeyDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
}

#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    pub fn open(dir: &Path) -> io::Result<Self> {
        state_dir::create_private_dir(dir)?;
        Ok(CertStore { dir: dir.to_path_buf() })
    }

    /// `spiffe://td/ns/a/sa/b` as a file name: Kubernetes names and trust domains hold no `_` or `%`, so the
    /// escaping is unambiguous.
    fn path(&self, id: &Identity) -> PathBuf {
        let name: String = id
            .to_string()
            .trim_start_matches("spiffe://")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .collect();
        self.dir.join(format!("{name}.pem"))
    }

    pub fn save(&self, id: &Identity, key: &[u8], chain: &[CertificateDer<'_>]) -> io::Result<()> {
        let mut blocks = vec![pem::Pem::new(KEY_LABEL, key.to_vec())];
        blocks.extend(chain.iter().map(|c| pem::Pem::new(CERT_LABEL, c.as_ref().to_vec())));
        state_dir::write_private(&self.path(id), pem::encode_many(&blocks).as_bytes())
    }

    /// What was saved for `id`: `Ok(None)` when nothing was, an error when the file is unreadable or malformed.
    pub fn load(&self, id: &Identity) -> io::Result<Option<StoredCert>> {
        let Some(bytes) = state_dir::read_if_present(&self.path(id))? else { return Ok(None) };
        let blocks = pem::parse_many(&bytes).map_err(io::Error::other)?;
        let mut key = None;
        let mut chain = Vec::new();
        for block in blocks {
            match block.tag() {
                KEY_LABEL if key.is_none() => key = Some(PrivatePkcs8KeyDer::from(block.into_contents())),
                CERT_LABEL => chain.push(CertificateDer::from(block.into_contents())),
                other => return Err(io::Error::other(format!("unexpected PEM block {other}"))),
            }
        }
        match key {
            Some(key) if !chain.is_empty() => Ok(Some(StoredCert { key, chain })),
            _ => Err(io::Error::other("a key and at least one certificate are required")),
        }
    }

    pub fn remove(&self, id: &Identity) {
        if let Err(e) = state_dir::remove(&self.path(id)) {
            tracing::warn!(identity = %id, error = %e, "cannot remove a stored certificate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_removes() {
        let dir = std::env::temp_dir().join(format!("nodemesh-cert-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = CertStore::open(&dir).unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        assert!(store.load(&id).unwrap().is_none());
        let chain = [CertificateDer::from(vec![1u8, 2, 3]), CertificateDer::from(vec![4u8, 5])];
        store.save(&id, &[9, 9, 9], &chain).unwrap();
        let back = store.load(&id).unwrap().unwrap();
        assert_eq!(back.key.secret_pkcs8_der(), &[9, 9, 9]);
        assert_eq!(back.chain, chain);
        assert!(store.path(&id).ends_with("cluster.local_ns_shop_sa_cart.pem"), "{}", store.path(&id).display());
        std::fs::write(store.path(&id), "garbage").unwrap();
        assert!(store.load(&id).is_err(), "a malformed file is an error, not an empty store");
        store.remove(&id);
        assert!(store.load(&id).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
