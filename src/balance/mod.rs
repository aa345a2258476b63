//! Endpoint picking: which endpoint of a pool gets the next connection or request.
//!
//! Sits on the data path between the route lookup and the upstream connect. A [`Balancer`] is
//! built once per pool on the control path (with the [`RoutingTable`](crate::table::RoutingTable))
//! and then shared read-only by every thread; a pick is a pure function of the immutable endpoint
//! slice, the per-endpoint [`EndpointStats`] atomics and, for some policies, one atomic cursor.
//! No pick allocates or takes a lock.
//!
//! Policies, one file each:
//! - [`rr`]: weighted round robin over a precomputed smooth (nginx-style) schedule.
//! - [`least_conn`]: fewest in-flight per unit of weight, rotating tie-break.
//! - [`p2c`]: power of two random choices over peak-EWMA latency × (in-flight + 1).
//! - [`maglev`]: Maglev consistent hashing on the client IP hash.
//!
//! Every policy skips endpoints that are excluded for this pick (already tried by a retry) or
//! unavailable (ejected by passive health, or marked down by the active check), and returns
//! `None` only when no endpoint is usable.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::Policy;
use crate::stats::EndpointStats;

mod hash;
pub mod least_conn;
pub mod maglev;
pub mod p2c;
pub mod rr;

#[cfg(test)]
mod proptests;

use hash::mix64;

/// One endpoint as the data path sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Resolved upstream address.
    pub addr: SocketAddr,
    /// Relative share of traffic; 0 is treated as 1 by the balancers (the table builder already
    /// leaves weight-0 endpoints out).
    pub weight: u32,
    /// Stable identity (task ID, container ID or address).
    pub id: Arc<str>,
    pub stats: Arc<EndpointStats>,
}

impl Endpoint {
    /// The weight the balancers use: never 0, so no division by zero and no endpoint that is
    /// present but can never be picked.
    #[inline]
    pub(crate) fn effective_weight(&self) -> u32 {
        self.weight.max(1)
    }
}

/// Indices already tried for this request (retries go to a different endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exclude {
    idx: [u32; 4],
    len: u8,
}

impl Exclude {
    pub fn insert(&mut self, i: usize) {
        if (self.len as usize) < self.idx.len() {
            self.idx[self.len as usize] = i as u32;
            self.len += 1;
        }
    }
    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        self.idx[..self.len as usize].contains(&(i as u32))
    }
}

/// Inputs of one pick.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext {
    /// Hash of the stickiness key (client IP for consistent hashing).
    pub hash: u64,
    pub now_ms: u64,
    pub now_ns: u64,
    pub exclude: Exclude,
}

impl PickContext {
    /// May endpoint `i` take this pick: not excluded and not ejected or down?
    #[inline]
    pub(crate) fn usable(&self, endpoints: &[Endpoint], i: usize) -> bool {
        !self.exclude.contains(i) && endpoints[i].stats.is_available(self.now_ms)
    }
}

/// Per-pool balancer state, built on the control path.
///
/// Lives inside the immutable routing table and is shared by every thread, so the only mutable
/// state is atomics inside the policy state.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    state: State,
}

#[derive(Debug)]
enum State {
    RoundRobin(rr::RoundRobin),
    LeastConn(least_conn::LeastConn),
    P2c(p2c::P2c),
    Maglev(maglev::Maglev),
}

impl Balancer {
    /// Build the balancer for `endpoints`. Expensive for [`Policy::ConsistentHash`] (a Maglev
    /// table, milliseconds) and cheap otherwise; always called on the control path.
    ///
    /// [`pick`](Self::pick) must be given the same slice (the pool keeps both together).
    pub fn new(policy: Policy, endpoints: &[Endpoint]) -> Self {
        let state = match policy {
            Policy::RoundRobin => State::RoundRobin(rr::RoundRobin::new(endpoints)),
            Policy::LeastConn => State::LeastConn(least_conn::LeastConn::new()),
            Policy::P2c => State::P2c(p2c::P2c),
            Policy::ConsistentHash => State::Maglev(maglev::Maglev::new(endpoints)),
        };
        Balancer { policy, state }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Index of the endpoint to use, or `None` if no endpoint is available.
    ///
    /// Each policy's own `pick` handles an empty slice too; this check only saves the dispatch.
    /// The result is always `< endpoints.len()`, never excluded by `ctx.exclude` and never an
    /// unavailable endpoint. Even if the slice is not the one the balancer was built with, the
    /// pick stays in bounds (the precomputed tables are then only a hint).
    #[inline]
    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let picked = match &self.state {
            State::RoundRobin(s) => s.pick(endpoints, ctx),
            State::LeastConn(s) => s.pick(endpoints, ctx),
            State::P2c(s) => s.pick(endpoints, ctx),
            State::Maglev(s) => s.pick(endpoints, ctx),
        };
        debug_assert!(picked.is_none_or(|i| i < endpoints.len() && ctx.usable(endpoints, i)));
        picked
    }
}

/// Hash of a client IP for consistent hashing.
///
/// Deterministic across processes and nodes (no per-process random keys), so every meshgate
/// node sends one client to the same endpoint. The address bits go through a 64-bit finalizer
/// so neighbouring addresses land far apart in the Maglev table.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        // Distinct tags keep 10.0.0.1 and ::10.0.0.1 apart.
        IpAddr::V4(v4) => mix64(u64::from(u32::from(v4)) ^ 0x4_0000_0000),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix64(mix64((bits >> 64) as u64 ^ 0x6) ^ bits as u64)
        }
    }
}

/// First usable endpoint at or after `start`, wrapping around: the last resort of every policy,
/// O(n) and only reached when the policy's own candidates are all unusable.
#[inline]
pub(crate) fn scan_from(endpoints: &[Endpoint], ctx: &PickContext, start: usize) -> Option<usize> {
    let n = endpoints.len();
    let start = start % n;
    (start..n)
        .chain(0..start)
        .find(|&i| ctx.usable(endpoints, i))
}

/// A per-process random 64-bit value (std's `RandomState` keys are random per process).
///
/// Used only for starting offsets, where "different on every node" is the point; never for
/// anything that must agree between nodes.
pub(crate) fn process_random() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(crate::clock::now_ns());
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Endpoint fixtures shared by the policy tests.
    use super::*;

    pub fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| endpoint(i, w))
            .collect()
    }

    pub fn endpoint(i: usize, weight: u32) -> Endpoint {
        let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080));
        Endpoint {
            addr,
            weight,
            id: Arc::from(format!("task-{i}")),
            stats: Arc::new(EndpointStats::default()),
        }
    }

    /// A context at the current process time: [`EndpointStats`] stamps its latency seed with
    /// the real clock, so a made-up `now_ns` would decay every estimate to nothing.
    pub fn ctx() -> PickContext {
        PickContext {
            hash: 0,
            now_ms: crate::clock::now_ms(),
            now_ns: crate::clock::now_ns(),
            exclude: Exclude::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    const ALL: [Policy; 4] = [
        Policy::RoundRobin,
        Policy::LeastConn,
        Policy::P2c,
        Policy::ConsistentHash,
    ];

    #[test]
    fn empty_pool_picks_nothing() {
        for policy in ALL {
            let b = Balancer::new(policy, &[]);
            assert_eq!(b.pick(&[], &ctx()), None, "{policy:?}");
            assert_eq!(b.policy(), policy);
        }
        // The policies themselves, without the dispatch's early return.
        let c = ctx();
        assert_eq!(rr::RoundRobin::new(&[]).pick(&[], &c), None);
        assert_eq!(least_conn::LeastConn::new().pick(&[], &c), None);
        assert_eq!(p2c::P2c.pick(&[], &c), None);
        assert_eq!(maglev::Maglev::new(&[]).pick(&[], &c), None);
    }

    #[test]
    fn everything_excluded_or_down_picks_nothing() {
        let eps = endpoints(&[1, 2, 3]);
        for policy in ALL {
            let b = Balancer::new(policy, &eps);
            let mut c = ctx();
            c.exclude.insert(0);
            c.exclude.insert(2);
            eps[1].stats.record_failure(c.now_ms);
            for _ in 0..20 {
                assert_eq!(b.pick(&eps, &c), None, "{policy:?}");
            }
            eps[1].stats.record_success();
            for _ in 0..20 {
                assert_eq!(b.pick(&eps, &c), Some(1), "{policy:?}");
            }
        }
    }

    #[test]
    fn ejected_endpoint_is_skipped_until_backoff_ends() {
        let eps = endpoints(&[1, 1, 1]);
        let c = ctx();
        eps[1].stats.record_failure(c.now_ms);
        for policy in ALL {
            let b = Balancer::new(policy, &eps);
            let mut seen = [0u32; 3];
            for h in 0..300u64 {
                let c = PickContext {
                    hash: mix64(h),
                    ..c
                };
                seen[b.pick(&eps, &c).expect("two endpoints are up")] += 1;
            }
            assert_eq!(seen[1], 0, "{policy:?} picked an ejected endpoint");
            // After the backoff (1 s for a first failure) it is eligible again.
            let later = PickContext {
                now_ms: c.now_ms + 1_000,
                ..c
            };
            let back = (0..300u64).any(|h| {
                let c = PickContext {
                    hash: mix64(h),
                    ..later
                };
                b.pick(&eps, &c) == Some(1)
            });
            assert!(back, "{policy:?} never returned to the recovered endpoint");
        }
    }

    #[test]
    fn pick_with_a_different_slice_stays_in_bounds() {
        let built = endpoints(&[1, 5, 2, 7, 1, 1]);
        let other = endpoints(&[1, 1]);
        for policy in ALL {
            let b = Balancer::new(policy, &built);
            for h in 0..200u64 {
                let c = PickContext {
                    hash: mix64(h),
                    ..ctx()
                };
                assert!(b.pick(&other, &c).unwrap() < 2, "{policy:?}");
            }
        }
    }

    const PINNED_10_0_0_1: u64 = 0xdf4c_ca88_7764_38ef;

    #[test]
    fn hash_ip_is_deterministic_and_mixes() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a6: IpAddr = "::10.0.0.1".parse().unwrap();
        assert_eq!(hash_ip(a), hash_ip(a));
        // Pinned value: a change here changes which endpoint every client sticks to across an
        // upgrade, so it must be deliberate.
        assert_eq!(hash_ip(a), PINNED_10_0_0_1);
        assert_ne!(hash_ip(a), hash_ip(a6));
        let diff = (hash_ip(a) ^ hash_ip(b)).count_ones();
        assert!(
            (16..=48).contains(&diff),
            "neighbours differ in {diff} bits"
        );
        // Neighbouring addresses spread over the top bits, where `% M` and Lemire look.
        let mut buckets = [0u32; 16];
        for i in 0..1600u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            buckets[(hash_ip(ip) % 16) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&c| (60..=140).contains(&c)),
            "{buckets:?}"
        );
    }
}
