//! Keeps one certificate per workload identity on this node: fetched as soon as a pod with that identity is
//! enrolled (before its first connection needs it), renewed at half of its lifetime, retried with backoff when
//! the CA fails, and dropped when the last pod with the identity leaves. With a [`CertStore`], every issued
//! certificate is also written to disk, and a restarted agent takes back those still valid before asking the CA.

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

use super::store::CertStore;
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
    store: Option<CertStore>,
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
        Self::with_store(ca, lifetime, None, super::crypto_provider())
    }

    /// A manager that keeps its certificates in `store` too, and takes valid ones back from it; HBONE's TLS
    /// uses `provider` (`identity::crypto`).
    pub fn with_store(
        ca: Arc<dyn CertificateAuthority>,
        lifetime: Duration,
        store: Option<CertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CertError> {
        let bundle = TrustBundle::new(&ca.trust_bundle()).map_err(|e| CertError::Bundle(e.to_string()))?;
        Ok(SecretManager {
            inner: Arc::new(Inner {
                ca,
                lifetime,
                provider,
                bundle: Arc::new(bundle),
                entries: Mutex::new(HashMap::new()),
                store,
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
                if let Some(store) = &self.inner.store {
                    store.remove(id);
                }
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

/// A stored certificate is taken back only with at least this much validity left.
const MIN_RESTORED_VALIDITY: i64 = 60;

/// Takes back the stored certificate of `id`, if it is still good; then issues one, and renews it at half of
/// its remaining lifetime, forever.
async fn refresh(inner: Arc<Inner>, id: Identity, tx: watch::Sender<Option<Arc<WorkloadCert>>>) {
    if let Some(cert) = restore(&inner, &id) {
        tracing::info!(identity = %id, serial = %cert.svid.serial, not_after = cert.svid.not_after, "workload certificate taken back from the state dir");
        let renew_in = half_of_remaining(&cert);
        tx.send_replace(Some(Arc::new(cert)));
        tokio::time::sleep(renew_in).await;
    }
    let mut backoff = Duration::from_millis(500);
    loop {
        match issue(&inner, &id).await {
            Ok(cert) => {
                tracing::info!(identity = %id, serial = %cert.svid.serial, not_after = cert.svid.not_after, "workload certificate issued");
                let renew_in = half_of_remaining(&cert);
                tx.send_replace(Some(Arc::new(cert)));
                backoff = Duration::from_millis(500);
                tokio::time::sleep(renew_in).await;
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

fn half_of_remaining(cert: &WorkloadCert) -> Duration {
    let remaining = Duration::from_secs(cert.svid.not_after.saturating_sub(unix_now()).max(0) as u64);
    (remaining / 2).max(Duration::from_secs(1))
}

async fn issue(inner: &Inner, id: &Identity) -> anyhow::Result<WorkloadCert> {
    // A fresh key every time: a renewal also rotates the key.
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let chain = inner.ca.sign(id, csr.der().clone(), inner.lifetime).await?;
    let key_der = key.serialize_der();
    let cert = certified(inner, id, PrivatePkcs8KeyDer::from(key_der.clone()), chain)
        .map_err(|e| anyhow::anyhow!("CA's answer: {e}"))?;
    if let Some(store) = &inner.store {
        if let Err(e) = store.save(id, &key_der, &cert.certified_key.cert) {
            tracing::warn!(identity = %id, error = %e, "cannot keep the certificate in the state dir; a restart without the CA would have none");
        }
    }
    Ok(cert)
}

/// The stored certificate of `id` when it is usable now; an unusable file is removed (and logged).
fn restore(inner: &Inner, id: &Identity) -> Option<WorkloadCert> {
    let store = inner.store.as_ref()?;
    let reject = |why: String| {
        tracing::warn!(identity = %id, reason = %why, "stored certificate not taken back");
        store.remove(id);
        None
    };
    let stored = match store.load(id) {
        Ok(Some(stored)) => stored,
        Ok(None) => return None,
        Err(e) => return reject(e.to_string()),
    };
    let cert = match certified(inner, id, stored.key, stored.chain) {
        Ok(cert) => cert,
        Err(e) => return reject(e),
    };
    let now = unix_now();
    if cert.svid.not_before > now || cert.svid.not_after - now < MIN_RESTORED_VALIDITY {
        return reject(format!("valid from {} to {}, now is {now}", cert.svid.not_before, cert.svid.not_after));
    }
    Some(cert)
}

/// Checks that `chain` is an SVID for `id` and pairs it with `key`.
fn certified(
    inner: &Inner,
    id: &Identity,
    key: PrivatePkcs8KeyDer<'static>,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> Result<WorkloadCert, String> {
    let leaf = chain.first().ok_or("empty chain")?;
    let svid = svid::check(leaf).map_err(|e| e.to_string())?;
    if svid.identity != *id {
        return Err(format!("certificate is for {} instead of {id}", svid.identity));
    }
    let signing_key =
        inner.provider.key_provider.load_private_key(PrivateKeyDer::Pkcs8(key)).map_err(|e| e.to_string())?;
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

    /// A CA that is down, like an unreachable controller.
    struct Unreachable;

    impl CertificateAuthority for Unreachable {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            _csr: rustls::pki_types::CertificateSigningRequestDer<'a>,
            _lifetime: Duration,
        ) -> crate::identity::ca::SignFuture<'a> {
            Box::pin(async move { Err(crate::identity::CaError::Sign(identity.to_string(), "unreachable".into())) })
        }

        fn trust_bundle(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
            Vec::new()
        }
    }

    /// A restarted agent whose CA is down takes back the certificate it had; an expired or foreign file is
    /// refused and removed; an identity no pod uses any more loses its file.
    #[tokio::test]
    async fn restart_without_the_ca_resumes_from_the_store() {
        let base = std::env::temp_dir().join(format!("nodemesh-restore-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        LocalCa::init(&base.join("ca"), "cluster.local").unwrap();
        let ca = Arc::new(LocalCa::load(&base.join("ca")).unwrap());
        let store = || Some(CertStore::open(&base.join("certs")).unwrap());
        let (id, other) =
            (Identity::new("cluster.local", "shop", "cart"), Identity::new("cluster.local", "shop", "pay"));
        let users = HashMap::from([(id.clone(), 1), (other.clone(), 1)]);

        let first = SecretManager::with_store(
            ca.clone(),
            Duration::from_secs(3600),
            store(),
            crate::identity::crypto_provider(),
        )
        .unwrap();
        first.set_users(&users);
        let issued = first.fetch(&id).await.unwrap();
        first.fetch(&other).await.unwrap();
        // `other`'s file now holds `id`'s certificate: it must not be taken back as `other`.
        let path =
            |i: &Identity| base.join("certs").join(format!("cluster.local_ns_shop_sa_{}.pem", i.service_account));
        std::fs::copy(path(&id), path(&other)).unwrap();

        let restarted = SecretManager::with_store(
            Arc::new(Unreachable),
            Duration::from_secs(3600),
            store(),
            crate::identity::crypto_provider(),
        )
        .unwrap();
        restarted.set_users(&users);
        let restored = restarted.fetch(&id).await.unwrap();
        assert_eq!(restored.svid.serial, issued.svid.serial);
        assert!(!restarted.all_issued(), "the foreign file is not a certificate for {other}");
        assert!(!path(&other).exists(), "an unusable file is removed");

        restarted.set_users(&HashMap::new());
        assert!(!path(&id).exists(), "identities no pod uses are forgotten on disk too");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
