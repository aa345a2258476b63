//! Cost of one endpoint pick per policy and pool size, single-threaded and with two threads
//! picking from the same pool, plus the control-path cost of building a balancer.
//!
//! Run: `cargo bench --bench balance -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshgate::balance::{Balancer, Endpoint, PickContext};
use meshgate::clock;
use meshgate::model::Policy;
use meshgate::stats::EndpointStats;

const SIZES: [usize; 3] = [10, 1_000, 100_000];

const POLICIES: [(&str, Policy); 4] = [
    ("rr", Policy::RoundRobin),
    ("least_conn", Policy::LeastConn),
    ("p2c", Policy::P2c),
    ("maglev", Policy::ConsistentHash),
];

/// `n` endpoints with weights 1..=3 (so round robin runs a real schedule, not the identity).
fn pool(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            addr: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)),
            weight: 1 + (i % 3) as u32,
            id: Arc::from(format!("task-{i:06}")),
            stats: Arc::new(EndpointStats::default()),
        })
        .collect()
}

fn ctx() -> PickContext {
    PickContext {
        now_ms: clock::now_ms(),
        now_ns: clock::now_ns(),
        ..PickContext::default()
    }
}

/// A new stickiness hash per pick (a Weyl sequence: cheap, and spread over the Maglev table).
#[inline]
fn next_hash(h: &mut u64) -> u64 {
    *h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    *h
}

fn pick_single_thread(c: &mut Criterion) {
    for (name, policy) in POLICIES {
        let mut group = c.benchmark_group(format!("pick/{name}"));
        for n in SIZES {
            let eps = pool(n);
            let balancer = Balancer::new(policy, &eps);
            let base = ctx();
            let mut h = 0u64;
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    let ctx = PickContext {
                        hash: next_hash(&mut h),
                        ..base
                    };
                    black_box(balancer.pick(black_box(&eps), &ctx))
                })
            });
        }
        group.finish();
    }
}

/// Two threads picking from one pool: shows the cost of the shared round-robin cursor
/// (a contended cache line) against P2C, which shares nothing it writes. Each thread does
/// `iters` picks; the time reported is per pick of one thread (perfect scaling = single-thread
/// number).
fn pick_two_threads(c: &mut Criterion) {
    for (name, policy) in [("rr", Policy::RoundRobin), ("p2c", Policy::P2c)] {
        let mut group = c.benchmark_group(format!("pick_2threads/{name}"));
        for n in [10, 1_000] {
            let eps = pool(n);
            let balancer = Balancer::new(policy, &eps);
            let base = ctx();
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..2 {
                            s.spawn(|| {
                                for _ in 0..iters {
                                    black_box(balancer.pick(black_box(&eps), &base));
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
        }
        group.finish();
    }
}

/// Control-path cost of `Balancer::new` where it is not trivial.
fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(2));
    for n in SIZES {
        let eps = pool(n);
        group.bench_with_input(BenchmarkId::new("maglev", n), &n, |b, _| {
            b.iter(|| black_box(Balancer::new(Policy::ConsistentHash, &eps)))
        });
        group.bench_with_input(BenchmarkId::new("rr_weighted", n), &n, |b, _| {
            b.iter(|| black_box(Balancer::new(Policy::RoundRobin, &eps)))
        });
    }
    group.finish();
}

criterion_group!(benches, pick_single_thread, pick_two_threads, build);
criterion_main!(benches);
