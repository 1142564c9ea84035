//! The names telemetry gives a workload and a Service — Istio's label values (`workload`, `app`, `version`,
//! canonical service and revision, the SPIFFE principal; `name.namespace.svc.cluster.local`). They are computed
//! once per workload and Service when a config snapshot is compiled and shared (`Arc<str>`), so the labels of a
//! connection or request are clones, not strings built per request.

use std::sync::{Arc, LazyLock};

use mesh_common::config::Workload;
use serde::Serialize;

/// Istio's value for a label the reporter cannot know.
pub const UNKNOWN: &str = "unknown";
/// Kubernetes' default cluster domain, for `destination_service` host names.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

static UNKNOWN_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));

/// [`UNKNOWN`], shared.
pub fn unknown() -> Arc<str> {
    UNKNOWN_NAME.clone()
}

/// One end of a connection or request, as the labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
    pub principal: Arc<str>,
    pub app: Arc<str>,
    pub version: Arc<str>,
    pub canonical_service: Arc<str>,
    pub canonical_revision: Arc<str>,
}

impl Peer {
    pub fn unknown() -> Peer {
        let u = unknown();
        Peer {
            workload: u.clone(),
            namespace: u.clone(),
            principal: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: u,
        }
    }

    pub fn of(w: &Workload, trust_domain: &str) -> Peer {
        Peer {
            workload: w.workload_name().into(),
            namespace: w.namespace.as_str().into(),
            principal: w.spiffe_id(trust_domain).into(),
            app: w.app().unwrap_or(UNKNOWN).into(),
            version: w.version().unwrap_or(UNKNOWN).into(),
            canonical_service: w.canonical_service().into(),
            canonical_revision: w.canonical_revision().into(),
        }
    }
}

/// `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct DestinationService {
    /// `name.namespace.svc.cluster.local`
    pub host: Arc<str>,
    pub name: Arc<str>,
    pub namespace: Arc<str>,
}

impl DestinationService {
    pub fn unknown() -> Self {
        let u = unknown();
        DestinationService { host: u.clone(), name: u.clone(), namespace: u }
    }

    pub fn of(namespace: &str, name: &str) -> Self {
        DestinationService {
            host: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}").into(),
            name: name.into(),
            namespace: namespace.into(),
        }
    }
}
