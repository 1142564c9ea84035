//! Circuit breaking per destination Service, across all callers on this node: concurrent requests
//! (`maxRequests`), requests allowed to wait for one of those slots (`maxPendingRequests`, default none),
//! concurrent retries (`maxRetries`) and upstream connections (`maxConnections`). What does not fit is answered
//! at once with 503 and the `UO` flag: failing fast protects both the caller and the overloaded Service.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use mesh_common::traffic::ConnectionPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Default)]
pub struct Breaker {
    requests: Option<Arc<Semaphore>>,
    max_pending: u32,
    pending: AtomicU32,
    max_retries: Option<u32>,
    retries: Arc<AtomicU32>,
    max_connections: Option<u32>,
    connections: Arc<AtomicU32>,
}

/// Held while a request is in flight.
pub struct RequestPermit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Held while a retry is in flight, or while an upstream connection is open.
pub struct CountPermit(Arc<AtomicU32>);

impl Drop for CountPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn take(counter: &Arc<AtomicU32>, max: Option<u32>) -> Option<CountPermit> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match max {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        })
        .ok()
        .map(|_| CountPermit(counter.clone()))
}

impl Breaker {
    pub fn new(pool: Option<&ConnectionPool>) -> Self {
        let Some(pool) = pool else { return Breaker::default() };
        Breaker {
            requests: pool.max_requests.map(|n| Arc::new(Semaphore::new(n as usize))),
            max_pending: pool.max_pending_requests.unwrap_or(0),
            max_retries: pool.max_retries,
            max_connections: pool.max_connections,
            ..Default::default()
        }
    }

    /// A slot for one request, waiting for one only while fewer than `maxPendingRequests` others wait; `None`
    /// is an overflow.
    pub async fn admit(&self) -> Option<RequestPermit> {
        let Some(semaphore) = &self.requests else { return Some(RequestPermit(None)) };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Some(RequestPermit(Some(permit)));
        }
        let queued =
            self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_pending).then_some(n + 1));
        if queued.is_err() {
            return None;
        }
        let permit = semaphore.clone().acquire_owned().await.ok();
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit.map(|p| RequestPermit(Some(p)))
    }

    /// A slot for one retry; `None` when `maxRetries` are already in flight.
    pub fn retry(&self) -> Option<CountPermit> {
        take(&self.retries, self.max_retries)
    }

    /// A slot for one more upstream connection; `None` when `maxConnections` are open.
    pub fn connection(&self) -> Option<CountPermit> {
        take(&self.connections, self.max_connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_beyond_requests_and_pending() {
        let b = Arc::new(Breaker::new(Some(&ConnectionPool {
            max_requests: Some(1),
            max_pending_requests: Some(1),
            max_retries: Some(1),
            max_connections: Some(2),
        })));
        let first = b.admit().await.expect("first request");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await.is_some() }
        });
        // Let the second request queue up.
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(b.admit().await.is_none(), "third overflows");
        drop(first);
        assert!(waiter.await.unwrap(), "the pending request gets the slot");

        let r = b.retry().unwrap();
        assert!(b.retry().is_none());
        drop(r);
        assert!(b.retry().is_some());
        let (_c1, _c2) = (b.connection().unwrap(), b.connection().unwrap());
        assert!(b.connection().is_none());
    }

    #[tokio::test]
    async fn no_limits_without_a_connection_pool() {
        let b = Breaker::new(None);
        let _many: Vec<_> = admit_many(&b).await;
        assert!(b.retry().is_some() && b.connection().is_some());
    }

    async fn admit_many(b: &Breaker) -> Vec<RequestPermit> {
        let mut v = Vec::new();
        for _ in 0..100 {
            v.push(b.admit().await.unwrap());
        }
        v
    }
}
