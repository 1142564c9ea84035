//! Outlier detection: an endpoint that answers with too many consecutive 5xx (or gateway errors: 502, 503,
//! 504 and connection failures) is ejected for `baseEjectionTime × ejections`, as long as no more than
//! `maxEjectionPercent` of the endpoints are out. It returns by itself when the time is over; each `interval`
//! of good behaviour afterwards takes one off its ejection count.

use std::time::{Duration, Instant};

use mesh_common::traffic::{OutlierDetection, parse_duration};

/// Istio's defaults.
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// An ejection never lasts longer than this, however often the endpoint misbehaved.
const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierSettings {
    consecutive_5xx: Option<u32>,
    consecutive_gateway: Option<u32>,
    interval: Duration,
    base_ejection: Duration,
    max_ejection_percent: u32,
}

impl OutlierSettings {
    pub fn from_policy(o: &OutlierDetection) -> Self {
        let duration =
            |d: &Option<String>, default| d.as_deref().and_then(|d| parse_duration(d).ok()).unwrap_or(default);
        OutlierSettings {
            // Setting only the gateway-error threshold means only gateway errors count (as in Istio).
            consecutive_5xx: o.consecutive_5xx_errors.or(if o.consecutive_gateway_errors.is_some() {
                None
            } else {
                Some(DEFAULT_CONSECUTIVE_5XX)
            }),
            consecutive_gateway: o.consecutive_gateway_errors,
            interval: duration(&o.interval, DEFAULT_INTERVAL),
            base_ejection: duration(&o.base_ejection_time, DEFAULT_BASE_EJECTION),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
        }
    }

    /// How many of `total` endpoints may be out at once; at least one when ejection is allowed at all, so a
    /// two-endpoint Service can still lose its bad half.
    pub fn max_ejected(&self, total: usize) -> usize {
        if self.max_ejection_percent == 0 { 0 } else { (total * self.max_ejection_percent as usize / 100).max(1) }
    }
}

/// What one response said about the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 500, 501, 505 and the like.
    ServerError,
    /// 502, 503, 504 or no response at all.
    GatewayError,
}

impl Outcome {
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => Outcome::GatewayError,
            500..=599 => Outcome::ServerError,
            _ => Outcome::Success,
        }
    }
}

#[derive(Default, Debug)]
pub struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    /// End of the current or last ejection.
    ejected_until: Option<Instant>,
}

impl OutlierState {
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// Records a response; returns true when this endpoint should now be ejected (the caller checks the
    /// ejection limit and then calls [`OutlierState::eject`]).
    pub fn record(&mut self, outcome: Outcome, settings: &OutlierSettings) -> bool {
        match outcome {
            Outcome::Success => {
                self.consecutive_5xx = 0;
                self.consecutive_gateway = 0;
                false
            }
            Outcome::ServerError | Outcome::GatewayError => {
                self.consecutive_5xx += 1;
                if outcome == Outcome::GatewayError {
                    self.consecutive_gateway += 1;
                } else {
                    self.consecutive_gateway = 0;
                }
                settings.consecutive_5xx.is_some_and(|n| self.consecutive_5xx >= n)
                    || settings.consecutive_gateway.is_some_and(|n| self.consecutive_gateway >= n)
            }
        }
    }

    pub fn eject(&mut self, settings: &OutlierSettings, now: Instant) -> Duration {
        if let Some(until) = self.ejected_until {
            // Whole intervals of good behaviour since the endpoint returned forgive one ejection each.
            let good = now.saturating_duration_since(until);
            let forgiven = (good.as_secs_f64() / settings.interval.as_secs_f64().max(0.001)) as u32;
            self.ejections = self.ejections.saturating_sub(forgiven);
        }
        self.ejections += 1;
        let time = (settings.base_ejection * self.ejections).min(MAX_EJECTION);
        self.ejected_until = Some(now + time);
        self.consecutive_5xx = 0;
        self.consecutive_gateway = 0;
        time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings::from_policy(&OutlierDetection {
            consecutive_5xx_errors: Some(3),
            base_ejection_time: Some("1s".into()),
            interval: Some("10s".into()),
            ..Default::default()
        })
    }

    #[test]
    fn consecutive_errors_eject_for_growing_times() {
        let s = settings();
        let mut e = OutlierState::default();
        let t = Instant::now();
        assert!(!e.record(Outcome::ServerError, &s));
        assert!(!e.record(Outcome::ServerError, &s));
        assert!(!e.record(Outcome::Success, &s), "a success resets the count");
        assert!(!e.record(Outcome::GatewayError, &s));
        assert!(!e.record(Outcome::ServerError, &s));
        assert!(e.record(Outcome::ServerError, &s));
        assert_eq!(e.eject(&s, t), Duration::from_secs(1));
        assert!(e.is_ejected(t + Duration::from_millis(999)));
        assert!(!e.is_ejected(t + Duration::from_secs(1)), "returns when the time is over");
        assert_eq!(e.eject(&s, t + Duration::from_secs(2)), Duration::from_secs(2), "base time × ejections");
        assert_eq!(e.eject(&s, t + Duration::from_secs(60)), Duration::from_secs(1), "good intervals forgive");
    }

    #[test]
    fn gateway_only_thresholds_and_limits() {
        let s = OutlierSettings::from_policy(&OutlierDetection {
            consecutive_gateway_errors: Some(2),
            ..Default::default()
        });
        let mut e = OutlierState::default();
        assert!(!e.record(Outcome::ServerError, &s));
        assert!(!e.record(Outcome::ServerError, &s));
        assert!(!e.record(Outcome::ServerError, &s), "500s do not count when only gateway errors are configured");
        assert!(!e.record(Outcome::GatewayError, &s));
        assert!(e.record(Outcome::GatewayError, &s));
        assert_eq!(s.max_ejected(2), 1);
        assert_eq!(s.max_ejected(40), 4);
    }
}
