//! The DNS server: UDP and TCP on `dns.bind`, answering from the current table's
//! [`DnsRecords`](super::DnsRecords).
//!
//! Why not hickory-server's `ServerFuture` + `RequestHandler`: its request path decodes the whole
//! message into a `Request`, builds `Record`s and re-encodes a `MessageResponse` for every
//! query. Our answers are bytes precomputed at table build, so the hand-written loop only parses
//! the question and copies bytes; `benches/dns.rs` measures both paths (the splice is several
//! times faster and allocation-free: ~0.25 µs vs ~3.8 µs per VIP answer; numbers in the bench doc).
//!
//! Concurrency: one UDP worker *thread* per runtime thread (up to 4) shares the socket, each with
//! its own buffers. A worker blocks in the socket's receive until a query arrives and takes the
//! batch queued by then (`recvmmsg` with `MSG_WAITFORONE` on Linux, [`crate::udpio`]), loads the
//! table, answers the batch, drops the arc-swap guard, then sends the answers (`sendmmsg`) — see
//! `UDP_BATCH` for why. A thread rather than a task: a task waits for readiness in the event loop
//! (`epoll_wait`) and then receives, two system calls per batch where the blocking receive is
//! one, and the event loop's turn and the task's wake-up come on top (about 5 % of the server's
//! CPU per query at 86k queries/s). The worker holds no lock and never waits on the runtime.
//! Forwarded queries run in tasks on the runtime, bounded by a semaphore so a slow upstream
//! cannot pile up unbounded work. TCP connections get one task each, bounded the same way, with
//! an idle timeout.
//!
//! Answers are sent without waiting (`MSG_DONTWAIT`); a full send buffer (rare: a UDP send
//! buffer drains as datagrams are delivered) is retried a few times, a millisecond apart, and
//! then those answers are dropped, as the network would.
//!
//! An idle server does not wake: at shutdown (or when the serving future is dropped) a worker
//! is woken by an empty datagram from the socket to itself, and each worker that stops wakes
//! the next ([`WakeWorkers`]); the socket's read timeout ([`UDP_WAKE_BACKSTOP`]) only bounds
//! the wait if such a datagram were lost.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::forward::Forwarder;
use super::records::{Outcome, Transport};
use super::{wire, DnsConfig, DnsError};
use crate::table::RoutingTable;
use crate::udpio::{send_batch, RecvBatch, SockaddrStorage};

/// Forwarded queries in flight at once; beyond this, SERVFAIL at once (an upstream outage must
/// not turn into unbounded tasks and sockets).
const MAX_FORWARDS: usize = 1024;
/// Open TCP connections at once; beyond this new ones are closed on accept.
const MAX_TCP: usize = 512;
/// A TCP client idle this long between queries is disconnected (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The UDP socket: blocking receives with a read timeout, sends that never wait.
type Udp = std::net::UdpSocket;

/// A UDP worker blocked in its receive wakes at least this often to check for the shutdown
/// (a backstop: the shutdown wakes it at once, see [`WakeWorkers`]).
const UDP_WAKE_BACKSTOP: Duration = Duration::from_secs(2);

/// Full send buffer: retries of a batch's remaining answers, this far apart, before dropping them.
const SEND_RETRIES: u32 = 10;
const SEND_RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Sockets bound, not yet serving (lets callers learn the port before queries start).
#[derive(Debug)]
pub struct DnsServer {
    udp: Arc<Udp>,
    tcp: TcpListener,
    cfg: DnsConfig,
}

impl DnsServer {
    /// Bind UDP and TCP on `cfg.bind`. With port 0 both get the same free port.
    pub async fn bind(cfg: DnsConfig) -> Result<Self, DnsError> {
        if cfg.validate().is_err() {
            return Err(DnsError::Zone(cfg.zone.clone()));
        }
        // With port 0 the kernel picks the UDP port; the same TCP port may be taken, so retry.
        let attempts = if cfg.bind.port() == 0 { 16 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            let udp = UdpSocket::bind(cfg.bind)
                .await
                .map_err(|source| DnsError::BindUdp {
                    addr: cfg.bind,
                    source,
                })?;
            let addr = udp.local_addr().map_err(|source| DnsError::BindUdp {
                addr: cfg.bind,
                source,
            })?;
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let udp = udp
                        .into_std()
                        .and_then(|u| {
                            u.set_nonblocking(false)?;
                            u.set_read_timeout(Some(UDP_WAKE_BACKSTOP))?;
                            Ok(u)
                        })
                        .map_err(|source| DnsError::BindUdp {
                            addr: cfg.bind,
                            source,
                        })?;
                    return Ok(DnsServer {
                        udp: Arc::new(udp),
                        tcp,
                        cfg,
                    });
                }
                Err(source) => last = Some(DnsError::BindTcp { addr, source }),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// The bound address (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serve until `shutdown`; then wait (bounded by the forward timeout) for relays in flight.
    pub async fn run(
        self,
        table: Arc<ArcSwap<RoutingTable>>,
        shutdown: CancellationToken,
    ) -> Result<(), DnsError> {
        let own = self.local_addr();
        let forwarder = Arc::new(Forwarder::from_config(&self.cfg, own));
        tracing::info!(addr = %own, zone = %self.cfg.zone, forward = self.cfg.forward,
            upstreams = ?forwarder.upstreams(), "dns server listening");
        let ctx = Arc::new(Context {
            table,
            forwarder,
            forwarding: self.cfg.forward,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            tasks: TaskTracker::new(),
            shutdown,
        });
        // One UDP worker per runtime thread (up to 4): more would only wake to find the
        // socket drained by the first (a wasted `recvmmsg` each).
        let runtime = tokio::runtime::Handle::current();
        let workers = runtime.metrics().num_workers().clamp(1, 4);
        // The workers stop when the shutdown is signalled, or when this future is dropped
        // without it (its runtime shutting down): they watch `alive`, which `wake` holds.
        let alive = Arc::new(());
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let worker = UdpWorker {
                ctx: Arc::clone(&ctx),
                udp: Arc::clone(&self.udp),
                runtime: runtime.clone(),
                alive: Arc::downgrade(&alive),
                own,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(error = %e, "dns: cannot start a UDP worker thread"),
            }
        }
        let wake = WakeWorkers {
            alive: Some(alive),
            udp: Arc::clone(&self.udp),
            addr: own,
        };
        ctx.tasks
            .clone()
            .spawn(tcp_accept(Arc::clone(&ctx), self.tcp));
        ctx.shutdown.cancelled().await;
        drop(wake);
        ctx.tasks.close();
        let grace = self.cfg.forward_timeout + Duration::from_secs(1);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let all = async {
            let _ = joined.await;
            ctx.tasks.wait().await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("dns: tasks still running after shutdown grace; leaving them");
        }
        Ok(())
    }
}

/// Dropped when the server stops (shutdown, or its future dropped): lets go of `alive`, then
/// wakes one UDP worker blocked in its receive. Each worker that stops wakes the next the same
/// way ([`wake_a_worker`]): one datagram could be taken by a worker along with the next in one
/// batch, so a datagram per worker sent at once might leave one asleep.
struct WakeWorkers {
    alive: Option<Arc<()>>,
    udp: Arc<Udp>,
    addr: SocketAddr,
}

impl Drop for WakeWorkers {
    fn drop(&mut self) {
        drop(self.alive.take());
        wake_a_worker(&self.udp, self.addr);
    }
}

/// Wake one UDP worker blocked in its receive on `udp` (bound to `own`): an empty datagram from
/// the socket to itself. An empty datagram is no query: nothing answers it.
fn wake_a_worker(udp: &Udp, own: SocketAddr) {
    let mut to = own;
    if to.ip().is_unspecified() {
        to.set_ip(match to {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    if let Err(e) = udp.send_to(&[], to) {
        tracing::debug!(error = %e, "dns: cannot wake a UDP worker; it stops within {UDP_WAKE_BACKSTOP:?}");
    }
}

/// Bind and serve until `shutdown`.
pub async fn serve(
    cfg: DnsConfig,
    table: Arc<ArcSwap<RoutingTable>>,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    DnsServer::bind(cfg).await?.run(table, shutdown).await
}

struct Context {
    table: Arc<ArcSwap<RoutingTable>>,
    forwarder: Arc<Forwarder>,
    forwarding: bool,
    forwards: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Context {
    /// Answer from the current generation. The guard lives only inside this call.
    fn respond(&self, query: &[u8], transport: Transport, out: &mut Vec<u8>) -> Outcome {
        self.table
            .load()
            .dns
            .respond(query, transport, self.forwarding, out)
    }
}

/// SERVFAIL for a query we failed to relay.
fn servfail(query: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let mut lower = [0u8; 255];
    let question = wire::parse_query(query, &mut lower).ok().map(|(q, _)| q);
    wire::error_response(
        &mut out,
        query,
        question.as_ref(),
        wire::RCODE_SERVFAIL,
        true,
    );
    out
}

/// Queries taken off the socket per wake-up, and answers sent per system call.
///
/// Why batch: on loopback and on a busy host most of a UDP answer's cost is the kernel
/// delivering it and waking the client; answers sent back to back find the client already awake.
/// On Linux one `recvmmsg` takes the batch and one `sendmmsg` sends the answers, instead of a
/// `recvfrom` and a `sendto` per query. Answering 32 queries (a quarter microsecond each) before
/// the first leaves adds a few microseconds at most.
const UDP_BATCH: usize = 32;
/// Receive buffer per query in a batch. A larger datagram arrives cut short and is answered
/// FORMERR (real queries are a few dozen bytes; EDNS ones stay below 512).
const UDP_QUERY_SLOT: usize = 2048;

/// A UDP worker thread: receive a batch, answer it from the current table, send the answers.
struct UdpWorker {
    ctx: Arc<Context>,
    udp: Arc<Udp>,
    /// Where forwarded queries run.
    runtime: tokio::runtime::Handle,
    /// Gone once the server's future is dropped.
    alive: std::sync::Weak<()>,
    /// The server's address, to wake the next worker when this one stops.
    own: SocketAddr,
}

impl UdpWorker {
    fn run(self) {
        let mut batch = UdpBatch::new();
        loop {
            if self.ctx.shutdown.is_cancelled() || self.alive.strong_count() == 0 {
                wake_a_worker(&self.udp, self.own);
                return;
            }
            match batch.input.recv_wait(&self.udp) {
                Ok(_) => {}
                // The read timeout: look at the shutdown again.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    // ICMP errors surface here (ECONNREFUSED from an earlier send): keep going.
                    tracing::debug!(error = %e, "dns udp recv error");
                    continue;
                }
            }
            {
                // The guard lives only in this block.
                let table = self.ctx.table.load();
                batch.answer(|query, peer, out| {
                    match table
                        .dns
                        .respond(query, Transport::Udp, self.ctx.forwarding, out)
                    {
                        Outcome::Answered => true,
                        Outcome::Drop => false,
                        Outcome::Forward => {
                            forward_udp(&self.ctx, &self.runtime, &self.udp, query, peer);
                            false
                        }
                    }
                });
            }
            batch.send(&self.udp);
        }
    }
}

/// Relay a query outside our zone in its own task (bounded by `MAX_FORWARDS`).
fn forward_udp(
    ctx: &Arc<Context>,
    runtime: &tokio::runtime::Handle,
    udp: &Arc<Udp>,
    query: &[u8],
    peer: SocketAddr,
) {
    let udp = Arc::clone(udp);
    match Arc::clone(&ctx.forwards).try_acquire_owned() {
        Ok(permit) => {
            let (fwd, query) = (Arc::clone(&ctx.forwarder), query.to_vec());
            ctx.tasks.spawn_on(
                async move {
                    let response = fwd
                        .relay_udp(&query)
                        .await
                        .unwrap_or_else(|| servfail(&query));
                    drop(permit);
                    send_one(&udp, &response, peer).await;
                },
                runtime,
            );
        }
        Err(_) => {
            let response = servfail(query);
            ctx.tasks.spawn_on(
                async move {
                    send_one(&udp, &response, peer).await;
                },
                runtime,
            );
        }
    }
}

/// One datagram, retried a few times on a full send buffer (see [`SEND_RETRIES`]).
async fn send_one(udp: &Udp, data: &[u8], peer: SocketAddr) {
    let to = [Some(SockaddrStorage::from(peer))];
    for _ in 0..SEND_RETRIES {
        // Never waits (the socket blocks in receives only).
        match send_batch(udp.as_raw_fd(), &[[IoSlice::new(data)]], &to) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(SEND_RETRY_PAUSE).await;
            }
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "dns udp send failed");
                return;
            }
            Ok(_) => return,
        }
    }
}

/// One worker's buffers: queries received, answers waiting to be sent. Allocated once; a warm
/// worker allocates nothing per query.
struct UdpBatch {
    /// `UDP_BATCH` receive slots of `UDP_QUERY_SLOT` bytes.
    input: RecvBatch,
    /// Answer buffers; the first `peers.len()` are waiting to be sent.
    out: Vec<Vec<u8>>,
    peers: Vec<SockaddrStorage>,
    send_addrs: Vec<Option<SockaddrStorage>>,
}

impl UdpBatch {
    fn new() -> Self {
        UdpBatch {
            input: RecvBatch::new(UDP_BATCH, UDP_QUERY_SLOT),
            out: (0..UDP_BATCH)
                .map(|_| Vec::with_capacity(wire::UDP_EDNS_MAX))
                .collect(),
            peers: Vec::with_capacity(UDP_BATCH),
            send_addrs: Vec::with_capacity(UDP_BATCH),
        }
    }

    /// Answer the queries received: `respond(query, peer, out)` writes an answer into `out` and
    /// says whether to send it. A query without a sender address gets no answer.
    fn answer(&mut self, mut respond: impl FnMut(&[u8], SocketAddr, &mut Vec<u8>) -> bool) {
        for i in 0..self.input.len() {
            let (query, got) = self.input.get(i);
            let Some(peer) = got.peer else { continue };
            let out = &mut self.out[self.peers.len()];
            let send = if got.truncated {
                wire::error_response(out, query, None, wire::RCODE_FORMERR, false);
                true
            } else {
                respond(query, peer, out)
            };
            if send {
                self.peers.push(SockaddrStorage::from(peer));
            }
        }
    }

    /// Send every answer, then empty the batch. A send that fails for one peer (unreachable,
    /// filtered) skips that answer; a full socket buffer is retried [`SEND_RETRIES`] times.
    fn send(&mut self, udp: &Udp) {
        self.send_addrs.clear();
        self.send_addrs.extend(self.peers.iter().map(|p| Some(*p)));
        let mut sent = 0;
        let mut retries = 0;
        while sent < self.peers.len() {
            let mut outs = self.out[sent..self.peers.len()].iter();
            let iovs: [[IoSlice<'_>; 1]; UDP_BATCH] =
                std::array::from_fn(|_| [IoSlice::new(outs.next().map_or(&[][..], |o| &o[..]))]);
            let count = self.peers.len() - sent;
            match send_batch(udp.as_raw_fd(), &iovs[..count], &self.send_addrs[sent..]) {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    retries += 1;
                    if retries > SEND_RETRIES {
                        tracing::debug!(
                            dropped = self.peers.len() - sent,
                            "dns udp send buffer full; answers dropped"
                        );
                        break;
                    }
                    std::thread::sleep(SEND_RETRY_PAUSE);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dns udp send failed");
                    sent += 1;
                }
            }
        }
        self.peers.clear();
    }
}

async fn tcp_accept(ctx: Arc<Context>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(MAX_TCP));
    loop {
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // EMFILE and friends are temporary: back off a little, keep accepting.
                    tracing::warn!(error = %e, "dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::debug!(peer = %peer, "dns tcp connection limit reached; closing");
            continue;
        };
        let ctx2 = Arc::clone(&ctx);
        ctx.tasks.spawn(async move {
            if let Err(e) = tcp_connection(&ctx2, stream).await {
                tracing::debug!(peer = %peer, error = %e, "dns tcp connection ended");
            }
            drop(permit);
        });
    }
}

/// Serve length-prefixed queries one after the other until EOF, idle timeout or shutdown.
async fn tcp_connection(ctx: &Context, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut query = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(512);
    loop {
        let len = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, stream.read_u16()) => match r {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r? as usize,
            },
        };
        query.resize(len, 0);
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let response = match ctx.respond(&query, Transport::Tcp, &mut out) {
            Outcome::Answered => &out,
            Outcome::Drop => continue,
            Outcome::Forward => {
                out = ctx
                    .forwarder
                    .relay_tcp(&query)
                    .await
                    .unwrap_or_else(|| servfail(&query));
                &out
            }
        };
        let mut framed = Vec::with_capacity(response.len() + 2);
        framed.extend_from_slice(&(response.len() as u16).to_be_bytes());
        framed.extend_from_slice(response);
        stream.write_all(&framed).await?;
    }
}
