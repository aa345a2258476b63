//! Shared helpers of the HTTP integration tests: a proxy started on 127.0.0.1:0 with its own
//! accept loop (the way the listener calls `serve_connection`), small hyper backends, clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::http::{HttpConfig, HttpContext};
use meshgate::model::{
    DesiredState, EndpointSpec, EntrypointKind, EntrypointSpec, RouterSpec, ServiceSpec,
};
use meshgate::stats::StatsRegistry;
use meshgate::table::{BuildOptions, RoutingTable};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every test step is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

pub struct Proxy {
    pub addr: SocketAddr,
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub ctx: Arc<HttpContext>,
    /// Graceful stop: no more accepts; idle connections close, requests in flight finish.
    pub shutdown: meshgate::stop::Graceful,
    /// Hard stop (a drain deadline): every connection is dropped where it stands.
    pub hard_stop: CancellationToken,
    pub stats: Arc<StatsRegistry>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Proxy {
    /// Start a proxy serving entrypoint `ep` of `desired` on a fresh loopback port.
    pub async fn start(desired: &DesiredState, ep: &str, config: HttpConfig) -> Proxy {
        Self::start_at(desired, ep, config, "127.0.0.1:0").await
    }

    /// Same as [`Proxy::start`] on a given address.
    pub async fn start_at(
        desired: &DesiredState,
        ep: &str,
        config: HttpConfig,
        bind: &str,
    ) -> Proxy {
        let stats = Arc::new(StatsRegistry::default());
        let table = RoutingTable::build(desired, &BuildOptions::default(), &stats, 1);
        for p in &table.problems {
            eprintln!("table problem: {p:?}");
        }
        let table = Arc::new(ArcSwap::from_pointee(table));
        let ctx = HttpContext::with_config(config);
        // The listener's own socket and accept: connections reach `serve_connection` outside
        // the event loop, as in meshgate (`LazyTcp`).
        let listener =
            meshgate::listener::bind_tcp(bind.parse().expect("a socket address"), false, true)
                .unwrap();
        let addr = listener.get_ref().local_addr().unwrap();
        let hard_stop = CancellationToken::new();
        let shutdown = meshgate::stop::Graceful::new(hard_stop.clone());
        let (t, c, s, name) = (
            Arc::clone(&table),
            Arc::clone(&ctx),
            shutdown.clone(),
            Arc::<str>::from(ep),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = meshgate::listener::accept(&listener) => {
                        let Ok((stream, peer)) = r else { continue };
                        tokio::spawn(meshgate::http::serve_connection(
                            Arc::clone(&c), Arc::clone(&t), Arc::clone(&name), stream.into(), peer, s.clone(),
                        ));
                    }
                    _ = s.cancelled() => return,
                }
            }
        });
        Proxy {
            addr,
            table,
            ctx,
            shutdown,
            hard_stop,
            stats,
        }
    }

    /// Swap in a table built from `desired` (next generation).
    pub fn update(&self, desired: &DesiredState) {
        let gen = self.table.load().generation + 1;
        let t = RoutingTable::build(desired, &BuildOptions::default(), &self.stats, gen);
        self.table.store(Arc::new(t));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Desired state builder for tests.
pub struct Setup(pub DesiredState);

impl Setup {
    pub fn new(kind: EntrypointKind) -> Setup {
        let mut d = DesiredState::default();
        d.entrypoints.insert(
            "web".into(),
            EntrypointSpec::new("web", "127.0.0.1:0".parse().unwrap(), kind),
        );
        Setup(d)
    }

    pub fn entrypoint(&mut self) -> &mut EntrypointSpec {
        self.0.entrypoints.get_mut("web").unwrap()
    }

    /// Add a service with `http_port` 80 and these endpoints.
    pub fn service(&mut self, name: &str, endpoints: &[SocketAddr]) -> &mut ServiceSpec {
        let mut s = ServiceSpec::new(name);
        s.http_port = Some(80);
        s.endpoints = endpoints
            .iter()
            .map(|a| EndpointSpec::from_addr(*a))
            .collect();
        self.0.services.insert(name.into(), s);
        self.0.services.get_mut(name).unwrap()
    }

    pub fn router(&mut self, name: &str, rule: &str, service: &str, priority: i64) -> &mut Self {
        self.0.routers.insert(
            name.into(),
            RouterSpec {
                name: name.into(),
                entrypoints: vec!["web".into()],
                rule: rule.into(),
                service: service.into(),
                priority,
            },
        );
        self
    }
}

/// A backend that answers `name`, then each request header as `name: value` lines, and
/// `x-backend: name`. Path `/slow` waits 2 s first. Returns its address.
pub async fn backend(name: &'static str) -> SocketAddr {
    serve_backend(move |req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let mut body = format!(
            "{name}\n{} {} {:?}\n",
            req.method(),
            req.uri(),
            req.version()
        );
        for (k, v) in req.headers() {
            body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        let data = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        body.push_str(&format!("body-bytes: {}\n", data.len()));
        Response::builder()
            .header("x-backend", name)
            .header("keep-alive", "timeout=5")
            .header("connection", "x-private")
            .header("x-private", "secret")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    })
    .await
}

/// Serve HTTP/1.1 and h2c with `f` on a fresh loopback port.
pub async fn serve_backend<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An address nothing listens on (bound then closed).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub type TestClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> TestClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Send a request and return status, headers and the body as text.
pub async fn send(
    client: &TestClient,
    req: Request<Full<Bytes>>,
) -> (http::StatusCode, http::HeaderMap, String) {
    let resp = tokio::time::timeout(STEP, client.request(req))
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(STEP, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

pub fn get(url: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}
