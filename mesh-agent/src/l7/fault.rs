//! Fault injection from a TrafficPolicy: a fixed delay and/or an abort (HTTP status or gRPC status) for a
//! percentage of the requests to a Service, decided per request by the calling agent.

use std::time::Duration;

use mesh_common::traffic::{FaultInjection, parse_duration};

use super::roll;

#[derive(Debug, PartialEq)]
pub struct Injected {
    pub delay: Option<Duration>,
    /// HTTP status and gRPC status to answer with instead of calling the Service.
    pub abort: Option<(u16, Option<u8>)>,
}

/// Decides the faults for one request.
pub fn decide(f: &FaultInjection) -> Injected {
    let delay = f.delay.as_ref().filter(|d| roll(d.percent)).and_then(|d| parse_duration(&d.fixed_delay).ok());
    let abort = f.abort.as_ref().filter(|a| roll(a.percent)).map(|a| (a.http_status.unwrap_or(503), a.grpc_status));
    Injected { delay, abort }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::traffic::{FaultAbort, FaultDelay};

    #[test]
    fn percentages_hold_over_many_requests() {
        let f = FaultInjection {
            delay: Some(FaultDelay { fixed_delay: "10ms".into(), percent: 100.0 }),
            abort: Some(FaultAbort { http_status: Some(500), grpc_status: None, percent: 30.0 }),
        };
        let decisions: Vec<_> = (0..10_000).map(|_| decide(&f)).collect();
        assert!(decisions.iter().all(|d| d.delay == Some(Duration::from_millis(10))));
        let aborted = decisions.iter().filter(|d| d.abort == Some((500, None))).count();
        assert!((2700..3300).contains(&aborted), "{aborted}");
        let none = FaultInjection { delay: None, abort: Some(FaultAbort { percent: 0.0, ..Default::default() }) };
        assert!((0..1000).all(|_| decide(&none).abort.is_none()));
    }
}
