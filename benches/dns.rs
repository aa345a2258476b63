//! DNS answer cost: build of the precomputed records, and per-query `respond` (parse the
//! question, hash lookup, splice precomputed bytes) for a VIP name, a rotated `tasks.` set and
//! NXDOMAIN. `hickory_message_path` does the same VIP answer the way a hickory-server
//! `RequestHandler` would (decode the query `Message`, build `Record`s, encode) — the baseline
//! that the hand-written path in `src/dns/server.rs` is chosen against.
//!
//! Run: `cargo bench --bench dns`. On the shared 2-core dev box (load average ~11, so absolute
//! numbers are pessimistic): respond VIP A ~250 ns, tasks. (10 A, rotated) ~310 ns, NXDOMAIN
//! ~150 ns, hickory Message path ~3.8 µs; build for 1,000 services × 10 tasks ~70 ms; VIP
//! allocation for 1,000 services ~0.8 ms.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshgate::dns::records::Transport;
use meshgate::dns::{allocate_vips, DnsConfig, DnsRecords};
use meshgate::model::{DesiredState, EndpointSpec, ServiceSpec};

/// 1,000 services with 10 endpoints each.
fn desired() -> DesiredState {
    let mut d = DesiredState::default();
    for s in 0..1000u32 {
        let name = format!("svc{s}");
        let mut spec = ServiceSpec::new(name.clone());
        for e in 0..10u32 {
            let ip: IpAddr = format!("10.{}.{}.{}", s / 250, s % 250, e + 1)
                .parse()
                .unwrap();
            let mut ep = EndpointSpec::from_addr(SocketAddr::new(ip, 80));
            ep.slot = Some(e as u64 + 1);
            spec.endpoints.push(ep);
        }
        d.services.insert(name, spec);
    }
    d
}

fn query(name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.to_vec().unwrap()
}

fn bench(c: &mut Criterion) {
    let d = desired();
    let cfg = DnsConfig {
        enabled: true,
        ..DnsConfig::default()
    };
    let vips = allocate_vips(&d, &cfg);
    c.bench_function("dns_build_1000_services", |b| {
        b.iter(|| DnsRecords::build(black_box(&d), &vips, &cfg))
    });
    c.bench_function("vip_allocate_1000_services", |b| {
        b.iter(|| allocate_vips(black_box(&d), &cfg))
    });
    let records = DnsRecords::build(&d, &vips, &cfg);
    let mut out = Vec::with_capacity(1232);
    for (label, name) in [
        ("respond_vip_a", "svc500.meshgate."),
        ("respond_tasks_a_10_rotated", "tasks.svc500.meshgate."),
        ("respond_nxdomain", "nope.meshgate."),
    ] {
        let q = query(name, RecordType::A);
        c.bench_function(label, |b| {
            b.iter(|| records.respond(black_box(&q), Transport::Udp, true, &mut out))
        });
    }
    let q = query("svc500.meshgate.", RecordType::A);
    let vip = vips["svc500"];
    let lookup: BTreeMap<Name, IpAddr> = vips
        .iter()
        .map(|(n, ip)| (Name::from_ascii(format!("{n}.meshgate.")).unwrap(), *ip))
        .collect();
    c.bench_function("hickory_message_path_vip_a", |b| {
        b.iter(|| {
            let req = Message::from_vec(black_box(&q)).unwrap();
            let qname = req.queries[0].name().to_lowercase();
            let ip = lookup.get(&qname).copied().unwrap_or(vip);
            let mut resp =
                Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
            resp.metadata.authoritative = true;
            resp.add_queries(req.queries.clone());
            let IpAddr::V4(v4) = ip else { unreachable!() };
            resp.add_answer(Record::from_rdata(
                req.queries[0].name().clone(),
                5,
                RData::A(v4.into()),
            ));
            resp.to_vec().unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
