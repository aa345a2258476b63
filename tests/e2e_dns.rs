//! Black-box tests of the embedded DNS server and service VIPs through the real `meshgate`
//! binary, queried with hickory-proto messages over UDP.
//!
//! - Scaling a service by rewriting the config file: `tasks.<svc>` answers equal the new endpoint
//!   set as soon as the admin API reports the new generation (DNS and routes come from the same
//!   table), while the VIP stays the same.
//! - Connections to `VIP:published` reach every endpoint over time (round robin).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

/// One UDP query; the answer's rcode and A/AAAA addresses.
async fn query(dns: SocketAddr, name: &str, rtype: RecordType) -> (ResponseCode, Vec<IpAddr>) {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
    let mut buf = vec![0; 65535];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
        .await
        .expect("DNS answer within 3s")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    let ips = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, ips)
}

async fn tasks(dns: SocketAddr, svc: &str) -> BTreeSet<IpAddr> {
    let (rcode, ips) = query(dns, &format!("tasks.{svc}.meshgate."), RecordType::A).await;
    assert_eq!(rcode, ResponseCode::NoError);
    ips.into_iter().collect()
}

/// Echo HTTP backends on 127.0.0.`i`:`port` (one loopback address each, same port), named `e<i>`.
struct Backends {
    port: u16,
    stop: CancellationToken,
}

impl Backends {
    async fn start(ids: &[u8]) -> Backends {
        let stop = CancellationToken::new();
        // A port free on 127.0.0.1 is almost surely free on the other loopback addresses; retry
        // with another one if not.
        'retry: loop {
            let port = free_port();
            let mut listeners = Vec::new();
            for i in ids {
                match TcpListener::bind((IpAddr::from([127, 0, 0, *i]), port)).await {
                    Ok(l) => listeners.push((*i, l)),
                    Err(_) => continue 'retry,
                }
            }
            for (i, l) in listeners {
                tokio::spawn(meshgate::echo::http(l, format!("e{i}"), stop.clone()));
            }
            return Backends { port, stop };
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn config(dns: SocketAddr, published: u16, target: u16, ids: &[u8]) -> String {
    let eps: Vec<String> = ids.iter().map(|i| format!("\"127.0.0.{i}\"")).collect();
    format!(
        "dns: {{ enabled: true, bind: \"{dns}\", forward: false, ttl: 0 }}\nservices:\n  web:\n    ports: [\"127.0.0.1:{published}:{target}/tcp\"]\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

fn ips(ids: &[u8]) -> BTreeSet<IpAddr> {
    ids.iter().map(|i| IpAddr::from([127, 0, 0, *i])).collect()
}

/// Names answering on `vip:port` over `n` new connections.
async fn names_via(vip: IpAddr, port: u16, n: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for _ in 0..n {
        names.insert(ask_name_eventually(SocketAddr::new(vip, port), STEP).await);
    }
    names
}

/// Rewrite the config, then poll: once the admin API reports a newer generation, `tasks.web`
/// must already be `want` (DNS answers come from the table the generation names).
async fn scale_to(mg: &Meshgate, dns: SocketAddr, body: &str, want: &BTreeSet<IpAddr>) {
    let gen = mg.generation().await;
    mg.rewrite(body);
    let deadline = Instant::now() + STEP;
    loop {
        let now = mg.generation().await;
        if now > gen {
            let got = tasks(dns, "web").await;
            assert_eq!(&got, want, "generation {now} answers {got:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no new generation:\n{}",
            mg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_changes_dns_in_the_same_generation_and_the_vip_balances() {
    let backends = Backends::start(&[2, 3, 4]).await;
    let dns = addr(free_udp_port());
    let published = free_port();
    let mg = Meshgate::start(&config(dns, published, backends.port, &[2, 3])).await;

    // The VIP and the task addresses.
    let (rcode, vip) = query(dns, "web.meshgate.", RecordType::A).await;
    assert_eq!(rcode, ResponseCode::NoError);
    assert_eq!(vip.len(), 1, "one VIP: {vip:?}");
    let vip = vip[0];
    assert!(
        matches!(vip, IpAddr::V4(v) if v.octets()[..2] == [127, 77]),
        "{vip}"
    );
    assert_eq!(tasks(dns, "web").await, ips(&[2, 3]));
    let (rcode, none) = query(dns, "nope.meshgate.", RecordType::A).await;
    assert_eq!((rcode, none.len()), (ResponseCode::NXDomain, 0));

    // Round robin over new connections to VIP:published reaches both endpoints.
    assert_eq!(names_via(vip, published, 6).await, set(&["e2", "e3"]));

    // Scale up to three endpoints.
    scale_to(
        &mg,
        dns,
        &config(dns, published, backends.port, &[2, 3, 4]),
        &ips(&[2, 3, 4]),
    )
    .await;
    let (_, vip_now) = query(dns, "web.meshgate.", RecordType::A).await;
    assert_eq!(vip_now, vec![vip], "the VIP is stable across generations");
    assert_eq!(names_via(vip, published, 9).await, set(&["e2", "e3", "e4"]));
    // The published loopback port routes the same way.
    assert_eq!(
        names_via("127.0.0.1".parse().unwrap(), published, 9).await,
        set(&["e2", "e3", "e4"])
    );

    // Scale down to one: DNS and the VIP's routes drop the others in the same generation.
    scale_to(
        &mg,
        dns,
        &config(dns, published, backends.port, &[4]),
        &ips(&[4]),
    )
    .await;
    assert_eq!(names_via(vip, published, 4).await, set(&["e4"]));
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}
