//! Power of two choices over peak-EWMA latency (the linkerd / Finagle balancer).
//!
//! A pick draws two *distinct* endpoints at random and keeps the cheaper one, where
//! `cost = ewma_ns(now) × (in_flight + 1) / weight`. Comparing only two random endpoints is O(1)
//! yet avoids the herd behaviour of "always the global minimum": every node and thread would
//! otherwise pile onto the same momentarily idle endpoint.
//!
//! New endpoints are not flooded: [`EndpointStats`](crate::stats::EndpointStats) seeds the EWMA
//! with [`DEFAULT_RTT_NS`](crate::stats::DEFAULT_RTT_NS) (10 ms, pessimistic on a LAN) instead of
//! zero, so a fresh endpoint costs as much as a slow one until real samples bring its estimate
//! down. The estimate decays towards zero without samples, so an endpoint that was slow once is
//! retried eventually.

use super::hash::rand_u64;
use super::{scan_from, Endpoint, PickContext};

/// P2C holds no per-pool state: randomness comes from a per-thread generator and the costs from
/// the endpoints' own stats.
#[derive(Debug, Default, Clone, Copy)]
pub struct P2c;

impl P2c {
    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        let n = endpoints.len();
        if n <= 1 {
            // Empty, or the only endpoint: no choice to make.
            return (n == 1 && ctx.usable(endpoints, 0)).then_some(0);
        }
        let (a, b) = candidates(n, rand_u64());
        match (ctx.usable(endpoints, a), ctx.usable(endpoints, b)) {
            (true, true) => {
                let (ca, cb) = (cost(&endpoints[a], ctx), cost(&endpoints[b], ctx));
                Some(if cb < ca { b } else { a })
            }
            (true, false) => Some(a),
            (false, true) => Some(b),
            // Both unusable: any usable endpoint beats none. `b` is random, so the scan's start
            // is too, and the fallback load still spreads.
            (false, false) => scan_from(endpoints, ctx, b),
        }
    }
}

/// Two distinct indices in `0..n` (n ≥ 2) from one random word: the low 32 bits pick the first
/// among n, the high 32 bits the second among the n − 1 others. Lemire's multiply-shift instead
/// of `%`; the bias (n / 2³²) is negligible at any pool size.
#[inline]
pub fn candidates(n: usize, r: u64) -> (usize, usize) {
    debug_assert!(n >= 2);
    let a = (((r & 0xffff_ffff) * n as u64) >> 32) as usize;
    let mut b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
    if b >= a {
        b += 1;
    }
    debug_assert!(a != b && a < n && b < n);
    (a, b)
}

/// Expected cost of sending one more request to `e`: latency estimate times the queue it would
/// join (its in-flight plus itself), per unit of weight.
#[inline]
pub fn cost(e: &Endpoint, ctx: &PickContext) -> f64 {
    e.stats.ewma_ns(ctx.now_ns) * f64::from(e.stats.in_flight() + 1)
        / f64::from(e.effective_weight())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn candidates_are_distinct_and_cover_every_pair() {
        let mut seen = [[false; 5]; 5];
        for k in 0..5000u64 {
            let (a, b) = candidates(5, super::super::mix64(k));
            assert_ne!(a, b);
            seen[a][b] = true;
        }
        for (a, row) in seen.iter().enumerate() {
            for (b, &s) in row.iter().enumerate() {
                assert_eq!(s, a != b, "pair ({a}, {b})");
            }
        }
        assert_eq!(candidates(2, 0), (0, 1));
        assert_eq!(candidates(2, u64::MAX), (1, 0));
    }

    #[test]
    fn one_endpoint_is_always_picked_two_are_both_compared() {
        let p = P2c;
        let c = ctx();
        let one = endpoints(&[1]);
        assert_eq!(p.pick(&one, &c), Some(0));
        // With two endpoints both are always the candidates, so the cheaper always wins.
        let two = endpoints(&[1, 1]);
        two[0].stats.record_latency(50_000_000, c.now_ns);
        for _ in 0..100 {
            assert_eq!(p.pick(&two, &c), Some(1));
        }
    }

    #[test]
    fn prefers_lower_latency_and_fewer_in_flight() {
        let p = P2c;
        let eps = endpoints(&[1, 1, 1]);
        let c = ctx();
        // Endpoint 2 is slow: every pair contains a faster endpoint, so it never wins.
        eps[2].stats.record_latency(80_000_000, c.now_ns);
        let mut seen = [0; 3];
        for _ in 0..600 {
            seen[p.pick(&eps, &c).unwrap()] += 1;
        }
        assert_eq!(seen[2], 0, "{seen:?}");
        // Same latency everywhere, but endpoint 0 has three requests queued: it loses every
        // comparison.
        let eps = endpoints(&[1, 1, 1]);
        eps.iter()
            .for_each(|e| e.stats.record_latency(20_000_000, c.now_ns));
        let _guards: Vec<_> = (0..3).map(|_| eps[0].stats.start()).collect();
        let mut seen = [0; 3];
        for _ in 0..600 {
            seen[p.pick(&eps, &c).unwrap()] += 1;
        }
        assert_eq!(seen[0], 0, "{seen:?}");
    }

    #[test]
    fn weight_divides_cost() {
        let eps = endpoints(&[1, 4]);
        let c = ctx();
        // Endpoint 1 has twice the latency but four times the weight: it is cheaper.
        eps[1]
            .stats
            .record_latency(2 * crate::stats::DEFAULT_RTT_NS, c.now_ns);
        assert!(cost(&eps[1], &c) < cost(&eps[0], &c));
        assert_eq!(P2c.pick(&eps, &c), Some(1));
    }

    #[test]
    fn spreads_evenly_among_equal_endpoints() {
        // Identical estimates (a sample above the seed replaces it exactly, same stamp): every
        // comparison ties, the first candidate wins, and candidates are uniform.
        let eps = endpoints(&[1; 4]);
        let c = ctx();
        eps.iter()
            .for_each(|e| e.stats.record_latency(20_000_000, c.now_ns));
        let mut seen = [0u32; 4];
        for _ in 0..40_000 {
            seen[P2c.pick(&eps, &c).unwrap()] += 1;
        }
        assert!(
            seen.iter().all(|&k| (9_400..=10_600).contains(&k)),
            "{seen:?}"
        );
    }

    #[test]
    fn in_flight_feedback_evens_out_nearly_equal_endpoints() {
        // Estimates a little apart (seeded at different instants), as in production: the
        // in-flight factor keeps the cheapest one from taking everything while requests are open.
        let eps = endpoints(&[1; 4]);
        let c = ctx();
        for (k, e) in eps.iter().enumerate() {
            e.stats
                .record_latency(20_000_000 + 100_000 * k as u64, c.now_ns);
        }
        let held: Vec<_> = (0..400)
            .map(|_| eps[P2c.pick(&eps, &c).unwrap()].stats.start())
            .collect();
        let open: Vec<u32> = eps.iter().map(|e| e.stats.in_flight()).collect();
        assert!(open.iter().all(|&k| (80..=120).contains(&k)), "{open:?}");
        drop(held);
    }

    #[test]
    fn unusable_candidate_yields_to_the_other_or_a_scan() {
        let eps = endpoints(&[1; 6]);
        let mut c = ctx();
        eps[..5]
            .iter()
            .for_each(|e| e.stats.record_failure(c.now_ms));
        for _ in 0..200 {
            assert_eq!(P2c.pick(&eps, &c), Some(5));
        }
        c.exclude.insert(5);
        assert_eq!(P2c.pick(&eps, &c), None);
    }
}
