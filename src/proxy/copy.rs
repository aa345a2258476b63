//! Moving bytes between two TCP sockets, both directions, with half-close and an idle timeout.
//!
//! On Linux a direction carrying a stream uses splice(2) through a pipe: socket → pipe → socket,
//! so payload bytes never enter user space. Pipes (1 MiB) come from a per-thread pool and are
//! held only while a chunk is in flight, so an idle connection costs no pipe (two fds and
//! kernel buffers each). Small messages (request/response protocols) are copied through a
//! pooled 16 KiB buffer instead, with one read and one write each: a short read proves the
//! socket drained, so no `EAGAIN` read follows; a read that fills the buffer switches the
//! direction to splice.
//! Elsewhere, or if splice is refused (`EINVAL`), or no pipe can be made (`EMFILE`), a buffered
//! copy does the same job. With `l4_copy: buffer` ([`CopyMode`]) streams stay on the pooled
//! buffer too.
//!
//! Half-close: when one side sends FIN, the other side's write half is shut down and the opposite
//! direction keeps flowing until it ends too. An error in either direction ends both.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::clock;
use crate::tcpio::read_some;

/// How a direction carrying a stream moves its bytes (the `l4_copy` setting).
///
/// `splice` moves page references and uses the least CPU: with four iperf3 streams through the
/// proxy (`benches/load/run.sh --only l4`) it carried 1.4× HAProxy's throughput. `buffer` copies
/// through user space as HAProxy does; that costs CPU, but the bytes the next hop reads are
/// then fresh in the proxy core's cache: on a Xeon guest it carried one stream 1.4× as fast as
/// `splice` (17.1 against 12.1 Gbit/s) and four 0.8× as fast (10.5 against 13.5); on the AMD
/// guests of earlier runs `splice` led with one stream too (0.65× direct, HAProxy 0.31×).
/// Small messages are copied either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    #[default]
    Splice,
    Buffer,
}

/// The process's [`CopyMode`], set once at start ([`set_mode`]).
static SPLICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Use `mode` for streams from now on (start-up; tests).
pub fn set_mode(mode: CopyMode) {
    SPLICE.store(mode == CopyMode::Splice, Ordering::Relaxed);
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached EOF.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// One side failed (reset, broken pipe).
    Error,
}

/// Bytes moved downstream→upstream and upstream→downstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub up: u64,
    pub down: u64,
}

/// Largest chunk moved per splice call: the capacity asked for each pipe (Linux's default
/// `pipe-max-size`). A bulk stream then moves up to 1 MiB per pair of splices instead of the
/// default pipe's 64 KiB; the pipe only references the socket's pages, and an empty pooled
/// pipe holds no data pages.
const CHUNK: usize = 1024 * 1024;

/// Proxy until both directions close, the idle timeout passes, or an error.
///
/// Functions returning `async move` blocks here, not `async fn`s: an `async fn` keeps its
/// arguments twice in its future, and an idle L4 connection's task is these futures.
#[allow(clippy::manual_async_fn)]
pub fn bidirectional<'a>(
    downstream: &'a TcpStream,
    upstream: &'a TcpStream,
    idle: Option<Duration>,
) -> impl std::future::Future<Output = (Outcome, Transferred)> + Send + 'a {
    async move {
        // The last time a byte moved, kept only when there is an idle timeout to check it
        // against (a clock read per message otherwise).
        let activity = AtomicU64::new(clock::now_ms());
        let track = idle.map(|_| &activity);
        let up = one_way(downstream, upstream, track);
        let down = one_way(upstream, downstream, track);
        let idle = idle_watch(idle, &activity);
        tokio::pin!(up, down, idle);
        // Not `join!`: an error in one direction must end the other too, or a direction waiting for
        // a peer that will never speak keeps both sockets open forever. Not `select!` either: its
        // random branch order costs a random number per wake-up, and the order does not matter
        // (each direction only does what its sockets allow).
        Both {
            up: up.as_mut(),
            down: down.as_mut(),
            idle: idle.as_mut(),
            up_done: None,
            down_done: None,
        }
        .await
    }
}

/// Both directions of a pair and its idle watch ([`bidirectional`]). A named future rather than
/// a `poll_fn` closure so that its `poll` is always inlined into the connection's task: the
/// compiler stopped inlining the `poll_fn` after unrelated changes elsewhere (callgrind `l4`
/// +50 instructions per request).
struct Both<'a, U, D, I> {
    up: Pin<&'a mut U>,
    down: Pin<&'a mut D>,
    idle: Pin<&'a mut I>,
    up_done: Option<u64>,
    down_done: Option<u64>,
}

impl<U, D, I> Future for Both<'_, U, D, I>
where
    U: Future<Output = io::Result<u64>>,
    D: Future<Output = io::Result<u64>>,
    I: Future<Output = ()>,
{
    type Output = (Outcome, Transferred);

    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if poll_way(this.up.as_mut(), &mut this.up_done, cx).is_err()
            || poll_way(this.down.as_mut(), &mut this.down_done, cx).is_err()
        {
            return Poll::Ready((Outcome::Error, Transferred::default()));
        }
        if let (Some(up), Some(down)) = (this.up_done, this.down_done) {
            return Poll::Ready((Outcome::Closed, Transferred { up, down }));
        }
        if this.idle.as_mut().poll(cx).is_ready() {
            return Poll::Ready((Outcome::Idle, Transferred::default()));
        }
        Poll::Pending
    }
}

/// Poll one direction unless it has ended (its byte count then is in `done`); `Err` if it
/// failed.
fn poll_way(
    way: std::pin::Pin<&mut impl Future<Output = io::Result<u64>>>,
    done: &mut Option<u64>,
    cx: &mut Context<'_>,
) -> Result<(), ()> {
    if done.is_none() {
        match way.poll(cx) {
            Poll::Ready(Ok(n)) => *done = Some(n),
            Poll::Ready(Err(_)) => return Err(()),
            Poll::Pending => {}
        }
    }
    Ok(())
}

/// Resolves once no byte moved for `idle`; never resolves without an idle timeout.
async fn idle_watch(idle: Option<Duration>, activity: &AtomicU64) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let idle_ms = idle.as_millis() as u64;
    loop {
        let last = activity.load(Ordering::Relaxed);
        let deadline = last + idle_ms;
        let now = clock::now_ms();
        if now >= deadline {
            return;
        }
        // Sleep until the earliest moment the connection could be idle, not on a fixed tick.
        tokio::time::sleep(Duration::from_millis(deadline - now)).await;
    }
}

/// Note that bytes moved now (for the idle timeout, if there is one).
#[inline]
fn touch(activity: Option<&AtomicU64>) {
    if let Some(a) = activity {
        a.store(clock::now_ms(), Ordering::Relaxed);
    }
}

/// Copy `from` → `to` until EOF (then shut down `to`'s write half) or an error.
#[allow(clippy::manual_async_fn)]
fn one_way<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    activity: Option<&'a AtomicU64>,
) -> impl std::future::Future<Output = io::Result<u64>> + Send + 'a {
    async move {
        #[cfg(target_os = "linux")]
        {
            match splice_one_way(from, to, activity).await {
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
                other => return other,
            }
        }
        buffered_one_way(from, to, activity).await
    }
}

/// Per-thread cache of 16 KiB copy buffers (the HTTP/1 fast path and small L4 messages), so
/// that moving a message costs no allocation and an idle connection holds no buffer.
pub(crate) mod bufs {
    use std::cell::RefCell;

    pub const BUF_SIZE: usize = 16 * 1024;
    const CACHE_MAX: usize = 64;

    thread_local! {
        static CACHE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> Vec<u8> {
        CACHE
            .with(|c| c.borrow_mut().pop())
            .unwrap_or_else(|| Vec::with_capacity(BUF_SIZE))
    }

    pub fn give(mut b: Vec<u8>) {
        if b.capacity() == 0 || b.capacity() > 4 * BUF_SIZE {
            return;
        }
        b.clear();
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < CACHE_MAX {
                c.push(b);
            }
        });
    }
}

/// Wait until `s` is readable, through the socket's own reader waker slot: no waiter node in
/// the waiting future (`TcpStream::readable` keeps a 150-byte one). The slot holds one waker,
/// so only one future may wait on a socket's read side at a time: in a proxied pair each
/// direction waits on the read side of its source and the write side of its destination only.
fn read_ready(s: &TcpStream) -> impl std::future::Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| s.poll_read_ready(cx))
}

/// [`read_ready`] for the write side.
fn write_ready(s: &TcpStream) -> impl std::future::Future<Output = io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| s.poll_write_ready(cx))
}

/// Splice pipes kept per worker thread between uses.
///
/// A connection holds a pipe only while a chunk is in flight (taken when data is readable,
/// given back once drained), so an idle proxied connection costs its two sockets and nothing
/// else, while a busy one makes no pipe2/close syscalls per chunk. Only empty pipes go back.
#[cfg(target_os = "linux")]
mod pipes {
    use std::cell::RefCell;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{pipe_with, PipeFlags};

    /// Pipes kept per thread: enough for the connections active at once on one worker.
    const POOL_MAX: usize = 64;

    pub type Pipe = (OwnedFd, OwnedFd);

    thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    #[cfg(test)]
    thread_local! {
        /// Pipes taken on this thread (tests: was a stream spliced?).
        pub static TAKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    pub fn take() -> std::io::Result<Pipe> {
        #[cfg(test)]
        TAKEN.with(|t| t.set(t.get() + 1));
        match POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => {
                let pipe = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
                // Best effort: a smaller pipe (limits, old kernels) still works.
                let _ = rustix::pipe::fcntl_setpipe_size(&pipe.1, super::CHUNK);
                Ok(pipe)
            }
        }
    }

    /// Return an *empty* pipe for reuse (closed if the pool is full).
    pub fn give(pipe: Pipe) {
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(pipe);
            }
        });
    }
}

#[cfg(target_os = "linux")]
#[allow(clippy::manual_async_fn)]
fn splice_one_way<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    activity: Option<&'a AtomicU64>,
) -> impl std::future::Future<Output = io::Result<u64>> + Send + 'a {
    async move {
        use rustix::pipe::{splice, SpliceFlags};

        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let mut total = 0u64;
        // Small messages (request/response traffic) go through a pooled buffer: read + write, and
        // the short read spares the next `EAGAIN` (see `read_some`; a short splice cannot tell
        // "drained" from "pipe slots full", so it cannot). A read that fills the buffer means a
        // stream: splice from then on, until a splice moves less than a buffer's worth again.
        let mut bulk = false;
        loop {
            if !bulk {
                // Wait first: an idle direction must not hold a buffer.
                read_ready(from).await?;
                let mut buf = bufs::take();
                let n = match read_some(from, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    bufs::give(buf);
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(total);
                }
                crate::tcpio::write_all(to, &buf[..n]).await?;
                // `l4_copy: buffer`: streams stay on this path too, a pooled buffer per chunk.
                bulk = n == buf.capacity() && SPLICE.load(Ordering::Relaxed);
                bufs::give(buf);
                total += n as u64;
                touch(activity);
                continue;
            }
            read_ready(from).await?;
            // No pipe (EMFILE and friends): this direction copies through a buffer instead.
            let Ok(pipe) = pipes::take() else {
                return Err(io::Error::from(rustix::io::Errno::INVAL));
            };
            let n = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.1, None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipes::give(pipe);
                    continue;
                }
                // On errors the pipe is dropped, not reused: it may hold bytes.
                Err(e) => return Err(e),
            };
            if n == 0 {
                pipes::give(pipe);
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(total);
            }
            let mut left = n;
            while left > 0 {
                write_ready(to).await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.0, None, to, None, left, flags).map_err(io::Error::from)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            pipes::give(pipe);
            total += n as u64;
            bulk = n >= bufs::BUF_SIZE;
            touch(activity);
        }
    }
}

/// Portable copy through a user-space buffer; allocated on first data, like the pipe.
#[allow(clippy::manual_async_fn)]
fn buffered_one_way<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    activity: Option<&'a AtomicU64>,
) -> impl std::future::Future<Output = io::Result<u64>> + Send + 'a {
    async move {
        let mut buf: Vec<u8> = Vec::new();
        let mut total = 0u64;
        loop {
            read_ready(from).await?;
            if buf.is_empty() {
                buf.resize(16 * 1024, 0);
            }
            let n = match from.try_read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(total);
            }
            let mut off = 0;
            while off < n {
                write_ready(to).await?;
                match to.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            touch(activity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> (p1 | p2) <-> server
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&p1, &p2, None).await });
        let payload = vec![7u8; 300_000];
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), payload.len());
        // The other direction still works after the client's FIN.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let (outcome, t) = proxy.await.unwrap();
        assert_eq!(outcome, Outcome::Closed);
        assert_eq!(
            t,
            Transferred {
                up: 300_000,
                down: 5
            }
        );
    }

    /// One stream each way through a proxied pair, on this thread; the pipes it took.
    async fn stream_through(n: usize) -> usize {
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let before = pipes::TAKEN.with(|t| t.get());
        let proxy = async { bidirectional(&p1, &p2, None).await };
        let ends = async {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let (mut cr, mut cw) = client.split();
            let (mut sr, mut sw) = server.split();
            let up = async {
                cw.write_all(&payload).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let down = async {
                sw.write_all(&payload).await.unwrap();
                sw.shutdown().await.unwrap();
            };
            let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
            let read_s = sr.read_to_end(&mut at_server);
            let read_c = cr.read_to_end(&mut at_client);
            let (_, _, a, b) = tokio::join!(up, down, read_s, read_c);
            a.unwrap();
            b.unwrap();
            assert!(
                at_server == payload && at_client == payload,
                "bytes changed"
            );
        };
        let ((outcome, moved), ()) = tokio::join!(proxy, ends);
        assert_eq!(outcome, Outcome::Closed);
        assert_eq!((moved.up, moved.down), (n as u64, n as u64));
        pipes::TAKEN.with(|t| t.get()) - before
    }

    /// `l4_copy: buffer` moves streams through user space (no pipe taken), `splice` through
    /// pipes; the bytes arrive intact either way.
    #[tokio::test(flavor = "current_thread")]
    async fn copy_modes_move_streams_intact() {
        assert!(
            stream_through(2_000_000).await > 0,
            "splice mode takes pipes"
        );
        set_mode(CopyMode::Buffer);
        let taken = stream_through(2_000_000).await;
        set_mode(CopyMode::Splice);
        assert_eq!(taken, 0, "buffer mode took pipes");
    }

    #[tokio::test]
    async fn error_in_one_direction_ends_both() {
        // The client never speaks; the server resets. Waiting for the client would leak both
        // sockets forever.
        let (_client, p1) = pair().await;
        let (p2, server) = pair().await;
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let r = tokio::time::timeout(Duration::from_secs(2), bidirectional(&p1, &p2, None)).await;
        assert_eq!(r.expect("ended promptly").0, Outcome::Error);
    }

    #[tokio::test]
    async fn idle_timeout_ends_connection() {
        let (_client, p1) = pair().await;
        let (p2, _server) = pair().await;
        let started = std::time::Instant::now();
        let (outcome, _) = bidirectional(&p1, &p2, Some(Duration::from_millis(200))).await;
        assert_eq!(outcome, Outcome::Idle);
        assert!(started.elapsed() >= Duration::from_millis(190));
    }

    /// An idle L4 pair's task holds this future: each direction waits through its socket's
    /// own waker slot (no 150-byte waiter node per direction), and no argument is stored twice.
    #[test]
    fn idle_pair_future_is_small() {
        fn size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = size3(bidirectional);
        assert!(n <= 704, "bidirectional future is {n} bytes");
    }

    #[tokio::test]
    async fn buffered_fallback_copies() {
        let (mut client, p1) = pair().await;
        let (p2, mut server) = pair().await;
        let activity = AtomicU64::new(0);
        let copy = async { buffered_one_way(&p1, &p2, Some(&activity)).await.unwrap() };
        let io = async {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let (n, got) = tokio::join!(copy, io);
        assert_eq!(n, 5);
        assert_eq!(got, b"hello");
    }
}
