//! UDP proxying with a per-client flow table.
//!
//! One task owns a listener socket and its flow table (client address → upstream socket), so the
//! table needs no lock. Each flow has its own connected upstream socket and a reply task that
//! sends the upstream's replies back to that client through the listener socket. Flows end after
//! the service's UDP idle timeout; the table is bounded, and a datagram from a new client when it
//! is full is dropped, counted and logged (at most once per second).
//!
//! Both directions move datagrams in batches ([`crate::udpio`]): one `recvmmsg` takes what
//! waits on the listener (up to 32 datagrams), and the datagrams of each flow leave with one
//! `sendmmsg` on its upstream socket, in arrival order; a reply task likewise takes what waits
//! on its upstream socket and sends it to the client with one `sendmmsg`. The sockets are in the
//! event loop for READABLE only, and nothing waits to send: a full send buffer drops the
//! datagrams, as a router would (counted: `meshgate_udp_send_dropped_total`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::balance::{hash_ip, PickContext};
use crate::clock;
use crate::metrics::Metrics;
use crate::stats::InFlight;
use crate::table::{ListenKey, RoutingTable};
use crate::udpio::{self, ReadOnlyUdp, RecvBatch, SockaddrStorage, MAX_BATCH};

/// Largest datagram handled (the UDP maximum). A batch's slots are this large: address space,
/// not memory, beyond the pages datagrams fill.
const MAX_DATAGRAM: usize = 65_535;

struct Flow {
    upstream: Arc<ReadOnlyUdp>,
    last_ms: Arc<AtomicU64>,
    idle_ms: u64,
    stop: CancellationToken,
    _in_flight: InFlight,
}

/// Serve one UDP listener until `stop` fires.
pub async fn serve(
    key: ListenKey,
    socket: Arc<ReadOnlyUdp>,
    table: Arc<ArcSwap<RoutingTable>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut batch = RecvBatch::new(MAX_BATCH, MAX_DATAGRAM);
    // (upstream socket, datagram index) per datagram of a batch, grouped by flow to send.
    let mut sends: Vec<(RawFd, usize)> = Vec::with_capacity(MAX_BATCH);
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    let mut last_full_log: Option<u64> = None;
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = socket.readable() => match r {
                Ok(ready) => ready,
                Err(e) => {
                    tracing::warn!(listener = %key, error = %e, "udp listener socket failed");
                    break;
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
        };
        // A short batch says `WouldBlock`, and `try_io` then clears the readiness.
        match ready.try_io(|s| batch.recv(s.get_ref())) {
            Ok(Ok(_)) => {}
            Err(_) if !batch.is_empty() => {}
            Err(_) => continue,
            Ok(Err(e)) => {
                // ICMP errors surface here on some kernels; they concern one peer only.
                tracing::debug!(listener = %key, error = %e, "udp recv error");
                continue;
            }
        }
        let now = clock::now_ms();
        let opened = flows.len();
        sends.clear();
        for i in 0..batch.len() {
            let (_, got) = batch.get(i);
            let Some(client) = got.peer else { continue };
            let fd = match flows.get(&client) {
                Some(flow) => {
                    flow.last_ms.store(now, Ordering::Relaxed);
                    flow.upstream.as_raw_fd()
                }
                None => {
                    let ctx = NewFlow {
                        key: &key,
                        table: &table,
                        metrics: &metrics,
                        socket: &socket,
                        stop: &stop,
                    };
                    let Some(flow) = ctx.open(client, flows.len(), now, &mut last_full_log) else {
                        continue;
                    };
                    let fd = flow.upstream.as_raw_fd();
                    flows.insert(client, flow);
                    fd
                }
            };
            sends.push((fd, i));
        }
        if flows.len() != opened {
            metrics.udp_flows.set(flows.len() as i64);
        }
        // One `sendmmsg` per flow; a stable sort keeps each flow's datagrams in arrival order.
        // Every `fd` belongs to a flow in `flows`, which nothing has removed since.
        sends.sort_by_key(|&(fd, _)| fd);
        for run in sends.chunk_by(|a, b| a.0 == b.0) {
            let mut at = run.iter();
            let datagrams: [[IoSlice<'_>; 1]; MAX_BATCH] = std::array::from_fn(|_| {
                [IoSlice::new(
                    at.next().map_or(&[][..], |&(_, i)| batch.get(i).0),
                )]
            });
            send_all(
                run[0].0,
                &datagrams[..run.len()],
                &udpio::CONNECTED,
                &metrics,
            );
        }
    }
    for f in flows.values() {
        f.stop.cancel();
    }
    metrics.udp_flows.set(0);
}

/// What opening a flow needs from the listener task.
struct NewFlow<'a> {
    key: &'a ListenKey,
    table: &'a Arc<ArcSwap<RoutingTable>>,
    metrics: &'a Arc<Metrics>,
    socket: &'a Arc<ReadOnlyUdp>,
    stop: &'a CancellationToken,
}

impl NewFlow<'_> {
    /// Route a new client with the current table, open its upstream socket and start its reply
    /// task; `None` (the datagram is dropped) when the table is full, the route or every
    /// endpoint is gone, or the socket cannot be opened.
    fn open(
        &self,
        client: SocketAddr,
        open: usize,
        now: u64,
        last_full_log: &mut Option<u64>,
    ) -> Option<Flow> {
        // The guard lives in this synchronous function only.
        let t = self.table.load();
        let route = t.l4.get(self.key)?;
        let (max_flows, idle) = (
            route.service.spec.udp.max_flows,
            route.service.spec.udp.idle,
        );
        if open >= max_flows {
            self.metrics.udp_flows_dropped.inc();
            if last_full_log.is_none_or(|t| now.saturating_sub(t) >= 1000) {
                *last_full_log = Some(now);
                tracing::warn!(listener = %self.key, max_flows, client = %client,
                    "UDP flow table full: datagrams from new clients are dropped");
            }
            return None;
        }
        let pool = route.pool();
        let ctx = PickContext {
            hash: hash_ip(client.ip()),
            now_ms: now,
            now_ns: clock::now_ns(),
            ..Default::default()
        };
        let Some(i) = pool.balancer.pick(&pool.endpoints, &ctx) else {
            self.metrics.no_endpoint.inc();
            return None;
        };
        let endpoint = &pool.endpoints[i];
        let upstream = match open_upstream(endpoint.addr) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::warn!(endpoint = %endpoint.addr, error = %e, "udp upstream socket failed");
                return None;
            }
        };
        let flow = Flow {
            upstream: Arc::clone(&upstream),
            last_ms: Arc::new(AtomicU64::new(now)),
            idle_ms: idle.as_millis().max(1) as u64,
            stop: self.stop.child_token(),
            _in_flight: endpoint.stats.start(),
        };
        tokio::spawn(replies(
            upstream,
            Arc::clone(self.socket),
            client,
            Arc::clone(&flow.last_ms),
            flow.stop.clone(),
            Arc::clone(self.metrics),
        ));
        Some(flow)
    }
}

/// A socket connected to `addr` from an ephemeral port, in the event loop for READABLE only.
fn open_upstream(addr: SocketAddr) -> std::io::Result<ReadOnlyUdp> {
    let any = match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(addr)?;
    s.set_nonblocking(true)?;
    udpio::read_only(s)
}

/// Send a batch; what does not fit in the send buffer is dropped and counted. A datagram the
/// kernel refuses (`ECONNREFUSED` left by an ICMP error on a connected socket) is skipped.
fn send_all(
    fd: RawFd,
    datagrams: &[[IoSlice<'_>; 1]],
    to: &[Option<SockaddrStorage>],
    metrics: &Metrics,
) {
    let mut sent = 0;
    while sent < datagrams.len() {
        match udpio::send_batch(fd, &datagrams[sent..], &to[sent..]) {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                metrics
                    .udp_send_dropped
                    .inc_by((datagrams.len() - sent) as u64);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "udp send failed");
                sent += 1;
            }
        }
    }
}

/// A worker thread's reply buffers, shared by the flows it runs: a flow costs no buffer of its
/// own. Only borrowed inside a non-async closure, never across an `.await`.
struct Replies {
    batch: RecvBatch,
    to: Vec<Option<SockaddrStorage>>,
}

thread_local! {
    static REPLIES: RefCell<Replies> = RefCell::new(Replies {
        batch: RecvBatch::new(MAX_BATCH, MAX_DATAGRAM),
        to: Vec::with_capacity(MAX_BATCH),
    });
}

/// Relay replies from the upstream to one client until the flow is stopped.
async fn replies(
    upstream: Arc<ReadOnlyUdp>,
    listener: Arc<ReadOnlyUdp>,
    client: SocketAddr,
    last_ms: Arc<AtomicU64>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let client_addr = SockaddrStorage::from(client);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = &mut stopped => return,
            r = upstream.readable() => match r {
                Ok(ready) => ready,
                Err(_) => return,
            },
        };
        let mut got = 0;
        let result = ready.try_io(|u| {
            REPLIES.with_borrow_mut(|r| {
                let result = r.batch.recv(u.get_ref());
                got = r.batch.len();
                r.to.clear();
                r.to.resize(got, Some(client_addr));
                let batch = &r.batch;
                let mut at = 0..got;
                let datagrams: [[IoSlice<'_>; 1]; MAX_BATCH] = std::array::from_fn(|_| {
                    [IoSlice::new(at.next().map_or(&[][..], |i| batch.get(i).0))]
                });
                send_all(listener.as_raw_fd(), &datagrams[..got], &r.to, &metrics);
                result
            })
        });
        if got > 0 {
            last_ms.store(clock::now_ms(), Ordering::Relaxed);
        }
        if let Ok(Err(_)) = result {
            // ECONNREFUSED from an ICMP port unreachable: the endpoint is down; keep the flow
            // until idle so the client is not switched mid-conversation.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
