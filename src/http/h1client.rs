//! meshgate's own HTTP/1.1 client for the bodyless requests that hyper serves (HTTP/2 and TLS
//! clients, and HTTP/1 connections handed over by [`super::fast1`]), towards plain HTTP/1.1
//! endpoints.
//!
//! hyper's client runs every upstream connection as its own task: a request crosses a channel
//! to that task and its response crosses back, two task wake-ups and a context switch of the
//! scheduler per request, plus a read that ends in `EAGAIN` after each response. Here the
//! request's own task writes the head on a bare pooled socket
//! ([`super::h1pool::EndpointPools`], the same pool as the fast path's), reads the response
//! head with httparse, and, when the whole body came with it (small responses: the usual
//! case), puts the connection back at once and answers from memory. A longer body is read by the response body itself (`RawBody`) as hyper
//! polls it, decoded (`Content-Length`, chunked with trailers, or until close), and the
//! connection goes back when the body ends.
//!
//! Requests with a body, and upgrades, stay on hyper's client ([`super::h1pool::H1Pool`]):
//! their body must stream upstream while the response may already arrive.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::error::{is_idempotent, ProxyError};
use super::h1pool::{idle_or_connect, EndpointPools, Idle};
use super::h1wire::{
    eq, header_slots, parse_response_head, put_header, tokens, Chunked, Decoded, Framing,
    ResponseFraming, MAX_CHUNK_META,
};
use super::headers::{write_forwarding, ForwardInfo};
use crate::proxy::copy::bufs::{self, BUF_SIZE};
use crate::tcpio::{poll_read_some, read_some};

/// Headers parsed in a response head.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Largest response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Send a bodyless request (origin-form target taken from the URI, headers already cleaned,
/// `Host` present) to `addr` on an idle pooled connection or a new one.
///
/// A pooled connection found closed when it is written to, or that closes before any response
/// byte for an idempotent request, is replaced once by a new connection to the same endpoint.
///
/// With `forwarding`, the request's headers are plain (`headers::is_plain`) and this hop's
/// forwarding headers (and `Host`, for an HTTP/2 request) are written after them.
pub(crate) async fn send(
    pools: &EndpointPools<TcpStream>,
    addr: SocketAddr,
    connect_timeout: Duration,
    req: &http::request::Parts,
    forwarding: Option<Forwarding<'_>>,
) -> Result<Response<RawBody>, ProxyError> {
    let mut buf = bufs::take();
    write_head(req, forwarding, &mut buf);
    let idle = pools.idle(addr);
    let mut fresh = false;
    let result = loop {
        let (up, reused) = match idle_or_connect(&idle, fresh, addr, connect_timeout).await {
            Ok(c) => c,
            Err(e) => break Err(e),
        };
        if crate::tcpio::write_all(&up, &buf).await.is_err() {
            if reused {
                fresh = true;
                continue;
            }
            break Err(ProxyError::NotSent);
        }
        // The answer takes at least a round trip: no buffer is held while it is awaited. With
        // many requests in flight at once (an HTTP/2 client's streams: 640 in the load
        // harness) each would hold 16 KiB, far more than the per-thread cache, and the reads
        // would land in malloc'd memory that is cold in the cache; HAProxy too allocates a
        // response buffer only once the response is there.
        bufs::give(std::mem::take(&mut buf));
        let _ = std::future::poll_fn(|cx| up.poll_read_ready(cx)).await;
        buf = bufs::take();
        match read_head(&up, &mut buf, req.method == Method::HEAD).await {
            Ok(head) => break Ok((up, head)),
            Err(Failed::Silent) if reused && is_idempotent(&req.method) => {
                // An idle connection closed just as it was reused: once, on a new one.
                fresh = true;
                write_head(req, forwarding, &mut buf);
            }
            Err(Failed::Silent) => break Err(ProxyError::ResetBeforeResponse),
            Err(Failed::Error(e)) => break Err(e),
        }
    };
    let (up, head) = match result {
        Ok(r) => r,
        Err(e) => {
            bufs::give(buf);
            return Err(e);
        }
    };
    let (body, upstream) = RawBody::start(&head, up, buf, idle);
    if let Some((up, idle)) = upstream {
        idle.push(up);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

/// A response header that never leaves its hop (RFC 9110 §7.6.1, and `Proxy-Connection`).
fn is_hop_by_hop(name: &str) -> bool {
    match name.len() {
        10 => eq(name, "connection") || eq(name, "keep-alive"),
        16 => eq(name, "proxy-connection"),
        17 => eq(name, "transfer-encoding"),
        2 => eq(name, "te"),
        7 => eq(name, "trailer") || eq(name, "upgrade"),
        _ => false,
    }
}

/// This hop's additions to a plain request (see [`send`]).
#[derive(Clone, Copy)]
pub(crate) struct Forwarding<'a> {
    pub info: &'a ForwardInfo,
    /// The request's host (its `Host` header, or an HTTP/2 request's `:authority`).
    pub host: Option<&'a HeaderValue>,
    /// Whether to write `host` as the `Host` header (the request's map has none).
    pub host_line: bool,
}

/// `METHOD target HTTP/1.1`, the headers, and `content-length: 0` where a body is expected;
/// then `forwarding`'s lines.
fn write_head(req: &http::request::Parts, forwarding: Option<Forwarding<'_>>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    for (name, value) in &req.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            // The body is empty whatever the client declared.
            declared = true;
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if declared || matches!(req.method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    if let Some(f) = forwarding {
        if let (true, Some(host)) = (f.host_line, f.host) {
            put_header(out, b"host", host.as_bytes());
        }
        write_forwarding(out, f.info, f.host.map(HeaderValue::as_bytes), None);
    }
    out.extend_from_slice(b"\r\n");
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    head_len: usize,
    framing: Framing,
    reusable: bool,
    /// The head and the body bytes of a `Length` body read with it, copied out of the read
    /// buffer once: the header values and that body are slices of it (one allocation, not one
    /// per value).
    raw: Bytes,
}

enum Failed {
    /// The connection ended (or failed) before any response byte.
    Silent,
    Error(ProxyError),
}

/// Read until the final (non-1xx) response head is complete; its body's first bytes follow
/// it in `buf`.
async fn read_head(up: &TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Result<Head, Failed> {
    let mut any = false;
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(Failed::Error(ProxyError::UpstreamProtocol));
            }
            buf.reserve(BUF_SIZE);
        }
        match read_some(up, buf).await {
            Ok(0) | Err(_) if !any => return Err(Failed::Silent),
            Ok(0) | Err(_) => return Err(Failed::Error(ProxyError::ResetBeforeResponse)),
            Ok(_) => any = true,
        }
        while let Some(head) = parse_head(buf, head_request).map_err(Failed::Error)? {
            if head.status.is_informational() {
                // 100 Continue, 103 Early Hints: not passed on to hyper's clients.
                buf.drain(..head.head_len);
                continue;
            }
            return Ok(head);
        }
    }
}

fn parse_head(data: &[u8], head_request: bool) -> Result<Option<Head>, ProxyError> {
    if data.is_empty() {
        return Ok(None);
    }
    let mut headers = header_slots::<MAX_RESPONSE_HEADERS>();
    let (parsed, resp) = parse_response_head(data, &mut headers);
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ProxyError::UpstreamProtocol),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err(ProxyError::UpstreamProtocol);
    };
    let status = StatusCode::from_u16(code).map_err(|_| ProxyError::UpstreamProtocol)?;
    if code == 101 {
        // No upgrade was asked for on this path.
        return Err(ProxyError::UpstreamProtocol);
    }
    let mut framing = ResponseFraming::default();
    let mut reusable = version == 1;
    // Names the `Connection` header lists are hop-by-hop too (RFC 9110 §7.6.1); as in
    // `headers::strip_hop_by_hop`, up to 8 of them.
    let mut listed: [&[u8]; 8] = [&[]; 8];
    let mut n_listed = 0;
    for h in resp.headers.iter() {
        let framing_header = framing
            .note(h.name, h.value)
            .map_err(|_| ProxyError::UpstreamProtocol)?;
        if !framing_header && eq(h.name, "connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") && n_listed < listed.len() {
                    listed[n_listed] = t;
                    n_listed += 1;
                }
            }
        }
    }
    let length_overridden = framing.length_overridden();
    let framing = framing.framing(code, head_request);
    if framing == Framing::UntilClose {
        reusable = false;
    }
    let body_here = match framing {
        Framing::Length(n) => n.min((data.len() - head_len) as u64) as usize,
        _ => 0,
    };
    let raw = Bytes::copy_from_slice(&data[..head_len + body_here]);
    let mut map = spare_maps::take(resp.headers.len());
    let mut length_kept = false;
    for h in resp.headers.iter() {
        // Hop-by-hop headers stay on this hop: the map is what the client gets.
        if is_hop_by_hop(h.name)
            || listed[..n_listed]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(h.name.as_bytes()))
        {
            continue;
        }
        if eq(h.name, "content-length") {
            if length_overridden || length_kept {
                // RFC 9112 §6.3: Transfer-Encoding wins, and the length is not passed on; or
                // a repeated (equal) length.
                continue;
            }
            length_kept = true;
        }
        let name = match common_response_name(h.name) {
            Some(n) => n,
            None => HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| ProxyError::UpstreamProtocol)?,
        };
        // `h.value` lies within `data[..head_len]`: the same bytes of `raw`.
        let at = (h.value.as_ptr() as usize).wrapping_sub(data.as_ptr() as usize);
        let value = if at.saturating_add(h.value.len()) <= head_len {
            HeaderValue::from_maybe_shared(raw.slice(at..at + h.value.len()))
        } else {
            HeaderValue::from_bytes(h.value)
        }
        .map_err(|_| ProxyError::UpstreamProtocol)?;
        map.append(name, value);
    }
    Ok(Some(Head {
        status,
        headers: map,
        head_len,
        framing,
        reusable,
        raw,
    }))
}

/// The names most responses carry, without `HeaderName::from_bytes`'s lower-casing into a
/// scratch buffer and its lookup of every standard name (~100 instructions a name; this: a
/// length switch and one or two word compares, [`eq`]).
fn common_response_name(name: &str) -> Option<HeaderName> {
    use http::header;
    match name.len() {
        4 if eq(name, "date") => Some(header::DATE),
        4 if eq(name, "etag") => Some(header::ETAG),
        6 if eq(name, "server") => Some(header::SERVER),
        12 if eq(name, "content-type") => Some(header::CONTENT_TYPE),
        13 if eq(name, "cache-control") => Some(header::CACHE_CONTROL),
        13 if eq(name, "last-modified") => Some(header::LAST_MODIFIED),
        14 if eq(name, "content-length") => Some(header::CONTENT_LENGTH),
        _ => None,
    }
}

/// Emptied header maps of answered requests, for the response heads parsed next (per worker
/// thread): a response's map then costs no allocation, nor does the request's map a free.
pub(crate) mod spare_maps {
    use std::cell::RefCell;

    use http::HeaderMap;

    /// Maps kept per thread; one is given back per answered request and taken per response.
    const KEEP: usize = 32;
    /// A map with room for more entries than this is not kept (kept maps have room for 6 or
    /// 12, ~104 bytes each: at most ~40 KiB per thread).
    const LARGEST: usize = 16;

    thread_local! {
        static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty map with room for `n` entries.
    pub(crate) fn take(n: usize) -> HeaderMap {
        match SPARE.with(|s| s.borrow_mut().pop()) {
            Some(mut map) => {
                map.reserve(n);
                map
            }
            None => HeaderMap::with_capacity(n),
        }
    }

    /// Keep `map`'s memory for a later [`take`].
    pub(crate) fn give(mut map: HeaderMap) {
        if map.capacity() == 0 || map.capacity() > LARGEST {
            return;
        }
        map.clear();
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(map);
            }
        });
    }
}

/// A response body read from a bare upstream connection.
pub(crate) struct RawBody {
    state: State,
}

enum State {
    /// Everything is here: data (if any), then trailers (if any).
    /// (Trailers boxed: rare, and a response moves through several futures on its way out;
    /// `Response<ProxyBody>` is 216 bytes with them boxed, 296 without.)
    Whole(Option<Bytes>, Option<Box<HeaderMap>>),
    Streaming(Box<Streaming>),
}

struct Streaming {
    up: TcpStream,
    /// Bytes read and not yet consumed are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    left: Left,
    reusable: bool,
    idle: Arc<Idle<TcpStream>>,
}

enum Left {
    Length(u64),
    Chunked(Chunked, Decoded),
    UntilClose,
}

type Upstream = Option<(TcpStream, Arc<Idle<TcpStream>>)>;

impl RawBody {
    /// The body after a head of `head_len` bytes in `buf`. When the body is complete in `buf`,
    /// the connection is handed back for the pool (if it may be reused) with the body.
    fn start(
        head: &Head,
        up: TcpStream,
        buf: Vec<u8>,
        idle: Arc<Idle<TcpStream>>,
    ) -> (RawBody, Upstream) {
        let (framing, head_len, reusable) = (head.framing, head.head_len, head.reusable);
        let rest = &buf[head_len..];
        let whole = match framing {
            Framing::Empty | Framing::Length(0) => Some((None, None, 0)),
            Framing::Length(n) if n <= rest.len() as u64 => {
                // Copied with the head (`Head::raw`).
                let data = head.raw.slice(head_len..);
                Some((Some(data), None, n as usize))
            }
            Framing::Chunked => {
                let mut d = Decoded::default();
                match Chunked::default().decode(rest, &mut d) {
                    Ok(Some(used)) => {
                        let data = (!d.data.is_empty()).then(|| d.data.freeze());
                        Some((data, parse_trailers(&d.trailers).map(Box::new), used))
                    }
                    // Incomplete or malformed: the streaming body reads on, or reports it.
                    _ => None,
                }
            }
            Framing::Length(_) | Framing::UntilClose => None,
        };
        let rest_len = rest.len();
        if let Some((data, trailers, used)) = whole {
            // Bytes beyond the body are a protocol error of the endpoint: no reuse.
            let back = (reusable && used == rest_len).then_some((up, idle));
            bufs::give(buf);
            let body = RawBody {
                state: State::Whole(data, trailers),
            };
            return (body, back);
        }
        let (left, reusable) = match framing {
            Framing::Length(n) => (Left::Length(n), reusable),
            Framing::Chunked => (
                Left::Chunked(Chunked::default(), Decoded::default()),
                reusable,
            ),
            _ => (Left::UntilClose, false),
        };
        let s = Streaming {
            up,
            buf,
            pos: head_len,
            left,
            reusable,
            idle,
        };
        let body = RawBody {
            state: State::Streaming(Box::new(s)),
        };
        (body, None)
    }
}

/// Trailer lines (`name: value\r\n`…) as a header map; malformed ones are dropped.
fn parse_trailers(raw: &[u8]) -> Option<HeaderMap> {
    if raw.is_empty() || raw.len() > MAX_CHUNK_META {
        return None;
    }
    let mut block = Vec::with_capacity(raw.len() + 2);
    block.extend_from_slice(raw);
    block.extend_from_slice(b"\r\n");
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(&block, &mut headers)
    else {
        return None;
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

fn body_error(what: &'static str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::UnexpectedEof, what))
}

impl Streaming {
    /// The next frame, reading from the connection as needed.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, BoxError>> {
        loop {
            if self.ended() {
                return Poll::Ready(Ok(None));
            }
            if self.pos < self.buf.len() {
                let avail = &self.buf[self.pos..];
                match &mut self.left {
                    Left::Length(n) => {
                        let take = (*n).min(avail.len() as u64) as usize;
                        let data = Bytes::copy_from_slice(&avail[..take]);
                        self.pos += take;
                        *n -= take as u64;
                        return Poll::Ready(Ok(Some(Frame::data(data))));
                    }
                    Left::UntilClose => {
                        let data = Bytes::copy_from_slice(avail);
                        self.pos = self.buf.len();
                        return Poll::Ready(Ok(Some(Frame::data(data))));
                    }
                    Left::Chunked(c, d) => {
                        match c.decode(avail, d) {
                            Ok(Some(used)) => self.pos += used,
                            Ok(None) => self.pos = self.buf.len(),
                            Err(_) => return Poll::Ready(Err(body_error("bad chunked body"))),
                        }
                        if !d.data.is_empty() {
                            return Poll::Ready(Ok(Some(Frame::data(d.data.split().freeze()))));
                        }
                    }
                }
            }
            if self.ended() {
                return Poll::Ready(Ok(None));
            }
            self.buf.clear();
            self.pos = 0;
            match std::task::ready!(poll_read_some(&self.up, cx, &mut self.buf)) {
                Ok(0) if matches!(self.left, Left::UntilClose) => return Poll::Ready(Ok(None)),
                Ok(0) => return Poll::Ready(Err(body_error("upstream closed mid-body"))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Box::new(e))),
            }
        }
    }

    fn ended(&self) -> bool {
        match &self.left {
            Left::Length(n) => *n == 0,
            Left::Chunked(c, _) => c.is_done(),
            Left::UntilClose => false,
        }
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.state {
            State::Whole(data, trailers) => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            State::Streaming(s) => {
                let next = std::task::ready!(s.poll_next(cx));
                match next {
                    Ok(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {
                        // The body ended: the connection goes back (if clean), then trailers.
                        let trailers = match &s.left {
                            Left::Chunked(_, d) => parse_trailers(&d.trailers),
                            _ => None,
                        };
                        let clean = s.reusable && s.pos == s.buf.len() && s.ended();
                        let old = std::mem::replace(&mut this.state, State::Whole(None, None));
                        if let State::Streaming(s) = old {
                            let Streaming { up, buf, idle, .. } = *s;
                            bufs::give(buf);
                            if clean {
                                idle.push(up);
                            }
                        }
                        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                    }
                    Err(e) => {
                        this.state = State::Whole(None, None);
                        Poll::Ready(Some(Err(e)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Whole(None, None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Whole(d, _) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            State::Streaming(s) => match s.left {
                Left::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

impl std::fmt::Debug for RawBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            State::Whole(d, _) => write!(f, "RawBody(whole, {:?})", d.as_ref().map(Bytes::len)),
            State::Streaming(_) => f.write_str("RawBody(streaming)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// One scripted answer: parts written with a short pause between them.
    type Reply = Vec<&'static [u8]>;

    struct Script {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    /// A server answering each request head with the next scripted reply; `close` closes the
    /// connection after each reply.
    async fn server(replies: Vec<Reply>, close: bool) -> Script {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let queue = Arc::new(Mutex::new(VecDeque::from(replies)));
        let (a, h) = (Arc::clone(&accepted), Arc::clone(&heads));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let (h, q) = (Arc::clone(&h), Arc::clone(&queue));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            h.lock().unwrap().push(String::from_utf8(head).unwrap());
                            let reply = q.lock().unwrap().pop_front().expect("a reply");
                            for (i, part) in reply.iter().enumerate() {
                                if i > 0 {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                s.write_all(part).await.unwrap();
                            }
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Script {
            addr,
            accepted,
            heads,
        }
    }

    fn request(method: Method, target: &str) -> http::request::Parts {
        let mut r = http::Request::new(());
        *r.method_mut() = method;
        *r.uri_mut() = target.parse().unwrap();
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("a.example"));
        r.into_parts().0
    }

    #[test]
    fn common_response_names_are_the_standard_ones() {
        for name in [
            "Date",
            "ETag",
            "Server",
            "Content-Type",
            "Cache-Control",
            "Last-Modified",
            "content-length",
            "CONTENT-LENGTH",
        ] {
            assert_eq!(
                common_response_name(name),
                Some(HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
        }
        for name in [
            "Dat3",
            "Vary",
            "X-Server",
            "Content-Typ",
            "content-lengths",
            "Etag2",
            "Dat\u{7f}",
            "Serv~r",
            "Content_Type",
            "ContentXLength",
        ] {
            assert_eq!(common_response_name(name), None, "{name}");
        }
    }

    #[test]
    fn spare_maps_come_back_empty_with_their_room() {
        let mut map = HeaderMap::with_capacity(6);
        map.insert(http::header::DATE, HeaderValue::from_static("x"));
        let room = map.capacity();
        spare_maps::give(map);
        let again = spare_maps::take(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
    }

    /// A plain request's head: its own headers, then Host (when the map has none, as for an
    /// HTTP/2 request) and this hop's forwarding headers, the same ones `set_forwarding`
    /// would have put in the map.
    #[test]
    fn head_with_forwarding_lines() {
        let info = ForwardInfo::new("192.0.2.7".parse().unwrap(), true, false);
        let mut r = http::Request::new(());
        *r.uri_mut() = "https://svc.example/p?q=1".parse().unwrap();
        r.headers_mut()
            .insert("accept", HeaderValue::from_static("*/*"));
        let req = r.into_parts().0;
        assert!(super::super::headers::is_plain(&req.headers));
        let host = HeaderValue::from_static("svc.example");
        let mut out = Vec::new();
        let f = Forwarding {
            info: &info,
            host: Some(&host),
            host_line: true,
        };
        write_head(&req, Some(f), &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\naccept: */*\r\nhost: svc.example\r\n\
             x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: svc.example\r\n\
             forwarded: for=192.0.2.7;proto=https;host=\"svc.example\"\r\n\r\n"
        );
        // The map path's result, for the same request: the same headers.
        let mut map = req.headers.clone();
        super::super::headers::set_forwarding(&mut map, &info, Some(&host));
        for (name, value) in &map {
            let line = format!("{}: {}\r\n", name, value.to_str().unwrap());
            assert!(
                std::str::from_utf8(&out).unwrap().contains(&line),
                "{line:?} missing"
            );
        }
        // A request with a Host header of its own keeps it and gets no second one.
        let mut out2 = Vec::new();
        let f = Forwarding {
            host_line: false,
            ..f
        };
        write_head(&req, Some(f), &mut out2);
        assert!(!std::str::from_utf8(&out2).unwrap().contains("\r\nhost: "));
        assert!(std::str::from_utf8(&out2)
            .unwrap()
            .contains("x-forwarded-host: svc.example"));
    }

    /// Hop-by-hop response headers, and the names `Connection` lists, stay out of the map;
    /// a repeated equal length is passed on once.
    #[test]
    fn response_map_leaves_hop_by_hop_out() {
        let head = b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\n\
            x-hop: 1\r\nx-end: 2\r\ncontent-length: 2\r\ncontent-length: 2\r\n\
            proxy-connection: close\r\ntrailer: x-t\r\nupgrade: h2c\r\n\r\nok";
        let h = parse_head(head, false).unwrap().unwrap();
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-end", "content-length"]);
        assert_eq!(h.headers.get_all("content-length").iter().count(), 1);
        assert!(h.reusable);
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 0\r\n\r\n";
        let h = parse_head(close, false).unwrap().unwrap();
        assert!(!h.reusable && !h.headers.contains_key("connection"));
    }

    async fn call(
        pools: &EndpointPools<TcpStream>,
        addr: SocketAddr,
        req: &http::request::Parts,
    ) -> Result<(StatusCode, HeaderMap, Bytes, Option<HeaderMap>), ProxyError> {
        let resp = send(pools, addr, Duration::from_secs(2), req, None).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        Ok((status, headers, collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn whole_bodies_reuse_the_connection() {
        let reply: Reply = vec![b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: 1\r\n\r\nabc"];
        let s = server(vec![reply.clone(), reply], false).await;
        let pools = EndpointPools::default();
        let req = request(Method::GET, "/p?q=1");
        for _ in 0..2 {
            let (status, headers, body, _) = call(&pools, s.addr, &req).await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(headers["x-a"], "1");
            assert_eq!(headers["content-length"], "3");
            assert_eq!(&body[..], b"abc");
        }
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
        let heads = s.heads.lock().unwrap().clone();
        assert_eq!(heads[0], "GET /p?q=1 HTTP/1.1\r\nhost: a.example\r\n\r\n");
    }

    #[tokio::test]
    async fn streamed_chunked_body_with_trailers_then_reuse() {
        let chunked: Reply = vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6\r\n world\r\n0\r\nx-t: 1\r",
            b"\n\r\n",
        ];
        let length: Reply = vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234",
            b"56789",
        ];
        let s = server(vec![chunked, length], false).await;
        let pools = EndpointPools::default();
        let req = request(Method::GET, "/");
        let (_, headers, body, trailers) = call(&pools, s.addr, &req).await.unwrap();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(trailers.expect("trailers")["x-t"], "1");
        // Decoded here; the client's side frames the body its own way.
        assert!(headers.get("transfer-encoding").is_none());
        let (_, _, body, _) = call(&pools, s.addr, &req).await.unwrap();
        assert_eq!(&body[..], b"0123456789");
        assert_eq!(
            s.accepted.load(Ordering::SeqCst),
            1,
            "reused after streaming"
        );
    }

    #[tokio::test]
    async fn body_until_close_is_not_reused() {
        let s = server(
            vec![
                vec![b"HTTP/1.1 200 OK\r\n\r\npart1 ", b"part2"],
                vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
            ],
            true,
        )
        .await;
        let pools = EndpointPools::default();
        let req = request(Method::GET, "/");
        let (_, _, body, _) = call(&pools, s.addr, &req).await.unwrap();
        assert_eq!(&body[..], b"part1 part2");
        let (status, _, body, _) = call(&pools, s.addr, &req).await.unwrap();
        assert_eq!((status.as_u16(), body.len()), (204, 0));
        assert_eq!(s.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn interim_heads_head_requests_and_empty_posts() {
        let s = server(
            vec![
                vec![
                    b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                ],
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"],
                vec![b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"],
            ],
            false,
        )
        .await;
        let pools = EndpointPools::default();
        let (status, _, body, _) = call(&pools, s.addr, &request(Method::GET, "/"))
            .await
            .unwrap();
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
        let (status, headers, body, _) = call(&pools, s.addr, &request(Method::HEAD, "/"))
            .await
            .unwrap();
        assert_eq!((status.as_u16(), body.len()), (200, 0));
        assert_eq!(headers["content-length"], "5");
        let (status, _, _, _) = call(&pools, s.addr, &request(Method::POST, "/form"))
            .await
            .unwrap();
        assert_eq!(status, 201);
        assert_eq!(s.accepted.load(Ordering::SeqCst), 1);
        let heads = s.heads.lock().unwrap().clone();
        assert_eq!(
            heads[2],
            "POST /form HTTP/1.1\r\nhost: a.example\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn failures_are_classified() {
        let s = server(
            vec![
                vec![b"garbage\r\n\r\n"],
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort"],
            ],
            true,
        )
        .await;
        let pools = EndpointPools::default();
        let req = request(Method::GET, "/");
        assert_eq!(
            call(&pools, s.addr, &req).await.unwrap_err(),
            ProxyError::UpstreamProtocol
        );
        // A body cut short is an error of the body, after the head was answered.
        let resp = send(&pools, s.addr, Duration::from_secs(2), &req, None)
            .await
            .unwrap();
        assert!(resp.into_body().collect().await.is_err());
        // Nothing listens on a closed port.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        assert_eq!(
            call(&pools, dead_addr, &req).await.unwrap_err(),
            ProxyError::ConnectFailed
        );
    }

    #[tokio::test]
    async fn silent_close_is_a_reset_before_response() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await;
        });
        let pools = EndpointPools::default();
        assert_eq!(
            call(&pools, addr, &request(Method::GET, "/"))
                .await
                .unwrap_err(),
            ProxyError::ResetBeforeResponse
        );
    }
}
