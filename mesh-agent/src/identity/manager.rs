//! Keeps one certificate per workload identity on this node: fetched as soon as a pod with that identity is
//! enrolled (before its first connection needs it), renewed at half of its lifetime, retried with backoff when
//! the CA fails, and dropped when the last pod with the identity leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::svid::{self, Svid};
use super::verifier::TrustBundle;
use super::{CertificateAuthority, Identity};

const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A workload's current key and certificate chain.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub certified_key: Arc<CertifiedKey>,
    pub svid: Svid,
}

/// `/certs` entry.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    pub identity: String,
    pub serial: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    /// Pods on this node using the identity.
    pub users: usize,
}

#[derive(Clone)]
pub struct SecretManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    bundle: Arc<TrustBundle>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

struct Entry {
    current: watch::Receiver<Option<Arc<WorkloadCert>>>,
    refresher: AbortHandle,
    users: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {0} yet (the CA has not answered within {FETCH_TIMEOUT:?})")]
    NotReady(Identity),
    #[error("trust bundle: {0}")]
    Bundle(String),
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, lifetime: Duration) -> Result<Self, CertError> {
        let bundle = TrustBundle::new(&ca.trust_bundle()).map_err(|e| CertError::Bundle(e.to_string()))?;
        Ok(SecretManager {
            inner: Arc::new(Inner {
                ca,
                lifetime,
                provider: super::crypto_provider(),
                bundle: Arc::new(bundle),
                entries: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.clone()
    }

    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.inner.provider.clone()
    }

    /// Re-reads the CA's trust bundle (e.g. after the roots were rotated).
    pub fn reload_trust_bundle(&self) -> Result<(), CertError> {
        self.inner.bundle.set(&self.inner.ca.trust_bundle()).map_err(|e| CertError::Bundle(e.to_string()))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the set of kept certificates match `wanted` (identity -> pods using it): new identities get a
    /// certificate right away, identities no pod uses any more are dropped. Needs a tokio runtime.
    pub fn set_users(&self, wanted: &HashMap<Identity, usize>) {
        let mut entries = self.entries();
        entries.retain(|id, e| match wanted.get(id) {
            Some(users) => {
                e.users = *users;
                true
            }
            None => {
                e.refresher.abort();
                false
            }
        });
        for (id, users) in wanted {
            if !entries.contains_key(id) {
                let (tx, rx) = watch::channel(None);
                let refresher = tokio::spawn(refresh(self.inner.clone(), id.clone(), tx)).abort_handle();
                entries.insert(id.clone(), Entry { current: rx, refresher, users: *users });
            }
        }
    }

    /// The current certificate, if one was issued (for TLS handshakes, which cannot wait).
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.entries().get(id).and_then(|e| e.current.borrow().clone())
    }

    /// The current certificate, waiting (bounded) for the first one to be issued.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let mut rx = {
            let entries = self.entries();
            match entries.get(id) {
                Some(e) => e.current.clone(),
                None => return Err(CertError::NotReady(id.clone())),
            }
        };
        let waited = tokio::time::timeout(FETCH_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(cert)) => cert.clone().ok_or_else(|| CertError::NotReady(id.clone())),
            _ => Err(CertError::NotReady(id.clone())),
        }
    }

    /// Whether every identity the enrolled pods need has its certificate (readiness).
    pub fn all_issued(&self) -> bool {
        self.entries().values().all(|e| e.current.borrow().is_some())
    }

    pub fn certs(&self) -> Vec<CertView> {
        let mut out: Vec<CertView> = self
            .entries()
            .iter()
            .map(|(id, e)| {
                let cert = e.current.borrow().clone();
                CertView {
                    identity: id.to_string(),
                    serial: cert.as_ref().map(|c| c.svid.serial.clone()),
                    not_before: cert.as_ref().map(|c| c.svid.not_before),
                    not_after: cert.as_ref().map(|c| c.svid.not_after),
                    users: e.users,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

/// Issues a certificate for `id`, then renews it at half of its remaining lifetime, forever.
async fn refresh(inner: Arc<Inner>, id: Identity, tx: watch::Sender<Option<Arc<WorkloadCert>>>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match issue(&inner, &id).await {
            Ok(cert) => {
                let remaining = Duration::from_secs(cert.svid.not_after.saturating_sub(unix_now()).max(0) as u64);
                tracing::info!(identity = %id, serial = %cert.svid.serial, not_after = cert.svid.not_after, "workload certificate issued");
                tx.send_replace(Some(Arc::new(cert)));
                backoff = Duration::from_millis(500);
                tokio::time::sleep((remaining / 2).max(Duration::from_secs(1))).await;
            }
            Err(e) => {
                tracing::error!(identity = %id, error = %e, retry_in = ?backoff, "cannot get a workload certificate");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

async fn issue(inner: &Inner, id: &Identity) -> anyhow::Result<WorkloadCert> {
    // A fresh key every time: a renewal also rotates the key.
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let chain = inner.ca.sign(id, csr.der().clone(), inner.lifetime).await?;
    let leaf = chain.first().ok_or_else(|| anyhow::anyhow!("CA returned an empty chain"))?;
    let svid = svid::check(leaf)?;
    anyhow::ensure!(svid.identity == *id, "CA issued {} instead of {id}", svid.identity);
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = inner.provider.key_provider.load_private_key(key_der)?;
    Ok(WorkloadCert { identity: id.clone(), certified_key: Arc::new(CertifiedKey::new(chain, signing_key)), svid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    #[tokio::test]
    async fn issues_rotates_and_forgets() {
        let dir = std::env::temp_dir().join(format!("nodemesh-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalCa::init(&dir, "cluster.local").unwrap();
        let ca = Arc::new(LocalCa::load(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        let manager = SecretManager::new(ca, Duration::from_secs(4)).unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        assert!(manager.fetch(&id).await.is_err(), "unknown identities are not fetched implicitly");
        manager.set_users(&HashMap::from([(id.clone(), 1)]));
        let first = manager.fetch(&id).await.unwrap();
        assert_eq!(first.svid.identity, id);
        // Half of a 4 s lifetime: a new certificate (new serial) within a few seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        loop {
            let now = manager.current(&id).unwrap();
            if now.svid.serial != first.svid.serial {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "certificate was not rotated");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        manager.set_users(&HashMap::from([(id.clone(), 2)]));
        assert_eq!(manager.current(&id).unwrap().svid.serial, manager.current(&id).unwrap().svid.serial);
        assert_eq!(manager.certs()[0].users, 2);
        manager.set_users(&HashMap::new());
        assert!(manager.current(&id).is_none());
        assert!(manager.certs().is_empty());
    }
}
