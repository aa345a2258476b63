//! The HTTP/1.1 fast path: plain HTTP/1.1 requests to plain HTTP/1.1 upstreams, proxied at the
//! byte level the way HAProxy does it, instead of through hyper on both legs.
//!
//! Per request: parse the head in place (httparse, no allocation), route, write ONE new head
//! (hop-by-hop headers out, forwarding headers in) and the body bytes already read, read the
//! response head, rewrite it the same way, and relay the body with its own framing
//! (`Content-Length`, chunked passed through verbatim, or until close). One task per client
//! connection drives both legs, so a keep-alive request costs four socket syscalls and no
//! task wake-ups between legs. Upstream connections are bare `TcpStream`s in the per-endpoint
//! [`super::h1pool::EndpointPools`]; an idle one is checked with tokio's read readiness
//! (no syscall) before reuse.
//!
//! An idle client connection holds no buffer: buffers come from a small per-thread cache when
//! the client's next bytes arrive and go back when the exchange is over.
//!
//! Anything this path does not handle is handed, with the bytes already read, to the hyper
//! path (`server::serve_h1`) for the rest of the connection: HTTP/1.0, `Upgrade`, `Expect`,
//! `CONNECT` and absolute-form targets, transfer codings other than `chunked`, routers with
//! header rules or sticky cookies, HTTPS redirects, and h2c/https upstreams. hyper stays the
//! reference implementation; this path must answer exactly what it would.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::tcpio::LazyTcp;

use super::accesslog::{unix_ms, AccessRecord};
use super::error::{is_idempotent, ProxyError};
use super::h1pool::{idle_or_connect, Reusable};
use super::h1wire::{
    eq, header_slots, parse_len, parse_response_head, put_header, tokens, BadChunk, BodyLeft,
    Framing, ResponseFraming,
};
use super::headers::{write_forwarding, Prior};
use super::proxy::ConnState;
use super::reused::ReusedBox;
use super::router::Target;
use super::rule::RequestView;
use super::timers::within;
use crate::balance::Exclude;
use crate::clock;
use crate::model::HttpUpstream;
use crate::proxy::copy::bufs::BUF_SIZE;
use crate::tcpio::read_some;

/// Headers parsed per head on the stack; an entrypoint allowing more uses hyper.
const MAX_PARSED_HEADERS: usize = 128;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

impl Reusable for TcpStream {
    /// Still open and silent. A connection goes idle right after the short read that ended
    /// its response, which cleared its read readiness ([`read_some`]); tokio's I/O driver sets
    /// it again when epoll reports an EOF or stray bytes, so this costs no syscall (HAProxy,
    /// too, trusts its poller here). A connection whose readiness was not cleared is not reused.
    fn alive(&self) -> bool {
        matches!(
            self.try_io(tokio::io::Interest::READABLE, || Ok(())),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }
}

/// The client side of one connection.
pub(crate) struct Client {
    /// Registered with the event loop only once it has to wait ([`LazyTcp`]).
    stream: LazyTcp,
    /// Taken from a per-thread cache when a request's first bytes arrive and given back when
    /// its response is over; an idle connection keeps them only if pipelined bytes wait.
    b: Slot,
}

/// A connection's buffer set, if it holds one; given back to the thread's cache when dropped,
/// so a connection that closes (one request per connection) leaves its set to the next one
/// instead of freeing it (16 KiB buffers are past malloc's per-thread cache: four allocations
/// through its slow path per connection).
struct Slot(Option<Box<Bufs>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            bufs_cache::give(b);
        }
    }
}

/// A connection's buffers, moved as one box so that an idle connection's future holds one
/// pointer instead of three vectors.
struct Bufs {
    /// Bytes read and not yet consumed are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// Outgoing heads (request, then response).
    out: Vec<u8>,
    /// Upstream reads.
    ubuf: Vec<u8>,
}

/// Buffer sets kept per worker thread between requests.
///
/// The cache follows demand: while requests are in flight it keeps up to [`CACHE_BUSY`] sets,
/// enough for a busy worker's connections to hand sets round without malloc (at 64 keep-alive
/// connections a 24-set cache sent one request in six through malloc's slow path for four
/// 16 KiB-class blocks, and their frees). When the last set out comes back (no request in
/// flight on any worker), every thread's cache is trimmed to [`CACHE_IDLE`] at its next give,
/// so a burst of requests does not leave its touched pages resident.
mod bufs_cache {
    use super::{Bufs, BUF_SIZE};
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Sets kept while requests are in flight (about 3 MiB of address space per thread).
    pub(super) const CACHE_BUSY: usize = 64;
    /// Sets kept after the process went quiet (about 1 MiB).
    pub(super) const CACHE_IDLE: usize = 24;

    /// Sets taken and not given back, over all threads (a connection's task may move to
    /// another worker between taking and giving).
    static OUT: AtomicUsize = AtomicUsize::new(0);
    /// Times `OUT` fell to zero; a thread trims its cache when this moved since it last looked.
    static QUIET: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        // Boxes, not bare sets: a connection holds its set by pointer, and keeping the boxes
        // spares a malloc and a free per request.
        #[allow(clippy::vec_box)]
        static CACHE: RefCell<Vec<Box<Bufs>>> = const { RefCell::new(Vec::new()) };
        static SEEN: Cell<usize> = const { Cell::new(0) };
    }

    pub(super) fn take() -> Box<Bufs> {
        OUT.fetch_add(1, Ordering::Relaxed);
        CACHE.with(|c| c.borrow_mut().pop()).unwrap_or_else(|| {
            Box::new(Bufs {
                buf: Vec::with_capacity(BUF_SIZE),
                pos: 0,
                out: Vec::with_capacity(BUF_SIZE),
                ubuf: Vec::with_capacity(BUF_SIZE),
            })
        })
    }

    /// Keep a set for the next request, unless one of its buffers grew large.
    pub(super) fn give(mut b: Box<Bufs>) {
        if OUT.fetch_sub(1, Ordering::Relaxed) == 1 {
            QUIET.fetch_add(1, Ordering::Relaxed);
        }
        let limit = 4 * BUF_SIZE;
        if b.buf.capacity() > limit || b.out.capacity() > limit || b.ubuf.capacity() > limit {
            return;
        }
        b.buf.clear();
        b.pos = 0;
        b.out.clear();
        b.ubuf.clear();
        // `try_with`: a connection dropped while its thread shuts down frees its set.
        let _ = CACHE.try_with(|c| {
            let quiet = QUIET.load(Ordering::Relaxed);
            let trim = SEEN.with(|s| s.replace(quiet)) != quiet;
            keep(&mut c.borrow_mut(), b, trim)
        });
    }

    /// Put `b` in `cache`, trimming it first to the quiet size if `trim`.
    #[allow(clippy::vec_box)]
    pub(super) fn keep(cache: &mut Vec<Box<Bufs>>, b: Box<Bufs>, trim: bool) {
        if trim {
            cache.truncate(CACHE_IDLE - 1);
        }
        if cache.len() < CACHE_BUSY {
            cache.push(b);
        }
    }
}

impl Client {
    /// A connection with no buffers yet (they are taken when bytes arrive).
    pub(crate) fn new(stream: LazyTcp) -> Client {
        Client {
            stream,
            b: Slot(None),
        }
    }

    fn pending(&self) -> &[u8] {
        match &self.b.0 {
            Some(b) => &b.buf[b.pos..],
            None => &[],
        }
    }

    fn consume(&mut self, n: usize) {
        let b = self.bufs();
        b.pos += n;
        if b.pos == b.buf.len() {
            b.buf.clear();
            b.pos = 0;
        }
    }

    /// The buffers of a request in progress ([`Client::ensure_buffers`] took them).
    fn bufs(&mut self) -> &mut Bufs {
        self.parts().1
    }

    /// The stream and the buffers of a request in progress, borrowed apart.
    fn parts(&mut self) -> (&mut LazyTcp, &mut Bufs) {
        let b = self
            .b
            .0
            .as_deref_mut()
            .expect("buffers are taken before a request is read");
        (&mut self.stream, b)
    }

    fn ensure_buffers(&mut self) {
        if self.b.0.is_none() {
            self.b.0 = Some(bufs_cache::take());
        }
    }

    /// Hand the connection over to hyper: the bytes read and not consumed go in front.
    fn into_rewind(mut self) -> io::Result<Rewind> {
        let pre = self.pending().to_vec();
        if let Some(b) = self.b.0.take() {
            bufs_cache::give(b);
        }
        Ok(Rewind {
            pre,
            pos: 0,
            inner: self.stream.into_registered()?,
        })
    }

    /// A new connection: read what the client has sent already, without joining the event
    /// loop ([`LazyTcp`]). Nothing there yet: the buffers go back, and the idle wait registers
    /// the socket. `false`: closed or failed.
    fn read_early(&mut self) -> bool {
        self.ensure_buffers();
        let read = {
            let (stream, b) = self.parts();
            stream.try_recv_spare(&mut b.buf)
        };
        match read {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.release_buffers();
                true
            }
            Err(_) => false,
        }
    }

    /// Between requests with nothing pipelined: give the buffers back.
    fn release_buffers(&mut self) {
        if self.pending().is_empty() {
            if let Some(b) = self.b.0.take() {
                bufs_cache::give(b);
            }
        }
    }

    /// Read more client bytes (compacting or growing the buffer up to `limit`); 0 = EOF.
    async fn read_more(&mut self, limit: usize) -> io::Result<usize> {
        let (stream, b) = self.parts();
        if b.buf.len() == b.buf.capacity() {
            if b.pos > 0 {
                b.buf.drain(..b.pos);
                b.pos = 0;
            } else if b.buf.capacity() < limit {
                b.buf.reserve(b.buf.capacity().max(BUF_SIZE));
            } else {
                return Err(io::Error::other("head too large"));
            }
        }
        stream.recv_some(&mut b.buf).await
    }
}

/// A parsed request, ready to forward: its new head is in `Client::out`.
struct Request {
    target: Arc<Target>,
    method: Method,
    head_len: usize,
    body: Framing,
    close: bool,
    record: Option<Box<AccessRecord>>,
}

enum Parsed {
    Partial,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    H2,
    /// Hand the connection to hyper.
    Fallback,
    Reject(StatusCode, &'static str),
    /// A well-formed request no router matches; the connection stays open if it has no body.
    NoRoute {
        head_len: usize,
        keep: bool,
        record: Option<Box<AccessRecord>>,
    },
    Ready(Request),
}

/// Serve a plain-text HTTP/1 connection (no h2c preface) until it closes.
///
/// Memory: an idle keep-alive connection's task is this future waiting in the idle state (read
/// readiness and the header timer), and a task is as large as its future's largest state. So
/// everything from the first byte of a request to the end of its response ([`one_request`]) is
/// boxed, in a heap block reused per thread ([`super::reused`]: no allocation per request), and
/// idle the future is a few hundred bytes (a test bounds it). The graceful stop is checked
/// when the future is polled: [`super::serve_connection`]'s future polls it when
/// `conn.shutdown` fires, and an idle connection then closes.
///
/// A function returning an `async move` block, not an `async fn`: rustc stores an `async fn`'s
/// arguments twice in its future (as captured and as moved into locals), 120 bytes here.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    conn: Arc<ConnState>,
    c: Client,
) -> impl std::future::Future<Output = ()> + Send {
    // Made here, not inside the block: a value moved into a new local there would take a
    // second slot in the future beside the captured one.
    let mut w = Waiting { c, timer: None };
    async move {
        if w.c.stream.is_raw() && !w.c.read_early() {
            return;
        }
        loop {
            let deadline = if w.c.pending().is_empty() {
                if w.c.stream.registered().is_err() {
                    return;
                }
                let at = Instant::now() + conn.settings.header_read_timeout;
                w.arm(at);
                let idle = Idle {
                    w: &mut w,
                    stop: &conn.shutdown,
                };
                match idle.await {
                    (Woke::Readable, deadline) => deadline,
                    (Woke::Stop, _) => return,
                    (Woke::TimedOut, _) => {
                        tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "idle connection timed out");
                        return;
                    }
                }
            } else {
                Instant::now() + conn.settings.header_read_timeout
            };
            // Built in its block ([`ReusedBox::new`]); a `move` closure over references, so
            // that no local of this loop is borrowed (and kept) across the await.
            let (conn_ref, client) = (&conn, &mut w.c);
            let request = ReusedBox::new(move || one_request(conn_ref, client, deadline));
            match request.await {
                Next::KeepAlive => {}
                Next::Close => return,
                Next::H2 => {
                    let Ok(io) = w.c.into_rewind() else { return };
                    // Boxed: hyper's connection futures are large, and an idle fast-path connection
                    // should not carry their size.
                    return Box::pin(super::server::serve_h2(conn, io)).await;
                }
                Next::Fallback => {
                    let Ok(io) = w.c.into_rewind() else { return };
                    return Box::pin(super::server::serve_h1(conn, io)).await;
                }
            }
            w.c.release_buffers();
        }
    }
}

/// A connection's client side and its header timer, side by side so that the idle wait holds
/// one pointer to both.
///
/// The timer is made at the first wait and kept for the connection's life: each later wait
/// moves its deadline later, an atomic update of its entry in tokio's timer wheel, where a new
/// timer per wait cost an insertion and a removal under the wheel's lock (callgrind,
/// keep-alive: 210-260 fewer instructions per request, ~2 %). Left armed while a request is
/// served, it may wake the task once for nothing.
///
/// A `Waiting` exists only as a local of [`serve`]'s future, which does not move once polled;
/// `w.c` may be moved out of it (to hand the connection to hyper), `w.timer` never is.
struct Waiting {
    c: Client,
    timer: Option<Sleep>,
}

impl Waiting {
    /// The timer, pinned where it is.
    #[allow(unsafe_code)]
    fn timer(&mut self) -> Pin<&mut Option<Sleep>> {
        // SAFETY: `self` is a local of `serve`'s pinned future (above) and the timer is never
        // moved out of it; it is dropped in place with that future.
        unsafe { Pin::new_unchecked(&mut self.timer) }
    }

    /// Set the timer to `at`: made the first time, moved after that.
    fn arm(&mut self, at: Instant) {
        let mut timer = self.timer();
        match timer.as_mut().as_pin_mut() {
            Some(sleep) => sleep.reset(at),
            None => timer.set(Some(tokio::time::sleep_until(at))),
        }
    }
}

/// Why a keep-alive connection stopped waiting.
enum Woke {
    Readable,
    /// Graceful stop, or the socket failed.
    Stop,
    TimedOut,
}

/// A keep-alive connection between requests: read readiness through the stream's own waker
/// slot (no waiter node), the graceful stop (checked when polled: [`super::Connection`]
/// polls on it), and the header timer, whose deadline also bounds the next head. A named
/// future rather than `timeout_at(poll_fn(..))`: no copy of the deadline beside the timer.
/// Made only with the stream registered and the timer set.
struct Idle<'a> {
    w: &'a mut Waiting,
    stop: &'a crate::stop::Graceful,
}

impl std::future::Future for Idle<'_> {
    type Output = (Woke, Instant);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let woke = if this.stop.is_cancelled() {
            Some(Woke::Stop)
        } else {
            match this.w.c.stream.registered() {
                Ok(stream) => match stream.poll_read_ready(cx) {
                    Poll::Ready(Ok(_)) => Some(Woke::Readable),
                    Poll::Ready(Err(_)) => Some(Woke::Stop),
                    Poll::Pending => None,
                },
                Err(_) => Some(Woke::Stop),
            }
        };
        let Some(sleep) = this.w.timer().as_pin_mut() else {
            return Poll::Ready((Woke::Stop, Instant::now()));
        };
        let deadline = sleep.deadline();
        match woke {
            Some(woke) => Poll::Ready((woke, deadline)),
            None => sleep.poll(cx).map(|()| (Woke::TimedOut, deadline)),
        }
    }
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Hand it to hyper's HTTP/2 server (h2c preface).
    H2,
    /// Hand it to hyper's HTTP/1 server.
    Fallback,
}

/// Read, parse and answer one request whose first bytes are readable or already buffered;
/// the head must be complete by `deadline`.
#[allow(clippy::manual_async_fn)]
fn one_request<'a>(
    conn: &'a ConnState,
    c: &'a mut Client,
    deadline: Instant,
) -> impl std::future::Future<Output = Next> + Send + 'a {
    async move {
        let started_ns = conn.log_start_ns();
        let parsed = match tokio::time::timeout_at(deadline, next_request(conn, c)).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) | Ok(Err(_)) => return Next::Close,
            Err(_) => {
                // Answer only a client that started a request (as the hyper path does).
                if !c.pending().is_empty() {
                    let _ = c.stream.send_all(super::server::RESPONSE_408).await;
                }
                tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "request head timed out");
                return Next::Close;
            }
        };
        let req = match parsed {
            Parsed::Ready(r) => r,
            Parsed::Partial => unreachable!("next_request returns complete heads"),
            Parsed::H2 => return Next::H2,
            Parsed::Fallback => return Next::Fallback,
            Parsed::Reject(status, body) => {
                // The head may be unusable (no framing known): always close.
                let _ = write_local(c, status, body, true).await;
                return Next::Close;
            }
            Parsed::NoRoute {
                head_len,
                keep,
                record,
            } => {
                let e = ProxyError::NoRoute;
                c.consume(head_len);
                let sent = write_local(c, e.status(), e.body(), !keep).await;
                log(conn, record, e.status().as_u16(), 0, started_ns);
                return if sent.is_ok() && keep {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
        };
        match exchange(conn, c, req, started_ns).await {
            Ok(true) if !conn.shutdown.is_cancelled() => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

/// Parse the next request head, reading until it is complete. `None`: the client closed.
async fn next_request(conn: &ConnState, c: &mut Client) -> io::Result<Option<Parsed>> {
    c.ensure_buffers();
    let limit = conn.settings.max_header_bytes;
    loop {
        if !c.pending().is_empty() {
            let b = c.bufs();
            let data = &b.buf[b.pos..];
            let preface = super::server::H2_PREFACE;
            let parsed = if data.len() >= preface.len() && data.starts_with(preface) {
                Parsed::H2
            } else if data.len() < preface.len() && preface.starts_with(data) {
                Parsed::Partial
            } else {
                parse_request(conn, data, &mut b.out)
            };
            if !matches!(parsed, Parsed::Partial) {
                return Ok(Some(parsed));
            }
            if c.pending().len() >= limit {
                return Ok(Some(Parsed::Reject(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "431 request header fields too large\n",
                )));
            }
        }
        match c.read_more(limit).await {
            Ok(0) => {
                if !c.pending().is_empty() {
                    tracing::debug!(peer = %conn.peer, "client closed in the middle of a request head");
                }
                return Ok(None);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Other => {
                return Ok(Some(Parsed::Reject(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "431 request header fields too large\n",
                )))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Up to 8 header names listed in `Connection` (hop-by-hop by declaration).
#[derive(Default)]
struct Named<'a> {
    names: [&'a [u8]; 8],
    n: usize,
}

impl<'a> Named<'a> {
    fn add(&mut self, t: &'a [u8]) {
        if self.n < self.names.len() {
            self.names[self.n] = t;
            self.n += 1;
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.names[..self.n]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Parse one request head at the start of `data`; on success its new head is in `out`.
fn parse_request(conn: &ConnState, data: &[u8], out: &mut Vec<u8>) -> Parsed {
    let bad = Parsed::Reject(StatusCode::BAD_REQUEST, "400 bad request\n");
    let mut headers = header_slots::<MAX_PARSED_HEADERS>();
    let limit = conn.settings.max_headers.min(MAX_PARSED_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(data, &mut headers[..limit]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) if conn.settings.max_headers > limit => {
            return Parsed::Fallback
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "431 request header fields too large\n",
            )
        }
        Err(_) => return bad,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Fallback;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Parsed::Fallback;
    }
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut te_trailers = false;
    let mut named = Named::default();
    let (mut has_xfp, mut has_xfh) = (false, false);
    for h in req.headers.iter() {
        let v = h.value;
        match h.name.len() {
            4 if eq(h.name, "host") => {
                hosts += 1;
                host = Some(v);
            }
            14 if eq(h.name, "content-length") => match (parse_len(v), length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return bad,
            },
            17 if eq(h.name, "transfer-encoding") => {
                if chunked || !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Parsed::Fallback;
                }
                chunked = true;
            }
            10 if eq(h.name, "connection") => {
                for t in tokens(v) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::Fallback;
                    } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                        named.add(t);
                    }
                }
            }
            7 if eq(h.name, "upgrade") => return Parsed::Fallback,
            6 if eq(h.name, "expect") => return Parsed::Fallback,
            2 if eq(h.name, "te") => {
                te_trailers |= tokens(v).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
            17 if eq(h.name, "x-forwarded-proto") => has_xfp = true,
            16 if eq(h.name, "x-forwarded-host") => has_xfh = true,
            _ => {}
        }
    }
    if chunked && length.is_some() {
        return Parsed::Fallback;
    }
    let (Some(host_raw), 1) = (host, hosts) else {
        return bad;
    };
    let mut host_buf = [0u8; 256];
    let Some(host) = super::host_key(host_raw, &mut host_buf) else {
        return bad;
    };
    if conn.settings.redirect_to_https {
        return Parsed::Fallback;
    }
    let Ok(m) = Method::from_bytes(method.as_bytes()) else {
        return bad;
    };
    let record = |router: Option<Arc<str>>, service: Option<Arc<str>>| {
        // Boxed: the record is carried through every state of the connection's future, and
        // inline it would make every idle connection's task larger, logging or not.
        conn.ctx.access_log.as_ref().map(|_| {
            Box::new(AccessRecord {
                time_ms: unix_ms(),
                client: conn.peer.ip(),
                entrypoint: Arc::clone(&conn.entrypoint),
                method: m.clone(),
                host: host.to_string(),
                path: path.to_string(),
                protocol: "HTTP/1.1",
                status: 0,
                bytes: 0,
                router,
                service,
                endpoint: None,
                duration_us: 0,
                upstream_us: 0,
                attempts: 0,
            })
        })
    };
    let no_route = || Parsed::NoRoute {
        head_len,
        keep: !close && !chunked && length.unwrap_or(0) == 0,
        record: record(None, None),
    };
    let (router, target) = {
        let table = conn.table.load();
        let Some(ep) = table.http.entrypoint(&conn.entrypoint) else {
            return no_route();
        };
        if ep.uses_headers {
            return Parsed::Fallback;
        }
        let view = RequestView {
            host,
            path: path.split('?').next().unwrap_or(path),
            method: &m,
            headers: None,
        };
        let Some(r) = ep.lookup(&view) else {
            return no_route();
        };
        (Arc::clone(&r.name), Arc::clone(&r.target))
    };
    if target.protocol != HttpUpstream::Http1 || target.sticky.is_some() {
        return Parsed::Fallback;
    }

    // The upstream head: same request line and headers minus hop-by-hop ones, plus ours.
    let trusted = conn.forward.trusted;
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let n = h.name;
        let skip = match n.len() {
            10 => eq(n, "connection") || eq(n, "keep-alive"),
            16 => eq(n, "proxy-connection") || (eq(n, "x-forwarded-host") && !trusted),
            2 => eq(n, "te"),
            7 => eq(n, "trailer"),
            15 => eq(n, "x-forwarded-for"),
            17 => eq(n, "x-forwarded-proto") && !trusted,
            9 => eq(n, "forwarded"),
            _ => false,
        } || named.contains(n);
        if !skip {
            put_header(out, n.as_bytes(), h.value);
        }
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    // X-Forwarded-For / Forwarded: previous hops (trusted peers only) first, then this one.
    let values = |name: &str, out: &mut Vec<u8>| {
        for h in req.headers.iter().filter(|h| eq(h.name, name)) {
            out.extend_from_slice(h.value);
            out.extend_from_slice(b", ");
        }
    };
    let prior = trusted.then_some(Prior {
        values: &values,
        has_proto: has_xfp,
        has_host: has_xfh,
    });
    write_forwarding(out, &conn.forward, Some(host_raw), prior.as_ref());
    out.extend_from_slice(b"\r\n");

    let record = record(Some(router), Some(Arc::clone(&target.service.name)));
    Parsed::Ready(Request {
        target,
        method: m,
        head_len,
        body: if chunked {
            Framing::Chunked
        } else {
            Framing::Length(length.unwrap_or(0))
        },
        close,
        record,
    })
}

/// A parsed response head, rewritten for the client into `out`.
struct Response {
    head_len: usize,
    status: u16,
    interim: bool,
    body: Framing,
    /// The upstream connection may serve another request after this response.
    reusable: bool,
    /// The client connection closes after this response.
    close: bool,
}

fn parse_response(
    data: &[u8],
    head_request: bool,
    close_client: bool,
    out: &mut Vec<u8>,
) -> Result<Option<Response>, ProxyError> {
    let mut headers = header_slots::<MAX_PARSED_HEADERS>();
    let (parsed, resp) = parse_response_head(data, &mut headers);
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if data.len() < MAX_RESPONSE_HEAD => return Ok(None),
        _ => return Err(ProxyError::UpstreamProtocol),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(ProxyError::UpstreamProtocol);
    };
    if status == 101 {
        return Err(ProxyError::UpstreamProtocol);
    }
    let interim = (100..200).contains(&status);
    let mut framing = ResponseFraming::default();
    let mut reusable = version == 1;
    let mut named = Named::default();
    for h in resp.headers.iter() {
        let v = h.value;
        if framing
            .note(h.name, v)
            .map_err(|_| ProxyError::UpstreamProtocol)?
        {
            continue;
        }
        if eq(h.name, "connection") {
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                    named.add(t);
                }
            }
        }
    }
    let body = framing.framing(status, head_request);
    if body == Framing::UntilClose {
        reusable = false;
    }
    let close = close_client || body == Framing::UntilClose;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa::Buffer::new();
    out.extend_from_slice(code.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let n = h.name;
        let skip = match n.len() {
            10 => eq(n, "connection") || eq(n, "keep-alive"),
            16 => eq(n, "proxy-connection"),
            7 => eq(n, "upgrade"),
            2 => eq(n, "te"),
            _ => false,
        } || named.contains(n);
        if !skip {
            put_header(out, n.as_bytes(), h.value);
        }
    }
    if close && !interim {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(Response {
        head_len,
        status,
        interim,
        body,
        reusable,
        close,
    }))
}

/// Who failed while a body was being moved.
enum Side {
    Client,
    Upstream,
    Framing,
}

/// Proxy one parsed request. `Ok(true)`: the client connection can take another request.
///
/// A function returning an `async move` block: an `async fn` would store its arguments twice
/// in the per-request box.
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    conn: &'a ConnState,
    c: &'a mut Client,
    mut req: Request,
    started_ns: u64,
) -> impl std::future::Future<Output = io::Result<bool>> + Send + 'a {
    async move {
        // The request body bytes already read: forwarded with the head when they complete it.
        let mut body = BodyLeft::new(req.body);
        let b = c.bufs();
        let after_head = &b.buf[b.pos + req.head_len..];
        let (buffered, whole) = match body.as_mut() {
            None => (0, true),
            Some(b) => match b.take(after_head) {
                Ok((n, done)) => (n, done),
                Err(BadChunk) => {
                    write_local(c, StatusCode::BAD_REQUEST, "400 bad request\n", true).await?;
                    return Ok(false);
                }
            },
        };
        // Only bodyless requests go to other endpoints on failure (as on the hyper path); any
        // request whose body is fully buffered may be resent once on a fresh connection when a
        // pooled one turns out to be closed.
        let spec = &req.target.service.spec;
        let max_attempts = 1 + if req.body == Framing::Length(0) {
            spec.retries
        } else {
            0
        };
        let head_request = req.method == Method::HEAD;
        let pool = req.target.pool();
        let mut exclude = Exclude::default();
        let mut last_error = ProxyError::NoEndpoint;
        let mut fresh_on: Option<usize> = None;
        let mut fresh_used = false;
        let mut attempt = 0;
        let mut body_complete = whole;
        let result = loop {
            if attempt >= max_attempts {
                break Err(last_error);
            }
            let sent_ns = clock::now_ns();
            let now_ms = sent_ns / 1_000_000;
            let picked = fresh_on
                .take()
                .or_else(|| conn.pick(pool, sent_ns, exclude));
            let Some(idx) = picked else {
                break Err(last_error);
            };
            let endpoint = &pool.endpoints[idx];
            if let Some(rec) = req.record.as_mut() {
                rec.endpoint = Some(endpoint.addr);
                rec.attempts = attempt + 1;
            }
            let idle = conn.ctx.upstreams.raw.idle(endpoint.addr);
            let (mut up, reused) = match idle_or_connect(
                &idle,
                fresh_used,
                endpoint.addr,
                spec.timeouts.connect,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    endpoint.stats.record_failure(now_ms);
                    tracing::debug!(service = %req.target.service.name, endpoint = %endpoint.addr, error = %e, attempt, "upstream attempt failed");
                    last_error = e;
                    exclude.insert(idx);
                    attempt += 1;
                    continue;
                }
            };
            let in_flight = endpoint.stats.start();
            // Head and buffered body in one write.
            let b = c.bufs();
            let head_end = b.out.len();
            let body_start = b.pos + req.head_len;
            b.out
                .extend_from_slice(&b.buf[body_start..body_start + buffered]);
            let written = crate::tcpio::write_all(&up, &b.out).await;
            b.out.truncate(head_end);
            if written.is_err() {
                // Nothing reached the endpoint: a stale pooled connection is replaced once by a
                // fresh one to the same endpoint; otherwise try another endpoint.
                if reused && !fresh_used {
                    fresh_used = true;
                    fresh_on = Some(idx);
                    continue;
                }
                last_error = ProxyError::NotSent;
                exclude.insert(idx);
                attempt += 1;
                continue;
            }
            let mut interim_sent = false;
            let head = if whole {
                let (stream, b) = c.parts();
                let close_client = req.close || conn.shutdown.is_cancelled();
                read_response_head(
                    &up,
                    &mut b.ubuf,
                    &mut b.out,
                    stream,
                    head_request,
                    close_client,
                    spec.timeouts.response,
                    sent_ns,
                    &mut interim_sent,
                )
                .await
            } else {
                c.consume(req.head_len + buffered);
                // Boxed: the rare path, and twice the size of the common one.
                match Box::pin(stream_body_then_head(&mut up, c, body.as_mut(), &req, conn)).await {
                    Ok((h, complete)) => {
                        body_complete = complete;
                        h
                    }
                    Err(Side::Client) => return Ok(false),
                    Err(_) => {
                        write_local(c, StatusCode::BAD_REQUEST, "400 bad request\n", true).await?;
                        return Ok(false);
                    }
                }
            };
            let now_ns = clock::now_ns();
            match head {
                Ok(resp) => {
                    endpoint.stats.record_success();
                    endpoint.stats.record_latency(now_ns - sent_ns, now_ns);
                    if let Some(rec) = req.record.as_mut() {
                        rec.upstream_us = now_ns.saturating_sub(started_ns) / 1000;
                    }
                    break Ok((up, resp, in_flight, idle));
                }
                Err(e) => {
                    drop(in_flight);
                    tracing::debug!(service = %req.target.service.name, endpoint = %endpoint.addr, error = %e, attempt, "upstream attempt failed");
                    if !whole || interim_sent {
                        break Err(e);
                    }
                    if e == ProxyError::ResetBeforeResponse
                        && reused
                        && !fresh_used
                        && is_idempotent(&req.method)
                    {
                        // An idle connection closed just as it was reused: once, on a new one.
                        fresh_used = true;
                        fresh_on = Some(idx);
                        continue;
                    }
                    last_error = e;
                    exclude.insert(idx);
                    attempt += 1;
                    if !e.retryable(&req.method) {
                        break Err(e);
                    }
                }
            }
        };
        let (mut up, resp, _in_flight, idle) = match result {
            Ok(r) => r,
            Err(e) => {
                let close = req.close || !body_complete;
                if whole {
                    c.consume(req.head_len + buffered);
                }
                let ok = write_local(c, e.status(), e.body(), close).await.is_ok();
                log(conn, req.record, e.status().as_u16(), 0, started_ns);
                return Ok(ok && !close);
            }
        };
        if whole {
            c.consume(req.head_len + buffered);
        }
        let (sent, complete, upstream_clean) = relay_response(&mut up, c, &resp).await;
        log(conn, req.record.take(), resp.status, sent, started_ns);
        if complete && upstream_clean && resp.reusable && body_complete {
            idle.push(up);
        }
        Ok(complete && !resp.close && !req.close && body_complete)
    }
}

/// Read the response head (forwarding interim 1xx heads to the client), bounded by the
/// response timeout counted from `sent_ns`. The final head, rewritten, is in `out`; its body's
/// first bytes follow the head in `ubuf`.
#[allow(clippy::too_many_arguments)]
async fn read_response_head<W>(
    up: &TcpStream,
    ubuf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    client: &mut W,
    head_request: bool,
    close_client: bool,
    timeout: Option<std::time::Duration>,
    sent_ns: u64,
    interim_sent: &mut bool,
) -> Result<Response, ProxyError>
where
    W: AsyncWrite + Unpin,
{
    let fut = async {
        ubuf.clear();
        loop {
            if !ubuf.is_empty() {
                if let Some(resp) = parse_response(ubuf, head_request, close_client, out)? {
                    if !resp.interim {
                        return Ok(resp);
                    }
                    // 1xx (103 Early Hints…): pass on, then wait for the final head.
                    *interim_sent = true;
                    client
                        .write_all(out)
                        .await
                        .map_err(|_| ProxyError::Internal)?;
                    ubuf.drain(..resp.head_len);
                    continue;
                }
            }
            if ubuf.len() == ubuf.capacity() {
                ubuf.reserve(BUF_SIZE);
            }
            match read_some(up, ubuf).await {
                Ok(0) | Err(_) => return Err(ProxyError::ResetBeforeResponse),
                Ok(_) => {}
            }
        }
    };
    within(timeout, sent_ns, fut).await
}

/// Stream the rest of a request body from the client while waiting for the response head.
/// Returns the head and whether the body was sent whole: a response that comes first ends
/// the streaming, and both connections are then closed after it.
async fn stream_body_then_head(
    up: &mut TcpStream,
    c: &mut Client,
    body: Option<&mut BodyLeft>,
    req: &Request,
    conn: &ConnState,
) -> Result<(Result<Response, ProxyError>, bool), Side> {
    let body = body.expect("a streamed request has a body");
    let head_request = req.method == Method::HEAD;
    let close_client = req.close || conn.shutdown.is_cancelled();
    let (up_r, mut up_w) = up.split();
    let (stream, b) = c.parts();
    // Client and upstream both ways at once: the event loop's readiness for each.
    let stream = stream.registered().map_err(|_| Side::Client)?;
    let Bufs {
        buf,
        pos,
        out,
        ubuf,
    } = b;
    let (client_r, mut client_w) = stream.split();
    let send = async {
        loop {
            buf.clear();
            *pos = 0;
            if buf.capacity() == 0 {
                buf.reserve(BUF_SIZE);
            }
            match read_some(client_r.as_ref(), buf).await {
                Ok(0) | Err(_) => return Err(Side::Client),
                Ok(_) => {}
            }
            let (n, done) = body.take(buf).map_err(|_| Side::Framing)?;
            up_w.write_all(&buf[..n])
                .await
                .map_err(|_| Side::Upstream)?;
            *pos = n;
            if done {
                if *pos == buf.len() {
                    buf.clear();
                    *pos = 0;
                }
                return Ok(());
            }
        }
    };
    let mut interim_sent = false;
    let head = read_response_head(
        up_r.as_ref(),
        ubuf,
        out,
        &mut client_w,
        head_request,
        close_client,
        req.target.service.spec.timeouts.response,
        clock::now_ns(),
        &mut interim_sent,
    );
    tokio::pin!(send);
    tokio::pin!(head);
    let mut sent: Option<bool> = None;
    loop {
        tokio::select! {
            r = &mut send, if sent.is_none() => match r {
                Ok(()) => sent = Some(true),
                // The endpoint stopped reading: its answer may still come.
                Err(Side::Upstream) => sent = Some(false),
                Err(e) => return Err(e),
            },
            h = &mut head => return Ok((h, sent == Some(true))),
        }
    }
}

/// Relay the response (head in `c.out`, first body bytes in `c.ubuf` after the head).
/// Returns (body bytes sent, whole response sent, upstream connection left clean).
async fn relay_response(up: &mut TcpStream, c: &mut Client, resp: &Response) -> (u64, bool, bool) {
    let mut left = BodyLeft::new(resp.body);
    let (_, b) = c.parts();
    let first = &b.ubuf[resp.head_len..];
    let (n, mut done, mut clean) = match left.as_mut() {
        None => (0, true, first.is_empty()),
        Some(b) => match b.take(first) {
            Ok((n, done)) => (n, done, n == first.len()),
            Err(BadChunk) => {
                // Nothing sent yet: the client gets a 502 rather than a cut.
                let e = ProxyError::UpstreamProtocol;
                let _ = write_local(c, e.status(), e.body(), true).await;
                return (0, false, false);
            }
        },
    };
    let (stream, b) = c.parts();
    b.out
        .extend_from_slice(&b.ubuf[resp.head_len..resp.head_len + n]);
    if stream.send_all(&b.out).await.is_err() {
        return (0, false, false);
    }
    let mut sent = n as u64;
    let Some(mut left) = left else {
        return (0, done, clean);
    };
    while !done {
        b.ubuf.clear();
        match read_some(up, &mut b.ubuf).await {
            Ok(0) if matches!(left, BodyLeft::UntilClose) => return (sent, true, false),
            Ok(0) | Err(_) => return (sent, false, false),
            Ok(_) => {}
        }
        let (n, end) = match left.take(&b.ubuf) {
            Ok(t) => t,
            Err(BadChunk) => return (sent, false, false),
        };
        if stream.send_all(&b.ubuf[..n]).await.is_err() {
            return (sent, false, false);
        }
        sent += n as u64;
        done = end;
        clean = n == b.ubuf.len();
    }
    (sent, true, clean)
}

fn log(
    conn: &ConnState,
    record: Option<Box<AccessRecord>>,
    status: u16,
    bytes: u64,
    started_ns: u64,
) {
    if let (Some(mut rec), Some(log)) = (record, conn.ctx.access_log.as_ref()) {
        rec.status = status;
        rec.bytes = bytes;
        rec.duration_us = clock::now_ns().saturating_sub(started_ns) / 1000;
        log.log(*rec);
    }
}

/// A response made by meshgate itself.
async fn write_local(
    c: &mut Client,
    status: StatusCode,
    body: &str,
    close: bool,
) -> io::Result<()> {
    let mut len = itoa::Buffer::new();
    let mut head = Vec::with_capacity(160 + body.len());
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    head.extend_from_slice(len.format(body.len()).as_bytes());
    if close {
        head.extend_from_slice(b"\r\nconnection: close");
    }
    head.extend_from_slice(b"\r\n\r\n");
    head.extend_from_slice(body.as_bytes());
    c.stream.send_all(&head).await
}

/// The client stream with the bytes already read put back in front, for hyper.
pub(crate) struct Rewind {
    pre: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.pre.len() {
            let n = (self.pre.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.pre[start..start + n]);
            self.pos += n;
            if self.pos == self.pre.len() {
                self.pre = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_cache_grows_while_busy_and_trims_when_idle() {
        use super::bufs_cache::{keep, take, CACHE_BUSY, CACHE_IDLE};
        let mut cache = Vec::new();
        for _ in 0..CACHE_BUSY + 5 {
            keep(&mut cache, take(), false);
        }
        assert_eq!(cache.len(), CACHE_BUSY);
        keep(&mut cache, take(), true);
        assert_eq!(cache.len(), CACHE_IDLE);
        keep(&mut cache, take(), true);
        assert_eq!(cache.len(), CACHE_IDLE);
    }

    fn response(raw: &[u8], head: bool, close: bool) -> (Response, String) {
        let mut out = Vec::new();
        let r = parse_response(raw, head, close, &mut out).unwrap().unwrap();
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_framing_and_reuse() {
        let (r, out) = response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
            false,
            false,
        );
        assert_eq!(
            (r.body, r.reusable, r.close),
            (Framing::Length(3), true, false)
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n");
        let (r, _) = response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true, false);
        assert_eq!(r.body, Framing::Empty);
        let (r, out) = response(b"HTTP/1.0 200 OK\r\n\r\n", false, false);
        assert_eq!(
            (r.body, r.reusable, r.close),
            (Framing::UntilClose, false, true)
        );
        assert!(out.ends_with("connection: close\r\n\r\n"));
        let (r, _) = response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n",
            false,
            false,
        );
        assert_eq!((r.body, r.reusable), (Framing::Chunked, false));
        let (r, _) = response(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            false,
            false,
        );
        assert_eq!(r.body, Framing::Empty);
        let mut out = Vec::new();
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false,
                false,
                &mut out
            )
            .err(),
            Some(ProxyError::UpstreamProtocol)
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-le", false, false, &mut out)
                .unwrap()
                .is_none()
        );
    }
}

#[cfg(test)]
mod size_probe {
    /// An idle plain HTTP/1 connection's task holds this future, so it must stay small (RSS
    /// per idle connection): hyper's and TLS's states and each request's exchange are boxed
    /// behind it. Tokio's task cell is the future plus 128 bytes (header, scheduler, task id,
    /// stage tag, trailer; the listener's task tracker adds 8) rounded up to a multiple of
    /// 128: a future of at most 272 bytes makes a 384-byte task (`mem-http`), 8 more a 512-byte
    /// one. Within the 272: the fast path's idle state (stream, one pointer to its buffers,
    /// the header timer), the TLS/hyper alternative's tag, and the stop signal's waiter.
    #[test]
    fn idle_connection_future_is_small() {
        fn size6<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let n = size6(crate::http::serve_connection);
        // The release layout is what runs; a debug build keeps 8 bytes more.
        let bound = if cfg!(debug_assertions) { 280 } else { 272 };
        assert!(n <= bound, "http::serve_connection future is {n} bytes");
        let n = crate::http::future_size(super::serve);
        assert!(n <= 200, "fast1::serve future is {n} bytes");
    }

    /// Each request's future lives in a heap block kept per thread ([`crate::http::reused`],
    /// up to 64 of them): 1 KiB at most keeps that cache at 64 KiB per worker.
    #[test]
    fn request_future_fits_malloc_thread_cache() {
        let n = crate::http::future_size3(super::one_request);
        assert!(n <= 1024, "fast1::one_request future is {n} bytes");
    }
}
