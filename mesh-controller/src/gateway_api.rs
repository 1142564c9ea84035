//! Which Gateway API install nodemesh needs. nodemesh does not own the Gateway API CRDs: they are the cluster's
//! (other implementations read the same HTTPRoutes), installed from an upstream release bundle, and an uninstall of
//! nodemesh must never take them — and with them every route in the cluster — away. The controller reads HTTPRoute
//! and GRPCRoute `v1` when they are served and treats them as empty when not; `meshctl check` holds the installed
//! bundle against [`MINIMUM`] with [`assess`].

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The upstream release nodemesh is built and tested against (the `gateway-api` crate's), and the one
/// `manifests/gateway-api` installs.
pub const BUNDLE_VERSION: &str = "v1.4.0";
/// The oldest bundle whose HTTPRoute and GRPCRoute are both served as `v1`.
pub const MINIMUM: (u64, u64) = (1, 1);
/// The CRDs nodemesh reads.
pub const CRDS: &[&str] = &["httproutes.gateway.networking.k8s.io", "grpcroutes.gateway.networking.k8s.io"];
/// Upstream's annotations on every CRD of a release bundle.
pub const VERSION_ANNOTATION: &str = "gateway.networking.k8s.io/bundle-version";
pub const CHANNEL_ANNOTATION: &str = "gateway.networking.k8s.io/channel";

/// The command that installs the bundle nodemesh is tested against, for messages and docs.
pub fn install_hint() -> String {
    format!("kubectl apply --server-side -k manifests/gateway-api (Gateway API {BUNDLE_VERSION}, experimental channel)")
}

/// What the installed Gateway API CRDs mean for nodemesh.
#[derive(Debug, PartialEq, Eq)]
pub enum Assessment {
    /// Usable; the detail names the version and channel.
    Usable(String),
    /// nodemesh cannot route by these CRDs (or not all of them): why.
    Unusable(String),
}

fn parse_version(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.strip_prefix('v')?.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.split('-').next()?.parse().ok()?;
    Some((major, minor))
}

/// Holds the cluster's CRDs against what nodemesh reads: both route CRDs present, from an upstream bundle (its
/// version annotation), no older than [`MINIMUM`], serving `v1`.
pub fn assess(installed: &[CustomResourceDefinition]) -> Assessment {
    let mut versions = Vec::new();
    let mut channels = Vec::new();
    for name in CRDS {
        let Some(crd) = installed.iter().find(|c| c.metadata.name.as_deref() == Some(*name)) else {
            return Assessment::Unusable(format!("{name} is not installed"));
        };
        let annotation = |key: &str| crd.metadata.annotations.as_ref().and_then(|a| a.get(key)).cloned();
        let Some(version) = annotation(VERSION_ANNOTATION) else {
            return Assessment::Unusable(format!(
                "{name} carries no {VERSION_ANNOTATION} annotation: not an upstream Gateway API bundle"
            ));
        };
        match parse_version(&version) {
            Some(v) if v >= MINIMUM => {}
            Some(_) => {
                return Assessment::Unusable(format!(
                    "{name} is from Gateway API {version}; nodemesh needs v{}.{} or newer",
                    MINIMUM.0, MINIMUM.1
                ));
            }
            None => return Assessment::Unusable(format!("{name}: unreadable bundle version {version:?}")),
        }
        if !crd.spec.versions.iter().any(|v| v.name == "v1" && v.served) {
            return Assessment::Unusable(format!("{name} does not serve v1"));
        }
        versions.push(version);
        channels.push(annotation(CHANNEL_ANNOTATION).unwrap_or_else(|| "unknown".into()));
    }
    versions.dedup();
    channels.dedup();
    if versions.len() > 1 {
        return Assessment::Unusable(format!("route CRDs from different bundles: {}", versions.join(", ")));
    }
    let mut detail = format!("{} ({} channel)", versions.join(""), channels.join("/"));
    if channels.iter().any(|c| c != "experimental") {
        // The standard channel's schema has no `retry`: the API server prunes it from stored routes.
        detail.push_str("; HTTPRoute retries need the experimental channel");
    }
    Assessment::Usable(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionVersion;

    fn crd(name: &str, version: Option<&str>, channel: &str, served: &str) -> CustomResourceDefinition {
        let mut c = CustomResourceDefinition::default();
        c.metadata.name = Some(name.into());
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(v) = version {
            annotations.insert(VERSION_ANNOTATION.to_string(), v.to_string());
        }
        annotations.insert(CHANNEL_ANNOTATION.to_string(), channel.to_string());
        c.metadata.annotations = Some(annotations);
        c.spec.versions =
            vec![CustomResourceDefinitionVersion { name: served.into(), served: true, ..Default::default() }];
        c
    }

    fn both(version: Option<&str>, channel: &str) -> Vec<CustomResourceDefinition> {
        CRDS.iter().map(|n| crd(n, version, channel, "v1")).collect()
    }

    #[test]
    fn an_upstream_bundle_at_or_above_the_minimum_is_usable() {
        assert_eq!(
            assess(&both(Some("v1.4.0"), "experimental")),
            Assessment::Usable("v1.4.0 (experimental channel)".into())
        );
        let standard = assess(&both(Some("v1.1.0"), "standard"));
        assert!(
            matches!(&standard, Assessment::Usable(d) if d.contains("retries need the experimental")),
            "{standard:?}"
        );
        assert!(matches!(assess(&both(Some("v2.0.0-rc1"), "standard")), Assessment::Usable(_)));
    }

    #[test]
    fn missing_old_unannotated_or_mixed_crds_are_not() {
        let unusable = |crds: &[CustomResourceDefinition], says: &str| match assess(crds) {
            Assessment::Unusable(why) => assert!(why.contains(says), "{why}"),
            other => panic!("{other:?}"),
        };
        unusable(&both(Some("v1.4.0"), "standard")[..1], "grpcroutes.gateway.networking.k8s.io is not installed");
        unusable(&both(Some("v1.0.0"), "standard"), "needs v1.1 or newer");
        // nodemesh's own CRDs of earlier releases carried no annotation.
        unusable(&both(None, "standard"), "not an upstream Gateway API bundle");
        unusable(&both(Some("1.4"), "standard"), "unreadable");
        let mut mixed = both(Some("v1.4.0"), "standard");
        mixed[1] = crd(CRDS[1], Some("v1.2.1"), "standard", "v1");
        unusable(&mixed, "different bundles");
        unusable(&[crd(CRDS[0], Some("v1.4.0"), "standard", "v1beta1")], "does not serve v1");
    }
}
