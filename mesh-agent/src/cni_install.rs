//! Installing the `nodemesh-cni` chained plugin on a node (`mesh-agent cni install`, the DaemonSet's init
//! container) and removing it (`mesh-agent cni uninstall`).
//!
//! The node's primary network config is the first file of the conf dir by name (`.conflist`, `.conf`,
//! `.json`), as the kubelet's CRI picks it. Install copies the plugin binary into the bin dir and appends
//! `{"type": "nodemesh-cni"}` to that config's plugin list (a single-plugin `.conf` becomes a `.conflist`);
//! uninstall removes the entry from every config and the binary. Both are idempotent and write atomically
//! (temp file + rename), so the runtime never reads a half-written config.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub const PLUGIN: &str = "nodemesh-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} is not a CNI network configuration: {1}")]
    BadConfig(PathBuf, String),
    #[error("no CNI network configuration in {0} (is the node's network plugin installed?)")]
    NoConfig(PathBuf),
    /// Chained into it, the plugin would fail every pod's ADD on the node; nothing is changed instead.
    #[error("{0} has cniVersion {1:?}, which nodemesh-cni does not speak (it speaks {supported:?}); not chained", supported = crate::cni_plugin::SUPPORTED_VERSIONS)]
    UnsupportedVersion(PathBuf, String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |e| InstallError::Io(path.to_path_buf(), e)
}

/// Network configs of `dir` in the order the runtime considers them.
fn configs(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "conflist" || e == "conf" || e == "json"))
        .collect();
    files.sort();
    Ok(files)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A name the runtime ignores (no config extension) while it is incomplete.
    let tmp = path.with_file_name(format!(".{name}.nodemesh-tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn read_config(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::BadConfig(path.to_path_buf(), e.to_string()))
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN
}

/// What the plugin's entry in the network config says beyond its type (unset: the plugin's defaults).
#[derive(Debug, Default, Clone, Copy)]
pub struct PluginEntry<'a> {
    pub agent_socket: Option<&'a str>,
    /// Namespaces whose pods the plugin passes without asking the agent (`crate::cni_plugin`).
    pub exclude_namespaces: Option<&'a [String]>,
}

impl PluginEntry<'_> {
    /// The entry as it stands in the config's plugin list.
    pub fn to_json(&self) -> Value {
        let mut entry = json!({"type": PLUGIN});
        if let Some(socket) = self.agent_socket {
            entry["agentSocket"] = json!(socket);
        }
        if let Some(namespaces) = self.exclude_namespaces {
            entry["excludeNamespaces"] = json!(namespaces);
        }
        entry
    }
}

/// Chains the plugin into the primary config (and copies `binary` into `bin_dir`). Returns the config file.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    settings: &PluginEntry,
) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN);
    let tmp = bin_dir.join(format!(".{PLUGIN}.nodemesh-tmp"));
    std::fs::copy(binary, &tmp).map_err(io(&tmp))?;
    // Renaming over the old binary is safe while a runtime is executing it.
    std::fs::rename(&tmp, &target).map_err(io(&target))?;

    chain(conf_dir, &settings.to_json())
}

/// The plugin's entry in the primary config, when it is chained there.
pub fn chained_entry(conf_dir: &Path) -> Option<Value> {
    let primary = configs(conf_dir).ok()?.into_iter().next()?;
    let config = read_config(&primary).ok()?;
    config.get("plugins")?.as_array()?.iter().find(|p| is_ours(p)).cloned()
}

/// Makes `entry` the plugin's entry at the end of the primary config's chain (a single-plugin `.conf` becomes a
/// `.conflist`). Returns the config file.
pub fn chain(conf_dir: &Path, entry: &Value) -> Result<PathBuf, InstallError> {
    let primary =
        configs(conf_dir)?.into_iter().next().ok_or_else(|| InstallError::NoConfig(conf_dir.to_path_buf()))?;
    let config = read_config(&primary)?;
    let (path, mut list) = if config.get("plugins").is_some_and(Value::is_array) {
        (primary.clone(), config)
    } else if config.get("type").is_some() {
        // A single-plugin config: the same network as a list, under a name that sorts first.
        let mut single = config.clone();
        let version = single.as_object_mut().and_then(|o| o.remove("cniVersion")).unwrap_or(json!("1.0.0"));
        let name = single.as_object_mut().and_then(|o| o.remove("name")).unwrap_or(json!("k8s-pod-network"));
        (primary.with_extension("conflist"), json!({"cniVersion": version, "name": name, "plugins": [single]}))
    } else {
        return Err(InstallError::BadConfig(primary, "neither `plugins` nor `type`".into()));
    };
    // The runtime passes the list's version to every plugin in it (a single-plugin config's own, carried over).
    let version = list.get("cniVersion").and_then(Value::as_str).unwrap_or("");
    if !crate::cni_plugin::SUPPORTED_VERSIONS.contains(&version) {
        return Err(InstallError::UnsupportedVersion(primary, version.to_string()));
    }
    let plugins =
        list["plugins"].as_array_mut().ok_or_else(|| InstallError::BadConfig(path.clone(), "plugins".into()))?;
    match plugins.iter_mut().find(|p| is_ours(p)) {
        Some(existing) if existing == entry && path == primary => return Ok(path),
        Some(existing) => *existing = entry.clone(),
        None => plugins.push(entry.clone()),
    }
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| InstallError::BadConfig(path.clone(), e.to_string()))?;
    write_atomically(&path, &bytes)?;
    if path != primary {
        std::fs::remove_file(&primary).map_err(io(&primary))?;
    }
    Ok(path)
}

/// Removes the plugin from every config of `conf_dir` and its binary from `bin_dir`. Returns the configs changed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in configs(conf_dir)? {
        let Ok(mut config) = read_config(&path) else { continue };
        let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else { continue };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let bytes =
                serde_json::to_vec_pretty(&config).map_err(|e| InstallError::BadConfig(path.clone(), e.to_string()))?;
            write_atomically(&path, &bytes)?;
            changed.push(path);
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(InstallError::Io(bin_dir.join(PLUGIN), e)),
        _ => {}
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs(PathBuf);

    impl Dirs {
        fn new(name: &str) -> Dirs {
            let root = std::env::temp_dir().join(format!("nodemesh-cni-install-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for d in ["bin", "conf", "src"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("src").join(PLUGIN), b"#!/bin/true\n").unwrap();
            Dirs(root)
        }
        fn p(&self, sub: &str) -> PathBuf {
            self.0.join(sub)
        }
    }

    impl Drop for Dirs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const FLANNEL: &str = r#"{"cniVersion": "1.0.0", "name": "cbr0", "plugins": [{"type": "flannel", "delegate": {"isDefaultGateway": true}}, {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

    #[test]
    fn chains_into_the_first_conflist_once_and_uninstalls_cleanly() {
        let d = Dirs::new("list");
        std::fs::write(d.p("conf/10-flannel.conflist"), FLANNEL).unwrap();
        std::fs::write(d.p("conf/99-other.conflist"), FLANNEL).unwrap();
        let binary = d.p("src").join(PLUGIN);
        let path = install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()).unwrap();
        assert_eq!(path, d.p("conf/10-flannel.conflist"));
        install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()).unwrap();
        let config = read_config(&path).unwrap();
        let types: Vec<&str> =
            config["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
        assert_eq!(types, ["flannel", "portmap", PLUGIN], "appended once, after the others");
        assert_eq!(config["plugins"][0]["delegate"]["isDefaultGateway"], true, "the rest is kept");
        assert!(d.p("bin").join(PLUGIN).is_file());
        assert_eq!(
            read_config(&d.p("conf/99-other.conflist")).unwrap(),
            serde_json::from_str::<Value>(FLANNEL).unwrap()
        );

        assert_eq!(uninstall(&d.p("bin"), &d.p("conf")).unwrap(), std::slice::from_ref(&path));
        assert_eq!(read_config(&path).unwrap(), serde_json::from_str::<Value>(FLANNEL).unwrap());
        assert!(!d.p("bin").join(PLUGIN).exists());
        assert!(uninstall(&d.p("bin"), &d.p("conf")).unwrap().is_empty(), "idempotent");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_bad_input_is_refused() {
        let d = Dirs::new("single");
        let binary = d.p("src").join(PLUGIN);
        assert!(matches!(
            install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()),
            Err(InstallError::NoConfig(_))
        ));
        std::fs::write(
            d.p("conf/10-bridge.conf"),
            r#"{"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        let path = install(
            &binary,
            &d.p("bin"),
            &d.p("conf"),
            &PluginEntry {
                agent_socket: Some("/run/x.sock"),
                exclude_namespaces: Some(&["kube-system".into(), "infra".into()]),
            },
        )
        .unwrap();
        assert_eq!(path, d.p("conf/10-bridge.conflist"));
        assert!(!d.p("conf/10-bridge.conf").exists());
        let config = read_config(&path).unwrap();
        assert_eq!((config["cniVersion"].as_str(), config["name"].as_str()), (Some("0.4.0"), Some("net")));
        assert_eq!(config["plugins"][0]["bridge"], "cni0");
        let entry =
            json!({"type": PLUGIN, "agentSocket": "/run/x.sock", "excludeNamespaces": ["kube-system", "infra"]});
        assert_eq!(config["plugins"][1], entry);

        // A version the plugin does not speak: refused, the config left as it was.
        let future = r#"{"cniVersion": "2.0.0", "name": "net", "plugins": [{"type": "bridge"}]}"#;
        std::fs::write(d.p("conf/05-future.conflist"), future).unwrap();
        let err = install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()).unwrap_err();
        assert!(matches!(err, InstallError::UnsupportedVersion(_, ref v) if v == "2.0.0"), "{err}");
        assert_eq!(std::fs::read_to_string(d.p("conf/05-future.conflist")).unwrap(), future);
        std::fs::remove_file(d.p("conf/05-future.conflist")).unwrap();
        // 1.1.0 (containerd 2 and CRI-O write it): chained.
        std::fs::write(d.p("conf/05-new.conflist"), FLANNEL.replace("1.0.0", "1.1.0")).unwrap();
        let path = install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()).unwrap();
        assert_eq!(read_config(&path).unwrap()["plugins"][2]["type"], PLUGIN);
        std::fs::remove_file(&path).unwrap();

        std::fs::write(d.p("conf/00-broken.conflist"), "{not json").unwrap();
        let err = install(&binary, &d.p("bin"), &d.p("conf"), &PluginEntry::default()).unwrap_err();
        assert!(err.to_string().contains("00-broken.conflist"), "{err}");
    }
}
