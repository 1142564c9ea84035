//! `--source dir:PATH`: Kubernetes objects as YAML files (`*.yaml`, `*.yml`, multi-document) in a directory,
//! re-read when a file changes. A file that does not parse keeps its last good objects in force, so one bad
//! edit never takes the rest of the mesh's config with it. A file that has not parsed since the controller
//! started has no last good objects: the snapshot is then withheld (agents keep the config they have, which
//! they also keep across their own restarts) until the file is fixed, instead of serving a mesh without it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use super::Snapshots;
use crate::mesh::{Mesh, Object};

const POLL: Duration = Duration::from_millis(300);

type Fingerprint = BTreeMap<PathBuf, (SystemTime, u64)>;

fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            let meta = std::fs::metadata(&path)?;
            out.insert(path, (meta.modified()?, meta.len()));
        }
    }
    Ok(out)
}

fn parse(path: &Path) -> Result<Vec<Object>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => {}
            Ok(value) => objects.push(serde_yaml::from_value(value).map_err(|e| e.to_string())?),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(objects)
}

/// Reads `dir` now and keeps watching it; returns the snapshot channel.
pub fn watch(dir: PathBuf) -> anyhow::Result<Snapshots> {
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let mut files: BTreeMap<PathBuf, Vec<Object>> = BTreeMap::new();
    let mut seen = Fingerprint::new();
    let first = reload(&dir, &mut files, &mut seen);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            match fingerprint(&dir) {
                Ok(now) if now != seen => {
                    let mesh = reload(&dir, &mut files, &mut seen);
                    tx.send_if_modified(|current| {
                        let changed = **current != mesh;
                        if changed {
                            *current = Arc::new(mesh);
                        }
                        changed
                    });
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot list the source directory"),
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

fn reload(dir: &Path, files: &mut BTreeMap<PathBuf, Vec<Object>>, seen: &mut Fingerprint) -> Mesh {
    let now = fingerprint(dir).unwrap_or_default();
    files.retain(|path, _| now.contains_key(path));
    for path in now.keys() {
        if seen.get(path) == now.get(path) && files.contains_key(path) {
            continue;
        }
        match parse(path) {
            Ok(objects) => {
                files.insert(path.clone(), objects);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot parse; keeping its last good objects")
            }
        }
    }
    let unparsed: Vec<String> =
        now.keys().filter(|path| !files.contains_key(*path)).map(|path| path.display().to_string()).collect();
    *seen = now;
    let all: Vec<Object> = files.values().flatten().cloned().collect();
    let (mut mesh, verdicts) = Mesh::from_objects(&all);
    for v in verdicts.iter().filter(|v| v.is_problem()) {
        tracing::error!("{v}");
    }
    if !unparsed.is_empty() {
        let why = format!("never parsed since the controller started: {}", unparsed.join(", "));
        tracing::error!("not serving config until every file parses ({why}); agents keep their last config");
        mesh.withheld = Some(why);
    }
    mesh
}
