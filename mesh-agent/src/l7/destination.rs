//! Per-Service runtime state on the calling side: the endpoints with their load, latency and outlier
//! history, and the Service's TrafficPolicy turned into a balancer, circuit breaker, retry budget and rate
//! limiter. Kept across config updates (an endpoint that stays keeps its history; unchanged settings keep
//! their counters), rebuilt lazily on the first request after a change.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::snapshot::Snapshot;
use mesh_common::config::{Locality, Service};
use mesh_common::traffic::{Algorithm, TrafficSettings};

use super::balance::{Balancer, Ewma};
use super::breaker::Breaker;
use super::outlier::{Outcome, OutlierSettings, OutlierState};
use super::ratelimit::RateLimiter;
use super::retry::Budget;

/// Where the calling agent runs (borrowed: it is looked at on every pick).
#[derive(Clone, Copy)]
pub struct Here<'a> {
    pub node: &'a str,
    pub locality: &'a Locality,
}

impl<'a> Here<'a> {
    pub fn of(node: &'a str, config: &'a Snapshot) -> Self {
        Here { node, locality: &config.locality }
    }
}

/// One endpoint (pod IP) of a Service; the port comes from the Service port being called.
pub struct Endpoint {
    pub ip: IpAddr,
    pub node: Option<String>,
    pub locality: Locality,
    in_flight: AtomicUsize,
    latency: Mutex<Ewma>,
    outlier: Mutex<OutlierState>,
}

/// Counts a request as in flight on its endpoint until dropped.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Endpoint {
    pub fn new(ip: IpAddr, node: Option<String>, locality: Locality) -> Self {
        Endpoint {
            ip,
            node,
            locality,
            in_flight: AtomicUsize::new(0),
            latency: Default::default(),
            outlier: Default::default(),
        }
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Least-request cost: expected latency times the requests it would queue behind.
    pub fn load(&self) -> f64 {
        let latency = self.latency.lock().unwrap_or_else(|p| p.into_inner()).latency_ms(Instant::now());
        // A floor of 1 µs, so requests in flight count even on an endpoint not measured yet.
        latency.max(0.001) * (self.in_flight.load(Ordering::Acquire) + 1) as f64
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.outlier.lock().unwrap_or_else(|p| p.into_inner()).is_ejected(now)
    }
}

/// The parts of a destination that live as long as its settings do.
#[derive(Clone)]
struct Shared {
    settings: TrafficSettings,
    balancer: Arc<Balancer>,
    breaker: Arc<Breaker>,
    budget: Arc<Budget>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Shared {
    fn new(settings: TrafficSettings) -> Self {
        Shared {
            balancer: Default::default(),
            breaker: Arc::new(Breaker::new(settings.connection_pool.as_ref())),
            budget: Arc::new(Budget::new(settings.retry_budget.as_ref())),
            limiter: settings.rate_limit.as_ref().map(|r| Arc::new(RateLimiter::new(r))),
            settings,
        }
    }
}

pub struct Destination {
    pub namespace: String,
    pub name: String,
    generation: u64,
    endpoints: Vec<Arc<Endpoint>>,
    outlier: Option<OutlierSettings>,
    shared: Shared,
}

impl Destination {
    fn build(service: &Service, settings: TrafficSettings, old: Option<&Destination>, generation: u64) -> Self {
        let known: HashMap<IpAddr, &Arc<Endpoint>> =
            old.map(|o| o.endpoints.iter().map(|e| (e.ip, e)).collect()).unwrap_or_default();
        let endpoints = service
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| {
                let ip = e.ip.to_canonical();
                known
                    .get(&ip)
                    .map(|k| (*k).clone())
                    .unwrap_or_else(|| Arc::new(Endpoint::new(ip, e.node.clone(), e.locality.clone())))
            })
            .collect();
        let shared = match old {
            Some(o) if o.shared.settings == settings => o.shared.clone(),
            _ => Shared::new(settings),
        };
        Destination {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            generation,
            endpoints,
            outlier: shared.settings.outlier_detection.as_ref().map(OutlierSettings::from_policy),
            shared,
        }
    }

    pub fn settings(&self) -> &TrafficSettings {
        &self.shared.settings
    }

    pub fn breaker(&self) -> &Breaker {
        &self.shared.breaker
    }

    pub fn budget(&self) -> &Budget {
        &self.shared.budget
    }

    pub fn limiter(&self) -> Option<&RateLimiter> {
        self.shared.limiter.as_deref()
    }

    /// Chooses an endpoint that is ready and not ejected (with locality preference: on this node if there is
    /// one, else in this zone, else in this region, else anywhere); `None` when there is none. `key` is the
    /// consistent-hash key, if the policy hashes and the request has one.
    pub fn pick(&self, key: Option<u64>, here: &Here) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let mut candidates: Vec<Arc<Endpoint>> =
            self.endpoints.iter().filter(|e| !e.is_ejected(now)).cloned().collect();
        if candidates.is_empty() {
            return None;
        }
        let lb = self.shared.settings.load_balancer.as_ref();
        if lb.is_some_and(|lb| lb.locality_preference) {
            let same_node = |e: &Endpoint| e.node.as_deref() == Some(here.node);
            let same_zone = |e: &Endpoint| here.locality.zone.is_some() && e.locality == *here.locality;
            let same_region =
                |e: &Endpoint| here.locality.region.is_some() && e.locality.region == here.locality.region;
            let tiers: [&dyn Fn(&Endpoint) -> bool; 3] = [&same_node, &same_zone, &same_region];
            let nearest = tiers.iter().map(|near| candidates.iter().filter(|e| near(e)).cloned().collect::<Vec<_>>());
            if let Some(nearest) = nearest.into_iter().find(|tier| !tier.is_empty()) {
                candidates = nearest;
            }
        }
        let algorithm = lb.map(|lb| lb.algorithm).unwrap_or(Algorithm::LeastRequest);
        Some(self.shared.balancer.pick(algorithm, &candidates, key))
    }

    /// Feeds one response into latency tracking and outlier detection.
    pub fn record(&self, endpoint: &Endpoint, outcome: Outcome, latency: Duration) {
        let now = Instant::now();
        endpoint.latency.lock().unwrap_or_else(|p| p.into_inner()).observe(latency, now);
        let Some(settings) = &self.outlier else { return };
        let tripped = endpoint.outlier.lock().unwrap_or_else(|p| p.into_inner()).record(outcome, settings);
        if !tripped {
            return;
        }
        // Counted without holding the endpoint's lock (never two outlier locks at once).
        let ejected = self.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        if ejected < settings.max_ejected(self.endpoints.len()) {
            let time = endpoint.outlier.lock().unwrap_or_else(|p| p.into_inner()).eject(settings, now);
            tracing::info!(service = %format!("{}/{}", self.namespace, self.name), endpoint = %endpoint.ip, ?time, "endpoint ejected");
        }
    }
}

/// What `/services` shows of one endpoint the agent has been balancing over.
#[derive(serde::Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub ip: IpAddr,
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    pub in_flight: usize,
    /// Latency EWMA the least-request balancer uses.
    pub latency_ms: f64,
    /// Ejected by outlier detection right now.
    pub ejected: bool,
}

impl Destination {
    pub fn endpoint_views(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| EndpointView {
                ip: e.ip,
                node: e.node.clone(),
                locality: e.locality.clone(),
                in_flight: e.in_flight.load(Ordering::Acquire),
                latency_ms: e.latency.lock().unwrap_or_else(|p| p.into_inner()).latency_ms(now),
                ejected: e.is_ejected(now),
            })
            .collect()
    }
}

/// Destinations by `namespace/name`, refreshed from the newest config on use.
#[derive(Default)]
pub struct Destinations {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// The config the generation belongs to (held, so its address cannot be reused by another config).
    config: Option<Arc<Snapshot>>,
    generation: u64,
    /// By namespace, then name: looked up with the request's borrowed names (no key is built per request).
    map: HashMap<String, HashMap<String, Arc<Destination>>>,
}

impl Destinations {
    /// The destinations this agent has sent traffic to (as of their last use).
    pub fn known(&self) -> Vec<Arc<Destination>> {
        let r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.map.values().flat_map(|by_name| by_name.values().cloned()).collect()
    }

    pub fn get(&self, config: &Arc<Snapshot>, namespace: &str, name: &str) -> Option<Arc<Destination>> {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !r.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            r.config = Some(config.clone());
            r.generation += 1;
        }
        let generation = r.generation;
        let old = r.map.get(namespace).and_then(|by_name| by_name.get(name)).cloned();
        if let Some(d) = old.as_ref().filter(|d| d.generation == generation) {
            return Some(d.clone());
        }
        let Some(service) = config.service(namespace, name) else {
            if let Some(by_name) = r.map.get_mut(namespace) {
                by_name.remove(name);
            }
            return None;
        };
        let settings = config
            .traffic_policies
            .iter()
            .find(|p| p.namespace == namespace && p.service == name)
            .map(|p| p.settings.clone())
            .unwrap_or_default();
        let d = Arc::new(Destination::build(service, settings, old.as_deref(), generation));
        r.map.entry(namespace.to_string()).or_default().insert(name.to_string(), d.clone());
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::config::Endpoint as ConfigEndpoint;
    use mesh_common::traffic::LoadBalancer;

    fn locality(zone: &str, region: &str) -> Locality {
        Locality { zone: Some(zone.into()), region: Some(region.into()) }
    }

    #[test]
    fn locality_prefers_node_then_zone_then_region() {
        let endpoint = |ip: &str, node: &str, l: Locality| ConfigEndpoint {
            ip: ip.parse().unwrap(),
            workload: None,
            node: Some(node.into()),
            locality: l,
            ready: true,
        };
        let service = |endpoints| Service { namespace: "a".into(), name: "s".into(), endpoints, ..Default::default() };
        let settings = TrafficSettings {
            load_balancer: Some(LoadBalancer {
                algorithm: Algorithm::RoundRobin,
                hash_key: None,
                locality_preference: true,
            }),
            ..Default::default()
        };
        let near = locality("z1", "r1");
        let here = Here { node: "n1", locality: &near };
        let all = [
            endpoint("10.0.0.1", "n1", locality("z1", "r1")),
            endpoint("10.0.0.2", "n2", locality("z1", "r1")),
            endpoint("10.0.0.3", "n3", locality("z2", "r1")),
            endpoint("10.0.0.4", "n4", locality("z9", "r2")),
        ];
        for (from, expected) in [(0, "10.0.0.1"), (1, "10.0.0.2"), (2, "10.0.0.3")] {
            let d = Destination::build(&service(all[from..].to_vec()), settings.clone(), None, 1);
            for _ in 0..5 {
                assert_eq!(d.pick(None, &here).unwrap().ip.to_string(), expected);
            }
        }
        let far = Destination::build(&service(all[3..].to_vec()), settings, None, 1);
        assert_eq!(far.pick(None, &here).unwrap().ip.to_string(), "10.0.0.4", "anywhere when nothing is near");
    }
}
