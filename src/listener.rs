//! Listeners opened and closed at runtime, as the table asks.
//!
//! [`ListenerSet::reconcile`] diffs the listeners a new table wants against the open ones: new
//! ones are bound (a bind failure is reported for that port only and retried on the next
//! reconcile), removed ones stop accepting at once while their established connections finish,
//! up to the listener's drain timeout, after which they are cut. Each accept loop reads the
//! current table per connection, so route changes need no listener restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::table::{ListenKey, ListenKind, ListenerSpec, RoutingTable};

/// Accept backlog: large enough for connection bursts at the edge.
const BACKLOG: i32 = 4096;

/// accept(2) error backoff: starts small (EMFILE clears when connections close), caps at 1 s.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Shared by every listener: where routes come from and what counts.
#[derive(Clone)]
pub struct ListenerContext {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub metrics: Arc<Metrics>,
    pub http: Arc<crate::http::HttpContext>,
    /// Set SO_REUSEPORT (lets a new meshgate bind beside an old one during an upgrade).
    pub reuse_port: bool,
}

struct OpenListener {
    spec: ListenerSpec,
    /// Stops the accept loop, and (gracefully) the listener's HTTP connections.
    stop_accept: crate::stop::Graceful,
    /// Cuts the listener's established connections (drain deadline or shutdown).
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

/// The open listeners. Owned by the control task; never touched by the data path.
pub struct ListenerSet {
    ctx: ListenerContext,
    open: BTreeMap<ListenKey, OpenListener>,
    /// Last bind error per listener that could not be opened.
    failed: BTreeMap<ListenKey, String>,
    /// Listeners removed from the table and still draining.
    draining: TaskTracker,
}

impl ListenerSet {
    pub fn new(ctx: ListenerContext) -> Self {
        ListenerSet {
            ctx,
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
            draining: TaskTracker::new(),
        }
    }

    /// Listeners that could not be bound, with the error.
    pub fn failed(&self) -> &BTreeMap<ListenKey, String> {
        &self.failed
    }

    /// Addresses actually bound (differs from the key for port 0).
    pub fn open_keys(&self) -> Vec<ListenKey> {
        self.open.keys().copied().collect()
    }

    /// Open what `wanted` has and we do not; drain what we have and it does not.
    pub async fn reconcile(&mut self, wanted: &BTreeMap<ListenKey, ListenerSpec>) {
        let removed: Vec<ListenKey> = self
            .open
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in removed {
            if let Some(l) = self.open.remove(&key) {
                self.drain(l);
            }
        }
        self.failed.retain(|k, _| wanted.contains_key(k));
        for (key, spec) in wanted {
            if let Some(open) = self.open.get_mut(key) {
                open.spec = spec.clone();
                continue;
            }
            match self.bind(spec).await {
                Ok(l) => {
                    tracing::info!(listener = %key, owner = %spec.owner, "listener opened");
                    self.failed.remove(key);
                    self.open.insert(*key, l);
                }
                Err(e) => {
                    let first = !self.failed.contains_key(key);
                    if first {
                        tracing::error!(listener = %key, owner = %spec.owner, error = %e,
                            "cannot open listener; other listeners are unaffected, retrying on the next reconcile");
                        Metrics::inc(&self.ctx.metrics.bind_errors, "listener", &key.to_string());
                    }
                    self.failed.insert(*key, e.to_string());
                }
            }
        }
        self.ctx.metrics.listeners_open.set(self.open.len() as i64);
    }

    fn drain(&self, l: OpenListener) {
        l.stop_accept.cancel();
        l.tracker.close();
        let (key, deadline) = (l.spec.key, l.spec.drain);
        tracing::info!(listener = %key, drain = ?deadline, in_flight = l.tracker.len(), "listener closed, draining");
        self.draining.spawn(async move {
            if tokio::time::timeout(deadline, l.tracker.wait()).await.is_err() {
                tracing::warn!(listener = %key, remaining = l.tracker.len(), "drain deadline passed, cutting connections");
                l.hard_stop.cancel();
                l.tracker.wait().await;
            }
            tracing::info!(listener = %key, "listener drained");
        });
    }

    /// Stop accepting everywhere and wait up to `deadline` for connections to finish.
    pub async fn shutdown(&mut self, deadline: Duration) {
        let all: Vec<OpenListener> = std::mem::take(&mut self.open).into_values().collect();
        for l in &all {
            l.stop_accept.cancel();
            l.tracker.close();
        }
        self.draining.close();
        let wait_all = async {
            for l in &all {
                l.tracker.wait().await;
            }
            self.draining.wait().await;
        };
        if tokio::time::timeout(deadline, wait_all).await.is_err() {
            tracing::warn!("shutdown deadline passed, cutting remaining connections");
            for l in &all {
                l.hard_stop.cancel();
            }
        }
    }

    async fn bind(&self, spec: &ListenerSpec) -> std::io::Result<OpenListener> {
        let hard_stop = CancellationToken::new();
        let stop_accept = crate::stop::Graceful::new(hard_stop.clone());
        let tracker = TaskTracker::new();
        let key = spec.key;
        match key.kind {
            ListenKind::Tcp | ListenKind::Http => {
                let client_first = key.kind == ListenKind::Http;
                let listener = bind_tcp(key.addr, self.ctx.reuse_port, client_first)?;
                tokio::spawn(accept_loop(
                    key,
                    spec.owner.clone(),
                    listener,
                    self.ctx.clone(),
                    stop_accept.clone(),
                    tracker.clone(),
                ));
            }
            ListenKind::Udp => {
                let socket = Arc::new(bind_udp(key.addr, self.ctx.reuse_port)?);
                let (table, metrics, stop) = (
                    Arc::clone(&self.ctx.table),
                    Arc::clone(&self.ctx.metrics),
                    hard_stop.clone(),
                );
                // UDP has no connections to drain: flows end when the listener stops.
                let accept_stop = stop_accept.clone();
                tracker.spawn(async move {
                    tokio::select! {
                        _ = crate::proxy::udp::serve(key, socket, table, metrics, stop) => {}
                        _ = accept_stop.cancelled() => {}
                    }
                });
            }
        }
        Ok(OpenListener {
            spec: spec.clone(),
            stop_accept,
            hard_stop,
            tracker,
        })
    }
}

/// A listening socket in the event loop, accepted from with `accept4` directly: tokio's
/// `TcpListener` registers every connection it accepts, and HTTP connections join the event
/// loop only when they have to wait ([`crate::tcpio::LazyTcp`]).
pub type Listener = AsyncFd<std::net::TcpListener>;

/// A TCP listening socket on `addr` (`SO_REUSEADDR`, and `SO_REUSEPORT` if asked), with
/// `TCP_NODELAY` and TCP keepalive ([`crate::proxy::keepalive`]): every socket accepted from it
/// inherits both, so no connection spends system calls on them (one for HTTP, four for L4).
///
/// `client_first`: the protocol has the client speak first (HTTP, TLS), so on Linux the
/// listener sets `TCP_DEFER_ACCEPT` (HAProxy's `defer-accept`, nginx's `deferred`): a
/// connection is handed to `accept` once its first bytes have arrived (or after about a second
/// without any), so its first read finds the request instead of `EAGAIN`, and the connection
/// never has to join the event loop just to wait for it. L4 listeners do not set it: there the
/// server may speak first (SMTP, SSH, MySQL).
#[allow(unsafe_code)]
pub fn bind_tcp(
    addr: SocketAddr,
    reuse_port: bool,
    client_first: bool,
) -> std::io::Result<Listener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&crate::proxy::keepalive())?;
    #[cfg(target_os = "linux")]
    if client_first {
        // Best effort: without it connections are accepted as soon as they are established.
        let _ = set_defer_accept(&socket, DEFER_ACCEPT_SECS);
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    let listener: std::net::TcpListener = socket.into();
    // SAFETY: the descriptor is the listener's own, and the listener lives inside the `AsyncFd`
    // for the `AsyncFd`'s whole life: open, and the same socket, until it is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?)
}

/// How long the kernel holds a connection that sent nothing before handing it to `accept`
/// anyway (`TCP_DEFER_ACCEPT`, rounded up to SYN-ACK retransmissions: about 1 s, then the
/// client's next ACK). A client that connects early and speaks later (a browser's preconnect)
/// is accepted then, and meets the usual header timeout.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_defer_accept(socket: &socket2::Socket, secs: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `socket` is an open socket for the whole call, and the option value is a
    // `c_int` passed with its own size, as `setsockopt(2)` expects for TCP_DEFER_ACCEPT.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The next connection, non-blocking and not in the event loop, and its peer's address.
pub async fn accept(listener: &Listener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    use rustix::net::SocketFlags;
    loop {
        let mut ready = listener.readable().await?;
        let accepted = ready.try_io(|l| {
            let (fd, addr) =
                rustix::net::acceptfrom_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
            let peer = addr
                .and_then(|a| SocketAddr::try_from(a).ok())
                .ok_or_else(|| std::io::Error::other("accepted a non-IP peer"))?;
            Ok((std::net::TcpStream::from(fd), peer))
        });
        match accepted {
            Ok(r) => return r,
            // Would block: readiness cleared, wait again.
            Err(_) => continue,
        }
    }
}

/// A UDP listener socket, in the event loop for READABLE only (see [`crate::udpio`]).
fn bind_udp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<crate::udpio::ReadOnlyUdp> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    crate::udpio::read_only(socket.into())
}

async fn accept_loop(
    key: ListenKey,
    owner: String,
    listener: Listener,
    ctx: ListenerContext,
    stop_accept: crate::stop::Graceful,
    tracker: TaskTracker,
) {
    let owner: Arc<str> = Arc::from(owner);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = stop_accept.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = ACCEPT_BACKOFF_MIN;
                x
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS are temporary: back off and keep accepting.
                ctx.metrics.accept_errors.inc();
                tracing::warn!(listener = %key, error = %e, backoff = ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop_accept.cancelled() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        ctx.metrics.accepted.inc();
        spawn_connection(&key, &owner, stream, peer, &ctx, &stop_accept, &tracker);
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its future, counted as an open connection while alive
    /// ([`crate::memtrim`]). Each protocol's future handles its own stop signals.
    ///
    /// A plain struct rather than an `async` block: a block that captures a future and awaits
    /// it stores it twice (the capture and the awaited copy), and every connection's task would
    /// be twice the size of its future.
    struct ConnTask<F> {
        #[pin]
        fut: F,
        open: crate::memtrim::ConnGuard,
    }
}

impl<F: std::future::Future<Output = ()>> ConnTask<F> {
    fn new(fut: F) -> ConnTask<F> {
        ConnTask {
            fut,
            open: crate::memtrim::ConnGuard::new(),
        }
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for ConnTask<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.project().fut.poll(cx)
    }
}

fn spawn_connection(
    key: &ListenKey,
    owner: &Arc<str>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    stop: &crate::stop::Graceful,
    tracker: &TaskTracker,
) {
    match key.kind {
        ListenKind::Tcp => {
            // Look the route up in the current table; the guard is dropped before any await.
            let route = ctx.table.load().l4.get(key).cloned();
            let Some(route) = route else {
                tracing::debug!(listener = %key, "no route (table changing); closing");
                return;
            };
            // A byte stream waits for either side at once: in the event loop from the start.
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(listener = %key, error = %e, "connection not registered; closing");
                    return;
                }
            };
            // The listener's graceful stop means nothing to a byte stream (it goes on); its hard
            // stop (the drain deadline) drops the connection.
            let proxied =
                crate::proxy::tcp::proxy_connection(route, stream, peer, Arc::clone(&ctx.metrics));
            tracker.spawn(ConnTask::new(crate::stop::Stoppable::new(
                proxied,
                stop.clone(),
            )));
        }
        ListenKind::Http => {
            // HTTP gets two signals: the graceful stop (listener removed or shutdown: finish
            // in-flight requests, stop keep-alive) and the hard stop (drain deadline: drop the
            // connection), both in `stop`.
            let serve = crate::http::serve_connection(
                Arc::clone(&ctx.http),
                Arc::clone(&ctx.table),
                Arc::clone(owner),
                stream.into(),
                peer,
                stop.clone(),
            );
            tracker.spawn(ConnTask::new(serve));
        }
        ListenKind::Udp => unreachable!("UDP listeners have no accept loop"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets carry the listener's TCP_NODELAY and keepalive (the per-connection
    /// `setsockopt` calls were removed on the strength of this).
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = accept(&listener).await.unwrap();
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(
            sock.tcp_keepalive_time().unwrap(),
            crate::proxy::TCP_KEEPALIVE_IDLE
        );
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            crate::proxy::TCP_KEEPALIVE_INTERVAL
        );
    }

    fn task_size<F: std::future::Future<Output = ()>>(_: &F) -> usize {
        std::mem::size_of::<ConnTask<F>>()
    }

    /// A client-first (HTTP) listener hands over a connection once its first bytes arrived,
    /// not when the handshake completes; an L4 listener at once.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn http_listeners_accept_once_the_client_spoke() {
        use tokio::io::AsyncWriteExt;
        let wait = Duration::from_millis(300);
        let http = bind_tcp("127.0.0.1:0".parse().unwrap(), false, true).unwrap();
        let addr = http.get_ref().local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            tokio::time::timeout(wait, accept(&http)).await.is_err(),
            "accepted before the client sent anything"
        );
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (stream, _) = tokio::time::timeout(wait, accept(&http))
            .await
            .expect("accepted once the request arrived")
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(stream.peek(&mut buf).unwrap(), 18, "the request is there");

        let l4 = bind_tcp("127.0.0.1:0".parse().unwrap(), false, false).unwrap();
        let addr = l4.get_ref().local_addr().unwrap();
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(wait, accept(&l4))
            .await
            .expect("an L4 listener accepts a silent client at once")
            .unwrap();
    }

    /// The task of an L4 connection is its future plus a few words, not twice the future
    /// (RSS per idle proxied connection).
    #[test]
    fn connection_task_adds_little_to_its_future() {
        let fut = async {
            let big = [1u8; 1024];
            tokio::task::yield_now().await;
            assert_eq!(big[7], 1);
        };
        let inner = std::mem::size_of_val(&fut);
        let outer = task_size(&fut);
        assert!(outer <= inner + 128, "{outer} vs {inner}");
        // The reference this replaced: an async block capturing the future and awaiting it.
        let guard = crate::memtrim::ConnGuard::new();
        let naive = async move {
            let _open = guard;
            fut.await
        };
        assert!(std::mem::size_of_val(&naive) >= 2 * inner);
    }
}
