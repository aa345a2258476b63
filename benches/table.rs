//! Cost of compiling a routing table, and of the L4 route lookup a new connection does.
//!
//! Run: `cargo bench --bench table -- --warm-up-time 1 --measurement-time 2`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use meshgate::balance::PickContext;
use meshgate::clock;
use meshgate::model::{DesiredState, EndpointSpec, PortSpec, Protocol, ServiceSpec};
use meshgate::stats::StatsRegistry;
use meshgate::table::{BuildOptions, ListenKey, ListenKind, RoutingTable};

const FIRST_PORT: u16 = 20_000;

/// `services` services with `per_service` endpoints each; service `i` publishes TCP port
/// `FIRST_PORT + i`.
fn desired(services: usize, per_service: usize) -> DesiredState {
    let mut state = DesiredState {
        services: BTreeMap::new(),
        ..DesiredState::default()
    };
    for s in 0..services {
        let mut spec = ServiceSpec::new(format!("svc-{s:05}"));
        spec.ports.push(PortSpec {
            published: FIRST_PORT + s as u16,
            target: 8080,
            protocol: Protocol::Tcp,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        });
        for e in 0..per_service {
            let ip = Ipv4Addr::new(10, (s >> 8) as u8, s as u8, e as u8 + 1);
            let mut ep = EndpointSpec::from_addr(SocketAddr::new(ip.into(), 8080));
            ep.id = format!("task-{s}-{e}");
            spec.endpoints.push(ep);
        }
        state.services.insert(spec.name.clone(), spec);
    }
    state
}

fn tcp_key(port: u16) -> ListenKey {
    ListenKey {
        kind: ListenKind::Tcp,
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    }
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_build");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for services in [1_000, 10_000] {
        let state = desired(services, 10);
        let stats = StatsRegistry::default();
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{services}x10")),
            &services,
            |b, _| {
                b.iter(|| {
                    black_box(RoutingTable::build(
                        &state,
                        &BuildOptions::default(),
                        &stats,
                        1,
                    ))
                })
            },
        );
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    const SERVICES: usize = 10_000;
    let table = RoutingTable::build(
        &desired(SERVICES, 10),
        &BuildOptions::default(),
        &StatsRegistry::default(),
        1,
    );
    assert_eq!(table.l4.len(), SERVICES);
    // Keys visited in a scrambled order so the lookups do not walk the map's memory in order.
    let hits: Vec<ListenKey> = (0..SERVICES)
        .map(|i| tcp_key(FIRST_PORT + ((i * 7_919) % SERVICES) as u16))
        .collect();
    let misses: Vec<ListenKey> = (0..SERVICES)
        .map(|i| tcp_key(FIRST_PORT - 1 - (i % 10_000) as u16))
        .collect();
    assert!(misses.iter().all(|k| !table.l4.contains_key(k)));

    let mut group = c.benchmark_group("l4_lookup");
    let mut i = 0;
    group.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 1) % SERVICES;
            black_box(table.l4.get(black_box(&hits[i])))
        })
    });
    group.bench_function("miss", |b| {
        b.iter(|| {
            i = (i + 1) % SERVICES;
            black_box(table.l4.get(black_box(&misses[i])))
        })
    });
    // The whole per-connection routing decision: route lookup, then a round-robin pick.
    let ctx = PickContext {
        now_ms: clock::now_ms(),
        now_ns: clock::now_ns(),
        ..PickContext::default()
    };
    group.bench_function("hit_and_pick", |b| {
        b.iter(|| {
            i = (i + 1) % SERVICES;
            let route = table.l4.get(&hits[i]).expect("published port");
            let pool = route.pool();
            black_box(pool.balancer.pick(&pool.endpoints, &ctx))
        })
    });
    group.finish();
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
