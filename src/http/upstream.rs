//! Pooled clients towards endpoints. Plain HTTP/1.1 endpoints (the default) use meshgate's own
//! pool ([`super::h1pool`]); h2c and https endpoints use hyper-util's pooled `Client`
//! (keep-alive per endpoint authority `ip:port`) over our own connector (TCP with a connect
//! timeout, optional TLS with ALPN h2/http1.1).
//!
//! One client per (protocol, connect timeout): services with the same settings share pools, and
//! the pool of an endpoint survives table swaps because it is keyed by address, not by table.
//! The client list is an `ArcSwap` read per request; the mutex only serialises the rare insert
//! of a new combination.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Uri;
use http_body_util::{Either, Empty};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::model::HttpUpstream;

/// Request body sent upstream: the downstream body streamed, or nothing (bodyless requests,
/// which is what makes them replayable on retry).
pub type UpstreamBody = Either<super::body::RequestBody, Empty<Bytes>>;

pub type UpstreamClient = Client<Connector, UpstreamBody>;

/// Idle pooled connections are closed after this long (below typical backend keep-alive limits
/// of 60–120 s would be ideal, but most servers close first and hyper notices the close).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The pooled clients.
pub struct Upstreams {
    /// meshgate's own pool for plain HTTP/1.1 endpoints (the default, and the hot path).
    pub h1: super::h1pool::H1Pool,
    /// Bare keep-alive connections of the HTTP/1 fast path ([`super::fast1`]).
    pub raw: super::h1pool::EndpointPools<tokio::net::TcpStream>,
    clients: ArcSwap<Vec<((HttpUpstream, Duration), UpstreamClient)>>,
    insert: Mutex<()>,
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("h1", &self.h1)
            .field("clients", &self.clients.load().len())
            .finish()
    }
}

impl Upstreams {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Upstreams {
        Upstreams {
            h1: super::h1pool::H1Pool::default(),
            raw: super::h1pool::EndpointPools::default(),
            clients: ArcSwap::from_pointee(Vec::new()),
            insert: Mutex::new(()),
            tls: tls.map(TlsConnector::from),
        }
    }

    /// The client for a protocol and connect timeout (created on first use).
    pub fn client(&self, protocol: HttpUpstream, connect_timeout: Duration) -> UpstreamClient {
        let key = (protocol, connect_timeout);
        if let Some((_, c)) = self.clients.load().iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let _guard = self.insert.lock().expect("upstream client insert poisoned");
        let current = self.clients.load_full();
        if let Some((_, c)) = current.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let connector = Connector {
            tls: match protocol {
                HttpUpstream::Https => self.tls.clone(),
                _ => None,
            },
            https: protocol == HttpUpstream::Https,
            timeout: connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(protocol == HttpUpstream::H2c)
            // The original Host header is forwarded as is; never replace it by the endpoint IP.
            .set_host(false)
            // A pooled connection that closed before our request was written is retried by
            // hyper on a fresh connection to the same endpoint (nothing was sent).
            .retry_canceled_requests(true)
            .build(connector);
        let mut next = (*current).clone();
        next.push((key, client.clone()));
        self.clients.store(Arc::new(next));
        client
    }
}

/// Connects to an endpoint `ip:port` (URI authority), with the connect timeout, then TLS.
#[derive(Clone)]
pub struct Connector {
    tls: Option<TlsConnector>,
    https: bool,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<UpstreamConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "endpoint is not ip:port")
                })?;
            let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
            let deadline = tokio::time::Instant::now() + this.timeout;
            let tcp = tokio::time::timeout_at(deadline, crate::tcpio::connect_upstream(addr))
                .await
                .map_err(|_| timed_out())??;
            let _ = tcp.set_nodelay(true);
            if !this.https {
                return Ok(UpstreamConn::Plain(TokioIo::new(tcp)));
            }
            let tls = this.tls.ok_or_else(|| {
                io::Error::other("no TLS client configuration for https upstreams")
            })?;
            // Endpoints are addressed by IP: their certificate must name that IP.
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tokio::time::timeout_at(deadline, tls.connect(name, tcp))
                .await
                .map_err(|_| timed_out())??;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamConn::Tls(Box::new(TokioIo::new(stream)), h2))
        })
    }
}

/// A connection to an endpoint.
pub enum UpstreamConn {
    Plain(TokioIo<TcpStream>),
    /// TLS stream and whether ALPN chose h2.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>, bool),
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        match self {
            UpstreamConn::Tls(_, true) => Connected::new().negotiated_h2(),
            _ => Connected::new(),
        }
    }
}

impl Read for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamConn::Tls(s, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamConn::Tls(s, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamConn::Tls(s, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamConn::Tls(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamConn::Plain(s) => s.is_write_vectored(),
            UpstreamConn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamConn::Tls(s, _) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
}
