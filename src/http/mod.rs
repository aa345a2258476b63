//! L7 HTTP edge: entrypoints (http, https, tls_passthrough), routers, and the reverse proxy.
//!
//! Flow of one downstream connection ([`serve_connection`]):
//! 1. [`server`]: TLS handshake with the SNI certificate store ([`tls`]) on https entrypoints,
//!    protocol choice (ALPN or the h2 preface), hyper's HTTP/1.1 server or meshgate's own HTTP/2
//!    loop ([`h2server`]) with limits.
//!    Plain-text HTTP/1.1 first goes through [`fast1`], meshgate's own byte-level HTTP/1 proxy
//!    (the hot path: no hyper on either leg), which hands the connection to hyper for anything
//!    it does not take (HTTP/1.0, upgrades, `Expect`, header rules, sticky cookies, h2c/https
//!    upstreams…). On `tls_passthrough` entrypoints [`passthrough`] routes the raw TLS bytes by
//!    SNI instead.
//! 2. [`proxy`]: per request, route lookup in the current table's [`router::HttpTable`]
//!    (rules from [`rule`]), endpoint pick, header hygiene ([`headers`]), forwarding with
//!    retries; every failure is a [`error::ProxyError`]. Bodyless requests to HTTP/1.1
//!    endpoints go through meshgate's own client ([`h1client`], framing in [`h1wire`]) on the
//!    fast path's bare pooled sockets; the rest through the pooled hyper clients ([`upstream`]).
//! 3. [`body`]: the response body streamed back, then one [`accesslog`] line.
//!
//! Long-lived state (pools, certificates, access log) lives in [`HttpContext`] and survives
//! table generations; everything derived from the desired state lives in the table.

pub mod accesslog;
pub mod body;
pub mod error;
pub mod fast1;
pub mod h1client;
pub mod h1pool;
pub mod h1wire;
pub mod h2server;
pub mod headers;
pub mod passthrough;
pub mod proxy;
pub(crate) mod reused;
pub mod router;
pub mod rule;
pub mod server;
pub(crate) mod timers;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use self::accesslog::{AccessLog, AccessLogConfig, LogFormat};
pub use self::error::ProxyError;
pub use self::router::HttpTable;
pub use self::tls::{CertFiles, CertStore};
use crate::model::EntrypointKind;
use crate::table::RoutingTable;

/// Size of the future a two-argument `async fn` returns (size tests of connection and request
/// futures, which are allocated per connection or per HTTP/2 stream).
#[cfg(test)]
pub(crate) fn future_size<A, B, F>(_: fn(A, B) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// The same for three arguments (a request's or an HTTP/2 stream's future).
#[cfg(test)]
pub(crate) fn future_size3<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// How often certificate files are checked for changes by default.
pub const DEFAULT_CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Process-wide HTTP settings (the `http:` section of the config file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Certificates served on https entrypoints; each serves the DNS names in its SAN.
    pub certificates: Vec<CertFiles>,
    /// Certificate for clients without SNI or with an unknown name (else the first one).
    pub default_certificate: Option<CertFiles>,
    /// How often certificate files are checked for changes (default 5s).
    #[serde(with = "crate::model::opt_duration")]
    pub cert_reload_interval: Option<Duration>,
    /// Extra PEM CA(s) trusted for `https` upstreams, on top of the system bundle.
    pub upstream_ca: Option<PathBuf>,
    /// Access log (off by default).
    pub access_log: AccessLogConfig,
}

/// Long-lived HTTP state shared by all connections and all table generations
/// (upstream connection pools, TLS certificate store, access log writer).
#[derive(Debug)]
pub struct HttpContext {
    pub config: HttpConfig,
    pub certs: Arc<CertStore>,
    pub upstreams: upstream::Upstreams,
    pub access_log: Option<Arc<AccessLog>>,
}

impl HttpContext {
    /// A context with default settings (no certificates, no access log).
    pub fn new() -> Arc<Self> {
        Self::with_config(HttpConfig::default())
    }

    /// A context from the `http:` config. Inside a tokio runtime it also starts the certificate
    /// reload poll and the access log writer (both end when the context is dropped).
    pub fn with_config(config: HttpConfig) -> Arc<Self> {
        let mut files = config.certificates.clone();
        let default = config.default_certificate.clone().map(|d| {
            files.push(d);
            files.len() - 1
        });
        let certs = Arc::new(CertStore::new(files, default));
        let upstream_tls = match tls::upstream_client_config(config.upstream_ca.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no TLS client config: https upstreams will fail");
                None
            }
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        let access_log = match (&runtime, config.access_log.enabled) {
            (Some(_), true) => match AccessLog::start(&config.access_log) {
                Ok(log) => Some(log),
                Err(e) => {
                    tracing::warn!(error = %e, "access log disabled: cannot open its file");
                    None
                }
            },
            (None, true) => {
                tracing::warn!("access log disabled: no tokio runtime at start-up");
                None
            }
            _ => None,
        };
        if let (Some(rt), false) = (
            &runtime,
            config.certificates.is_empty() && config.default_certificate.is_none(),
        ) {
            let weak = Arc::downgrade(&certs);
            let every = config
                .cert_reload_interval
                .unwrap_or(DEFAULT_CERT_RELOAD_INTERVAL);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(store) = weak.upgrade() else { return };
                    // File reads are small; a blocking thread keeps them off the workers.
                    let _ = tokio::task::spawn_blocking(move || store.reload()).await;
                }
            });
        }
        Arc::new(HttpContext {
            config,
            certs,
            upstreams: upstream::Upstreams::new(upstream_tls),
            access_log,
        })
    }
}

/// ASCII-lowercase `s` into `buf` without allocating; `None` if longer than the buffer
/// (no valid host name is longer than 253 bytes).
pub(crate) fn lowercase<'b>(s: &str, buf: &'b mut [u8; 256]) -> Option<&'b str> {
    lowercase_bytes(s.as_bytes(), buf)
}

/// [`lowercase`] of bytes; `None` also if they are not UTF-8.
#[inline]
fn lowercase_bytes<'b>(s: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let out = buf.get_mut(..s.len())?;
    for (o, b) in out.iter_mut().zip(s) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// The routing key of a `Host` header or an `:authority`: trimmed, without its port, ASCII
/// lowercase, in `buf`; `None` if it is not UTF-8 or longer than the buffer. The same as
/// `lowercase(strip_port(from_utf8(raw)?.trim()), buf)`, in one pass over the bytes of a
/// plain ASCII name (the usual case, every request); bracketed IPv6 literals and non-ASCII
/// names take that composition itself.
pub(crate) fn host_key<'b>(raw: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    // `str::trim`'s ASCII white space: `trim_ascii`'s and the vertical tab.
    let ws = |b: &u8| b.is_ascii_whitespace() || *b == 0x0b;
    let start = raw.iter().position(|b| !ws(b)).unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    let h = &raw[start..end];
    if h.first() == Some(&b'[') || !h.is_ascii() {
        let s = std::str::from_utf8(raw).ok()?;
        return lowercase(proxy::strip_port(s.trim()), buf);
    }
    let h = match h.iter().rposition(|&b| b == b':') {
        Some(i) if h[i + 1..].iter().all(u8::is_ascii_digit) => &h[..i],
        _ => h,
    };
    lowercase_bytes(h, buf)
}

/// Serve one accepted downstream connection on entrypoint `entrypoint` until it closes or
/// `shutdown` fires (then finish in-flight requests and close).
///
/// The entrypoint's settings (kind, TLS, limits, trusted proxies) are those of the table
/// current when the connection was accepted; routes are looked up per request in the table
/// current at that time.
///
/// When `shutdown`'s hard stop fires (a drain deadline), the connection is dropped where it
/// stands.
///
/// Not an `async fn`: the connection's state is set up right away and the future returned is
/// the plain HTTP/1 fast path's own (or a box for TLS and passthrough) inside a
/// [`crate::stop::Stoppable`].
/// An `async fn` would keep its arguments in the future beside the one it awaits, ~300 bytes
/// more in every connection's task (RSS per idle connection).
pub fn serve_connection(
    ctx: Arc<HttpContext>,
    table: Arc<ArcSwap<RoutingTable>>,
    entrypoint: Arc<str>,
    stream: crate::tcpio::LazyTcp,
    peer: SocketAddr,
    shutdown: crate::stop::Graceful,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio_util::either::Either;
    type Boxed = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let stop = shutdown.clone();
    let settings = {
        let current = table.load();
        current
            .http
            .entrypoint(&entrypoint)
            .map(|e| Arc::clone(&e.settings))
    };
    let Some(settings) = settings else {
        tracing::debug!(entrypoint = %entrypoint, "connection on an entrypoint that is gone");
        return crate::stop::Stoppable::new(
            Either::Right(Box::pin(std::future::ready(())) as Boxed),
            stop,
        );
    };
    // TCP_NODELAY (and keepalive) come from the listener: no system call here.
    let tls_config = match settings.kind {
        EntrypointKind::Https => {
            let built = settings.tls_config.get_or_init(|| {
                tls::server_config(Arc::clone(&ctx.certs), settings.client_verifier.clone())
                    .expect("ring supports TLS 1.2 and 1.3")
            });
            Some(Arc::clone(built))
        }
        _ => None,
    };
    let trusted = settings.is_trusted(peer.ip());
    let conn = Arc::new(proxy::ConnState {
        forward: headers::ForwardInfo::new(peer.ip(), tls_config.is_some(), trusted),
        hash: crate::balance::hash_ip(peer.ip()),
        ctx,
        table,
        entrypoint,
        settings,
        peer,
        tls: tls_config.is_some(),
        shutdown,
    });
    // TLS and passthrough futures are boxed: the task of every connection is as large as its
    // largest possible state, and plain HTTP/1 connections (the many idle keep-alive ones)
    // should not pay for a TLS session and a hyper connection.
    let serve = match (conn.settings.kind, tls_config) {
        // TLS waits for the handshake's messages anyway: in the event loop from the start.
        (EntrypointKind::TlsPassthrough, _) => match stream.into_registered() {
            Ok(stream) => Either::Right(Box::pin(passthrough::serve(conn, stream)) as Boxed),
            Err(_) => Either::Right(Box::pin(std::future::ready(())) as Boxed),
        },
        (EntrypointKind::Https, Some(config)) => match stream.into_registered() {
            Ok(stream) => Either::Right(Box::pin(server::serve_tls(conn, stream, config)) as Boxed),
            Err(_) => Either::Right(Box::pin(std::future::ready(())) as Boxed),
        },
        _ => Either::Left(fast1::serve(conn, fast1::Client::new(stream))),
    };
    crate::stop::Stoppable::new(serve, stop)
}
