//! The controller's view of a directory of YAML: Kubernetes objects (Pods, Services, Gateway API routes,
//! nodemesh.io policies with their CRD schema checks) into a snapshot and one node's config, without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_controller::mesh::{Mesh, Object};
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text).take(32) {
        let Ok(value) = serde_yaml::Value::deserialize(doc) else { return };
        if let Ok(object) = serde_yaml::from_value::<Object>(value) {
            objects.push(object);
        }
    }
    let (mesh, _verdicts) = Mesh::from_objects(&objects);
    let _ = mesh.local_config("node-1", "cluster.local");
});
