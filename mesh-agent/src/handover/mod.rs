//! Hitless upgrade: a new agent on the node takes over the running agent's listening sockets instead of opening
//! its own, so no connection is refused or reset while one replaces the other. The running agent (the
//! *predecessor*) waits at `<state-dir>/handover.sock`; a starting agent (the *successor*) that finds it says
//! hello (the predecessor then reports not ready, so the successor's probe, answered on the same host port until
//! the handover, cannot pass early), gets its config, and asks to take over. The predecessor stops taking CNI
//! requests, freezes enrollment for good, and sends every listener it has — each enrolled pod's, admin, metrics,
//! the CNI socket — with `SCM_RIGHTS`. From then on both accept on the same sockets (a connection queued in a
//! listener is accepted by one of them, never lost); once the successor serves them and is ready it says so,
//! and the predecessor stops accepting, drains (`crate::drain`) and exits when its last connection has ended.
//! If the successor fails before that, the predecessor carries on as before.

pub mod fds;
pub mod inherited;

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use crate::state::AgentState;
use fds::{Channel, Listener};
use inherited::Inherited;

/// The socket file under the state dir.
pub const SOCKET: &str = "handover.sock";
/// How long the predecessor waits, after sending its listeners, for the successor to say it serves them.
const ADOPTION_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the successor waits for each of the predecessor's messages once it asked to take over.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Message {
    /// Successor → predecessor, on connecting.
    Hello { pid: u32, version: String },
    /// Successor → predecessor: it has its config and will serve once it has the listeners.
    Take,
    /// Predecessor → successor: listeners, one descriptor per entry in order; `last` on the final message.
    Listeners { entries: Vec<Owner>, last: bool },
    /// Successor → predecessor: it accepts on all of them and is ready.
    Adopted,
}

/// What a handed-over listener is for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Owner {
    Pod {
        #[serde(rename = "containerId")]
        container_id: String,
    },
    Admin,
    Metrics,
    Cni,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket: {0}")]
    Io(#[from] io::Error),
    #[error("unexpected handover message: {0}")]
    Protocol(String),
}

fn send(channel: &Channel, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(message).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    Ok(channel.send(&body, fds)?)
}

fn recv(channel: &Channel) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let (body, fds) = channel.recv()?;
    let message = serde_json::from_slice(&body).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    Ok((message, fds))
}

fn add(inherited: &mut Inherited, owner: Owner, fd: OwnedFd) {
    match owner {
        Owner::Pod { container_id } => inherited.pods.entry(container_id).or_default().push(TcpListener::from(fd)),
        Owner::Admin => inherited.admin = Some(TcpListener::from(fd)),
        Owner::Metrics => inherited.metrics = Some(TcpListener::from(fd)),
        Owner::Cni => inherited.cni = Some(UnixListener::from(fd)),
    }
}

/// The successor's side: an agent already running on the node.
pub struct Predecessor {
    channel: Channel,
}

/// The successor has the listeners; [`Adoption::complete`] lets the predecessor go.
pub struct Adoption {
    channel: Channel,
}

impl Predecessor {
    /// Says hello to the agent running on the node, if there is one.
    pub fn find(state_dir: &Path) -> Result<Option<Self>, HandoverError> {
        let Some(channel) = Channel::connect(&state_dir.join(SOCKET))? else { return Ok(None) };
        let hello = Message::Hello { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").to_string() };
        send(&channel, &hello, &[])?;
        Ok(Some(Predecessor { channel }))
    }

    /// Asks for the listeners and receives them all.
    pub async fn take(self) -> Result<(Inherited, Adoption), HandoverError> {
        tokio::task::spawn_blocking(move || {
            let channel = self.channel;
            channel.set_recv_timeout(Some(REPLY_TIMEOUT))?;
            send(&channel, &Message::Take, &[])?;
            let mut inherited = Inherited::default();
            loop {
                let (message, fds) = recv(&channel)?;
                let Message::Listeners { entries, last } = message else {
                    return Err(HandoverError::Protocol(format!("{message:?}")));
                };
                if entries.len() != fds.len() {
                    return Err(HandoverError::Protocol(format!(
                        "{} entries, {} descriptors",
                        entries.len(),
                        fds.len()
                    )));
                }
                for (owner, fd) in entries.into_iter().zip(fds) {
                    add(&mut inherited, owner, fd);
                }
                if last {
                    return Ok((inherited, Adoption { channel }));
                }
            }
        })
        .await
        .map_err(|e| HandoverError::Io(io::Error::other(e)))?
    }
}

impl Adoption {
    pub fn complete(self) -> Result<(), HandoverError> {
        send(&self.channel, &Message::Adopted, &[])
    }
}

/// The predecessor's host listeners and the tasks serving them.
pub struct HostListeners {
    pub admin: (TcpListener, AbortHandle),
    pub metrics: (TcpListener, AbortHandle),
    pub cni: (UnixListener, AbortHandle),
}

/// Waits for a successor at `<state_dir>/handover.sock` on a thread of its own, and hands everything over to
/// the first that completes the exchange; then asks this agent to drain and exit.
pub fn serve(state_dir: &Path, state: AgentState, host: HostListeners) -> io::Result<()> {
    let path = state_dir.join(SOCKET);
    let listener = Listener::bind(&path)?;
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new().name("handover".into()).spawn(move || {
        let mut host = host;
        loop {
            let channel = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "handover accept failed");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            match hand_over(&channel, &state, &runtime, &mut host) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "the successor did not take over; carrying on");
                    state.set_successor_pending(false);
                }
            }
        }
    })?;
    tracing::debug!(socket = %path.display(), "waiting for a successor");
    Ok(())
}

/// One successor's exchange. On error nothing is lost: the predecessor still accepts everywhere.
fn hand_over(
    channel: &Channel,
    state: &AgentState,
    runtime: &tokio::runtime::Handle,
    host: &mut HostListeners,
) -> Result<(), HandoverError> {
    let (hello, _) = recv(channel)?;
    let Message::Hello { pid, version } = hello else { return Err(HandoverError::Protocol(format!("{hello:?}"))) };
    tracing::info!(successor_pid = pid, %version, "a successor is starting; not ready until it takes over");
    state.set_successor_pending(true);
    // The successor asks once it has its config, however long that takes; it closing is the end of it.
    let (take, _) = recv(channel)?;
    if take != Message::Take {
        return Err(HandoverError::Protocol(format!("{take:?}")));
    }
    // No CNI request may change the pod set from here: new ones wait in the socket's queue for the successor,
    // and the ones in progress finish before the enrollment lock is ours.
    host.cni.1.abort();
    let enrollment = runtime.block_on(state.enrollment_lock());
    let sent = send_listeners(channel, state, host);
    let adopted = sent.and_then(|()| {
        channel.set_recv_timeout(Some(ADOPTION_TIMEOUT))?;
        match recv(channel)? {
            (Message::Adopted, _) => Ok(()),
            (other, _) => Err(HandoverError::Protocol(format!("{other:?}"))),
        }
    });
    if let Err(e) = adopted {
        drop(enrollment);
        resume_cni(state, runtime, host);
        return Err(e);
    }
    tracing::info!(successor_pid = pid, "the successor took over; draining");
    host.admin.1.abort();
    host.metrics.1.abort();
    crate::state_dir::relinquish();
    // This agent never changes enrollment again (the kernel state and pods.json are the successor's now): the
    // lock stays taken until the process exits.
    std::mem::forget(enrollment);
    // The agent's drain stops accepting on its copies of the sockets, as on any quit.
    state.request_quit();
    Ok(())
}

fn send_listeners(channel: &Channel, state: &AgentState, host: &HostListeners) -> Result<(), HandoverError> {
    let pods = state.pods();
    let mut all: Vec<(Owner, BorrowedFd<'_>)> = vec![
        (Owner::Admin, host.admin.0.as_fd()),
        (Owner::Metrics, host.metrics.0.as_fd()),
        (Owner::Cni, host.cni.0.as_fd()),
    ];
    for (id, entry) in pods.iter() {
        all.extend(entry.listeners().iter().map(|l| (Owner::Pod { container_id: id.clone() }, l.as_fd())));
    }
    let chunks: Vec<_> = all.chunks(fds::MAX_FDS).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let entries = chunk.iter().map(|(owner, _)| owner.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
        send(channel, &Message::Listeners { entries, last: i + 1 == chunks.len() }, &fds)?;
    }
    tracing::info!(listeners = all.len(), pods = pods.len(), "listeners sent to the successor");
    Ok(())
}

/// The handover failed after CNI requests were stopped: serve them again.
fn resume_cni(state: &AgentState, runtime: &tokio::runtime::Handle, host: &mut HostListeners) {
    let _entered = runtime.enter();
    let listener = host.cni.0.try_clone().and_then(|l| l.set_nonblocking(true).map(|()| l));
    match listener.and_then(tokio::net::UnixListener::from_std) {
        Ok(listener) => host.cni.1 = runtime.spawn(crate::cni_server::serve(listener, state.clone())).abort_handle(),
        Err(e) => tracing::error!(error = %e, "cannot serve the CNI socket again after a failed handover"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_wire_form() {
        let m = Message::Listeners { entries: vec![Owner::Pod { container_id: "c1".into() }, Owner::Cni], last: true };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"type":"listeners","entries":[{"kind":"pod","containerId":"c1"},{"kind":"cni"}],"last":true}"#
        );
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), m);
        assert!(serde_json::from_str::<Message>(r#"{"type":"takeEverything"}"#).is_err());
    }

    #[test]
    fn inherited_host_listeners_are_used_only_on_the_same_address() {
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = admin.local_addr().unwrap();
        let mut inherited = Inherited { admin: Some(admin), ..Default::default() };
        assert!(inherited.admin("127.0.0.1:1".parse().unwrap()).is_none(), "another address binds anew");
        let admin = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = admin.local_addr().unwrap();
        inherited.admin = Some(admin);
        assert_eq!(inherited.admin(other).unwrap().local_addr().unwrap(), other);
        assert_ne!(addr, other);
    }
}
