//! The install as the tests see it: the kustomize install rendered by kubectl, the Helm chart rendered and linted
//! by a real Helm engine (Helm v4's Go SDK in the `helm-python-sdk` wheel, in the venv `cargo xtask setup` makes:
//! Debian has no helm).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn manifests() -> PathBuf {
    workspace().join("manifests")
}

pub fn chart() -> PathBuf {
    workspace().join("charts/nodemesh")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// kubectl, or `None` outside CI (a test then returns early); under `CI=true` a missing one fails the test.
pub fn kubectl() -> Option<PathBuf> {
    let found = on_path("kubectl");
    assert!(found.is_some() || std::env::var("CI").is_err(), "kubectl is missing");
    found
}

/// A program of the venv `cargo xtask setup` makes (`NODEMESH_VENV` overrides its place), as for [`kubectl`].
fn venv_program(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("NODEMESH_VENV").map_or_else(|| workspace().join("target/venv"), PathBuf::from);
    let program = venv.join("bin").join(name);
    let found = program.is_file().then_some(program);
    assert!(found.is_some() || std::env::var("CI").is_err(), "no {name} in target/venv: run `cargo xtask setup`");
    found
}

/// The venv's Python, with helm-python-sdk.
pub fn helm_python() -> Option<PathBuf> {
    venv_program("python")
}

/// The policy linter.
pub fn checkov() -> Option<PathBuf> {
    venv_program("checkov")
}

/// The non-empty YAML documents of `text`.
pub fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `kubectl kustomize dir`.
pub fn kustomize(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl).arg("kustomize").arg(dir).output().expect("running kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// Runs `xtask/helm.py COMMAND charts/nodemesh NAMESPACE VALUES`: its exit status and JSON answer.
pub fn helm(python: &Path, command: &str, namespace: &str, values: &Value) -> (bool, Value) {
    let out = Command::new(python)
        .arg(workspace().join("xtask/helm.py"))
        .args([command, &chart().display().to_string(), namespace, &values.to_string()])
        .output()
        .expect("running the Helm engine");
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (out.status.success(), answer)
}

/// What `helm install` would create: the chart's CRDs, then its rendered templates.
pub fn helm_render(python: &Path, namespace: &str, values: &Value) -> Vec<Value> {
    let (ok, answer) = helm(python, "render", namespace, values);
    assert!(ok, "{answer}");
    let crds = answer["crds"].as_array().into_iter().flatten().filter_map(Value::as_str).flat_map(documents);
    let mut templates: Vec<(&String, &Value)> = answer["templates"].as_object().expect("templates").iter().collect();
    templates.sort_by_key(|(path, _)| *path);
    let rendered = templates.into_iter().filter_map(|(_, m)| m.as_str()).flat_map(documents);
    crds.chain(rendered).collect()
}
