//! Weighted round robin over a precomputed smooth schedule.
//!
//! At build time the weights are divided by their gcd and expanded into nginx's *smooth* weighted
//! round-robin sequence (weights 5,1,1 give `a a b a c a a`, not `a a a a a b c`), stored as a
//! slice of endpoint indices. A pick is one `fetch_add` on a shared cursor and one slice read.
//!
//! When every normalized weight is 1 the schedule would be `0, 1, …, n-1`, so none is stored and
//! slot `c` is endpoint `c % n`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{process_random, scan_from, Endpoint, PickContext};

/// Longest schedule stored, in slots (256 KiB of `u32`).
///
/// If the normalized weights add up to more, each weight `w` is scaled to
/// `max(1, floor(w × MAX_SCHEDULE / total))`: shares are kept to within one slot per endpoint
/// (a relative error below `1 / scaled weight`), and the floor of 1 keeps every endpoint in the
/// rotation. With more than `MAX_SCHEDULE` endpoints the cap becomes the endpoint count.
pub const MAX_SCHEDULE: usize = 1 << 16;

/// Cursor advances tried when the scheduled endpoint is unusable, before a linear scan.
///
/// Each retry takes a fresh slot from the shared cursor instead of peeking at the next one, so
/// the load of an ejected endpoint spreads over the rotation instead of doubling its neighbour's.
const MAX_SKIPS: usize = 8;

/// Round-robin state of one pool.
pub struct RoundRobin {
    /// Endpoint index per slot; empty when the schedule is the identity (uniform weights).
    schedule: Box<[u32]>,
    /// Number of endpoints the schedule was built for.
    built_for: usize,
    /// Next slot (modulo the schedule length). Shared by all threads: contention on it is the
    /// price of exact round robin; `Relaxed` is enough because only the counter itself matters.
    cursor: AtomicUsize,
}

impl fmt::Debug for RoundRobin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoundRobin")
            .field("endpoints", &self.built_for)
            .field("schedule_len", &self.schedule.len())
            .field("cursor", &self.cursor.load(Ordering::Relaxed))
            .finish()
    }
}

impl RoundRobin {
    pub fn new(endpoints: &[Endpoint]) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(Endpoint::effective_weight).collect();
        let schedule = schedule(&weights).into_boxed_slice();
        let slots = if schedule.is_empty() {
            endpoints.len()
        } else {
            schedule.len()
        };
        // A random start per pool and per node: with the same schedule everywhere, a fixed start
        // would send the first connection of every node to endpoint 0.
        let start = (process_random() as usize).checked_rem(slots).unwrap_or(0);
        RoundRobin {
            schedule,
            built_for: endpoints.len(),
            cursor: AtomicUsize::new(start),
        }
    }

    /// Slots in one full rotation.
    pub fn rotation_len(&self) -> usize {
        if self.schedule.is_empty() {
            self.built_for
        } else {
            self.schedule.len()
        }
    }

    #[inline]
    fn slot(&self, c: usize, n: usize) -> usize {
        if self.schedule.is_empty() || self.built_for != n {
            c % n
        } else {
            self.schedule[c % self.schedule.len()] as usize
        }
    }

    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let mut i = self.slot(self.cursor.fetch_add(1, Ordering::Relaxed), n);
        for _ in 0..MAX_SKIPS.min(n) {
            if ctx.usable(endpoints, i) {
                return Some(i);
            }
            i = self.slot(self.cursor.fetch_add(1, Ordering::Relaxed), n);
        }
        scan_from(endpoints, ctx, i)
    }
}

/// The smooth weighted round-robin schedule for `weights` (each ≥ 1), or an empty vector when
/// it would be the identity.
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let mut w = normalize(weights.iter().map(|&w| u64::from(w.max(1))).collect());
    let mut total: u64 = w.iter().sum();
    let cap = MAX_SCHEDULE.max(weights.len()) as u64;
    if total > cap {
        let scaled = w
            .iter()
            .map(|&x| ((u128::from(x) * u128::from(cap) / u128::from(total)) as u64).max(1))
            .collect();
        w = normalize(scaled);
        total = w.iter().sum();
    }
    if w.iter().all(|&x| x == 1) {
        return Vec::new();
    }
    smooth(&w, total)
}

/// Divide by the gcd so weights 100,200,300 take 6 slots, not 600.
fn normalize(mut w: Vec<u64>) -> Vec<u64> {
    let g = w.iter().fold(0, |g, &x| gcd(g, x)).max(1);
    w.iter_mut().for_each(|x| *x /= g);
    w
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Endpoints that share one weight. In nginx's algorithm they have the same `current` except
/// for how often each has been picked, so they are picked in index order, cyclically.
struct WeightClass {
    weight: i64,
    members: Vec<u32>,
    /// Members before `next` were picked `rounds + 1` times, the rest `rounds` times.
    next: usize,
    rounds: i64,
}

/// nginx's smooth weighted round robin, exactly: at step `t` every endpoint has
/// `current = t·w − total·picks`, the highest wins (lowest index on ties). nginx recomputes it
/// over all n endpoints per step; grouping endpoints by weight makes a step cost the number of
/// distinct weights instead (at most √(2·total), so the worst build is ~10⁸ cheap steps and the
/// usual one, a handful of weights, is linear in the schedule length).
fn smooth(w: &[u64], total: u64) -> Vec<u32> {
    let mut by_weight: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (i, &x) in w.iter().enumerate() {
        by_weight.entry(x).or_default().push(i as u32);
    }
    let mut classes: Vec<WeightClass> = by_weight
        .into_iter()
        .map(|(weight, members)| WeightClass {
            weight: weight as i64,
            members,
            next: 0,
            rounds: 0,
        })
        .collect();
    let total_i = total as i64;
    let mut out = Vec::with_capacity(total as usize);
    for t in 1..=total_i {
        let mut best: Option<(i64, u32, usize)> = None;
        for (ci, c) in classes.iter().enumerate() {
            let current = t * c.weight - total_i * c.rounds;
            let idx = c.members[c.next];
            if best.is_none_or(|(bc, bi, _)| current > bc || (current == bc && idx < bi)) {
                best = Some((current, idx, ci));
            }
        }
        let (_, idx, ci) = best.expect("at least one weight class");
        out.push(idx);
        let c = &mut classes[ci];
        c.next += 1;
        if c.next == c.members.len() {
            c.next = 0;
            c.rounds += 1;
        }
    }
    debug_assert_eq!(out.len() as u64, total);
    out
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    /// nginx's algorithm as written in ngx_http_upstream_get_peer, O(n) per step: the reference.
    fn nginx_reference(w: &[u64]) -> Vec<u32> {
        let total: i64 = w.iter().map(|&x| x as i64).sum();
        let mut current = vec![0i64; w.len()];
        (0..total)
            .map(|_| {
                let mut best = 0;
                for i in 0..w.len() {
                    current[i] += w[i] as i64;
                    if current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= total;
                best as u32
            })
            .collect()
    }

    #[test]
    fn schedule_is_nginx_smooth_sequence() {
        assert_eq!(schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        for w in [
            vec![1, 2, 3],
            vec![3, 3, 1, 7],
            vec![10, 1, 1, 1, 5, 5],
            vec![2, 4, 4, 9],
        ] {
            let wu: Vec<u64> = w.iter().map(|&x| u64::from(x)).collect();
            assert_eq!(schedule(&w), nginx_reference(&normalize(wu)), "{w:?}");
        }
    }

    #[test]
    fn weights_are_divided_by_their_gcd() {
        assert_eq!(schedule(&[100, 200, 300]), schedule(&[1, 2, 3]));
        assert_eq!(schedule(&[7, 7, 7]), Vec::<u32>::new());
        assert_eq!(schedule(&[1, 2, 3]).len(), 6);
    }

    #[test]
    fn oversized_weights_are_scaled_under_the_cap() {
        let w = [1_000_000, 3_000_000, 1, 999_999];
        let s = schedule(&w);
        assert!(s.len() <= MAX_SCHEDULE + w.len(), "{}", s.len());
        let count = |i: u32| s.iter().filter(|&&x| x == i).count() as f64;
        assert!((count(1) / count(0) - 3.0).abs() < 0.01);
        assert_eq!(count(2), 1.0, "a tiny weight keeps one slot");
    }

    #[test]
    fn weights_1_2_3_give_exact_interleaved_counts() {
        let eps = endpoints(&[1, 2, 3]);
        let rr = RoundRobin::new(&eps);
        let c = ctx();
        let picks: Vec<usize> = (0..600).map(|_| rr.pick(&eps, &c).unwrap()).collect();
        let mut counts = [0; 3];
        picks.iter().for_each(|&i| counts[i] += 1);
        assert_eq!(counts, [100, 200, 300]);
        // Interleaved: no run longer than the endpoint's weight.
        for run in picks.chunk_by(|a, b| a == b) {
            assert!(run.len() <= eps[run[0]].weight as usize, "{picks:?}");
        }
        assert!(picks.chunk_by(|a, b| a == b).all(|r| r.len() <= 2));
    }

    #[test]
    fn uniform_weights_rotate_through_every_endpoint() {
        let eps = endpoints(&[1; 5]);
        let rr = RoundRobin::new(&eps);
        assert_eq!(rr.rotation_len(), 5);
        let c = ctx();
        let first = rr.pick(&eps, &c).unwrap();
        for k in 1..20 {
            assert_eq!(rr.pick(&eps, &c), Some((first + k) % 5));
        }
    }

    #[test]
    fn start_offset_differs_between_pools() {
        let eps = endpoints(&[1; 1000]);
        let starts: std::collections::HashSet<usize> = (0..8)
            .map(|_| RoundRobin::new(&eps).pick(&eps, &ctx()).unwrap())
            .collect();
        assert!(starts.len() > 1, "every pool started at {starts:?}");
    }

    #[test]
    fn ejected_endpoint_load_spreads_evenly() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let rr = RoundRobin::new(&eps);
        let c = ctx();
        eps[1].stats.record_failure(c.now_ms);
        let mut counts = [0; 4];
        for _ in 0..3000 {
            counts[rr.pick(&eps, &c).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        for i in [0, 2, 3] {
            assert!((900..=1100).contains(&counts[i]), "{counts:?}");
        }
    }

    #[test]
    fn exclusion_walks_to_the_next_usable_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        let rr = RoundRobin::new(&eps);
        let mut c = ctx();
        c.exclude.insert(0);
        c.exclude.insert(1);
        for _ in 0..10 {
            assert_eq!(rr.pick(&eps, &c), Some(2));
        }
    }
}
