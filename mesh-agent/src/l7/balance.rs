//! Choosing an endpoint: round robin, least request (power of two choices weighted by an EWMA of latency, the
//! default), and consistent hashing on a ring or a Maglev table. Locality narrows the candidates first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_common::traffic::Algorithm;

use super::destination::Endpoint;

/// How quickly old latency observations fade.
const EWMA_DECAY: Duration = Duration::from_secs(10);
const RING_POINTS_PER_ENDPOINT: usize = 128;
/// Maglev lookup table size: a prime well above the endpoint count (Envoy's default).
const MAGLEV_TABLE_SIZE: usize = 65537;

/// A peak-sensitive, decaying estimate of an endpoint's response latency (the "peak EWMA" of Finagle and
/// Linkerd). A slower response raises it at once; faster ones pull it down over `EWMA_DECAY`; and while the
/// endpoint gets no traffic it fades toward zero, so an endpoint avoided for being slow is tried again later
/// instead of starving. An endpoint never measured costs nothing: it is tried as soon as it is drawn.
#[derive(Default)]
pub struct Ewma {
    latency_ms: f64,
    at: Option<Instant>,
}

impl Ewma {
    pub fn observe(&mut self, latency: Duration, now: Instant) {
        let sample = latency.as_secs_f64() * 1000.0;
        let current = self.latency_ms(now);
        self.latency_ms = match self.at {
            Some(at) if sample < current => {
                let weight = (-(now.saturating_duration_since(at)).as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
                current * weight + sample * (1.0 - weight)
            }
            _ => sample,
        };
        self.at = Some(now);
    }

    /// The estimate at `now`, faded by the time since the last observation.
    pub fn latency_ms(&self, now: Instant) -> f64 {
        self.at.map_or(0.0, |at| {
            let idle = now.saturating_duration_since(at).as_secs_f64();
            self.latency_ms * (-idle / EWMA_DECAY.as_secs_f64()).exp()
        })
    }
}

/// A stable 64-bit hash (FNV-1a with a final avalanche), the same in every agent and across restarts.
pub fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The consistent-hash key of a client address.
pub fn source_ip_key(ip: std::net::IpAddr) -> u64 {
    hash(ip.to_canonical().to_string().as_bytes(), 0)
}

fn endpoint_key(e: &Endpoint) -> Vec<u8> {
    e.ip.to_string().into_bytes()
}

enum HashTable {
    Ring(Vec<(u64, usize)>),
    Maglev(Vec<usize>),
}

impl HashTable {
    fn ring(endpoints: &[Arc<Endpoint>]) -> Self {
        let mut points = Vec::with_capacity(endpoints.len() * RING_POINTS_PER_ENDPOINT);
        for (i, e) in endpoints.iter().enumerate() {
            let key = endpoint_key(e);
            for replica in 0..RING_POINTS_PER_ENDPOINT as u64 {
                points.push((hash(&key, replica), i));
            }
        }
        points.sort_unstable();
        HashTable::Ring(points)
    }

    /// Maglev (Eisenbud et al., NSDI 2016): each endpoint fills the table along its own permutation, taking turns,
    /// so every endpoint owns an equal share and a change of endpoints moves few keys.
    fn maglev(endpoints: &[Arc<Endpoint>]) -> Self {
        let m = MAGLEV_TABLE_SIZE;
        let perms: Vec<(usize, usize)> = endpoints
            .iter()
            .map(|e| {
                let key = endpoint_key(e);
                let offset = (hash(&key, 0xdead) % m as u64) as usize;
                let skip = (hash(&key, 0xbeef) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; endpoints.len()];
        let mut table = vec![usize::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot] != usize::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot] = i;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        HashTable::Maglev(table)
    }

    fn lookup(&self, key: u64) -> usize {
        match self {
            HashTable::Ring(points) => {
                let i = points.partition_point(|(h, _)| *h < key);
                points[i % points.len()].1
            }
            HashTable::Maglev(table) => table[(key % table.len() as u64) as usize],
        }
    }
}

/// The per-destination part of balancing: the round-robin cursor and the cached consistent-hash table (rebuilt
/// when the set of candidates changes, e.g. an endpoint is ejected or returns).
#[derive(Default)]
pub struct Balancer {
    cursor: AtomicUsize,
    table: Mutex<Option<(u64, Arc<HashTable>)>>,
}

impl Balancer {
    /// Picks one of `candidates` (non-empty). `key` is the request's hash key for consistent hashing; without
    /// one, hashing algorithms fall back to least request.
    pub fn pick(&self, algorithm: Algorithm, candidates: &[Arc<Endpoint>], key: Option<u64>) -> Arc<Endpoint> {
        let n = candidates.len();
        if n == 1 {
            return candidates[0].clone();
        }
        match (algorithm, key) {
            (Algorithm::RoundRobin, _) => candidates[self.cursor.fetch_add(1, Ordering::Relaxed) % n].clone(),
            (Algorithm::RingHash | Algorithm::Maglev, Some(key)) => {
                let table = self.table(algorithm, candidates);
                candidates[table.lookup(key)].clone()
            }
            _ => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (ea, eb) = (&candidates[a], &candidates[b]);
                if ea.load() <= eb.load() { ea.clone() } else { eb.clone() }
            }
        }
    }

    fn table(&self, algorithm: Algorithm, candidates: &[Arc<Endpoint>]) -> Arc<HashTable> {
        let mut set = Vec::new();
        for e in candidates {
            set.extend(endpoint_key(e));
        }
        let set_key = hash(&set, algorithm as u64);
        let mut cached = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, table)) = cached.as_ref().filter(|(k, _)| *k == set_key) {
            return table.clone();
        }
        let table = Arc::new(match algorithm {
            Algorithm::Maglev => HashTable::maglev(candidates),
            _ => HashTable::ring(candidates),
        });
        *cached = Some((set_key, table.clone()));
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(Endpoint::new(format!("10.0.0.{i}").parse().unwrap(), None, Default::default())))
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = Balancer::default();
        let e = endpoints(3);
        let picks: Vec<_> = (0..6).map(|_| b.pick(Algorithm::RoundRobin, &e, None).ip).collect();
        assert_eq!(picks[..3], picks[3..]);
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let b = Balancer::default();
        let e = endpoints(2);
        let _busy: Vec<_> = (0..10).map(|_| e[0].start()).collect();
        for _ in 0..20 {
            assert_eq!(b.pick(Algorithm::LeastRequest, &e, None).ip, e[1].ip);
        }
    }

    #[test]
    fn consistent_hashing_is_stable_and_spreads_keys() {
        for algorithm in [Algorithm::RingHash, Algorithm::Maglev] {
            let b = Balancer::default();
            let e = endpoints(4);
            let mut counts = [0usize; 4];
            for k in 0..4000u64 {
                let key = hash(&k.to_le_bytes(), 0);
                let first = b.pick(algorithm, &e, Some(key));
                assert_eq!(b.pick(algorithm, &e, Some(key)).ip, first.ip);
                counts[e.iter().position(|x| x.ip == first.ip).unwrap()] += 1;
            }
            assert!(counts.iter().all(|c| *c > 500), "{algorithm:?} spread {counts:?}");
            // Removing one endpoint moves only (about) that endpoint's keys.
            let (fewer, after) = (&e[..3], Balancer::default());
            let moved = (0..4000u64)
                .filter(|k| {
                    let key = hash(&k.to_le_bytes(), 0);
                    let before = b.pick(algorithm, &e, Some(key)).ip;
                    before != e[3].ip && after.pick(algorithm, fewer, Some(key)).ip != before
                })
                .count();
            assert!(moved < 400, "{algorithm:?} moved {moved} keys that did not need to move");
        }
    }

    #[test]
    fn ewma_follows_recent_latency() {
        let mut ewma = Ewma::default();
        let t = Instant::now();
        assert_eq!(ewma.latency_ms(t), 0.0, "never measured: tried first");
        ewma.observe(Duration::from_millis(100), t);
        assert!((ewma.latency_ms(t) - 100.0).abs() < 1e-6, "first sample taken as is");
        let later = t + Duration::from_secs(10);
        ewma.observe(Duration::from_millis(0), later);
        assert!(ewma.latency_ms(later) < 40.0, "{}", ewma.latency_ms(later));
    }

    #[test]
    fn ewma_jumps_to_a_peak_and_fades_while_idle() {
        let mut ewma = Ewma::default();
        let t = Instant::now();
        ewma.observe(Duration::from_millis(1), t);
        ewma.observe(Duration::from_millis(50), t + Duration::from_millis(5));
        assert!(
            (ewma.latency_ms(t + Duration::from_millis(5)) - 50.0).abs() < 1e-6,
            "a slower response counts at once"
        );
        // Many fast responses in quick succession barely move it: one slow answer keeps mattering for a while.
        for i in 1..=10 {
            ewma.observe(Duration::from_millis(1), t + Duration::from_millis(5 + i));
        }
        assert!(ewma.latency_ms(t + Duration::from_millis(15)) > 45.0);
        // Untouched for half a minute it fades, so the balancer tries the endpoint again.
        assert!(ewma.latency_ms(t + Duration::from_secs(30)) < 3.0);
    }
}
