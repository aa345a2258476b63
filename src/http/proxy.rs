//! One request through the proxy: route lookup, endpoint pick (sticky cookie or balancer),
//! header hygiene, forwarding with timeouts and retries, upgrades (WebSocket) tunnelled.
//!
//! Retries: a failed connect or a request that was never written is retried on a DIFFERENT
//! endpoint, and so is an idempotent request whose connection died before a response (see
//! [`ProxyError::retryable`]); at most `ServiceSpec.retries` times. Only requests without a
//! body are retried: the body is streamed into the first attempt, never buffered, so it cannot
//! be replayed (documented limitation; bodyless requests are the vast majority of retries).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::accesslog::{unix_ms, AccessRecord};
use super::body::{PendingLog, ProxyBody, RequestBody};
use super::error::{classify_client_error, ProxyError};
use super::h1client::{self, RawBody};
use super::h1pool::PooledConn;
use super::headers::{is_plain, set_forwarding, strip_hop_by_hop, ForwardInfo};
use super::router::{EntrypointSettings, Target};
use super::rule::RequestView;
use super::timers::within;
use super::upstream::UpstreamBody;
use super::HttpContext;
use crate::balance::{Exclude, PickContext};
use crate::clock;
use crate::model::HttpUpstream;
use crate::table::{Pool, RoutingTable};

/// Per-connection state shared by the requests of one downstream connection.
pub(crate) struct ConnState {
    pub ctx: Arc<HttpContext>,
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub entrypoint: Arc<str>,
    pub settings: Arc<EntrypointSettings>,
    pub peer: SocketAddr,
    pub tls: bool,
    pub forward: ForwardInfo,
    /// Client IP hash for consistent-hash balancing.
    pub hash: u64,
    pub shutdown: crate::stop::Graceful,
}

impl ConnState {
    /// A request's start on the process clock, read only when the access log will want it
    /// (0 otherwise: one clock read less per request).
    pub(crate) fn log_start_ns(&self) -> u64 {
        if self.ctx.access_log.is_some() {
            clock::now_ns()
        } else {
            0
        }
    }

    /// The balancer's pick among `pool`'s endpoints for this client at `now_ns`, other than
    /// those in `exclude` (both request paths).
    pub(crate) fn pick(&self, pool: &Pool, now_ns: u64, exclude: Exclude) -> Option<usize> {
        pool.balancer.pick(
            &pool.endpoints,
            &PickContext {
                hash: self.hash,
                now_ms: now_ns / 1_000_000,
                now_ns,
                exclude,
            },
        )
    }
}

/// hyper service entry point: never fails, every error becomes a response.
///
/// hyper spawns a task per HTTP/2 stream holding this future, so it is a function returning an
/// `async move` block (an `async fn` stores its arguments twice).
#[allow(clippy::manual_async_fn)]
pub(crate) fn handle(
    conn: Arc<ConnState>,
    req: Request<RequestBody>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
    async move {
        let started_ns = conn.log_start_ns();
        let mut record = conn.ctx.access_log.as_ref().map(|_| AccessRecord {
            time_ms: unix_ms(),
            client: conn.peer.ip(),
            entrypoint: Arc::clone(&conn.entrypoint),
            method: req.method().clone(),
            host: {
                let mut buf = [0u8; 256];
                host_of(&req)
                    .and_then(|h| super::host_key(h, &mut buf))
                    .unwrap_or_default()
                    .to_string()
            },
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
            protocol: version_str(req.version()),
            status: 0,
            bytes: 0,
            router: None,
            service: None,
            endpoint: None,
            duration_us: 0,
            upstream_us: 0,
            attempts: 0,
        });
        let mut response = match proxy(&conn, req, record.as_mut(), started_ns).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(entrypoint = %conn.entrypoint, peer = %conn.peer, error = %e, source = ?e.source(), "request failed");
                error_response(e)
            }
        };
        if let (Some(mut record), Some(log)) = (record, conn.ctx.access_log.as_ref()) {
            record.status = response.status().as_u16();
            response.body_mut().set_log(Some(Box::new(PendingLog {
                log: Arc::clone(log),
                record,
                started_ns,
            })));
        }
        Ok(response)
    }
}

pub(crate) fn error_response(e: ProxyError) -> Response<ProxyBody> {
    local_response(e.status(), e.body())
}

fn local_response(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::local(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// The request's host as sent: `Host` header, else the URI authority (HTTP/2).
fn host_of<B>(req: &Request<B>) -> Option<&[u8]> {
    match req.headers().get(header::HOST) {
        Some(h) => Some(h.as_bytes()),
        None => Some(req.uri().authority()?.as_str().as_bytes()),
    }
}

pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Is this an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`)?
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

enum Routed {
    Redirect(Box<Response<ProxyBody>>),
    To(Arc<str>, Arc<Target>),
}

/// The request's router and target (a plain function: its buffers stay out of the request's
/// future). The table guard is dropped before returning.
fn route<B>(conn: &ConnState, req: &Request<B>) -> Result<Routed, ProxyError> {
    let mut host_buf = [0u8; 256];
    let host = match host_of(req) {
        Some(h) => super::host_key(h, &mut host_buf).ok_or(ProxyError::BadRequest)?,
        None if req.version() == Version::HTTP_10 => "",
        None => return Err(ProxyError::BadRequest),
    };
    if conn.settings.redirect_to_https && !conn.tls {
        return Ok(Routed::Redirect(Box::new(redirect(conn, host, req))));
    }
    // Route under a short-lived guard: clone the Arc we need and drop the guard before awaiting.
    let (router, target) = {
        let table = conn.table.load();
        let ep = table
            .http
            .entrypoint(&conn.entrypoint)
            .ok_or(ProxyError::NoRoute)?;
        let view = RequestView {
            host,
            path: req.uri().path(),
            method: req.method(),
            headers: Some(req.headers()),
        };
        let r = ep.lookup(&view).ok_or(ProxyError::NoRoute)?;
        (Arc::clone(&r.name), Arc::clone(&r.target))
    };
    Ok(Routed::To(router, target))
}

#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    conn: &'a ConnState,
    mut req: Request<RequestBody>,
    mut record: Option<&'a mut AccessRecord>,
    started_ns: u64,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a {
    async move {
        let (router, target) = match route(conn, &req)? {
            Routed::Redirect(r) => return Ok(*r),
            Routed::To(router, target) => (router, target),
        };
        if let Some(rec) = record.as_deref_mut() {
            rec.router = Some(router);
            rec.service = Some(Arc::clone(&target.service.name));
        }
        let upgrade = is_upgrade(&req);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if upgrade && target.protocol == HttpUpstream::H2c {
            return Err(ProxyError::UpstreamProtocol);
        }
        let sticky_idx = target
            .sticky
            .as_ref()
            .and_then(|s| sticky_endpoint(&req, s, &target));

        // Request hygiene.
        let bodyless = req.body().is_end_stream();
        // Bodyless requests to plain HTTP/1.1 endpoints go through meshgate's own client.
        let inline = target.protocol == HttpUpstream::Http1 && bodyless && !upgrade;
        let host_in_map = req.headers().get(header::HOST).cloned();
        let host_line = host_in_map.is_none();
        let host_header = host_in_map.or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| conn.forward.authority_value(a.as_str()))
        });
        // The usual request has nothing to remove: its map is left alone, and meshgate's client
        // writes the forwarding headers (and an HTTP/2 request's Host) after its head.
        let plain = inline && is_plain(req.headers());
        if !plain {
            strip_hop_by_hop(req.headers_mut(), upgrade);
            set_forwarding(req.headers_mut(), &conn.forward, host_header.as_ref());
            if let Some(h) = &host_header {
                // HTTP/2 requests carry the host in :authority; HTTP/1 upstreams need a Host
                // header.
                req.headers_mut()
                    .entry(header::HOST)
                    .or_insert_with(|| h.clone());
            }
        }
        let (parts, body) = req.into_parts();
        let method = parts.method.clone();
        let spec = &target.service.spec;
        let max_attempts = 1 + if bodyless && !upgrade {
            spec.retries
        } else {
            0
        };
        let mut body = Some(if bodyless {
            Either::Right(Empty::new())
        } else {
            Either::Left(body)
        });
        let mut parts = Some(parts);
        let pool = target.pool();
        let mut exclude = Exclude::default();
        let mut last_error = ProxyError::NoEndpoint;
        for attempt in 0..max_attempts {
            // One clock read per attempt: the pick and the latency sample share it (the pick takes
            // well under a microsecond), and `now_ms` derives from the same process clock.
            let sent_ns = clock::now_ns();
            let now_ms = sent_ns / 1_000_000;
            let idx = match sticky_idx.filter(|_| attempt == 0) {
                Some(i) => Some(i),
                None => conn.pick(pool, sent_ns, exclude),
            };
            let Some(idx) = idx else {
                return Err(last_error);
            };
            exclude.insert(idx);
            let endpoint = &pool.endpoints[idx];
            if let Some(rec) = record.as_deref_mut() {
                rec.endpoint = Some(endpoint.addr);
                rec.attempts = attempt + 1;
            }
            let in_flight = endpoint.stats.start();
            let result = if inline {
                // meshgate's own client writes the head from the request as it is: no copy.
                let head = parts.as_ref().expect("head kept until the last attempt");
                let fut = h1client::send(
                    &conn.ctx.upstreams.raw,
                    endpoint.addr,
                    spec.timeouts.connect,
                    head,
                    plain.then_some(h1client::Forwarding {
                        info: &conn.forward,
                        host: host_header.as_ref(),
                        host_line,
                    }),
                );
                within(spec.timeouts.response, sent_ns, fut)
                    .await
                    .map(Answer::Raw)
            } else {
                // The last attempt takes the head by value; earlier ones send a copy.
                let head = if attempt + 1 == max_attempts {
                    parts.take().expect("head kept until the last attempt")
                } else {
                    copy_head(parts.as_ref().expect("head kept until the last attempt"))
                };
                let out_body = if attempt + 1 == max_attempts || !bodyless {
                    body.take().expect("body kept until the last attempt")
                } else {
                    Either::Right(Empty::new())
                };
                // Boxed: the rare path keeps its large state out of every request's future.
                Box::pin(send_hyper(
                    conn,
                    &target,
                    idx,
                    Request::from_parts(head, out_body),
                ))
                .await
            };
            let now_ns = clock::now_ns();
            match result {
                Ok(answer) => {
                    endpoint.stats.record_success();
                    endpoint.stats.record_latency(now_ns - sent_ns, now_ns);
                    if let Some(rec) = record.as_deref_mut() {
                        rec.upstream_us = now_ns.saturating_sub(started_ns) / 1000;
                    }
                    let mut resp = match answer {
                        // meshgate's client left the hop-by-hop headers out of the map.
                        Answer::Raw(resp) => {
                            // The request is answered: its map's memory goes to the next
                            // response head.
                            if let Some(head) = parts.take() {
                                h1client::spare_maps::give(head.headers);
                            }
                            resp.map(|b| ProxyBody::raw(b, in_flight))
                        }
                        Answer::Hyper(mut resp, pooled) => {
                            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                            if let (true, Some(down)) = (switching, downstream_upgrade) {
                                let up = hyper::upgrade::on(&mut resp);
                                // The connection now belongs to the tunnel.
                                if let Some(c) = pooled {
                                    c.discard();
                                }
                                let shutdown = conn.shutdown.token().clone();
                                tokio::spawn(tunnel(down, up, in_flight, shutdown));
                                strip_hop_by_hop(resp.headers_mut(), true);
                                return Ok(resp.map(|_| ProxyBody::local(Bytes::new())));
                            }
                            strip_hop_by_hop(resp.headers_mut(), false);
                            resp.map(|b| {
                                let mut body = ProxyBody::upstream(b, Some(in_flight));
                                body.set_conn(pooled);
                                body
                            })
                        }
                    };
                    if let Some(sticky) = &target.sticky {
                        if sticky_idx != Some(idx) {
                            resp.headers_mut()
                                .append(header::SET_COOKIE, sticky.set_cookie[idx].clone());
                        }
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    if e.is_connect_failure() {
                        endpoint.stats.record_failure(now_ms);
                    }
                    tracing::debug!(service = %target.service.name, endpoint = %endpoint.addr, error = %e, attempt, "upstream attempt failed");
                    last_error = e;
                    if !e.retryable(&method) {
                        return Err(e);
                    }
                }
            }
        }
        Err(last_error)
    }
}

/// What an endpoint answered, through hyper's client or meshgate's own.
enum Answer {
    Hyper(Response<Incoming>, Option<PooledConn>),
    Raw(Response<RawBody>),
}

/// One attempt through hyper: meshgate's HTTP/1 pool (requests with a body, upgrades), or
/// hyper-util's pooled client (h2c and https endpoints).
async fn send_hyper(
    conn: &ConnState,
    target: &Target,
    idx: usize,
    mut out: Request<UpstreamBody>,
) -> Result<Answer, ProxyError> {
    let spec = &target.service.spec;
    let addr = target.pool().endpoints[idx].addr;
    if target.protocol == HttpUpstream::Http1 {
        // Our own HTTP/1 connection: the URI is written as is, so origin-form.
        if out.uri().scheme().is_some() || out.uri().path_and_query().is_none() {
            let pq = out
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *out.uri_mut() = Uri::from(pq);
        }
        *out.version_mut() = Version::HTTP_11;
        let fut = conn.ctx.upstreams.h1.send(addr, spec.timeouts.connect, out);
        return within(spec.timeouts.response, clock::now_ns(), fut)
            .await
            .map(|(resp, c)| Answer::Hyper(resp, Some(c)));
    }
    let scheme = if target.protocol == HttpUpstream::Https {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme);
    uri.authority = Some(target.authorities[idx].clone());
    uri.path_and_query = out
        .uri()
        .path_and_query()
        .cloned()
        .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
    *out.uri_mut() = Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest)?;
    *out.version_mut() = if target.protocol == HttpUpstream::H2c {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let fut = async {
        conn.ctx
            .upstreams
            .client(target.protocol, spec.timeouts.connect)
            .request(out)
            .await
            .map_err(|e| classify_client_error(&e))
    };
    within(spec.timeouts.response, clock::now_ns(), fut)
        .await
        .map(|resp| Answer::Hyper(resp, None))
}

/// Copy of a request head for a retry (extensions are not needed upstream).
fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r.into_parts().0
}

/// The endpoint named by the request's sticky cookie, if it is in the pool and available.
fn sticky_endpoint<B>(
    req: &Request<B>,
    sticky: &super::router::Sticky,
    target: &Target,
) -> Option<usize> {
    let wanted = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == &*sticky.cookie).then(|| u64::from_str_radix(v.trim(), 16).ok())?
        })?;
    let idx = sticky.hashes.iter().position(|h| *h == wanted)?;
    let ep = target.pool().endpoints.get(idx)?;
    ep.stats.is_available(clock::now_ms()).then_some(idx)
}

/// Copy bytes both ways between the upgraded downstream and upstream connections.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    _in_flight: crate::stats::InFlight,
    shutdown: CancellationToken,
) {
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "upgraded tunnel closed with error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

/// 308 to the same host and path over https.
fn redirect<B>(conn: &ConnState, host: &str, req: &Request<B>) -> Response<ProxyBody> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match conn.settings.redirect_port {
        Some(port) if port != 443 => format!("https://{host}:{port}{path}"),
        _ => format!("https://{host}{path}"),
    };
    let mut r = local_response(StatusCode::PERMANENT_REDIRECT, "308 use https\n");
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.example:8080"), "a.example");
        assert_eq!(strip_port("a.example"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }

    /// What `host_key` replaced: trim, strip the port, lowercase, UTF-8 or nothing.
    fn composed(raw: &[u8]) -> Option<String> {
        let mut buf = [0u8; 256];
        let s = std::str::from_utf8(raw).ok()?;
        super::super::lowercase(strip_port(s.trim()), &mut buf).map(str::to_string)
    }

    /// The one-pass host key is the composition it replaces.
    #[test]
    fn host_key_is_trim_strip_port_lowercase() {
        let long = "a".repeat(300);
        let cases: Vec<&[u8]> = vec![
            b"App.Example:8080",
            b"  app.example  ",
            b"app.example:",
            b"app.example:80a",
            b"APP.EXAMPLE",
            b"[::1]:80",
            b"[::1]",
            b"[FE80::1]",
            b"",
            b":80",
            b"127.0.0.1:24002",
            "b\u{fc}cher.Example:443".as_bytes(),
            b"bad\xff.example",
            b"bad.example:\xff",
            long.as_bytes(),
        ];
        for raw in cases {
            let mut buf = [0u8; 256];
            let got = super::super::host_key(raw, &mut buf).map(str::to_string);
            assert_eq!(got, composed(raw), "{:?}", String::from_utf8_lossy(raw));
        }
        assert_eq!(
            super::super::host_key(b" Api.Example:8443", &mut [0u8; 256]),
            Some("api.example")
        );
    }

    proptest::proptest! {
        #[test]
        fn host_key_matches_the_composition_on_any_bytes(
            raw in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b" \t:[]0123456789aZ.-".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..270,
            )
        ) {
            let mut buf = [0u8; 256];
            let got = super::super::host_key(&raw, &mut buf).map(str::to_string);
            proptest::prop_assert_eq!(got, composed(&raw));
        }
    }

    #[test]
    fn head_copy_keeps_everything_sent() {
        let mut r = Request::new(());
        *r.method_mut() = Method::PUT;
        r.headers_mut().insert("x", HeaderValue::from_static("1"));
        let (p, ()) = r.into_parts();
        let c = copy_head(&p);
        assert_eq!(c.method, Method::PUT);
        assert_eq!(c.headers.get("x").unwrap(), "1");
    }
}

#[cfg(test)]
mod size_probe {
    use crate::http::future_size as size;

    /// hyper spawns one task per HTTP/2 stream holding this future, so its size is copied and
    /// allocated per request: the rare paths (hyper's clients, new connections) are boxed.
    /// Bounds are for the test (debug) build.
    #[test]
    fn request_future_stays_small() {
        let handle = size(super::handle);
        // 2,088 B: a plain request keeps its host and this hop's forwarding inputs for
        // meshgate's client to write (instead of four inserts into its header map).
        assert!(handle <= 2112, "handle future is {handle} bytes");
        let pools = crate::http::h1pool::EndpointPools::default();
        let parts = http::Request::new(()).into_parts().0;
        let addr = "127.0.0.1:1".parse().unwrap();
        let send = crate::http::h1client::send(
            &pools,
            addr,
            std::time::Duration::from_secs(1),
            &parts,
            None,
        );
        let n = std::mem::size_of_val(&send);
        assert!(n < 512, "h1client::send future is {n} bytes");
    }
}
