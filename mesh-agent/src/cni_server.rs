//! The unix socket the `nodemesh-cni` plugin talks to (protocol in `mesh_common::cni`).

use std::path::Path;
use std::time::Duration;

use mesh_common::cni::{AgentError, AgentRequest, AgentResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::inpod;
use crate::state::AgentState;

/// Requests are one small JSON line; anything longer is not a CNI plugin talking.
const MAX_REQUEST: u64 = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by an earlier agent would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = UnixListener::bind(path)?;
    // Only root (the container runtime) may enroll pods.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: AgentState) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, state)).await {
                        tracing::warn!(error = %e, "CNI request timed out");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, state: AgentState) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let response = match BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line).await {
        Err(e) => failure(5, "cannot read request", e),
        Ok(_) => match serde_json::from_str::<AgentRequest>(&line) {
            Err(e) => failure(6, "cannot decode request", e),
            Ok(request) => dispatch(request, &state).await,
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        tracing::warn!(error = %e, "cannot answer CNI plugin");
    }
}

async fn dispatch(request: AgentRequest, state: &AgentState) -> AgentResponse {
    match request {
        AgentRequest::Add(pod) => {
            let name = pod.qualified_name();
            match inpod::enroll(state, pod).await {
                Ok(captured) => AgentResponse { captured, error: None },
                Err(error) => {
                    tracing::error!(pod = %name, error = %error.msg, details = %error.details, "enrollment failed");
                    AgentResponse { captured: false, error: Some(error) }
                }
            }
        }
        AgentRequest::Del { container_id, .. } => {
            inpod::unenroll(state, &container_id).await;
            AgentResponse { captured: false, error: None }
        }
        AgentRequest::Check { container_id } => {
            if inpod::is_enrolled(state, &container_id) {
                AgentResponse { captured: true, error: None }
            } else if inpod::is_parked(state, &container_id) {
                // Its ADD found it outside the mesh and said so: nothing to check, and nothing wrong.
                AgentResponse { captured: false, error: None }
            } else {
                failure(3, "pod is not known to the node agent", container_id)
            }
        }
        AgentRequest::Status => {
            if state.capture_ready() {
                AgentResponse { captured: false, error: None }
            } else {
                failure(50, "the node agent is starting: it takes no pods yet", "")
            }
        }
    }
}

fn failure(code: u32, msg: &str, details: impl ToString) -> AgentResponse {
    AgentResponse { captured: false, error: Some(AgentError { code, msg: msg.into(), details: details.to_string() }) }
}
