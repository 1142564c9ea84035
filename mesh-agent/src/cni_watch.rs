//! Keeps `nodemesh-cni` in the node's network config while the agent runs. The node's network plugin may write
//! its config again (Calico, Cilium and flannel do on restart or upgrade), and a config written without our entry
//! means every pod created after it starts uncaptured — a meshed pod in plaintext. The install step runs once,
//! so the agent checks the config directory every few seconds and chains the plugin back (as istio-cni's
//! install loop does), logging each time. A pod created in the moment between the rewrite and the check is not
//! enrolled; the log line says when that window was.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::cni_install::{self, PLUGIN};

/// How often the config directory is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Held by a check while it runs; an uninstall takes it and sets it to stop every check after (none can chain
/// the plugin back behind the uninstall's back, not even one already running on a blocking thread).
#[derive(Clone, Default)]
pub struct Stop(Arc<Mutex<bool>>);

impl Stop {
    /// Runs `f` (the uninstall) once no check runs, and stops the checks for good.
    pub fn stop_and<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut stopped = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *stopped = true;
        f()
    }
}

/// Checks `conf_dir` every [`CHECK_INTERVAL`] until stopped. The entry written back is the one found chained
/// the last time (its agent socket and excluded namespaces), `initial` until one was seen.
pub async fn keep_chained(bin_dir: PathBuf, conf_dir: PathBuf, initial: Value, stop: Stop) {
    let mut entry = initial;
    // Logged once until it changes, not every few seconds.
    let mut last_error = None;
    let mut interval = tokio::time::interval(CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let (bin, conf, wanted, stop) = (bin_dir.clone(), conf_dir.clone(), entry.clone(), stop.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let stopped = stop.0.lock().unwrap_or_else(|p| p.into_inner());
            if *stopped { Ok(None) } else { check(&bin, &conf, &wanted) }
        })
        .await;
        let error = match checked {
            Ok(Ok(found)) => {
                entry = found.unwrap_or(entry);
                None
            }
            Ok(Err(e)) => Some(e),
            Err(e) => Some(format!("CNI config check failed: {e}")),
        };
        if error.is_some() && error != last_error {
            tracing::error!(
                error = error.as_deref().unwrap_or(""),
                "cannot keep nodemesh-cni in the node's network config"
            );
        }
        last_error = error;
    }
}

/// One check: the entry chained now (to remember), after chaining `wanted` back if it was missing. Chains
/// nothing while the plugin binary is missing from `bin_dir`: a config naming a plugin the runtime cannot find
/// fails every pod's ADD, meshed or not.
fn check(bin_dir: &std::path::Path, conf_dir: &std::path::Path, wanted: &Value) -> Result<Option<Value>, String> {
    if let Some(found) = cni_install::chained_entry(conf_dir) {
        return Ok(Some(found));
    }
    if !bin_dir.join(PLUGIN).is_file() {
        return Err(format!("{PLUGIN} is missing from {}; not chaining it", bin_dir.display()));
    }
    match cni_install::chain(conf_dir, wanted) {
        Ok(path) => {
            tracing::warn!(config = %path.display(), "nodemesh-cni was no longer in the node's network config (rewritten by its network plugin?); chained it back — pods created in the last seconds were not enrolled");
            Ok(None)
        }
        Err(cni_install::InstallError::NoConfig(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_rewritten_config_gets_the_entry_it_had_back_and_nothing_is_chained_without_the_binary() {
        let root = std::env::temp_dir().join(format!("nodemesh-cni-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (bin, conf) = (root.join("bin"), root.join("conf"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let primary = conf.join("10-calico.conflist");
        let calico = r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "calico"}]}"#;
        let ours = json!({"type": PLUGIN, "excludeNamespaces": ["kube-system", "infra"]});
        let chained = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "calico"}, ours]});
        std::fs::write(&primary, chained.to_string()).unwrap();
        let fallback = json!({"type": PLUGIN});

        // Chained: nothing to do, and the entry is what the next rewrite gets back.
        let remembered = check(&bin, &conf, &fallback);
        assert_eq!(remembered, Ok(Some(ours.clone())));
        // The network plugin writes its config again, without us; the binary is gone too: nothing is chained.
        std::fs::write(&primary, calico).unwrap();
        assert!(check(&bin, &conf, &ours).unwrap_err().contains("missing"));
        assert_eq!(cni_install::chained_entry(&conf), None);
        // With the binary in place: chained back, with the remembered settings.
        std::fs::write(bin.join(PLUGIN), b"plugin").unwrap();
        assert_eq!(check(&bin, &conf, &ours), Ok(None));
        assert_eq!(cni_install::chained_entry(&conf), Some(ours));
        let _ = std::fs::remove_dir_all(&root);
    }
}
