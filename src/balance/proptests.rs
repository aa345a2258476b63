//! Property tests over every policy: invariants that must hold for any pool, weights,
//! exclusions and ejections.

use proptest::prelude::*;

use super::testutil::{ctx, endpoints};
use super::*;

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::RoundRobin),
        Just(Policy::LeastConn),
        Just(Policy::P2c),
        Just(Policy::ConsistentHash),
    ]
}

/// Runs in a cyclic sequence (the schedule repeats), longest per endpoint.
fn longest_cyclic_runs(s: &[u32], n: usize) -> Vec<usize> {
    let mut longest = vec![0; n];
    let doubled: Vec<u32> = s.iter().chain(s).copied().collect();
    for run in doubled.chunk_by(|a, b| a == b) {
        let i = run[0] as usize;
        longest[i] = longest[i].max(run.len().min(s.len()));
    }
    longest
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any pick is in bounds, not excluded, not ejected; `None` only when nothing is usable.
    #[test]
    fn picks_are_usable_and_none_only_when_nothing_is(
        policy in policy(),
        weights in prop::collection::vec(1u32..10, 0..40),
        excluded in prop::collection::vec(0usize..40, 0..4),
        down in prop::collection::vec(0usize..40, 0..40),
        hashes in prop::collection::vec(any::<u64>(), 1..20),
    ) {
        let eps = endpoints(&weights);
        let b = Balancer::new(policy, &eps);
        let mut c = ctx();
        excluded.iter().for_each(|&i| c.exclude.insert(i));
        for &i in down.iter().filter(|&&i| i < eps.len()) {
            eps[i].stats.record_failure(c.now_ms);
        }
        let any_usable = (0..eps.len()).any(|i| c.usable(&eps, i));
        for hash in hashes {
            let c = PickContext { hash, ..c };
            match b.pick(&eps, &c) {
                Some(i) => {
                    prop_assert!(i < eps.len());
                    prop_assert!(!c.exclude.contains(i), "{policy:?} picked excluded {i}");
                    prop_assert!(eps[i].stats.is_available(c.now_ms), "{policy:?} picked down {i}");
                }
                None => prop_assert!(!any_usable, "{policy:?} gave up with usable endpoints"),
            }
        }
    }

    /// One full rotation of round robin gives each endpoint exactly its normalized weight, and
    /// nginx's smoothness: no endpoint runs longer than its weight while others exist.
    #[test]
    fn round_robin_rotation_is_exact_and_interleaved(
        weights in prop::collection::vec(1u32..12, 1..12),
        rotations in 1usize..4,
    ) {
        let eps = endpoints(&weights);
        let rr = rr::RoundRobin::new(&eps);
        let len = rr.rotation_len();
        let c = ctx();
        let mut counts = vec![0usize; eps.len()];
        let picks: Vec<u32> =
            (0..len * rotations).map(|_| rr.pick(&eps, &c).unwrap() as u32).collect();
        picks.iter().for_each(|&i| counts[i as usize] += 1);
        let g = weights.iter().fold(0, |g, &w| num_gcd(g, w));
        for (i, &w) in weights.iter().enumerate() {
            prop_assert_eq!(counts[i], (w / g) as usize * rotations);
        }
        if eps.len() > 1 {
            let rotation = &picks[..len];
            for (i, run) in longest_cyclic_runs(rotation, eps.len()).into_iter().enumerate() {
                prop_assert!(run <= (weights[i] / g) as usize, "endpoint {i} ran {run}: {rotation:?}");
            }
        }
    }

    /// Least-conn's pick has the minimum in-flight/weight among usable endpoints.
    #[test]
    fn least_conn_picks_a_minimum(
        pool in prop::collection::vec((1u32..6, 0u32..8), 1..20),
        down in prop::collection::vec(0usize..20, 0..5),
    ) {
        let weights: Vec<u32> = pool.iter().map(|p| p.0).collect();
        let eps = endpoints(&weights);
        let _guards: Vec<_> = pool
            .iter()
            .enumerate()
            .flat_map(|(i, p)| (0..p.1).map(move |_| i))
            .map(|i| eps[i].stats.start())
            .collect();
        let c = ctx();
        for &i in down.iter().filter(|&&i| i < eps.len()) {
            eps[i].stats.record_failure(c.now_ms);
        }
        let b = Balancer::new(Policy::LeastConn, &eps);
        let load = |i: usize| f64::from(pool[i].1) / f64::from(pool[i].0);
        let min = (0..eps.len()).filter(|&i| c.usable(&eps, i)).map(load).fold(f64::INFINITY, f64::min);
        match b.pick(&eps, &c) {
            Some(i) => prop_assert_eq!(load(i), min),
            None => prop_assert!(min.is_infinite()),
        }
    }

    /// P2C's two candidates are distinct and in range for every pool size and random word.
    #[test]
    fn p2c_candidates_are_distinct(n in 2usize..100_000, r in any::<u64>()) {
        let (a, b) = p2c::candidates(n, r);
        prop_assert!(a < n && b < n && a != b);
    }

    /// Maglev: removing one of N endpoints moves its own ~1/N of the slots and few others.
    #[test]
    fn maglev_removal_disrupts_little(n in 3usize..60, removed in 0usize..60) {
        let removed = removed % n;
        let eps = endpoints(&vec![1; n]);
        let rest: Vec<Endpoint> =
            eps.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, e)| e.clone()).collect();
        let (before, after) = (maglev::Maglev::new(&eps), maglev::Maglev::new(&rest));
        let m = before.len();
        prop_assert_eq!(m, after.len());
        let mut moved_own = 0;
        let mut moved_other = 0;
        for slot in 0..m {
            let was = &eps[before.owner(slot)].id;
            let now = &rest[after.owner(slot)].id;
            if before.owner(slot) == removed {
                moved_own += 1;
            } else if was != now {
                moved_other += 1;
            }
        }
        let own = moved_own as f64 / m as f64;
        let other = moved_other as f64 / m as f64;
        prop_assert!((own - 1.0 / n as f64).abs() < 0.001, "removed endpoint owned {own}");
        // Keys that did not belong to the removed endpoint also move a little (Maglev trades
        // perfect stability for balance): measured ≤ 0.6% of the table for N < 60; allow 1.5%.
        prop_assert!(other < 0.015, "n={n}: {other} of the other keys moved");
    }

    /// Maglev balance with weights: each endpoint's share within 2% of its weighted share.
    #[test]
    fn maglev_shares_follow_weights(weights in prop::collection::vec(1u32..8, 1..40)) {
        let eps = endpoints(&weights);
        let t = maglev::Maglev::new(&eps);
        let total: u32 = weights.iter().sum();
        let mut shares = vec![0usize; eps.len()];
        (0..t.len()).for_each(|s| shares[t.owner(s)] += 1);
        for (i, &w) in weights.iter().enumerate() {
            let want = t.len() as f64 * f64::from(w) / f64::from(total);
            let got = shares[i] as f64;
            prop_assert!((got - want).abs() <= want * 0.02 + 1.0, "endpoint {i}: {got} vs {want}");
        }
    }
}

fn num_gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
