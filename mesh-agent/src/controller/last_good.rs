//! The last config and trust bundle the controller sent, kept under the state dir. An agent restarted while the
//! controller is unreachable resumes from them (with the certificates `identity::store` kept) instead of
//! starting empty — an empty config knows no meshed workload, and would have sent their traffic in plaintext.
//! Written after every config the agent applied; JSON, so a newer agent can read an older agent's file.

use std::path::{Path, PathBuf};

use mesh_common::config::NodeConfig;

use crate::state_dir;

const CONFIG_FILE: &str = "config.json";
const BUNDLE_FILE: &str = "trust-bundle.pem";

#[derive(Clone, Debug)]
pub struct LastGood {
    dir: PathBuf,
}

impl LastGood {
    pub fn new(state_dir: &Path) -> Self {
        LastGood { dir: state_dir.to_path_buf() }
    }

    /// Serialized before the config is applied (it moves into the agent's state), saved once it was.
    pub fn encode(config: &NodeConfig) -> Option<Vec<u8>> {
        serde_json::to_vec(config).map_err(|e| tracing::error!(error = %e, "cannot encode the config")).ok()
    }

    pub fn save_config(&self, encoded: &[u8]) {
        if let Err(e) = state_dir::write_private(&self.dir.join(CONFIG_FILE), encoded) {
            tracing::error!(error = %e, dir = %self.dir.display(), "cannot keep the config; a restart without the controller would fail closed");
        }
    }

    /// The saved config; `None` (logged) when there is none or it cannot be read.
    pub fn load_config(&self) -> Option<NodeConfig> {
        let path = self.dir.join(CONFIG_FILE);
        let bytes = match state_dir::read_if_present(&path) {
            Ok(bytes) => bytes?,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the last good config");
                return None;
            }
        };
        match serde_json::from_slice::<NodeConfig>(&bytes) {
            Ok(config) => Some(config),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the last good config is unreadable; ignoring it");
                None
            }
        }
    }

    pub fn save_bundle(&self, pem: &[u8]) {
        if let Err(e) = state_dir::write_private(&self.dir.join(BUNDLE_FILE), pem) {
            tracing::error!(error = %e, "cannot keep the trust bundle");
        }
    }

    pub fn load_bundle(&self) -> Option<Vec<u8>> {
        state_dir::read_if_present(&self.dir.join(BUNDLE_FILE))
            .map_err(|e| tracing::error!(error = %e, "cannot read the last trust bundle"))
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_config_and_bundle_across_instances() {
        let dir = std::env::temp_dir().join(format!("nodemesh-last-good-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(LastGood::new(&dir).load_config().is_none());
        let config = NodeConfig::from_yaml(
            "version: v7\nworkloads:\n  - {namespace: shop, name: cart, serviceAccount: cart, ips: [10.0.0.7]}\n",
        )
        .unwrap();
        let saved = LastGood::new(&dir);
        saved.save_config(&LastGood::encode(&config).unwrap());
        saved.save_bundle(b"roots");
        let back = LastGood::new(&dir);
        assert_eq!(back.load_config(), Some(config));
        assert_eq!(back.load_bundle().as_deref(), Some(&b"roots"[..]));
        std::fs::write(dir.join(CONFIG_FILE), "{not json").unwrap();
        assert!(back.load_config().is_none(), "a damaged file is ignored, not half applied");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
