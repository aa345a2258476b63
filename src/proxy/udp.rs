//! UDP proxying with a per-client flow table.
//!
//! One task owns a listener socket and its flow table (client address → upstream socket), so the
//! table needs no lock. Each flow has its own connected upstream socket and a reader task that
//! sends replies back to that client through the shared listener socket. Flows end after the
//! service's UDP idle timeout; the table is bounded, and a datagram from a new client when it is
//! full is dropped, counted and logged (at most once per second).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::balance::{hash_ip, PickContext};
use crate::clock;
use crate::metrics::Metrics;
use crate::stats::InFlight;
use crate::table::{ListenKey, RoutingTable};

/// Largest datagram handled (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

struct Flow {
    upstream: Arc<UdpSocket>,
    last_ms: Arc<AtomicU64>,
    idle_ms: u64,
    stop: CancellationToken,
    _in_flight: InFlight,
}

/// Serve one UDP listener until `stop` fires.
pub async fn serve(
    key: ListenKey,
    socket: Arc<UdpSocket>,
    table: Arc<ArcSwap<RoutingTable>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    let mut last_full_log: Option<u64> = None;
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on some kernels; they concern one peer only.
                    tracing::debug!(listener = %key, error = %e, "udp recv error");
                    continue;
                }
            },
            _ = sweep.tick() => {
                let now = clock::now_ms();
                flows.retain(|_, f| {
                    let keep = now.saturating_sub(f.last_ms.load(Ordering::Relaxed)) < f.idle_ms;
                    if !keep { f.stop.cancel(); }
                    keep
                });
                metrics.udp_flows.set(flows.len() as i64);
                continue;
            }
            _ = stop.cancelled() => break,
        };
        let now = clock::now_ms();
        if let Some(flow) = flows.get(&client) {
            flow.last_ms.store(now, Ordering::Relaxed);
            let _ = flow.upstream.send(&buf[..n]).await;
            continue;
        }
        // A new flow: route it with the current table (guard dropped before any await).
        let (route, max_flows, idle) = {
            let t = table.load();
            match t.l4.get(&key) {
                Some(r) => (
                    r.clone(),
                    r.service.spec.udp.max_flows,
                    r.service.spec.udp.idle,
                ),
                None => continue,
            }
        };
        if flows.len() >= max_flows {
            metrics.udp_flows_dropped.inc();
            if last_full_log.is_none_or(|t| now.saturating_sub(t) >= 1000) {
                last_full_log = Some(now);
                tracing::warn!(listener = %key, max_flows, client = %client,
                    "UDP flow table full: datagrams from new clients are dropped");
            }
            continue;
        }
        let pool = route.pool();
        let ctx = PickContext {
            hash: hash_ip(client.ip()),
            now_ms: now,
            now_ns: clock::now_ns(),
            ..Default::default()
        };
        let Some(i) = pool.balancer.pick(&pool.endpoints, &ctx) else {
            metrics.no_endpoint.inc();
            continue;
        };
        let endpoint = &pool.endpoints[i];
        let upstream = match open_upstream(endpoint.addr).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(endpoint = %endpoint.addr, error = %e, "udp upstream socket failed");
                continue;
            }
        };
        let flow = Flow {
            upstream: Arc::clone(&upstream),
            last_ms: Arc::new(AtomicU64::new(now)),
            idle_ms: idle.as_millis().max(1) as u64,
            stop: stop.child_token(),
            _in_flight: endpoint.stats.start(),
        };
        tokio::spawn(replies(
            upstream,
            Arc::clone(&socket),
            client,
            Arc::clone(&flow.last_ms),
            flow.stop.clone(),
        ));
        let _ = flow.upstream.send(&buf[..n]).await;
        flows.insert(client, flow);
        metrics.udp_flows.set(flows.len() as i64);
    }
    for f in flows.values() {
        f.stop.cancel();
    }
    metrics.udp_flows.set(0);
}

async fn open_upstream(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let any = match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = UdpSocket::bind(any).await?;
    s.connect(addr).await?;
    Ok(s)
}

thread_local! {
    /// Reply buffer shared by all flows on a worker thread: a flow costs no 64 KiB buffer of its
    /// own. It is only borrowed inside a non-async closure, never across an `.await`.
    static REPLY_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Relay replies from the upstream to one client until the flow is stopped.
async fn replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    last_ms: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            r = upstream.readable() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
        let result = REPLY_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = upstream.try_recv(&mut buf)?;
            // A full send buffer drops the reply, as a router would; UDP tolerates loss.
            let _ = listener.try_send_to(&buf[..n], client);
            Ok::<_, std::io::Error>(n)
        });
        match result {
            Ok(_) => last_ms.store(clock::now_ms(), Ordering::Relaxed),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // ECONNREFUSED from an ICMP port unreachable: the endpoint is down; keep the flow
            // until idle so the client is not switched mid-conversation.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
