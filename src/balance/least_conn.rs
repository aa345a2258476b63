//! Least connections: the usable endpoint with the fewest in-flight connections per unit of
//! weight.
//!
//! A pick reads every endpoint's in-flight counter once (O(n), like nginx and HAProxy's leastconn);
//! for large pools P2C gives nearly the same result in O(1). Loads are compared as fractions by
//! cross-multiplying in u64 (`a/wa < b/wb ⇔ a·wb < b·wa`), so no floats and no rounding.

use super::hash::{below, LocalRng};
use super::{Endpoint, PickContext};

/// Least-connections needs no per-pool state: the counts live in the endpoints' stats and ties
/// are broken with the per-thread random generator.
///
/// Why not a rotating start offset: with loads `[x, x, 1, 1]` a scan starting at a rotating
/// offset finds endpoint 2 first from three of the four offsets, so tied endpoints share 3:1,
/// not evenly; it would also make every pick write one shared cache line. Reservoir sampling
/// over the tied minimum is exactly uniform and touches nothing shared.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastConn;

impl LeastConn {
    pub fn new() -> Self {
        LeastConn
    }

    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        // (index, in-flight, weight) of the best so far, and how many endpoints tie with it.
        let mut best: Option<(usize, u64, u64)> = None;
        let mut ties = 0usize;
        // Only drawn from on ties; in an idle pool every endpoint ties, so no TLS per draw.
        let mut rng = LocalRng::from_thread();
        for (i, e) in endpoints.iter().enumerate() {
            if !ctx.usable(endpoints, i) {
                continue;
            }
            let load = u64::from(e.stats.in_flight());
            let weight = u64::from(e.effective_weight());
            let Some((_, bl, bw)) = best else {
                (best, ties) = (Some((i, load, weight)), 1);
                continue;
            };
            // Cross-multiplied `load/weight` vs `bl/bw`: both sides < 2^32 · 2^32, no overflow.
            match (load * bw).cmp(&(bl * weight)) {
                std::cmp::Ordering::Less => (best, ties) = (Some((i, load, weight)), 1),
                std::cmp::Ordering::Equal => {
                    // Reservoir sampling: the k-th tie replaces the pick with probability 1/k,
                    // so each of the k ends up picked with probability 1/k.
                    ties += 1;
                    if below(rng.next_u64(), ties) == 0 {
                        best = Some((i, load, weight));
                    }
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn picks_the_minimum_in_flight_per_weight() {
        // in-flight 4,1,6,3 with weights 1,1,4,2: loads 4, 1, 1.5, 1.5 → endpoint 1.
        let eps = endpoints(&[1, 1, 4, 2]);
        let guards: Vec<_> = [4, 1, 6, 3]
            .iter()
            .enumerate()
            .flat_map(|(i, &k)| (0..k).map(move |_| i))
            .map(|i| eps[i].stats.start())
            .collect();
        let lc = LeastConn::new();
        let c = ctx();
        for _ in 0..10 {
            assert_eq!(lc.pick(&eps, &c), Some(1));
        }
        // Endpoint 1 out: 2 and 3 tie at 1.5 and share the picks evenly.
        let mut c2 = c;
        c2.exclude.insert(1);
        let mut seen = [0; 4];
        for _ in 0..4_000 {
            seen[lc.pick(&eps, &c2).unwrap()] += 1;
        }
        assert_eq!(seen[0] + seen[1], 0);
        assert!((1_800..=2_200).contains(&seen[2]), "{seen:?}");
        drop(guards);
        assert!(eps.iter().all(|e| e.stats.in_flight() == 0));
    }

    #[test]
    fn load_follows_in_flight_changes() {
        let eps = endpoints(&[1, 1, 1]);
        let lc = LeastConn::new();
        let c = ctx();
        // Hold every picked connection open: least-conn must fill the endpoints evenly.
        let mut held = Vec::new();
        for _ in 0..30 {
            let i = lc.pick(&eps, &c).unwrap();
            held.push(eps[i].stats.start());
        }
        assert!(eps.iter().all(|e| e.stats.in_flight() == 10));
    }

    #[test]
    fn ties_are_shared_evenly() {
        let eps = endpoints(&[1; 4]);
        let lc = LeastConn::new();
        let c = ctx();
        let mut seen = [0; 4];
        for _ in 0..8_000 {
            seen[lc.pick(&eps, &c).unwrap()] += 1;
        }
        assert!(
            seen.iter().all(|&k| (1_800..=2_200).contains(&k)),
            "{seen:?}"
        );
    }
}
