//! Throughput harness (ignored by default): meshgate's HTTP proxy in front of a tiny backend, on
//! fixed loopback ports, for an external load generator (wrk) to compare with HAProxy.
//!
//! `MG_BENCH_SECS=60 cargo test --release --test http_bench -- --ignored --nocapture`
//! then `wrk -t1 -c50 -d10s http://127.0.0.1:18080/` (proxy) or `:18081` (backend direct).

mod http_support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use http_support::*;
use meshgate::http::HttpConfig;
use meshgate::model::EntrypointKind;

#[test]
#[ignore = "benchmark harness, run by hand"]
fn serve_for_wrk() {
    let secs: u64 = std::env::var("MG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    // The backend gets its own thread and runtime, so the proxy's single thread is measured
    // alone (HAProxy runs with nbthread 1 against the same backend).
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:18081")
                .await
                .unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"hello from the backend\n"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut s = Setup::new(EntrypointKind::Http);
        s.service("bench", &["127.0.0.1:18081".parse().unwrap()]);
        s.router("bench", "PathPrefix(`/`)", "bench", 0);
        let proxy = Proxy::start_at(&s.0, "web", HttpConfig::default(), "127.0.0.1:18080").await;
        eprintln!("proxy on {} for {secs}s", proxy.addr);
        tokio::time::sleep(Duration::from_secs(secs)).await;
    });
}
