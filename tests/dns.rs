//! The embedded DNS server over real sockets: a `RoutingTable` built from a desired state, the
//! server on 127.0.0.1:0, queried with raw hickory-proto messages (UDP and TCP) and with
//! hickory-resolver.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use meshgate::dns::{allocate_vips, DnsConfig, DnsServer};
use meshgate::model::{DesiredState, EndpointSpec, PortSpec, Protocol, ServiceSpec};
use meshgate::stats::StatsRegistry;
use meshgate::table::{BuildOptions, RoutingTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(3);

fn endpoint(ip: &str, slot: u64, id: &str, draining: bool) -> EndpointSpec {
    let mut e = EndpointSpec::from_addr(SocketAddr::new(ip.parse().unwrap(), 80));
    e.port = None;
    e.slot = Some(slot);
    e.id = id.into();
    e.draining = draining;
    e
}

/// `web`: 3 tasks (slot 3 draining), port 8080→80/tcp. `db`: one v4 and one v6 task, no port.
fn desired(web_tasks: usize) -> DesiredState {
    let mut d = DesiredState::default();
    let mut web = ServiceSpec::new("web");
    web.ports.push(PortSpec {
        published: 8080,
        target: 80,
        protocol: Protocol::Tcp,
        bind: "127.0.0.1".parse().unwrap(),
    });
    for i in 1..=web_tasks {
        web.endpoints.push(endpoint(
            &format!("10.0.0.{i}"),
            i as u64,
            &format!("task{i}"),
            false,
        ));
    }
    web.endpoints
        .push(endpoint("10.0.0.99", 99, "taskold", true));
    d.services.insert("web".into(), web);
    let mut db = ServiceSpec::new("db");
    db.endpoints.push(endpoint("10.0.1.1", 1, "dbtask1", false));
    db.endpoints.push(endpoint("fd00::1", 2, "dbtask2", false));
    d.services.insert("db".into(), db);
    d
}

fn config() -> DnsConfig {
    DnsConfig {
        enabled: true,
        bind: "127.0.0.1:0".parse().unwrap(),
        forward: false,
        ..DnsConfig::default()
    }
}

fn table(d: &DesiredState, cfg: &DnsConfig, generation: u64) -> RoutingTable {
    RoutingTable::build(
        d,
        &BuildOptions { dns: cfg.clone() },
        &StatsRegistry::default(),
        generation,
    )
}

struct Running {
    addr: SocketAddr,
    table: Arc<ArcSwap<RoutingTable>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn start(d: &DesiredState, cfg: DnsConfig) -> Running {
    let table = Arc::new(ArcSwap::from_pointee(table(d, &cfg, 1)));
    let server = DnsServer::bind(cfg).await.unwrap();
    let addr = server.local_addr();
    let shutdown = CancellationToken::new();
    let (t, s) = (Arc::clone(&table), shutdown.clone());
    let task = tokio::spawn(async move { server.run(t, s).await.unwrap() });
    Running {
        addr,
        table,
        shutdown,
        task,
    }
}

fn query(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m.metadata.recursion_desired = true;
    m
}

async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0; 65535];
    let n = tokio::time::timeout(WAIT, s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    buf.truncate(n);
    Some(buf)
}

async fn tcp_raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let len = tokio::time::timeout(WAIT, s.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0; len as usize];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

async fn ask(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    let q = query(name, rtype);
    let raw = udp_raw(addr, &q.to_vec().unwrap())
        .await
        .expect("an answer");
    let m = Message::from_vec(&raw).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1, "SOA in authority");
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[tokio::test]
async fn vip_tasks_slots_and_bare_names() {
    let d = desired(2);
    let cfg = config();
    let vip = allocate_vips(&d, &cfg)["web"];
    assert!(cfg.vip_cidr.contains(vip));
    let s = start(&d, cfg).await;

    let m = ask(s.addr, "web.meshgate.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(ips(&m), vec![vip]);
    assert_eq!(m.answers[0].ttl, 5);
    // Case-insensitive lookup; the question comes back as asked.
    let m = ask(s.addr, "WeB.MeshGate.", RecordType::A).await;
    assert_eq!(ips(&m), vec![vip]);
    assert_eq!(m.queries[0].name().to_ascii(), "WeB.MeshGate.");
    assert_eq!(m.answers[0].name.to_ascii(), "WeB.MeshGate.");

    // tasks.: live endpoints only (the draining one is out), rotated between answers.
    let live = vec![ip("10.0.0.1"), ip("10.0.0.2")];
    let first = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
    let second = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
    assert_eq!(sorted(ips(&first)), live);
    assert_eq!(sorted(ips(&second)), live);
    assert_ne!(ips(&first)[0], ips(&second)[0], "rotation");

    // Bare names share the records.
    assert_eq!(ips(&ask(s.addr, "web.", RecordType::A).await), vec![vip]);
    assert_eq!(
        sorted(ips(&ask(s.addr, "tasks.web.", RecordType::A).await)),
        live
    );

    // Per-task names: slot and task id; the draining task has none.
    assert_eq!(
        ips(&ask(s.addr, "2.web.meshgate.", RecordType::A).await),
        vec![ip("10.0.0.2")]
    );
    assert_eq!(
        ips(&ask(s.addr, "task1.web.meshgate.", RecordType::A).await),
        vec![ip("10.0.0.1")]
    );
    assert_negative(
        &ask(s.addr, "99.web.meshgate.", RecordType::A).await,
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(s.addr, "taskold.web.meshgate.", RecordType::A).await,
        ResponseCode::NXDomain,
    );
    s.stop().await;
}

#[tokio::test]
async fn aaaa_srv_ptr_soa_and_negative_answers() {
    let d = desired(2);
    let cfg = config();
    let vip = allocate_vips(&d, &cfg)["web"];
    let s = start(&d, cfg).await;

    let m = ask(s.addr, "tasks.db.meshgate.", RecordType::AAAA).await;
    assert_eq!(ips(&m), vec![ip("fd00::1")]);
    assert_eq!(
        ips(&ask(s.addr, "tasks.db.meshgate.", RecordType::A).await),
        vec![ip("10.0.1.1")]
    );
    // The VIP is IPv4: AAAA for web is NODATA (name exists).
    assert_negative(
        &ask(s.addr, "web.meshgate.", RecordType::AAAA).await,
        ResponseCode::NoError,
    );

    // SRV: published port as the service label; a VIP service points at the VIP name.
    let m = ask(s.addr, "_8080._tcp.web.meshgate.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1);
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(
        (srv.port, srv.target.to_ascii().as_str()),
        (8080, "web.meshgate.")
    );
    assert_negative(
        &ask(s.addr, "_8080._udp.web.meshgate.", RecordType::SRV).await,
        ResponseCode::NXDomain,
    );
    // Empty non-terminal: exists, no data.
    assert_negative(
        &ask(s.addr, "_tcp.web.meshgate.", RecordType::A).await,
        ResponseCode::NoError,
    );

    // PTR for the VIP.
    let IpAddr::V4(v4) = vip else { panic!() };
    let o = v4.octets();
    let rev = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
    let m = ask(s.addr, &rev, RecordType::PTR).await;
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(ptr.0.to_ascii(), "web.meshgate.");

    // SOA at the apex; NXDOMAIN and NODATA carry it in authority.
    let m = ask(s.addr, "meshgate.", RecordType::SOA).await;
    let RData::SOA(soa) = &m.answers[0].data else {
        panic!("{m:?}")
    };
    assert_eq!(soa.minimum, 5);
    assert_negative(
        &ask(s.addr, "nope.meshgate.", RecordType::A).await,
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(s.addr, "meshgate.", RecordType::A).await,
        ResponseCode::NoError,
    );

    // ANY returns every record of the name.
    let m = ask(s.addr, "tasks.db.meshgate.", RecordType::ANY).await;
    assert_eq!(sorted(ips(&m)), vec![ip("10.0.1.1"), ip("fd00::1")]);

    // Forwarding off: names outside the zone are refused.
    let m = ask(s.addr, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.recursion_available);
    s.stop().await;
}

#[tokio::test]
async fn without_vips_srv_lists_tasks_and_name_lists_endpoints() {
    let d = desired(2);
    let cfg = DnsConfig {
        vips: Some(false),
        ..config()
    };
    assert!(allocate_vips(&d, &cfg).is_empty());
    let s = start(&d, cfg).await;
    let m = ask(s.addr, "web.meshgate.", RecordType::A).await;
    assert_eq!(sorted(ips(&m)), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    let m = ask(s.addr, "_8080._tcp.web.meshgate.", RecordType::SRV).await;
    let mut targets: Vec<(String, u16)> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(srv) => (srv.target.to_ascii(), srv.port),
            other => panic!("{other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            ("1.web.meshgate.".into(), 80),
            ("2.web.meshgate.".into(), 80)
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn tcp_answers_and_truncation() {
    let mut d = desired(2);
    let mut big = ServiceSpec::new("big");
    for i in 0..100u32 {
        big.endpoints.push(endpoint(
            &format!("10.2.{}.{}", i / 200, i % 200 + 1),
            i as u64,
            &format!("b{i}"),
            false,
        ));
    }
    d.services.insert("big".into(), big);
    let s = start(&d, config()).await;
    let q = query("tasks.big.meshgate.", RecordType::A);
    // UDP without EDNS: 512 bytes, truncated.
    let udp = Message::from_vec(&udp_raw(s.addr, &q.to_vec().unwrap()).await.unwrap()).unwrap();
    assert!(udp.metadata.truncation);
    assert!(!udp.answers.is_empty() && udp.answers.len() < 100);
    // UDP with EDNS 1232: more records, still truncated, OPT echoed.
    let mut qe = q.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    qe.set_edns(edns);
    let raw = udp_raw(s.addr, &qe.to_vec().unwrap()).await.unwrap();
    assert!(raw.len() <= 1232);
    let m = Message::from_vec(&raw).unwrap();
    assert!(m.edns.is_some());
    assert!(m.answers.len() > udp.answers.len());
    // TCP: everything.
    let m = Message::from_vec(&tcp_raw(s.addr, &q.to_vec().unwrap()).await).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    s.stop().await;
}

#[tokio::test]
async fn malformed_queries_get_formerr_and_serving_goes_on() {
    let s = start(&desired(2), config()).await;
    // Valid header claiming one question, then a label running past the end.
    let bad = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'a', b'b',
    ];
    let m = Message::from_vec(&udp_raw(s.addr, &bad).await.unwrap()).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A compression pointer in the question is also FORMERR, over TCP too.
    let ptr = [
        0x43, 0x21, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
    ];
    let m = Message::from_vec(&tcp_raw(s.addr, &ptr).await).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x4321, ResponseCode::FormErr)
    );
    // Too short for a header, or empty (what the shutdown wakes the workers with): no answer.
    assert!(udp_raw(s.addr, &[1, 2, 3]).await.is_none());
    assert!(udp_raw(s.addr, &[]).await.is_none());
    // And the next query is answered.
    let m = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
    assert_eq!(m.answers.len(), 2);
    s.stop().await;
}

/// An idle server's UDP workers (four here) sleep in their receive with no timer to wake them:
/// the shutdown wakes them itself, so stopping takes far less than their 2 s backstop timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_server_stops_at_once() {
    for _ in 0..3 {
        let s = start(&desired(2), config()).await;
        let m = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
        assert_eq!(m.answers.len(), 2);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        s.stop().await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1000), "stopping took {took:?}");
    }
}

/// Queries arrive faster than one at a time (the server takes them off the socket in batches):
/// every one is answered once, with its own id and its own name's records, on two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_many_clients_are_answered_one_for_one() {
    let s = start(&desired(2), config()).await;
    let names = [
        ("tasks.web.meshgate.", vec![ip("10.0.0.1"), ip("10.0.0.2")]),
        ("tasks.db.meshgate.", vec![ip("10.0.1.1")]),
    ];
    let mut clients = Vec::new();
    for c in 0..4u16 {
        let addr = s.addr;
        let names = names.clone();
        clients.push(tokio::spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut buf = vec![0; 4096];
            // Three waves of 32 queries each sent back to back (128 in flight from 4 clients
            // stays well inside loopback socket buffers, so nothing is lost on the way).
            for wave in 0..3u16 {
                let mut expect = std::collections::HashMap::new();
                for i in 0..32u16 {
                    let id = c * 1000 + wave * 100 + i;
                    let (name, want) = &names[usize::from(i % 2)];
                    let mut q = query(name, RecordType::A);
                    q.metadata.id = id;
                    sock.send_to(&q.to_vec().unwrap(), addr).await.unwrap();
                    expect.insert(id, want.clone());
                    if i == 10 {
                        // Too short for a header: dropped unanswered, the rest still answered.
                        sock.send_to(&[1, 2, 3], addr).await.unwrap();
                    }
                }
                while !expect.is_empty() {
                    let n = tokio::time::timeout(WAIT, sock.recv(&mut buf))
                        .await
                        .expect("every query answered")
                        .unwrap();
                    let m = Message::from_vec(&buf[..n]).unwrap();
                    let want = expect.remove(&m.metadata.id).expect("one answer per id");
                    assert_eq!(sorted(ips(&m)), want);
                }
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    s.stop().await;
}

/// A datagram longer than the server's 2 KiB receive slot arrives cut short: it is answered
/// FORMERR (with its id), not read as if it ended there.
#[tokio::test]
async fn oversized_udp_query_gets_formerr() {
    let s = start(&desired(2), config()).await;
    let mut q = query("tasks.web.meshgate.", RecordType::A)
        .to_vec()
        .unwrap();
    q[0..2].copy_from_slice(&0x5151u16.to_be_bytes());
    q.resize(3000, 0);
    let m = Message::from_vec(&udp_raw(s.addr, &q).await.unwrap()).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x5151, ResponseCode::FormErr)
    );
    // 2 KiB still fits: the same query padded to 2,000 bytes is answered.
    q.truncate(2000);
    let m = Message::from_vec(&udp_raw(s.addr, &q).await.unwrap()).unwrap();
    assert_eq!(sorted(ips(&m)), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    s.stop().await;
}

#[tokio::test]
async fn scaling_and_draining_change_answers_in_the_same_generation() {
    let cfg = config();
    let s = start(&desired(2), cfg.clone()).await;
    assert_eq!(
        ips(&ask(s.addr, "tasks.web.meshgate.", RecordType::A).await).len(),
        2
    );
    s.table.store(Arc::new(table(&desired(4), &cfg, 2)));
    let m = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
    assert_eq!(
        sorted(ips(&m)),
        (1..=4)
            .map(|i| ip(&format!("10.0.0.{i}")))
            .collect::<Vec<_>>()
    );
    // Drain task 1: out of DNS in the generation its L4 pool drops it.
    let mut d = desired(4);
    d.services.get_mut("web").unwrap().endpoints[0].draining = true;
    let t = table(&d, &cfg, 3);
    let pool_addrs: Vec<IpAddr> = t.service("web").unwrap().pools[0]
        .endpoints
        .iter()
        .map(|e| e.addr.ip())
        .collect();
    s.table.store(Arc::new(t));
    let dns_addrs = sorted(ips(&ask(s.addr, "tasks.web.meshgate.", RecordType::A).await));
    assert_eq!(dns_addrs, sorted(pool_addrs));
    assert!(!dns_addrs.contains(&ip("10.0.0.1")));
    s.stop().await;
}

#[tokio::test]
async fn ttl_zero_is_honoured() {
    let cfg = DnsConfig { ttl: 0, ..config() };
    let s = start(&desired(2), cfg).await;
    let m = ask(s.addr, "tasks.web.meshgate.", RecordType::A).await;
    assert!(m.answers.iter().all(|r| r.ttl == 0));
    let m = ask(s.addr, "nope.meshgate.", RecordType::A).await;
    let RData::SOA(soa) = &m.authorities[0].data else {
        panic!()
    };
    assert_eq!((m.authorities[0].ttl, soa.minimum), (0, 0));
    s.stop().await;
}

/// A fake upstream on loopback: answers every query (UDP and TCP) with A 192.0.2.7.
async fn fake_upstream() -> SocketAddr {
    // The UDP port's TCP twin may be taken (an ephemeral port of some connection): try again.
    let mut tries = 0;
    let (udp, addr, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        match TcpListener::bind(addr).await {
            Ok(tcp) => break (udp, addr, tcp),
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("fake upstream: TCP {addr} taken ({e}), retrying");
            }
            Err(e) => panic!("no UDP+TCP port pair: {e}"),
        }
    };
    fn answer(raw: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(raw).unwrap();
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.add_queries(q.queries.clone());
        let name = q.queries[0].name().clone();
        r.add_answer(hickory_proto::rr::Record::from_rdata(
            name,
            60,
            RData::A("192.0.2.7".parse().unwrap()),
        ));
        r.to_vec().unwrap()
    }
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&answer(&buf[..n]), peer).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let len = s.read_u16().await.unwrap();
            let mut q = vec![0; len as usize];
            s.read_exact(&mut q).await.unwrap();
            let r = answer(&q);
            s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
            s.write_all(&r).await.unwrap();
        }
    });
    addr
}

#[tokio::test]
async fn forwards_outside_the_zone_and_servfails_on_timeout() {
    let upstream = fake_upstream().await;
    let cfg = DnsConfig {
        forward: true,
        upstreams: vec![upstream],
        ..config()
    };
    let s = start(&desired(2), cfg).await;
    let m = ask(s.addr, "example.com.", RecordType::A).await;
    assert_eq!(ips(&m), vec![ip("192.0.2.7")]);
    let q = query("example.org.", RecordType::A);
    let m = Message::from_vec(&tcp_raw(s.addr, &q.to_vec().unwrap()).await).unwrap();
    assert_eq!(
        (m.metadata.id, ips(&m)),
        (q.metadata.id, vec![ip("192.0.2.7")])
    );
    // In-zone names are still ours, with RA set since we forward.
    let m = ask(s.addr, "nope.meshgate.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.recursion_available);
    s.stop().await;

    // A silent upstream: SERVFAIL after forward_timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = DnsConfig {
        forward: true,
        upstreams: vec![silent.local_addr().unwrap()],
        forward_timeout: Duration::from_millis(300),
        ..config()
    };
    let s = start(&desired(2), cfg).await;
    let started = std::time::Instant::now();
    let m = ask(s.addr, "example.com.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    s.stop().await;
}

#[tokio::test]
async fn hickory_resolver_sees_the_same_answers() {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::Resolver;

    let upstream = fake_upstream().await;
    let d = desired(2);
    // hickory-resolver answers every 127.in-addr.arpa. PTR itself ("localhost.", RFC 6761), so
    // the reverse lookup needs a VIP range outside 127/8 (raw queries cover the default range).
    let cfg = DnsConfig {
        forward: true,
        upstreams: vec![upstream],
        vip_cidr: "10.77.0.0/16".parse().unwrap(),
        ..config()
    };
    let vip = allocate_vips(&d, &cfg)["web"];
    let s = start(&d, cfg).await;
    let mut ns = NameServerConfig::udp(s.addr.ip());
    ns.connections[0].port = s.addr.port();
    let resolver = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    )
    .build()
    .unwrap();

    let a = resolver.ipv4_lookup("web.meshgate.").await.unwrap();
    assert_eq!(ips_of(a.answers()), vec![vip]);
    let srv = resolver
        .srv_lookup("_8080._tcp.web.meshgate.")
        .await
        .unwrap();
    assert_eq!(srv.answers().len(), 1);
    let ptr = resolver.reverse_lookup(vip).await.unwrap();
    assert_eq!(
        ptr.answers()[0].data,
        RData::PTR(hickory_proto::rr::rdata::PTR(
            Name::from_ascii("web.meshgate.").unwrap()
        ))
    );
    let err = resolver.ipv4_lookup("nope.meshgate.").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
    let err = resolver.ipv6_lookup("web.meshgate.").await.unwrap_err();
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err:?}");
    let fwd = resolver.ipv4_lookup("example.com.").await.unwrap();
    assert_eq!(ips_of(fwd.answers()), vec![ip("192.0.2.7")]);
    s.stop().await;
}

fn ips_of(records: &[hickory_proto::rr::Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

/// Standalone server for load tests (dnsperf): 1,000 services × 4 tasks, forwarding off.
/// `MESHGATE_DNS_BENCH_ADDR` (default 127.0.0.1:5399), `MESHGATE_DNS_BENCH_SECS` (default 20).
/// Writes its pid to `$MESHGATE_DNS_BENCH_PID` if set (for /proc/<pid>/stat CPU accounting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load-test runner, run by hand"]
async fn standalone_server_for_dnsperf() {
    let addr = std::env::var("MESHGATE_DNS_BENCH_ADDR").unwrap_or_else(|_| "127.0.0.1:5399".into());
    let secs: u64 = std::env::var("MESHGATE_DNS_BENCH_SECS").map_or(20, |s| s.parse().unwrap());
    if let Ok(path) = std::env::var("MESHGATE_DNS_BENCH_PID") {
        std::fs::write(path, std::process::id().to_string()).unwrap();
    }
    let mut d = DesiredState::default();
    for s in 0..1000u32 {
        let mut spec = ServiceSpec::new(format!("svc{s}"));
        for e in 0..4u32 {
            let ip = format!("10.{}.{}.{}", s / 250, s % 250, e + 1);
            spec.endpoints
                .push(endpoint(&ip, e as u64 + 1, &format!("t{s}x{e}"), false));
        }
        d.services.insert(format!("svc{s}"), spec);
    }
    let cfg = DnsConfig {
        bind: addr.parse().unwrap(),
        ..config()
    };
    let s = start(&d, cfg).await;
    eprintln!("dns bench server on {} for {secs}s", s.addr);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    s.stop().await;
}
