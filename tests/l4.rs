//! Black-box tests of the L4 mesh: the real binary, real sockets on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn service(name: &str, port: u16, policy: &str, endpoints: &[String]) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "  {name}:\n    ports: [\"{port}\"]\n    policy: {policy}\n    endpoints: [{}]\n",
        eps.join(", ")
    )
}

async fn count_names(port: u16, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let name = ask_name(addr(port))
            .await
            .expect("request through meshgate");
        *counts.entry(name).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_respects_weights() {
    let (a, b) = (Backend::http("a").await, Backend::http("b").await);
    let port = free_port();
    let body = format!(
        "services:\n  web:\n    ports: [\"{port}\"]\n    endpoints:\n      - {{ address: \"{}\", weight: 1 }}\n      - {{ address: \"{}\", weight: 3 }}\n",
        a.addr, b.addr
    );
    let _mg = Meshgate::start(&body).await;
    let counts = count_names(port, 80).await;
    assert_eq!(counts.get("a"), Some(&20), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&60), "{counts:?}");
}

#[tokio::test]
async fn least_conn_avoids_busy_endpoint() {
    let (a, b) = (Backend::tcp_echo().await, Backend::tcp_echo().await);
    let port = free_port();
    let body = format!(
        "services:\n{}",
        service(
            "lc",
            port,
            "least_conn",
            &[a.addr.to_string(), b.addr.to_string()]
        )
    );
    let _mg = Meshgate::start(&body).await;
    // Hold 4 echo connections open: least_conn must put 2 on each endpoint.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr(port)).await.unwrap();
        s.write_all(b"x").await.unwrap();
        held.push(s);
    }
    // Until all 4 are proxied (a fixed 100 ms wait was too short beside other tests).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let inflight = loop {
        let mg_table = _mg.get("/api/table").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&mg_table).unwrap();
        let eps = &v["services"][0]["pools"][0]["endpoints"];
        let inflight: Vec<u64> = eps
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["in_flight"].as_u64().unwrap())
            .collect();
        if inflight.iter().sum::<u64>() == 4 || std::time::Instant::now() > deadline {
            break inflight;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(inflight.iter().sum::<u64>(), 4, "{inflight:?}");
    assert_eq!(
        inflight,
        vec![2, 2],
        "least_conn balances in-flight connections"
    );
}

#[tokio::test]
async fn p2c_spreads_and_consistent_hash_sticks() {
    let backends = [
        Backend::http("a").await,
        Backend::http("b").await,
        Backend::http("c").await,
    ];
    let eps: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let (p1, p2) = (free_port(), free_port());
    let body = format!(
        "services:\n{}{}",
        service("p2c", p1, "p2c", &eps),
        service("hash", p2, "consistent_hash", &eps)
    );
    let mg = Meshgate::start(&body).await;

    let counts = count_names(p1, 90).await;
    assert_eq!(counts.len(), 3, "p2c uses every endpoint: {counts:?}");
    // P2C follows measured latency, so shares vary a lot on a loaded machine (one slow sample
    // keeps an endpoint's peak EWMA high for a while); no endpoint takes nearly everything. The
    // property tests check the preference itself with controlled stats.
    assert!(counts.values().all(|&c| c < 80), "p2c spreads: {counts:?}");

    // Same client IP → same endpoint; different client IPs → different endpoints over time.
    let mut by_client: HashMap<IpAddr, String> = HashMap::new();
    for round in 0..3 {
        for i in 2..40u8 {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, i));
            let name = ask_name_from(addr(p2), Some(ip)).await.unwrap();
            if round == 0 {
                by_client.insert(ip, name);
            } else {
                assert_eq!(by_client[&ip], name, "client {ip} moved");
            }
        }
    }
    let distinct: std::collections::HashSet<_> = by_client.values().collect();
    assert_eq!(distinct.len(), 3, "38 clients hash onto all 3 endpoints");
    drop(mg);
}

#[tokio::test]
async fn reload_adds_and_removes_port_and_rejects_invalid() {
    let a = Backend::http("a").await;
    let (p1, p2) = (free_port(), free_port());
    let one = format!(
        "services:\n{}",
        service("one", p1, "round_robin", &[a.addr.to_string()])
    );
    let mg = Meshgate::start(&one).await;
    assert_eq!(ask_name(addr(p1)).await.unwrap(), "a");
    assert!(TcpStream::connect(addr(p2)).await.is_err());

    // Add a port: served within 1 s, no restart.
    let gen = mg.generation().await;
    let two = format!(
        "{one}{}",
        service("two", p2, "round_robin", &[a.addr.to_string()])
    );
    let started = Instant::now();
    mg.rewrite(&two);
    assert_eq!(
        ask_name_eventually(addr(p2), Duration::from_secs(1)).await,
        "a"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let gen = mg.wait_generation_above(gen, Duration::from_secs(1)).await;

    // An invalid change is rejected: old table keeps serving, error counted and shown.
    let errors_before = mg.metric("meshgate_provider_errors_total").await;
    mg.rewrite(&format!("{two}    policy: fastest\n"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while mg.metric("meshgate_provider_errors_total").await <= errors_before {
        assert!(Instant::now() < deadline, "error counter did not move");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = mg.get("/api/status").await.unwrap();
    assert!(
        status.contains("fastest"),
        "admin API shows the error: {status}"
    );
    assert_eq!(mg.generation().await, gen, "no new table from a bad file");
    assert_eq!(ask_name(addr(p1)).await.unwrap(), "a");
    assert_eq!(ask_name(addr(p2)).await.unwrap(), "a");
    assert!(mg.log_text().contains("config reload rejected"));

    // Remove a port: no longer accepting.
    mg.rewrite(&one);
    mg.wait_generation_above(gen, Duration::from_secs(1)).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    while TcpStream::connect(addr(p2)).await.is_ok() {
        assert!(Instant::now() < deadline, "port {p2} still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ask_name(addr(p1)).await.unwrap(), "a");
}

#[tokio::test]
async fn removed_port_drains_established_connections() {
    let echo = Backend::tcp_echo().await;
    let (p1, keep) = (free_port(), free_port());
    let other = Backend::http("k").await;
    let base = service("keep", keep, "round_robin", &[other.addr.to_string()]);
    let body = format!(
        "services:\n{base}  echo:\n    ports: [\"{p1}\"]\n    endpoints: [\"{}\"]\n    timeouts: {{ drain: 1500ms }}\n",
        echo.addr
    );
    let mg = Meshgate::start(&body).await;
    let mut conn = TcpStream::connect(addr(p1)).await.unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();

    let gen = mg.generation().await;
    mg.rewrite(&format!("services:\n{base}"));
    mg.wait_generation_above(gen, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(addr(p1)).await.is_err(),
        "new connections refused"
    );
    // The established connection still works during the drain…
    conn.write_all(b"pong").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // …and is cut at the drain deadline.
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "connection cut after the drain timeout");
    assert!(mg.log_text().contains("drain deadline passed"));
}

#[tokio::test]
async fn killed_endpoint_is_skipped_and_client_still_succeeds() {
    let a = Backend::http("alive").await;
    let dead = free_port(); // nothing listens here
    let port = free_port();
    let body = format!(
        "services:\n{}",
        service(
            "web",
            port,
            "round_robin",
            &[addr(dead).to_string(), a.addr.to_string()]
        )
    );
    let mg = Meshgate::start(&body).await;
    // Every request succeeds: the failed connect is retried on the other endpoint.
    for _ in 0..10 {
        assert_eq!(ask_name(addr(port)).await.unwrap(), "alive");
    }
    // Exactly one failed connect: after it, the dead endpoint is ejected.
    assert_eq!(
        mg.metric("meshgate_upstream_connect_failures_total").await,
        1.0
    );
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let echo = Backend::tcp_echo().await;
    let port = free_port();
    let body = format!(
        "services:\n{}",
        service("e", port, "round_robin", &[echo.addr.to_string()])
    );
    let mut mg = Meshgate::start(&body).await;
    let mut conn = TcpStream::connect(addr(port)).await.unwrap();
    conn.write_all(b"1234").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();

    mg.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        TcpStream::connect(addr(port)).await.is_err(),
        "stopped accepting"
    );
    assert!(mg.child.try_wait().unwrap().is_none(), "still draining");
    conn.write_all(b"5678").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"5678", "in-flight connection still served");
    drop(conn);
    let code = tokio::task::spawn_blocking(move || {
        let c = mg.wait_exit(Duration::from_secs(5));
        (c, mg)
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "exit 0 after drain");
}

#[tokio::test]
async fn udp_round_trip_and_flow_bound() {
    let echo = Backend::udp_echo().await;
    let port = free_udp_port();
    let body = format!(
        "services:\n  dns:\n    ports: [\"{port}/udp\"]\n    endpoints: [\"{}\"]\n    udp: {{ max_flows: 2, idle: 500ms }}\n",
        echo.addr
    );
    let mg = Meshgate::start(&body).await;
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr(port)).await.unwrap();
        clients.push((i, c));
    }
    let mut buf = [0u8; 64];
    for (i, c) in &clients[..2] {
        for round in 0..3u8 {
            c.send(&[*i, round]).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
                .await
                .expect("reply")
                .unwrap();
            assert_eq!(&buf[..n], &[*i, round], "reply goes to the right client");
        }
    }
    // The third flow exceeds max_flows: dropped, counted, logged.
    let (_, third) = &clients[2];
    third.send(b"x").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.recv(&mut buf))
            .await
            .is_err()
    );
    assert_eq!(mg.metric("meshgate_udp_flows_dropped_total").await, 1.0);
    assert!(mg.log_text().contains("UDP flow table full"));
    // After the idle timeout the flows are gone and the third client gets through.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    third.send(b"y").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), third.recv(&mut buf))
        .await
        .expect("reply after idle expiry")
        .unwrap();
    assert_eq!(&buf[..n], b"y");
}

/// Send `msg` and wait up to 300 ms for its echo, at most `tries` times; how many sends it took.
async fn udp_exchange(c: &UdpSocket, msg: &[u8], tries: usize) -> Option<usize> {
    let mut buf = [0u8; 64];
    for attempt in 1..=tries {
        c.send(msg).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(got) = tokio::time::timeout_at(deadline, c.recv(&mut buf)).await {
            if got.is_ok_and(|n| &buf[..n] == msg) {
                return Some(attempt);
            }
        }
    }
    None
}

/// A UDP endpoint with nothing listening answers ICMP port unreachable: its flow is dropped,
/// the endpoint ejected, and the client's next datagram goes to a live endpoint, where its flow
/// then stays. New clients avoid the ejected endpoint.
#[tokio::test]
async fn udp_unreachable_endpoint_is_ejected_and_its_clients_rerouted() {
    let echo = Backend::udp_echo().await;
    let dead = free_udp_port(); // nothing listens here
    let port = free_udp_port();
    let body = format!(
        "services:\n  u:\n    ports: [\"{port}/udp\"]\n    policy: round_robin\n    endpoints: [\"{}\", \"{}\"]\n",
        addr(dead),
        echo.addr
    );
    let mg = Meshgate::start(&body).await;
    // Two clients from fixed ports: round robin sends one of them to the dead endpoint first.
    let mut clients = Vec::new();
    let mut refused = 0;
    for i in 0..2u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr(port)).await.unwrap();
        if udp_exchange(&c, &[i, 0], 1).await.is_none() {
            // Its flow went to the dead endpoint. Once meshgate has seen the refusal, the very
            // next datagram goes to the live one (not after the flow sweep).
            refused += 1;
            let deadline = Instant::now() + Duration::from_secs(2);
            while mg.metric("meshgate_udp_upstream_unreachable_total").await < 1.0 {
                assert!(Instant::now() < deadline, "the refusal was not noticed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                udp_exchange(&c, &[i, 1], 1).await,
                Some(1),
                "client {i} re-routed at its next datagram"
            );
        }
        clients.push(c);
    }
    assert_eq!(
        refused, 1,
        "round robin sent one of two new flows to each endpoint"
    );
    assert_eq!(
        mg.metric("meshgate_udp_upstream_unreachable_total").await,
        1.0
    );
    // Both stay on the live endpoint.
    for round in 1..=20u8 {
        for (i, c) in clients.iter().enumerate() {
            assert_eq!(udp_exchange(c, &[i as u8, round], 1).await, Some(1));
        }
    }
    // New clients: the dead endpoint is ejected (1 s, doubling per failure), so few if any of
    // them lose their first datagram; round robin alone would send half of them there.
    let mut lost = 0;
    for i in 0..10u8 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr(port)).await.unwrap();
        let took = udp_exchange(&c, &[100 + i], 3)
            .await
            .expect("new client served");
        lost += took - 1;
    }
    assert!(
        lost <= 2,
        "{lost} of 10 new clients lost their first datagram"
    );
}

/// Bursts through the UDP proxy: datagrams sent back to back (taken off the sockets in batches)
/// come back whole, to the right client, in order; the largest IPv4 datagram too.
#[tokio::test]
async fn udp_bursts_keep_order_size_and_client() {
    let echo = Backend::udp_echo().await;
    let port = free_udp_port();
    let body = format!(
        "services:\n  u:\n    ports: [\"{port}/udp\"]\n    endpoints: [\"{}\"]\n",
        echo.addr
    );
    let mg = Meshgate::start(&body).await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr(port)).await.unwrap();
        clients.push(c);
    }
    // The first datagram of each client opens its flow; wait for its echo.
    let mut buf = vec![0u8; 70_000];
    for c in &clients {
        c.send(b"hello").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
            .await
            .expect("first echo")
            .unwrap();
        assert_eq!(&buf[..n], b"hello");
    }
    // The largest IPv4 datagram, then small ones right behind it (its own burst: a socket's
    // default receive buffer holds about one datagram that large).
    for (k, c) in clients.iter().enumerate() {
        let big = vec![k as u8 + 1; 65_507];
        c.send(&big).await.unwrap();
        for i in 0..5u8 {
            c.send(&[k as u8, i]).await.unwrap();
        }
        let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
            .await
            .expect("large echo")
            .unwrap();
        assert!(
            n == big.len() && buf[..n] == big[..],
            "client {k}: 65,507 bytes whole"
        );
        for i in 0..5u8 {
            let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
                .await
                .expect("echo after the large one")
                .unwrap();
            assert_eq!(
                &buf[..n],
                &[k as u8, i],
                "client {k}: in order after the large one"
            );
        }
    }
    // Bursts of both clients interleaved (more than one batch), sent without waiting for replies.
    let payload = |client: usize, wave: usize, i: usize| -> Vec<u8> {
        let mut p = vec![(client * 100 + i) as u8; 4 + (i * 131 + wave * 17) % 1_400];
        p[..4].copy_from_slice(&(wave as u32 * 1000 + i as u32).to_be_bytes());
        p
    };
    for wave in 0..4 {
        for i in 0..24 {
            for (k, c) in clients.iter().enumerate() {
                c.send(&payload(k, wave, i)).await.unwrap();
            }
        }
        for (k, c) in clients.iter().enumerate() {
            for i in 0..24 {
                let n = tokio::time::timeout(Duration::from_secs(2), c.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("client {k} wave {wave}: reply {i} missing"))
                    .unwrap();
                let want = payload(k, wave, i);
                assert_eq!(n, want.len(), "client {k} wave {wave} datagram {i}: length");
                assert!(
                    buf[..n] == want[..],
                    "client {k} wave {wave} datagram {i}: bytes"
                );
            }
        }
    }
    assert_eq!(mg.metric("meshgate_udp_flows").await, 2.0);
    assert_eq!(mg.metric("meshgate_udp_send_dropped_total").await, 0.0);
}

#[tokio::test]
async fn half_close_both_directions() {
    let echo = Backend::tcp_echo().await;
    let port = free_port();
    let body = format!(
        "services:\n{}",
        service("e", port, "round_robin", &[echo.addr.to_string()])
    );
    let _mg = Meshgate::start(&body).await;
    // Client half-closes first: it still reads the whole echo, then EOF from the server side.
    let mut conn = TcpStream::connect(addr(port)).await.unwrap();
    let payload = vec![42u8; 1 << 20];
    conn.write_all(&payload).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), payload.len());

    // Server half-closes first: a raw backend that writes and shuts down, then reads.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let port2 = free_port();
    let _mg2 = Meshgate::start(&format!(
        "services:\n{}",
        service("s", port2, "round_robin", &[backend.to_string()])
    ))
    .await;
    let mut conn = TcpStream::connect(addr(port2)).await.unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        conn.read(&mut [0u8; 1]).await.unwrap(),
        0,
        "EOF from server"
    );
    conn.write_all(b"after server FIN").await.unwrap();
    conn.shutdown().await.unwrap();
    assert_eq!(server.await.unwrap(), b"after server FIN");
}

#[tokio::test]
async fn thousand_concurrent_connections() {
    let echo = Backend::tcp_echo().await;
    let port = free_port();
    let body = format!(
        "services:\n{}",
        service("e", port, "least_conn", &[echo.addr.to_string()])
    );
    let mg = Meshgate::start(&body).await;
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(TcpStream::connect(addr(port)).await.unwrap());
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let msg = format!("conn-{i}");
                c.write_all(msg.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; msg.len()];
                c.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, msg.as_bytes());
                c
            })
        })
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        held.push(
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let table: serde_json::Value =
        serde_json::from_str(&mg.get("/api/table").await.unwrap()).unwrap();
    assert_eq!(
        table["services"][0]["pools"][0]["endpoints"][0]["in_flight"],
        1000
    );
    // Idle proxied connections hold their two sockets and no splice pipe (pipes are pooled per
    // worker thread, at most 64 each, and only lent while a chunk moves).
    let fds = std::fs::read_dir(format!("/proc/{}/fd", mg.pid()))
        .unwrap()
        .count();
    assert!(
        fds < 2 * 1000 + 400,
        "{fds} fds for 1000 idle proxied connections"
    );
    drop(held);
}

#[tokio::test]
async fn bind_failure_is_per_port() {
    let a = Backend::http("a").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let ok_port = free_port();
    let body = format!(
        "services:\n  bad:\n    ports: [\"127.0.0.1:{taken_port}:80\"]\n    endpoints: [\"{}\"]\n{}",
        a.addr,
        service("good", ok_port, "round_robin", &[a.addr.to_string()])
    );
    let mg = Meshgate::start(&body).await;
    assert_eq!(ask_name(addr(ok_port)).await.unwrap(), "a");
    let status = mg.get("/api/status").await.unwrap();
    assert!(
        status.contains(&format!("127.0.0.1:{taken_port}")),
        "{status}"
    );
    assert!(status.contains("in use"), "{status}");
    assert!(mg.metric("meshgate_listener_bind_errors_total").await >= 1.0);
    // Once the port is free, the next retry opens it.
    drop(taken);
    assert_eq!(
        ask_name_eventually(addr(taken_port), Duration::from_secs(7)).await,
        "a"
    );
}

#[tokio::test]
async fn idle_timeout_and_proxy_protocol() {
    // A raw backend that records what it receives first.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256];
                let n = s.read(&mut buf).await.unwrap();
                tx.send(buf[..n].to_vec()).await.unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    let port = free_port();
    let body = format!(
        "services:\n  pp:\n    ports: [\"{port}\"]\n    endpoints: [\"{backend}\"]\n    proxy_protocol: v1\n    timeouts: {{ idle: 300ms }}\n"
    );
    let mg = Meshgate::start(&body).await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut conn = sock.connect(addr(port)).await.unwrap();
    let client = conn.local_addr().unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let expected = format!(
        "PROXY TCP4 127.0.0.9 127.0.0.1 {} {port}\r\n",
        client.port()
    );
    assert_eq!(String::from_utf8_lossy(&first), expected);
    // Idle: closed after ~300 ms without traffic.
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut buf))
        .await
        .expect("closed by idle timeout")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(mg.metric("meshgate_idle_closed_total").await, 1.0);
}

/// Poll `/api/table` until an endpoint is down (at most 3 s); the table then.
async fn wait_for_down(mg: &Meshgate) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let table = mg.get("/api/table").await.unwrap();
        if table.contains("\"Down\"") {
            return table;
        }
        assert!(
            Instant::now() < deadline,
            "no endpoint marked down: {table}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn active_health_check_takes_bad_endpoint_out_and_back() {
    // The TCP echo accepts connections (passive health cannot see it is broken) but is no HTTP
    // server: the HTTP health check marks it down, and every request goes to the good one.
    let good = Backend::http("good").await;
    let bad = Backend::tcp_echo().await;
    let port = free_port();
    let body = format!(
        "services:\n  web:\n    ports: [\"{port}\"]\n    endpoints: [\"{}\", \"{}\"]\n    health_check: {{ interval: 100ms, timeout: 500ms, fall: 2, rise: 2, http_path: / }}\n",
        good.addr, bad.addr
    );
    let mg = Meshgate::start(&body).await;
    wait_for_down(&mg).await;
    for _ in 0..20 {
        assert_eq!(ask_name(addr(port)).await.unwrap(), "good");
    }
    assert!(mg.log_text().contains("health check: endpoint down"));
    assert_eq!(
        mg.metric("meshgate_upstream_connect_failures_total").await,
        0.0
    );
}

/// The same target over TCP and UDP is two endpoints. A DNS-like server that answers UDP and
/// takes no TCP is marked down by the (TCP) health check for TCP only, and keeps serving UDP.
#[tokio::test]
async fn tcp_health_verdict_leaves_udp_on_the_same_target_serving() {
    let echo = Backend::udp_echo().await;
    let target = echo.addr.port();
    let (udp_port, tcp_port) = (free_udp_port(), free_port());
    let body = format!(
        "services:\n  dns:\n    ports: [\"{udp_port}:{target}/udp\", \"{tcp_port}:{target}/tcp\"]\n    endpoints: [\"127.0.0.1\"]\n    health_check: {{ interval: 100ms, timeout: 500ms, fall: 1, rise: 1 }}\n"
    );
    let mg = Meshgate::start(&body).await;
    let table = wait_for_down(&mg).await;
    assert_eq!(
        table.matches("\"Down\"").count(),
        1,
        "only TCP is down: {table}"
    );
    // Checks go on every 100 ms: UDP must be served across several of them.
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(addr(udp_port)).await.unwrap();
    for i in 0..5u8 {
        assert_eq!(udp_exchange(&c, &[i], 2).await, Some(1), "datagram {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn reload_keeps_established_connections() {
    let (e1, e2) = (Backend::tcp_echo().await, Backend::tcp_echo().await);
    let port = free_port();
    let one = format!(
        "services:\n{}",
        service("e", port, "round_robin", &[e1.addr.to_string()])
    );
    let mg = Meshgate::start(&one).await;
    let mut conn = TcpStream::connect(addr(port)).await.unwrap();
    conn.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf).await.unwrap();
    // Change the service's endpoints and policy: a new table, same listener.
    let gen = mg.generation().await;
    mg.rewrite(&format!(
        "services:\n{}",
        service(
            "e",
            port,
            "least_conn",
            &[e1.addr.to_string(), e2.addr.to_string()]
        )
    ));
    mg.wait_generation_above(gen, Duration::from_secs(1)).await;
    conn.write_all(b"after!").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"after!",
        "established connection survived the reload"
    );
    assert!(
        !mg.log_text().contains("listener closed"),
        "listener was not reopened"
    );
}

#[tokio::test]
async fn accept_backs_off_on_emfile_and_recovers() {
    let echo = Backend::tcp_echo().await;
    let port = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mg.yaml");
    std::fs::write(
        &config,
        format!(
            "admin:\n  bind: {admin}\nservices:\n{}",
            service("e", port, "round_robin", &[echo.addr.to_string()])
        ),
    )
    .unwrap();
    // A tiny fd limit: each proxied connection costs 2 fds (+ pipes when data flows).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec {} run --config {}",
            env!("CARGO_BIN_EXE_meshgate"),
            config.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target = addr(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(target).await.is_err() {
        assert!(Instant::now() < deadline, "meshgate did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Hold far more connections than the limit allows; the kernel queues them in the backlog.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(c) = TcpStream::connect(target).await {
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = async {
        let mut s = TcpStream::connect(admin.as_str()).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    drop(held);
    // After the connections close, meshgate accepts and proxies again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = async {
            let mut c = TcpStream::connect(target).await?;
            c.write_all(b"ok").await?;
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        if let Ok(Ok(b)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            assert_eq!(&b, b"ok");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "meshgate did not recover after EMFILE"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = metrics.await.unwrap_or_default();
    let errors: f64 = text
        .lines()
        .find(|l| l.starts_with("meshgate_accept_errors_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "EMFILE counted as accept errors: {errors}");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = child.kill();
    let _ = child.wait();
}

/// The congestion control of meshgate's socket connected to `peer`, read through a duplicate
/// of the process's descriptor (`pidfd_getfd`: same user, Linux 5.6+).
fn congestion_of_socket_to(pid: i32, peer: std::net::SocketAddr) -> Option<String> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pidfd = pidfd_open(Pid::from_raw(pid)?, PidfdFlags::empty()).expect("pidfd_open");
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(n) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(fd) = pidfd_getfd(&pidfd, n, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let peer_of = rustix::net::getpeername(&fd).ok().flatten();
        let peer_of = peer_of.and_then(|a| std::net::SocketAddr::try_from(a).ok());
        if peer_of == Some(peer) {
            return rustix::net::sockopt::tcp_congestion(&fd).ok();
        }
    }
    None
}

/// `upstream_congestion` applies to the connections meshgate opens to endpoints, L4 and HTTP,
/// and only to them: the client's connection keeps the kernel's default.
#[tokio::test]
async fn upstream_congestion_applies_to_endpoint_connections_only() {
    let kernel_default = meshgate::tcpio::kernel_congestion();
    let wanted = if kernel_default == "reno" {
        "cubic"
    } else {
        "reno"
    };
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let port = free_port();
    let web_backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web_backend.local_addr().unwrap();
    let web_port = free_port();
    let body = format!(
        "upstream_congestion: {wanted}\nservices:\n{}  web:\n    http_port: {}\n    endpoints: [\"{web_addr}\"]\n\
         entrypoints:\n  web: {{ bind: \"127.0.0.1:{web_port}\" }}\n\
         routers:\n  r: {{ entrypoints: [web], rule: \"PathPrefix(`/`)\", service: web }}\n",
        service("cc", port, "round_robin", &[backend_addr.to_string()]),
        web_addr.port()
    );
    let mg = Meshgate::start(&body).await;
    // HTTP: meshgate connects to the endpoint when the request arrives.
    let mut http = TcpStream::connect(addr(web_port)).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (_web_upstream, _) = tokio::time::timeout(Duration::from_secs(5), web_backend.accept())
        .await
        .expect("meshgate connects to the HTTP endpoint")
        .unwrap();
    assert_eq!(
        congestion_of_socket_to(mg.pid(), web_addr).as_deref(),
        Some(wanted),
        "HTTP upstream"
    );
    let client = TcpStream::connect(addr(port)).await.unwrap();
    let (_upstream, _) = tokio::time::timeout(Duration::from_secs(5), backend.accept())
        .await
        .expect("meshgate connects to the endpoint")
        .unwrap();
    let to_endpoint = congestion_of_socket_to(mg.pid(), backend_addr);
    let to_client = congestion_of_socket_to(mg.pid(), client.local_addr().unwrap());
    assert_eq!(
        (to_endpoint.as_deref(), to_client.as_deref()),
        (Some(wanted), Some(kernel_default.as_str()))
    );
}
