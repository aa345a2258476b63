//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4).
//!
//! Each endpoint gets a permutation of the table slots from two hashes of its id
//! (`offset = h1 % M`, `skip = h2 % (M − 1) + 1`, slot `j` = `(offset + j·skip) % M`; M prime so
//! every skip walks all slots). Endpoints take turns claiming their next free preferred slot until
//! the table is full; heavier endpoints take more turns. A pick is `table[hash % M]`.
//!
//! Properties this gives, and the tests check:
//! - every node builds the same table: ids are hashed with fixed-seed FNV-1a + splitmix64, and
//!   turns are taken in id order, not in the (provider-dependent) slice order;
//! - balance: with equal weights every endpoint owns ⌊M/N⌋ or ⌈M/N⌉ slots;
//! - minimal disruption: removing one of N endpoints moves its 1/N of the slots plus a small
//!   extra (a few % of M at small N, per the paper).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use super::hash::{fnv1a64, mix64};
use super::{scan_from, Endpoint, PickContext};

/// Table sizes (primes) by pool size: the smallest size keeping `M ≥ 100·N`, so each endpoint's
/// share is even to ~1%, but never below 65 537. Tradeoffs:
/// - A change of M remaps nearly every client, so sizes are few and coarse: a pool can scale
///   anywhere within 1..=655 endpoints (or 656..=6 553) and keep its clients sticky. Smaller
///   tables for small pools would be cheaper but would reshuffle clients at every threshold.
/// - Cost is per pool and per table generation: 128 KiB and ~4 ms to build at M = 65 537,
///   1.3 MiB (2.6 MiB above 65 535 endpoints, with 32-bit entries) and ~100 ms at M = 655 373.
/// - Above 6 553 endpoints M stays at 655 373 (< 100 per endpoint): a larger table would cost
///   more memory and build time, while ±1 slot of ~65 per endpoint (±1.5% at 10 000 endpoints)
///   is already below what latency noise does.
const SIZES: [(usize, usize); 2] = [(655, 65_537), (6_553, 655_373)];

/// Following table slots tried when the owner of `hash % M` is unusable. The slots after it
/// belong to pseudo-random endpoints, so the failed endpoint's clients spread over the others,
/// and the same client always lands on the same fallback.
const MAX_PROBES: usize = 32;

/// The table size for `n` endpoints.
pub fn table_size(n: usize) -> usize {
    SIZES
        .iter()
        .find(|&&(max_n, _)| n <= max_n)
        .map_or(SIZES[SIZES.len() - 1].1, |&(_, m)| m)
}

/// The lookup table; 16-bit entries whenever the indices fit, halving its cache footprint.
enum Table {
    Small(Box<[u16]>),
    Large(Box<[u32]>),
}

/// Maglev state of one pool.
pub struct Maglev {
    table: Table,
    built_for: usize,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("endpoints", &self.built_for)
            .field("table_size", &self.len())
            .finish()
    }
}

/// Build-time state of one endpoint.
struct Turn {
    idx: u32,
    /// Next position in this endpoint's permutation, as a slot number.
    slot: u64,
    skip: u64,
    weight: u64,
    /// Turns are taken while `iteration · weight ≥ target`; `target` grows by the max weight
    /// per turn, so an endpoint of weight w takes w/max turns per iteration (Envoy's scheme).
    target: u64,
}

impl Maglev {
    pub fn new(endpoints: &[Endpoint]) -> Self {
        let n = endpoints.len();
        if n == 0 {
            return Maglev {
                table: Table::Small(Box::new([])),
                built_for: 0,
            };
        }
        let m = table_size(n) as u64;
        // Turn order by id so the table does not depend on the order a provider listed the
        // endpoints in; ties (duplicate ids) by address, then index.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            let (ea, eb) = (&endpoints[a], &endpoints[b]);
            (&ea.id, ea.addr, a).cmp(&(&eb.id, eb.addr, b))
        });
        let g = endpoints
            .iter()
            .fold(0u64, |g, e| gcd(g, u64::from(e.effective_weight())));
        let mut turns: Vec<Turn> = order
            .iter()
            .map(|&i| {
                let h = fnv1a64(endpoints[i].id.as_bytes());
                Turn {
                    idx: i as u32,
                    slot: mix64(h ^ 0x6f66_6673_6574) % m,
                    skip: mix64(h ^ 0x736b_6970) % (m - 1) + 1,
                    weight: u64::from(endpoints[i].effective_weight()) / g,
                    target: 0,
                }
            })
            .collect();
        let table = fill(&mut turns, m as usize);
        let table = if n <= usize::from(u16::MAX) {
            Table::Small(table.iter().map(|&i| i as u16).collect())
        } else {
            Table::Large(table.into_boxed_slice())
        };
        Maglev {
            table,
            built_for: n,
        }
    }

    /// Table size M (0 for an empty pool).
    pub fn len(&self) -> usize {
        match &self.table {
            Table::Small(t) => t.len(),
            Table::Large(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoint index owning `slot` (< [`len`](Self::len)).
    #[inline]
    pub fn owner(&self, slot: usize) -> usize {
        match &self.table {
            Table::Small(t) => usize::from(t[slot]),
            Table::Large(t) => t[slot] as usize,
        }
    }

    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        let n = endpoints.len();
        let m = self.len();
        if n == 0 {
            return None;
        }
        if self.built_for != n || m == 0 {
            // Not the slice this table was built for: stay correct, if not consistent.
            return scan_from(endpoints, ctx, (ctx.hash % n as u64) as usize);
        }
        let start = (ctx.hash % m as u64) as usize;
        for k in 0..MAX_PROBES {
            let slot = start + k;
            let i = self.owner(if slot >= m { slot - m } else { slot });
            if ctx.usable(endpoints, i) {
                return Some(i);
            }
        }
        scan_from(endpoints, ctx, self.owner(start) + 1)
    }
}

/// Let endpoints take turns claiming their next free preferred slot until all `m` are owned.
fn fill(turns: &mut [Turn], m: usize) -> Vec<u32> {
    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; m];
    // slot, skip < m, so one conditional subtraction replaces a 64-bit division per probe: the
    // build makes ~M·ln M probes, and the division was most of their cost.
    let advance = |t: &mut Turn| {
        t.slot += t.skip;
        if t.slot >= m as u64 {
            t.slot -= m as u64;
        }
    };
    let mut claim = |t: &mut Turn| {
        // Terminates: the permutation visits every slot and at least one is free.
        while table[t.slot as usize] != FREE {
            advance(t);
        }
        table[t.slot as usize] = t.idx;
        advance(t);
    };
    let mut filled = 0;
    if turns.iter().all(|t| t.weight == 1) {
        // Equal weights: plain rounds, as in the paper.
        'rounds: loop {
            for t in turns.iter_mut() {
                claim(t);
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    } else {
        // Weighted: the turn order of Envoy's iteration loop (by iteration, then id order),
        // from a heap, so a pool with one heavy endpoint does not scan every light one on every
        // iteration.
        let max_w = turns.iter().map(|t| t.weight).max().unwrap_or(1);
        let mut due: BinaryHeap<Reverse<(u64, usize)>> =
            (0..turns.len()).map(|k| Reverse((1, k))).collect();
        while let Some(Reverse((_, k))) = due.pop() {
            let t = &mut turns[k];
            claim(t);
            filled += 1;
            if filled == m {
                break;
            }
            t.target += max_w;
            // First iteration with iteration·w ≥ target.
            due.push(Reverse((t.target.div_ceil(t.weight), k)));
        }
    }
    debug_assert!(table.iter().all(|&i| i != FREE));
    table
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn shares(t: &Maglev, n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        (0..t.len()).for_each(|slot| s[t.owner(slot)] += 1);
        s
    }

    #[test]
    fn table_sizes_are_prime_and_large_enough() {
        for &(max_n, m) in &SIZES {
            assert!((2..).take_while(|d| d * d <= m).all(|d| m % d != 0), "{m}");
            assert!(m >= 100 * max_n);
        }
        assert_eq!(table_size(3), 65_537);
        assert_eq!(table_size(1_000), 655_373);
        assert_eq!(table_size(100_000), 655_373);
    }

    #[test]
    fn equal_weights_get_equal_shares() {
        let eps = endpoints(&[1; 7]);
        let t = Maglev::new(&eps);
        let m = t.len();
        for s in shares(&t, 7) {
            assert!(s == m / 7 || s == m / 7 + 1, "{s}");
        }
    }

    #[test]
    fn weights_are_honoured() {
        let eps = endpoints(&[1, 2, 3, 4]);
        let t = Maglev::new(&eps);
        let m = t.len() as f64;
        for (i, s) in shares(&t, 4).into_iter().enumerate() {
            let want = m * (i + 1) as f64 / 10.0;
            assert!(
                (s as f64 - want).abs() / want < 0.01,
                "endpoint {i}: {s} vs {want}"
            );
        }
    }

    #[test]
    fn same_hash_same_endpoint_and_independent_of_slice_order() {
        let eps = endpoints(&[1, 1, 2, 1, 3]);
        let mut rev = eps.clone();
        rev.reverse();
        let (a, b) = (Maglev::new(&eps), Maglev::new(&rev));
        let c = ctx();
        for h in 0..2_000u64 {
            let c = PickContext {
                hash: mix64(h),
                ..c
            };
            let x = a.pick(&eps, &c).unwrap();
            assert_eq!(a.pick(&eps, &c), Some(x));
            assert_eq!(rev[b.pick(&rev, &c).unwrap()].id, eps[x].id);
        }
    }

    #[test]
    fn fallback_is_deterministic_and_spreads() {
        let eps = endpoints(&[1; 5]);
        let t = Maglev::new(&eps);
        let c = ctx();
        eps[2].stats.record_failure(c.now_ms);
        let mut moved = [0; 5];
        for h in 0..5_000u64 {
            let c = PickContext {
                hash: mix64(h),
                ..c
            };
            let first = t.pick(&eps, &c).unwrap();
            assert_ne!(first, 2);
            assert_eq!(
                t.pick(&eps, &c),
                Some(first),
                "fallback changed between picks"
            );
            if t.owner((c.hash % t.len() as u64) as usize) == 2 {
                moved[first] += 1;
            }
        }
        // The ~1000 clients of endpoint 2 spread over the four others.
        assert_eq!(moved[2], 0);
        assert!(
            moved.iter().enumerate().all(|(i, &k)| i == 2 || k > 150),
            "{moved:?}"
        );
    }

    #[test]
    fn table_is_pinned_across_processes_and_releases() {
        // Every meshgate node must build this exact table from these ids; a change here moves
        // clients between endpoints on upgrade, so it must be deliberate.
        let eps = endpoints(&[1; 5]);
        let t = Maglev::new(&eps);
        let fingerprint = (0..t.len()).fold(0u64, |h, s| mix64(h ^ t.owner(s) as u64));
        assert_eq!(fingerprint, 0xaa88_92a3_c1b0_10a2);
    }

    #[test]
    fn large_pools_use_wide_entries() {
        let eps = endpoints(&vec![1; 70_000]);
        let t = Maglev::new(&eps);
        assert!(matches!(t.table, Table::Large(_)));
        assert_eq!(t.len(), 655_373);
        let s = shares(&t, eps.len());
        assert!(
            s.iter().all(|&k| k == 9 || k == 10),
            "every endpoint owns M/N slots"
        );
    }
}
