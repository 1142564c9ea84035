//! Discovery documents (`/api`, `/apis`, group and resource lists) and `/version`, built from the registered
//! types, so kube-rs's discovery and kubectl's resource mapping work for built-ins and CRDs alike.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::store::Store;

fn resources(store: &Store, group: &str, version: &str) -> Value {
    let mut list = Vec::new();
    for t in store.types.iter().filter(|t| t.group == group && t.versions.iter().any(|v| v == version)) {
        let verbs = if t.virtual_create {
            json!(["create"])
        } else {
            json!(["create", "delete", "get", "list", "patch", "update", "watch"])
        };
        list.push(json!({"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                         "kind": t.kind, "verbs": verbs, "shortNames": t.short_names}));
        if t.status {
            list.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                             "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
}

fn groups(store: &Store) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in store.types.iter().filter(|t| !t.group.is_empty()) {
        let versions = out.entry(t.group.clone()).or_default();
        for v in &t.versions {
            if !versions.contains(v) {
                versions.push(v.clone());
            }
        }
    }
    out
}

fn group(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> =
        versions.iter().map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v})).collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": versions,
           "preferredVersion": versions[0]})
}

/// The answer for a discovery path, or `None` when `path` is not one.
pub fn answer(store: &Store, path: &str) -> Option<Value> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    Some(match segments.as_slice() {
        ["version"] => json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fakeapi", "platform": "linux/amd64"}),
        ["healthz"] | ["readyz"] | ["livez"] => json!("ok"),
        ["api"] => json!({"kind": "APIVersions", "versions": ["v1"],
                          "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ["api", version] => resources(store, "", version),
        ["apis"] => {
            let list: Vec<Value> = groups(store).iter().map(|(g, v)| group(g, v)).collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list})
        }
        ["apis", name] => group(name, groups(store).get(*name)?),
        ["apis", name, version] if groups(store).get(*name)?.iter().any(|v| v == version) => {
            resources(store, name, version)
        }
        _ => return None,
    })
}
