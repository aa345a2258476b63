//! Per-endpoint live statistics: in-flight count, peak-EWMA latency, passive and active health.
//!
//! These live *outside* the routing snapshot. The control path looks them up in a
//! [`StatsRegistry`] by endpoint key when it builds a table, so an endpoint that survives a table
//! swap keeps its counters, its latency estimate and its ejection. The data path only touches the
//! atomics through an `Arc<EndpointStats>`: no locks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock;
use crate::model::Protocol;

/// Latency assumed for an endpoint with no sample yet, in nanoseconds.
///
/// A zero seed would make a new endpoint look free to P2C and it would be flooded until its first
/// samples arrive; 10 ms is pessimistic for a LAN backend, so a new endpoint earns traffic as its
/// real latency shows up.
pub const DEFAULT_RTT_NS: u64 = 10_000_000;

/// Decay time constant of the EWMA, in nanoseconds (10 s, as linkerd and Finagle use).
pub const EWMA_DECAY_NS: f64 = 10_000_000_000.0;

/// Smallest elapsed time used in the decay, so two samples in the same nanosecond do not divide
/// by zero or weigh nothing.
const MIN_DECAY_NS: f64 = 1.0;

/// First ejection after a failed connect; doubles per consecutive failure up to the max.
const EJECT_BASE_MS: u64 = 1_000;
const EJECT_MAX_MS: u64 = 30_000;

/// Active health state set by the health checker.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No active check configured or not yet run: treated as up.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// Live counters of one endpoint. Shared by every table generation that contains the endpoint.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    /// Peak-EWMA latency estimate in nanoseconds (stored as f64 bits).
    ewma_bits: AtomicU64,
    /// Time of the last EWMA update ([`clock::now_ns`]).
    ewma_stamp: AtomicU64,
    /// Passive health: consecutive connect failures and the time until which it is ejected.
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    health: AtomicU8,
    /// Totals for metrics and the admin API.
    pub total_connections: AtomicU64,
    pub total_failures: AtomicU64,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            in_flight: AtomicU32::new(0),
            ewma_bits: AtomicU64::new((DEFAULT_RTT_NS as f64).to_bits()),
            ewma_stamp: AtomicU64::new(clock::now_ns()),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            total_connections: AtomicU64::new(0),
            total_failures: AtomicU64::new(0),
        }
    }
}

impl EndpointStats {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count a connection or request as in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.total_connections.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Arc::clone(self),
        }
    }

    /// Current latency estimate in nanoseconds, decayed to `now_ns`.
    pub fn ewma_ns(&self, now_ns: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp.load(Ordering::Relaxed);
        // With no new samples the estimate decays towards zero, so an endpoint that was slow
        // once is tried again eventually.
        let elapsed = (now_ns.saturating_sub(stamp) as f64).max(MIN_DECAY_NS);
        ewma * (-elapsed / EWMA_DECAY_NS).exp()
    }

    /// Record a latency sample (connect time for L4, time to response headers for L7).
    ///
    /// Peak-EWMA: a sample above the estimate replaces it at once (react to slowness now),
    /// a lower one is blended in with weight by elapsed time. Races between two recorders only
    /// lose one sample, which an estimate can afford.
    pub fn record_latency(&self, sample_ns: u64, now_ns: u64) {
        let sample = sample_ns as f64;
        let old = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp.load(Ordering::Relaxed);
        let new = if sample > old {
            sample
        } else {
            let elapsed = (now_ns.saturating_sub(stamp) as f64).max(MIN_DECAY_NS);
            let w = (-elapsed / EWMA_DECAY_NS).exp();
            old * w + sample * (1.0 - w)
        };
        self.ewma_bits.store(new.to_bits(), Ordering::Relaxed);
        self.ewma_stamp.store(now_ns, Ordering::Relaxed);
    }

    /// Passive health: a connect to this endpoint failed. Ejects it for a backoff period.
    pub fn record_failure(&self, now_ms: u64) {
        self.total_failures.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(5);
        let backoff = (EJECT_BASE_MS << n).min(EJECT_MAX_MS);
        self.ejected_until_ms
            .store(now_ms + backoff, Ordering::Relaxed);
    }

    /// Passive health: a connect succeeded; clears the failure streak.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::Relaxed);
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// May this endpoint take a new connection at `now_ms`?
    #[inline]
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.health.load(Ordering::Relaxed) != Health::Down as u8
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Until when (process ms) passive health keeps this endpoint out; 0 when it is not ejected.
    pub fn ejected_until_ms(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<EndpointStats>,
}

impl InFlight {
    pub fn stats(&self) -> &Arc<EndpointStats> {
        &self.stats
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Key of an endpoint's stats: the service, the transport and the resolved upstream address.
/// TCP and UDP to the same `ip:port` are different endpoints: a DNS server may answer on one and
/// not the other, so a verdict on one must not eject the other.
pub type StatsKey = (Arc<str>, Protocol, SocketAddr);

/// Control-path map from endpoint key to its stats. Only table builds and the health checker use
/// it, never the data path, so a plain mutex is right: it is held for a map lookup, never across
/// an `.await`.
#[derive(Debug, Default)]
pub struct StatsRegistry {
    map: Mutex<HashMap<StatsKey, (Arc<EndpointStats>, u64)>>,
}

impl StatsRegistry {
    /// The stats for `key`, created if new; marks it as used by `generation`.
    pub fn get(
        &self,
        service: &Arc<str>,
        protocol: Protocol,
        addr: SocketAddr,
        generation: u64,
    ) -> Arc<EndpointStats> {
        let mut map = self.map.lock().expect("stats registry poisoned");
        let entry = map
            .entry((Arc::clone(service), protocol, addr))
            .or_insert_with(|| (Arc::new(EndpointStats::default()), generation));
        entry.1 = generation;
        Arc::clone(&entry.0)
    }

    /// Forget endpoints not used by `generation` or later. In-flight guards keep their own `Arc`.
    pub fn retain_generation(&self, generation: u64) {
        let mut map = self.map.lock().expect("stats registry poisoned");
        map.retain(|_, (_, g)| *g >= generation);
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("stats registry poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
