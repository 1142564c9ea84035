//! Draining: the agent telling its long-lived connections to move elsewhere before it exits — because an upgrade
//! handed its listeners to the next agent (`handover`) or because it got SIGTERM. Keep-alive connections never
//! end on their own: before this the agent waited its whole drain timeout and then cut them. Now HTTP/1
//! responses carry `connection: close`, HTTP/1 connections still idle a moment after the drain began are
//! closed, HTTP/2 and HBONE connections get GOAWAY (streams in flight finish, new ones go to a new connection);
//! opaque TCP runs to its end.

use std::time::Duration;

use tokio::sync::watch;

/// An HTTP/1 connection is closed this long after the drain began if no request came in the meantime; a busy
/// one has been told `connection: close` by then and closed after that response. Closing an idle connection
/// races with a request the client may be sending at that instant, so busy connections are not closed this way.
pub const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Whether the agent is draining; cheap to clone into every connection.
#[derive(Clone, Debug)]
pub struct Drain(watch::Receiver<bool>);

/// Starts the drain for every [`Drain`] made from it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

pub fn channel() -> (Trigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Drain(rx))
}

impl Trigger {
    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain has begun (at once if it already has); never if the trigger is gone without it.
    pub async fn started(&mut self) {
        if self.0.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_drain_begin() {
        let (trigger, drain) = channel();
        let (mut early, late) = (drain.clone(), drain);
        assert!(!early.is_draining());
        let pending = tokio::time::timeout(Duration::from_millis(20), early.started()).await;
        assert!(pending.is_err(), "resolved before the drain began");
        trigger.start();
        tokio::time::timeout(Duration::from_secs(1), early.started()).await.expect("drain seen");
        let mut late = late.clone();
        assert!(late.is_draining());
        tokio::time::timeout(Duration::from_secs(1), late.started()).await.expect("already draining");
    }

    #[tokio::test]
    async fn a_dropped_trigger_is_not_a_drain() {
        let (trigger, mut drain) = channel();
        drop(trigger);
        assert!(tokio::time::timeout(Duration::from_millis(20), drain.started()).await.is_err());
        assert!(!drain.is_draining());
    }
}
