//! The root CA in Kubernetes mode: a Secret (`ca.crt`, `ca.key`, optional `root.crt` when the CA is an
//! intermediate), created with a new self-signed root on first start. Two controllers starting at once both try
//! to create it; the loser reads the winner's. Its root certificate is published in a ConfigMap the agents
//! mount (like Istio's `istio-ca-root-cert`), since they need it before they can trust the controller.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use mesh_agent::identity::LocalCa;
use mesh_agent::identity::ca::{CA_CERT, CA_KEY, ROOT_CERT, new_root};

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> anyhow::Result<LocalCa> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let origin = format!("Secret {namespace}/{name}");
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(name).await.with_context(|| format!("reading {origin}"))? {
            let data = secret.data.unwrap_or_default();
            let text = |key: &str| data.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned());
            let (Some(cert), Some(key)) = (text(CA_CERT), text(CA_KEY)) else {
                bail!("{origin} lacks {CA_CERT} or {CA_KEY}");
            };
            return Ok(LocalCa::from_pem(&cert, &key, text(ROOT_CERT).as_deref(), &origin)?);
        }
        let (cert, key) = new_root(trust_domain, ROOT_LIFETIME).context("generating a root CA")?;
        let data = BTreeMap::from([
            (CA_CERT.to_string(), ByteString(cert.pem().into_bytes())),
            (CA_KEY.to_string(), ByteString(key.serialize_pem().into_bytes())),
        ]);
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => tracing::info!(secret = %format!("{namespace}/{name}"), "created a root CA"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("creating {origin}")),
        }
    }
    bail!("{origin} keeps disappearing")
}

/// Key of the root certificates (PEM) in the published ConfigMap.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";

/// Writes the CA's root certificates into ConfigMap `namespace/name` (server-side apply: created or updated).
pub async fn publish_root(client: Client, namespace: &str, name: &str, ca: &LocalCa) -> anyhow::Result<()> {
    let configmap = ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..Default::default() },
        data: Some(BTreeMap::from([(ROOT_CONFIGMAP_KEY.to_string(), crate::tls::roots_pem(ca))])),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&configmap)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client, namespace)
        .patch(name, &PatchParams::apply("nodemesh-controller").force(), &Patch::Apply(value))
        .await
        .with_context(|| format!("publishing the CA root in ConfigMap {namespace}/{name}"))?;
    Ok(())
}
