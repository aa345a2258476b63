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
//!
//! Passive health: an endpoint with nothing listening answers with ICMP port unreachable, which
//! Linux leaves on the connected upstream socket as `ECONNREFUSED` for its next send or receive
//! (host or network unreachable likewise). Either task that meets it ejects the endpoint, as a
//! failed TCP connect does, and marks the flow refused; the client's next datagram opens a new
//! flow to an endpoint still available (or, when every one is ejected, to the one whose ejection
//! ends first). A reply clears the endpoint's failure streak.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::Interest;
use tokio_util::sync::CancellationToken;

use super::connect::panic_pick;
use crate::balance::{hash_ip, PickContext};
use crate::clock;
use crate::metrics::Metrics;
use crate::stats::{EndpointStats, InFlight};
use crate::table::{ListenKey, RoutingTable};
use crate::udpio::{self, ReadOnlyUdp, RecvBatch, SockaddrStorage, MAX_BATCH};

/// Largest datagram handled (the UDP maximum). A batch's slots are this large: address space,
/// not memory, beyond the pages datagrams fill.
const MAX_DATAGRAM: usize = 65_535;

struct Flow {
    upstream: Arc<ReadOnlyUdp>,
    state: Arc<FlowState>,
    idle_ms: u64,
    stop: CancellationToken,
    _in_flight: InFlight,
}

/// What a flow's listener side and its reply task share.
struct FlowState {
    /// When a datagram last moved either way ([`clock::now_ms`]).
    last_ms: AtomicU64,
    /// The endpoint proved unreachable: the flow is done, the client's next datagram re-routes.
    refused: AtomicBool,
    /// The endpoint's stats, for its passive health.
    endpoint: Arc<EndpointStats>,
}

impl FlowState {
    /// The endpoint refused this flow's datagrams: eject it (once per flow) and end the flow.
    fn refuse(&self, metrics: &Metrics) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            self.endpoint.record_failure(clock::now_ms());
            metrics.udp_upstream_unreachable.inc();
        }
    }
}

/// Errors a connected UDP socket reports for an ICMP error from its peer, or a route to it gone:
/// they condemn the endpoint, not this host.
fn is_unreachable(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    [
        Errno::CONNREFUSED,
        Errno::HOSTUNREACH,
        Errno::NETUNREACH,
        Errno::HOSTDOWN,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
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
                    let keep = !f.state.refused.load(Ordering::Relaxed)
                        && now.saturating_sub(f.state.last_ms.load(Ordering::Relaxed)) < f.idle_ms;
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
                Some(flow) if !flow.state.refused.load(Ordering::Relaxed) => {
                    flow.state.last_ms.store(now, Ordering::Relaxed);
                    flow.upstream.as_raw_fd()
                }
                _ => {
                    // A refused flow gives way to a new one, routed afresh.
                    if let Some(old) = flows.remove(&client) {
                        old.stop.cancel();
                    }
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
            let refused = send_all(
                run[0].0,
                &datagrams[..run.len()],
                &udpio::CONNECTED,
                &metrics,
            );
            if refused {
                let client = batch.get(run[0].1).1.peer;
                if let Some(flow) = client.and_then(|c| flows.get(&c)) {
                    flow.state.refuse(&metrics);
                }
            }
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
        let Some(i) = pool
            .balancer
            .pick(&pool.endpoints, &ctx)
            .or_else(|| panic_pick(pool, &ctx))
        else {
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
            state: Arc::new(FlowState {
                last_ms: AtomicU64::new(now),
                refused: AtomicBool::new(false),
                endpoint: Arc::clone(&endpoint.stats),
            }),
            idle_ms: idle.as_millis().max(1) as u64,
            stop: self.stop.child_token(),
            _in_flight: endpoint.stats.start(),
        };
        tokio::spawn(replies(
            upstream,
            Arc::clone(self.socket),
            client,
            Reply {
                state: Arc::clone(&flow.state),
                stop: flow.stop.clone(),
                metrics: Arc::clone(self.metrics),
            },
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
/// kernel refuses is skipped; `true` when the peer proved unreachable ([`is_unreachable`]:
/// `ECONNREFUSED` left by an ICMP error on a connected socket), and then the rest of the batch
/// is not sent.
fn send_all(
    fd: RawFd,
    datagrams: &[[IoSlice<'_>; 1]],
    to: &[Option<SockaddrStorage>],
    metrics: &Metrics,
) -> bool {
    let mut sent = 0;
    while sent < datagrams.len() {
        match udpio::send_batch(fd, &datagrams[sent..], &to[sent..]) {
            Ok(n) => sent += n.max(1),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                metrics
                    .udp_send_dropped
                    .inc_by((datagrams.len() - sent) as u64);
                break;
            }
            // The rest would go to a peer known to be unreachable: dropped with this one.
            Err(e) if is_unreachable(&e) => return true,
            Err(e) => {
                tracing::debug!(error = %e, "udp send failed");
                sent += 1;
            }
        }
    }
    false
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

/// What a reply task shares with its flow.
struct Reply {
    state: Arc<FlowState>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

/// Relay replies from the upstream to one client until the flow is stopped or its endpoint
/// proves unreachable.
async fn replies(
    upstream: Arc<ReadOnlyUdp>,
    listener: Arc<ReadOnlyUdp>,
    client: SocketAddr,
    flow: Reply,
) {
    let Reply {
        state,
        stop,
        metrics,
    } = flow;
    let client_addr = SockaddrStorage::from(client);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let mut ready = tokio::select! {
            biased;
            _ = &mut stopped => return,
            // ERROR too: an ICMP error leaves the socket in error (`EPOLLERR`) but not readable.
            r = upstream.ready(Interest::READABLE | Interest::ERROR) => match r {
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
                // Unreachable is about the client, not the endpoint: ignored here.
                send_all(listener.as_raw_fd(), &datagrams[..got], &r.to, &metrics);
                result
            })
        });
        if got > 0 {
            state.last_ms.store(clock::now_ms(), Ordering::Relaxed);
            state.endpoint.record_success();
        }
        match result {
            Ok(Err(e)) if is_unreachable(&e) => {
                state.refuse(&metrics);
                return;
            }
            // Some other error: do not spin on it.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener side learns of a dead endpoint from its own send when the ICMP error is
    /// still pending on the socket (the reply task had not taken it yet).
    #[test]
    fn send_all_reports_an_unreachable_peer() {
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap();
        drop(dead); // nothing listens there now: the kernel answers ICMP port unreachable
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(addr).unwrap();
        let metrics = Metrics::default();
        let datagrams = [[IoSlice::new(b"x")]];
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        // The first send goes out; the error it causes is reported to a later one.
        assert!(!send_all(
            s.as_raw_fd(),
            &datagrams,
            &udpio::CONNECTED[..1],
            &metrics
        ));
        while !send_all(s.as_raw_fd(), &datagrams, &udpio::CONNECTED[..1], &metrics) {
            assert!(
                std::time::Instant::now() < deadline,
                "no ECONNREFUSED reported"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            metrics.udp_send_dropped.get(),
            0,
            "a refusal is not a full buffer"
        );
    }
}
