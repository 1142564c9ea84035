//! The agent's side of the controller API: the config stream (apply, acknowledge, keep the last good config
//! while the controller is away, reconnect with backoff) and certificate signing through the controller's CA.

use anyhow::Context;

pub mod channel;
pub mod last_good;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mesh_common::proto::certificate_service_client::CertificateServiceClient;
use mesh_common::proto::config_discovery_client::ConfigDiscoveryClient;
use mesh_common::proto::{Ack, ConfigRequest, Hello, SignRequest, config_request};
use mesh_common::resources::Assembler;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::identity::ca::{SignFuture, pem_certs};
use crate::identity::{CaError, CertificateAuthority, Identity};
use crate::state::AgentState;

pub const NODE_HEADER: &str = "x-nodemesh-node";
/// Reconnect delays double from 200 ms up to this cap: a controller back after a restart has every agent again
/// within a few seconds, and the jitter below keeps a thousand agents from arriving in the same instant.
const MAX_BACKOFF: Duration = Duration::from_secs(3);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Half of `backoff` plus a random part of the other half ("equal jitter").
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(fastrand::f64())
}

/// How to reach and authenticate to the controller.
#[derive(Clone)]
pub struct ControllerClient {
    channel: Channel,
    token: Arc<TokenFile>,
    node: Arc<str>,
    /// Roots from the config stream, for [`CertificateAuthority::trust_bundle`].
    bundle: Arc<RwLock<Vec<CertificateDer<'static>>>>,
    /// Where what the controller sent is kept for a restart without it.
    last_good: Option<last_good::LastGood>,
}

/// The credential file: a bootstrap token, or in Kubernetes a projected service-account token the kubelet
/// rotates, hence read again for every call (keeping the last good one if a read fails).
struct TokenFile {
    path: PathBuf,
    last: RwLock<String>,
}

impl TokenFile {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(path).with_context(|| format!("reading the token {}", path.display()))?;
        Ok(TokenFile { path: path.to_path_buf(), last: RwLock::new(token.trim().to_string()) })
    }

    fn current(&self) -> String {
        if let Ok(fresh) = std::fs::read_to_string(&self.path) {
            let fresh = fresh.trim();
            if !fresh.is_empty() {
                let mut last = self.last.write().unwrap_or_else(|p| p.into_inner());
                if *last != fresh {
                    *last = fresh.to_string();
                }
            }
        }
        self.last.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Adds the token and node name to every call.
type AuthInterceptor = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>;
type Authenticated = InterceptedService<Channel, AuthInterceptor>;

impl ControllerClient {
    /// Connects lazily: the agent starts (and serves its last state) whether or not the controller is up.
    /// `ca_file`: the root certificate(s) an `https://` controller is verified against.
    pub fn new(url: &str, ca_file: Option<&Path>, token_file: &Path, node: String) -> anyhow::Result<Self> {
        let token = Arc::new(TokenFile::open(token_file)?);
        let channel = channel::channel(url, ca_file)?;
        Ok(ControllerClient { channel, token, node: node.into(), bundle: Default::default(), last_good: None })
    }

    /// Keeps every config and trust bundle the agent applies in `last_good`, and takes back the trust bundle
    /// kept there (so certificates restored from disk can be verified before the controller answers). Returns
    /// the kept config, for the agent to resume from.
    pub fn resume_from(&mut self, last_good: last_good::LastGood) -> Option<mesh_common::config::NodeConfig> {
        if let Some(pem) = last_good.load_bundle() {
            match pem_certs(&String::from_utf8_lossy(&pem), "the kept trust bundle") {
                Ok(roots) => *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = roots,
                Err(e) => tracing::error!(error = %e, "ignoring the kept trust bundle"),
            }
        }
        let config = last_good.load_config();
        self.last_good = Some(last_good);
        config
    }

    fn authenticated(&self) -> Result<Authenticated, Status> {
        let auth: MetadataValue<_> = format!("Bearer {}", self.token.current())
            .parse()
            .map_err(|_| Status::internal("token is not a header value"))?;
        let node: MetadataValue<_> =
            self.node.parse().map_err(|_| Status::internal("node name is not a header value"))?;
        let interceptor: AuthInterceptor = Box::new(move |mut req: Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            req.metadata_mut().insert(NODE_HEADER, node.clone());
            Ok(req)
        });
        Ok(InterceptedService::new(self.channel.clone(), interceptor))
    }

    /// Keeps the config stream up for as long as the agent runs.
    pub async fn run_config_stream(self, state: AgentState) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let delay = jittered(backoff);
            match self.config_stream_once(&state, &mut backoff).await {
                Ok(()) => tracing::warn!(retry_in = ?delay, "controller closed the config stream; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "config stream from the controller failed; keeping the last good config")
                }
            }
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn config_stream_once(&self, state: &AgentState, backoff: &mut Duration) -> Result<(), Status> {
        let mut client = ConfigDiscoveryClient::new(self.authenticated()?);
        let (tx, rx) = mpsc::channel(4);
        let hello = Hello { node: self.node.to_string(), accepts_packed: true };
        let hello = ConfigRequest { kind: Some(config_request::Kind::Hello(hello)) };
        let _ = tx.send(hello).await;
        let mut updates = client.stream_config(ReceiverStream::new(rx)).await?.into_inner();
        let mut assembler = Assembler::default();
        while let Some(update) = updates.message().await? {
            if !update.trust_bundle_pem.is_empty() {
                self.set_trust_bundle(state, &update.trust_bundle_pem);
            }
            let result = upserts(&update)
                .and_then(|upserts| {
                    assembler.apply(update.full, &upserts, &update.removals, &update.version).map_err(|e| e.to_string())
                })
                .and_then(|config| {
                    let encoded = self.last_good.as_ref().and_then(|_| last_good::LastGood::encode(&config));
                    state.set_config(config).map_err(|e| e.to_string()).map(|()| encoded)
                });
            let error = match result {
                Ok(encoded) => {
                    tracing::info!(version = %update.version, full = update.full, "config from controller applied");
                    if let (Some(kept), Some(encoded)) = (&self.last_good, encoded) {
                        kept.save_config(&encoded);
                    }
                    state.set_config_ready();
                    *backoff = FIRST_BACKOFF;
                    String::new()
                }
                Err(e) => {
                    tracing::error!(version = %update.version, error = %e, "config from controller rejected; keeping the previous one");
                    e
                }
            };
            let ack = ConfigRequest { kind: Some(config_request::Kind::Ack(Ack { version: update.version, error })) };
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    fn set_trust_bundle(&self, state: &AgentState, pem: &[u8]) {
        let roots = match pem_certs(&String::from_utf8_lossy(pem), "controller") {
            Ok(r) => r,
            Err(e) => return tracing::error!(error = %e, "bad trust bundle from controller"),
        };
        if let Some(secrets) = state.secrets() {
            if let Err(e) = secrets.bundle().set(&roots) {
                return tracing::error!(error = %e, "cannot use the controller's trust bundle");
            }
        }
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = roots;
        if let Some(kept) = &self.last_good {
            kept.save_bundle(pem);
        }
    }
}

impl CertificateAuthority for ControllerClient {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr: CertificateSigningRequestDer<'a>,
        lifetime: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            let fail = |e: Status| CaError::Sign(identity.to_string(), format!("controller: {}", e.message()));
            let mut client = CertificateServiceClient::new(self.authenticated().map_err(fail)?);
            let request = SignRequest {
                identity: identity.to_string(),
                csr_der: csr.as_ref().to_vec(),
                lifetime_seconds: lifetime.as_secs(),
            };
            let response = client.sign(request).await.map_err(fail)?.into_inner();
            Ok(response.chain_der.into_iter().map(CertificateDer::from).collect())
        })
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Every upsert of an update: those it lists, then those packed (`mesh_common::packed`); a pack that does not
/// unpack rejects the update (the agent keeps its last good config and says why in its Ack).
fn upserts(update: &mesh_common::proto::ConfigUpdate) -> Result<Vec<mesh_common::proto::Resource>, String> {
    let mut all = update.upserts.clone();
    if !update.packed_upserts.is_empty() {
        let packed = mesh_common::packed::unpack(&update.packed_upserts).map_err(|e| format!("packed upserts: {e}"))?;
        all.extend(packed);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_are_jittered_and_capped() {
        let delays: Vec<Duration> = (0..200).map(|_| jittered(MAX_BACKOFF)).collect();
        assert!(delays.iter().all(|d| *d >= MAX_BACKOFF / 2 && *d <= MAX_BACKOFF), "{delays:?}");
        let distinct: std::collections::BTreeSet<u128> = delays.iter().map(Duration::as_millis).collect();
        assert!(distinct.len() > 50, "agents must not reconnect in lockstep: {distinct:?}");
        assert!(jittered(FIRST_BACKOFF) <= FIRST_BACKOFF);
    }
}
