//! The resource bounds of the data path, in one place with their defaults (docs/ARCHITECTURE.md lists them).
//! A client that opens connections and never finishes a request head, or one pod that opens connections
//! without end, must not be able to hold the agent's memory and descriptors that every other pod shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Generous for any single workload (the agent itself was measured carrying 10,000 idle connections), small
/// enough that one runaway pod cannot take all of the agent's descriptors.
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 20_000;
/// HTTP/2 keep-alive: a peer that stops answering pings is dropped.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HBONE connection to a peer agent without streams for this long is closed (`--hbone-idle-timeout`): long
/// enough to carry the next request of a chatty pair, short enough that a burst's connection, whose HTTP/2
/// stream tables stay at the burst's size while it lives, does not hold that memory for good.
pub const DEFAULT_HBONE_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A request head (HTTP/1) must arrive whole within this, the first one after the connection opened and
    /// every later one after the previous response (so it is also the keep-alive idle timeout); a connection
    /// to a port declared HTTP must send its request line (or HTTP/2 preface) within it. Default 30 s (`--http-header-timeout`):
    /// hyper's own, and what nginx and Go servers commonly use.
    pub header_timeout: Duration,
    /// Connections one pod may have open through its agent at once; beyond it new ones are reset.
    pub max_connections_per_pod: usize,
    /// See [`DEFAULT_HBONE_IDLE_TIMEOUT`].
    pub hbone_idle_timeout: Duration,
}

/// Counts a pod's open connections against [`Limits::max_connections_per_pod`].
#[derive(Debug, Default)]
pub struct ConnectionCount(Arc<AtomicUsize>);

/// One counted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl ConnectionCount {
    /// A slot, or `None` when `max` are taken.
    pub fn try_take(&self, max: usize) -> Option<Slot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.0.clone()))
    }

    pub fn open(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        let count = ConnectionCount::default();
        let a = count.try_take(2).unwrap();
        let _b = count.try_take(2).unwrap();
        assert!(count.try_take(2).is_none(), "the third of two is refused");
        drop(a);
        assert_eq!(count.open(), 1);
        assert!(count.try_take(2).is_some());
    }
}
