//! meshgate's own keep-alive pool for plain HTTP/1.1 upstreams (the default protocol).
//!
//! hyper-util's pooled client costs ~8k instructions per request on the keep-alive path
//! (SipHash of the (scheme, authority) key on checkout and return, boxed futures, and a task
//! spawned per request to wait for the connection to become idle again). Here an endpoint's
//! idle connections are a small stack reached through a map keyed by `SocketAddr` with a cheap
//! hasher; the map is copy-on-write (`ArcSwap`, written only when a new endpoint is first
//! used), the stack's mutex is held only for a push or a pop, never across an `.await`.
//!
//! A connection goes back on its stack when the response body ends (or is dropped, see
//! [`PooledConn`]); a stale one (closed by the endpoint, or idle longer than
//! [`IDLE_TIMEOUT`]) is discarded when met on checkout. Requests go out with
//! `try_send_request`, which hands the request back when it was never written: a reused
//! connection that closed under us is then replaced by a fresh one transparently, exactly once,
//! the way hyper-util's `retry_canceled_requests` did.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::{classify_hyper_error, ProxyError};
use super::upstream::UpstreamBody;
use crate::clock;

/// Idle connections are closed after this long (checked lazily).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// At most this many idle connections are kept per endpoint; extra ones are closed.
pub const MAX_IDLE_PER_ENDPOINT: usize = 1024;

type Sender = SendRequest<UpstreamBody>;

/// An idle upstream connection that can tell whether it is still usable without blocking.
pub trait Reusable: Send + 'static {
    fn alive(&self) -> bool;
}

impl Reusable for Sender {
    fn alive(&self) -> bool {
        self.is_ready()
    }
}

/// The idle connections of one endpoint, most recently used last.
pub struct Idle<T> {
    /// Each with the time it went idle ([`clock::coarse_ms`]).
    conns: Mutex<Vec<(T, u64)>>,
}

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Idle {
            conns: Mutex::new(Vec::new()),
        }
    }
}

impl<T: Reusable> Idle<T> {
    /// A usable idle connection, discarding closed and expired ones met on the way.
    /// `now_ms` is [`clock::coarse_ms`].
    pub fn pop(&self, now_ms: u64) -> Option<T> {
        let mut conns = self.conns.lock().expect("idle list poisoned");
        while let Some((s, since)) = conns.pop() {
            if fresh(since, now_ms) && s.alive() {
                return Some(s);
            }
        }
        None
    }

    pub fn push(&self, s: T) {
        let mut conns = self.conns.lock().expect("idle list poisoned");
        if conns.len() < MAX_IDLE_PER_ENDPOINT {
            conns.push((s, clock::coarse_ms()));
        }
    }

    /// Drop closed and expired connections; true when nothing is left.
    fn sweep(&self, now_ms: u64) -> bool {
        let mut conns = self.conns.lock().expect("idle list poisoned");
        conns.retain(|(s, since)| s.alive() && fresh(*since, now_ms));
        conns.is_empty()
    }
}

/// Whether a connection idle since `since_ms` may still be used at `now_ms`.
#[inline]
fn fresh(since_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(since_ms) < IDLE_TIMEOUT.as_millis() as u64
}

/// FNV-1a over the address bytes: the keys are a few thousand endpoint addresses chosen by the
/// orchestrator, not by clients, so SipHash's flooding resistance buys nothing here.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type IdleMap<T> = HashMap<SocketAddr, Arc<Idle<T>>, BuildHasherDefault<AddrHasher>>;

/// Every endpoint's idle stack, reached through a copy-on-write map (written only when an
/// endpoint is first used).
pub struct EndpointPools<T> {
    map: ArcSwap<IdleMap<T>>,
    insert: Mutex<()>,
}

impl<T> Default for EndpointPools<T> {
    fn default() -> Self {
        EndpointPools {
            map: ArcSwap::default(),
            insert: Mutex::new(()),
        }
    }
}

impl<T: Reusable> EndpointPools<T> {
    /// The idle stack of `addr`, created on first use.
    pub fn idle(&self, addr: SocketAddr) -> Arc<Idle<T>> {
        if let Some(i) = self.map.load().get(&addr) {
            return Arc::clone(i);
        }
        let _guard = self.insert.lock().expect("pool insert poisoned");
        let current = self.map.load_full();
        if let Some(i) = current.get(&addr) {
            return Arc::clone(i);
        }
        // Rare (first request to a new endpoint): also forget endpoints with nothing idle left,
        // so the map tracks the endpoints in use rather than every endpoint ever seen.
        let now = clock::coarse_ms();
        let mut next: IdleMap<T> = current
            .iter()
            .filter(|(_, i)| Arc::strong_count(i) > 1 || !i.sweep(now))
            .map(|(a, i)| (*a, Arc::clone(i)))
            .collect();
        let idle = Arc::new(Idle::default());
        next.insert(addr, Arc::clone(&idle));
        self.map.store(Arc::new(next));
        idle
    }

    /// Endpoints with an idle stack.
    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// All endpoints' idle connections.
#[derive(Default)]
pub struct H1Pool {
    pools: EndpointPools<Sender>,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("endpoints", &self.pools.len())
            .finish()
    }
}

/// A checked-out connection: put back on its endpoint's idle stack when dropped, if reusable.
pub struct PooledConn {
    sender: Option<Sender>,
    idle: Arc<Idle<Sender>>,
}

impl PooledConn {
    /// Never put this connection back (it was upgraded, or is otherwise spent).
    pub fn discard(mut self) {
        self.sender = None;
    }
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PooledConn")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(mut s) = self.sender.take() else {
            return;
        };
        if s.is_ready() {
            self.idle.push(s);
        } else if !s.is_closed() {
            // The connection task has not yet noticed the end of the exchange (or is still
            // draining a body the client abandoned): wait for it off the request path.
            let idle = Arc::clone(&self.idle);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), s.ready())
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        idle.push(s);
                    }
                });
            }
        }
    }
}

impl H1Pool {
    fn idle(&self, addr: SocketAddr) -> Arc<Idle<Sender>> {
        self.pools.idle(addr)
    }

    /// Send `req` (origin-form URI, `Host` set) to `addr` on an idle connection or a new one.
    ///
    /// The response comes with its connection, to be dropped when the response body is done.
    pub async fn send(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, PooledConn), ProxyError> {
        let idle = self.idle(addr);
        let mut req = req;
        if let Some(mut s) = idle.pop(clock::coarse_ms()) {
            match s.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        PooledConn {
                            sender: Some(s),
                            idle,
                        },
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed while idle. Use a fresh one.
                    Some(back) => req = back,
                    None => return Err(classify_hyper_error(e.error())),
                },
            }
        }
        let mut s = connect(addr, connect_timeout).await?;
        match s.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                PooledConn {
                    sender: Some(s),
                    idle,
                },
            )),
            Err(e) if e.message().is_some() => Err(ProxyError::NotSent),
            Err(e) => Err(classify_hyper_error(e.error())),
        }
    }
}

/// A new connection to `addr` with its connection task spawned.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ProxyError> {
    let tcp = connect_tcp(addr, timeout).await?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| ProxyError::ConnectFailed)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(endpoint = %addr, error = %e, "upstream connection ended with error");
        }
    });
    Ok(sender)
}

/// A usable idle connection from `idle` (unless `fresh` is asked for), else a new one to
/// `addr`; and whether it was reused.
pub async fn idle_or_connect(
    idle: &Idle<TcpStream>,
    fresh: bool,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, bool), ProxyError> {
    if !fresh {
        if let Some(s) = idle.pop(clock::coarse_ms()) {
            return Ok((s, true));
        }
    }
    // Boxed: a new connection is the exception, and its state is large for every caller.
    Ok((Box::pin(connect_tcp(addr, timeout)).await?, false))
}

/// A new TCP connection to `addr` (TCP_NODELAY set), classified on failure.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let tcp = match tokio::time::timeout(timeout, crate::tcpio::connect_upstream(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            tracing::debug!(endpoint = %addr, error = %e, "connect failed");
            return Err(ProxyError::ConnectFailed);
        }
        Err(_) => return Err(ProxyError::ConnectTimeout),
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn get(path: &'static str) -> Request<UpstreamBody> {
        Request::builder()
            .uri(path)
            .header("host", "test")
            .body(Either::Right(Empty::<Bytes>::new()))
            .unwrap()
    }

    /// A minimal HTTP/1.1 server answering `ok` to every request; closes each connection after
    /// `per_conn` responses. Returns its address and the count of accepted connections.
    async fn server(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(r).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        (addr, accepted)
    }

    async fn roundtrip(pool: &H1Pool, addr: SocketAddr) -> Result<Bytes, ProxyError> {
        let (resp, conn) = pool.send(addr, Duration::from_secs(2), get("/")).await?;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        drop(conn);
        Ok(body)
    }

    #[tokio::test]
    async fn connections_are_reused() {
        let (addr, accepted) = server(usize::MAX).await;
        let pool = H1Pool::default();
        for _ in 0..5 {
            assert_eq!(roundtrip(&pool, addr).await.unwrap(), "ok");
            // Let the connection task mark the connection idle if it has not yet.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn closed_idle_connection_is_replaced() {
        let (addr, accepted) = server(1).await;
        let pool = H1Pool::default();
        for _ in 0..3 {
            assert_eq!(roundtrip(&pool, addr).await.unwrap(), "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn expired_idle_connection_is_not_reused() {
        let (addr, accepted) = server(usize::MAX).await;
        let pool = H1Pool::default();
        assert_eq!(roundtrip(&pool, addr).await.unwrap(), "ok");
        tokio::task::yield_now().await;
        let idle = pool.idle(addr);
        assert!(idle
            .pop(clock::coarse_ms() + IDLE_TIMEOUT.as_millis() as u64)
            .is_none());
        assert_eq!(roundtrip(&pool, addr).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn abandoned_response_body_does_not_poison_the_pool() {
        // Announces a long body and sends only part of it: the connection cannot be reused.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 1024];
                    let _ = s.read(&mut chunk).await;
                    let r = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial";
                    let _ = s.write_all(r).await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                });
            }
        });
        let pool = H1Pool::default();
        for _ in 0..2 {
            let (resp, conn) = pool
                .send(addr, Duration::from_secs(2), get("/"))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            drop(resp);
            drop(conn);
            tokio::task::yield_now().await;
        }
        // Whatever the drop-time waiter decides, a half-read connection never comes back.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.idle(addr).pop(clock::coarse_ms()).is_none());
    }

    #[tokio::test]
    async fn refused_connect_is_a_connect_failure() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = H1Pool::default();
        assert_eq!(
            roundtrip(&pool, addr).await.unwrap_err(),
            ProxyError::ConnectFailed
        );
    }

    #[tokio::test]
    async fn reset_before_response_is_classified() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut chunk = [0u8; 1024];
            let _ = s.read(&mut chunk).await;
            drop(s);
        });
        let pool = H1Pool::default();
        assert_eq!(
            roundtrip(&pool, addr).await.unwrap_err(),
            ProxyError::ResetBeforeResponse
        );
    }
}
