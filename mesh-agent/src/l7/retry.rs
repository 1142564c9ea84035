//! Retries (GEP-1731 on the route: attempts, status codes, backoff) within a retry budget (TrafficPolicy): over
//! a ten-second window, retries may add at most `percent` of the requests, plus `minRetriesPerSecond` whatever
//! the ratio. Under sustained failure the budget keeps retries from multiplying the load on a struggling
//! Service.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_common::route::Retry;
use mesh_common::traffic::RetryBudget;

/// Gateway API's default retryable codes.
const DEFAULT_CODES: [u16; 4] = [500, 502, 503, 504];
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Exponential backoff stops growing at this multiple of the base.
const MAX_BACKOFF_FACTOR: u32 = 10;
/// Used when retries are configured without a TrafficPolicy budget (Linkerd's defaults).
const DEFAULT_BUDGET: RetryBudget = RetryBudget { percent: 20, min_retries_per_second: 10 };
const WINDOW_SECONDS: usize = 10;

pub struct RetryPolicy<'a> {
    retry: &'a Retry,
}

impl<'a> RetryPolicy<'a> {
    pub fn new(retry: &'a Retry) -> Self {
        RetryPolicy { retry }
    }

    pub fn max_retries(&self) -> u32 {
        self.retry.attempts
    }

    /// Whether a response with `status` is worth another try.
    pub fn retryable(&self, status: u16) -> bool {
        if self.retry.codes.is_empty() { DEFAULT_CODES.contains(&status) } else { self.retry.codes.contains(&status) }
    }

    /// Full-jitter exponential backoff before retry number `n` (1-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self.retry.backoff_ms.map_or(DEFAULT_BACKOFF, Duration::from_millis);
        let ceiling = base * 2u32.saturating_pow(n.saturating_sub(1)).min(MAX_BACKOFF_FACTOR);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Requests and retries per second over the last [`WINDOW_SECONDS`].
pub struct Budget {
    percent: u32,
    min_per_second: u32,
    window: Mutex<Window>,
}

struct Window {
    start: Instant,
    /// (second since start, requests, retries), one slot per second of the window.
    slots: [(u64, u32, u32); WINDOW_SECONDS],
}

impl Window {
    fn slot(&mut self, now: Instant) -> &mut (u64, u32, u32) {
        let second = now.saturating_duration_since(self.start).as_secs();
        let slot = &mut self.slots[second as usize % WINDOW_SECONDS];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let second = now.saturating_duration_since(self.start).as_secs();
        self.slots
            .iter()
            .filter(|s| second.saturating_sub(s.0) < WINDOW_SECONDS as u64)
            .fold((0, 0), |(req, ret), s| (req + u64::from(s.1), ret + u64::from(s.2)))
    }
}

impl Budget {
    pub fn new(budget: Option<&RetryBudget>) -> Self {
        let b = budget.unwrap_or(&DEFAULT_BUDGET);
        Budget {
            percent: b.percent,
            min_per_second: b.min_retries_per_second,
            window: Mutex::new(Window { start: Instant::now(), slots: [(u64::MAX, 0, 0); WINDOW_SECONDS] }),
        }
    }

    pub fn request(&self, now: Instant) {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).slot(now).1 += 1;
    }

    /// Takes a retry out of the budget if there is one left.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, retries) = w.totals(now);
        let allowed = requests * u64::from(self.percent) / 100 + u64::from(self.min_per_second) * WINDOW_SECONDS as u64;
        if retries >= allowed {
            return false;
        }
        w.slot(now).2 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_backoff() {
        let r = Retry { attempts: 3, codes: vec![], backoff_ms: Some(100) };
        let p = RetryPolicy::new(&r);
        assert!(p.retryable(503) && !p.retryable(404));
        assert!(RetryPolicy::new(&Retry { codes: vec![429], ..r.clone() }).retryable(429));
        for n in 1..10 {
            assert!(p.backoff(n) <= Duration::from_millis(100) * 2u32.pow(n - 1).min(MAX_BACKOFF_FACTOR));
        }
    }

    #[test]
    fn budget_caps_retries_at_the_ratio_plus_the_minimum() {
        let b = Budget::new(Some(&RetryBudget { percent: 20, min_retries_per_second: 0 }));
        let t = Instant::now();
        for _ in 0..100 {
            b.request(t);
        }
        let granted = (0..100).filter(|_| b.try_retry(t)).count();
        assert_eq!(granted, 20);
        // Ten seconds later the window has moved on.
        let later = t + Duration::from_secs(11);
        assert!(!b.try_retry(later), "no requests in the window, no minimum");
        let b = Budget::new(Some(&RetryBudget { percent: 0, min_retries_per_second: 1 }));
        assert_eq!((0..100).filter(|_| b.try_retry(t)).count(), WINDOW_SECONDS);
    }
}
