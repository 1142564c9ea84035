//! A stand-in for the upstream Gateway API bundle in the fake API server: HTTPRoute and GRPCRoute as the
//! `gateway-api` crate (generated from that release's CRDs) defines them, annotated as upstream annotates its
//! bundle. nodemesh does not ship these CRDs; a cluster has them from upstream.

use mesh_controller::gateway_api::{BUNDLE_VERSION, CHANNEL_ANNOTATION, VERSION_ANNOTATION};

/// The bundle's route CRDs as YAML documents, for `FakeApi::apply_yaml` and kubectl.
pub fn bundle_crds() -> Vec<String> {
    use gateway_api::experimental::{grpcroutes::GRPCRoute, httproutes::HTTPRoute};
    use kube::CustomResourceExt;
    [HTTPRoute::crd(), GRPCRoute::crd()]
        .into_iter()
        .map(|mut crd| {
            let annotations = crd.metadata.annotations.get_or_insert_with(Default::default);
            annotations.insert(VERSION_ANNOTATION.into(), BUNDLE_VERSION.into());
            annotations.insert(CHANNEL_ANNOTATION.into(), "experimental".into());
            serde_yaml::to_string(&crd).expect("a CRD serializes")
        })
        .collect()
}

/// nodemesh's CRDs and the bundle's: what a cluster with nodemesh installed serves.
pub fn all_crds() -> Vec<String> {
    mesh_controller::crds::all().into_iter().map(|(_, yaml)| yaml).chain(bundle_crds()).collect()
}
