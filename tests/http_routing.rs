//! HTTP/1.1 through the proxy over real sockets: routing, error statuses, limits, header
//! hygiene, retries, sticky cookies, redirect, access log.

mod http_support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use http_support::*;
use meshgate::http::{AccessLogConfig, HttpConfig, LogFormat};
use meshgate::model::EntrypointKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn routes_by_host_path_header_method_and_priority() {
    let (a, b, c, d) = (
        backend("a").await,
        backend("b").await,
        backend("c").await,
        backend("d").await,
    );
    let mut s = Setup::new(EntrypointKind::Http);
    for (n, addr) in [("a", a), ("b", b), ("c", c), ("d", d)] {
        s.service(n, &[addr]);
    }
    s.router("host", "Host(`x.example`)", "a", 0)
        .router(
            "api",
            "Host(`x.example`) && (PathPrefix(`/api`) || Method(`POST`))",
            "b",
            0,
        )
        .router("wild", "Host(`*.example`)", "c", 0)
        .router(
            "canary",
            "Header(`X-Canary`, `1`) && !Path(`/health`)",
            "d",
            0,
        )
        .router("low", "Host(`x.example`) && PathPrefix(`/api/low`)", "a", 1);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cl = client();
    let cases = [
        ("/", "x.example", None, "a"),
        ("/api/v1", "X.Example:8080", None, "b"),
        ("/api/low", "x.example", None, "b"), // explicit priority 1 loses to rule length
        ("/", "y.example", None, "c"),
        ("/", "other", Some("1"), "d"),
    ];
    for (path, host, canary, want) in cases {
        let mut req = get(&proxy.url(path), host);
        if let Some(v) = canary {
            req.headers_mut().insert("x-canary", v.parse().unwrap());
        }
        let (status, headers, _) = send(&cl, req).await;
        assert_eq!(status, 200, "{host}{path}");
        assert_eq!(headers["x-backend"], want, "{host}{path}");
    }
    let post = Request::post(proxy.url("/"))
        .header("host", "x.example")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (status, headers, body) = send(&cl, post).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-backend"], "b");
    assert!(body.contains("body-bytes: 5"), "{body}");

    let (status, _, body) = send(&cl, get(&proxy.url("/health"), "nobody.test")).await;
    assert_eq!(status, 404);
    assert_eq!(body, "404 no route matches this host and path\n");
}

#[tokio::test]
async fn error_statuses_per_failure_mode() {
    let slow = backend("slow").await;
    let dead = dead_addr().await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("empty", &[]);
    s.service("dead", &[dead]).retries = 0;
    s.service("slow", &[slow]).timeouts.response = Some(Duration::from_millis(300));
    s.router("empty", "Host(`empty`)", "empty", 0)
        .router("dead", "Host(`dead`)", "dead", 0)
        .router("slow", "Host(`slow`)", "slow", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cl = client();
    let (st, _, body) = send(&cl, get(&proxy.url("/"), "empty")).await;
    assert_eq!(
        (st.as_u16(), body.as_str()),
        (503, "503 no endpoint available for this service\n")
    );
    let (st, _, _) = send(&cl, get(&proxy.url("/"), "dead")).await;
    assert_eq!(st, 502);
    // The failed connect ejected the only endpoint: next request finds none available.
    let (st, _, _) = send(&cl, get(&proxy.url("/"), "dead")).await;
    assert_eq!(st, 503);
    let (st, _, body) = send(&cl, get(&proxy.url("/slow"), "slow")).await;
    assert_eq!(
        (st.as_u16(), body.as_str()),
        (504, "504 upstream response timed out\n")
    );
}

#[tokio::test]
async fn connect_timeout_is_504() {
    // A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    // connect hangs until meshgate's connect timeout (no traffic leaves the host).
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let full = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..3 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full)).await
        {
            fillers.push(s);
        }
    }
    let mut s = Setup::new(EntrypointKind::Http);
    let svc = s.service("full", &[full]);
    svc.timeouts.connect = Duration::from_millis(300);
    svc.retries = 0;
    s.router("full", "Host(`full`)", "full", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let (st, _, body) = send(&client(), get(&proxy.url("/"), "full")).await;
    assert_eq!(
        (st.as_u16(), body.as_str()),
        (504, "504 upstream connect timed out\n")
    );
    drop((fillers, sock));
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn slowloris_gets_408_and_huge_heads_get_431() {
    let a = backend("a").await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("a", &[a]);
    s.router("all", "PathPrefix(`/`)", "a", 0);
    s.entrypoint().header_read_timeout = Some(Duration::from_millis(300));
    s.entrypoint().max_headers = Some(20);
    s.entrypoint().max_header_bytes = Some(8192);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;

    let partial = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ", STEP).await;
    assert!(partial.starts_with("HTTP/1.1 408"), "{partial:?}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let out = raw_exchange(proxy.addr, many.as_bytes(), STEP).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");

    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(20_000)
    );
    let out = raw_exchange(proxy.addr, big.as_bytes(), STEP).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:?}");

    let ok = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        STEP,
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok:?}");
}

#[tokio::test]
async fn forwarding_headers_and_hop_by_hop() {
    let a = backend("a").await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("a", &[a]);
    s.router("all", "PathPrefix(`/`)", "a", 0);
    let untrusted = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    s.entrypoint().trusted_proxies = vec!["127.0.0.0/8".into()];
    let trusted = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cl = client();
    let req = |url: String| {
        Request::get(url)
            .header("host", "app.example")
            .header("x-forwarded-for", "203.0.113.9")
            .header("forwarded", "for=203.0.113.9")
            .header("connection", "x-drop-me")
            .header("x-drop-me", "1")
            .header("te", "trailers")
            .header("proxy-connection", "keep-alive")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (st, headers, body) = send(&cl, req(untrusted.url("/"))).await;
    assert_eq!(st, 200);
    assert!(body.contains("\nx-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(body.contains("\nx-forwarded-proto: http\n"), "{body}");
    assert!(body.contains("\nx-forwarded-host: app.example\n"), "{body}");
    assert!(
        body.contains("\nforwarded: for=127.0.0.1;proto=http;host=\"app.example\"\n"),
        "{body}"
    );
    assert!(body.contains("\nhost: app.example\n"), "{body}");
    assert!(body.contains("\nte: trailers\n"), "{body}");
    assert!(!body.contains("x-drop-me"), "{body}");
    assert!(!body.contains("proxy-connection"), "{body}");
    // Response hop-by-hop headers are gone too.
    assert!(headers.get("keep-alive").is_none());
    assert!(headers.get("x-private").is_none());

    let (_, _, body) = send(&cl, req(trusted.url("/"))).await;
    assert!(
        body.contains("\nx-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{body}"
    );
    assert!(
        body.contains(
            "\nforwarded: for=203.0.113.9, for=127.0.0.1;proto=http;host=\"app.example\"\n"
        ),
        "{body}"
    );
}

#[tokio::test]
async fn get_retries_on_another_endpoint_post_after_reset_does_not() {
    let live = backend("live").await;
    let dead = dead_addr().await;
    // A backend that reads the request head and closes without answering.
    let resetter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = resetter.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = resetter.accept().await else {
                continue;
            };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("pair", &[dead, live]);
    s.service("reset", &[reset_addr, live]);
    s.router("pair", "Host(`pair`)", "pair", 0)
        .router("reset", "Host(`reset`)", "reset", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cl = client();
    // Round robin starts on the dead endpoint; the retry goes to the live one.
    for _ in 0..4 {
        let (st, headers, _) = send(&cl, get(&proxy.url("/"), "pair")).await;
        assert_eq!(st, 200);
        assert_eq!(headers["x-backend"], "live");
    }
    // POST (bodyless, so it could be replayed) reaches the resetter: never retried.
    let mut saw_502 = false;
    for _ in 0..2 {
        let post = Request::post(proxy.url("/"))
            .header("host", "reset")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (st, _, _) = send(&cl, post).await;
        saw_502 |= st == 502;
    }
    assert!(
        saw_502,
        "a POST that reached the resetting endpoint must not be retried"
    );
    // GET after reset is idempotent: retried on the live endpoint.
    for _ in 0..2 {
        let (st, headers, _) = send(&cl, get(&proxy.url("/"), "reset")).await;
        assert_eq!(st, 200);
        assert_eq!(headers["x-backend"], "live");
    }
    assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn sticky_cookie_pins_an_endpoint() {
    let (a, b) = (backend("a").await, backend("b").await);
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("ab", &[a, b]).sticky_cookie = Some("mg".into());
    s.router("all", "PathPrefix(`/`)", "ab", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cl = client();
    let (_, headers, _) = send(&cl, get(&proxy.url("/"), "x")).await;
    let first = headers["x-backend"].to_str().unwrap().to_string();
    let cookie = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("mg=") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("127.0.0.1"),
        "cookie must not reveal the address: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    for _ in 0..6 {
        let mut req = get(&proxy.url("/"), "x");
        req.headers_mut()
            .insert("cookie", format!("other=1; {pair}").parse().unwrap());
        let (_, headers, _) = send(&cl, req).await;
        assert_eq!(headers["x-backend"], first.as_str());
        assert!(headers.get("set-cookie").is_none());
    }
    // The pinned endpoint leaves the pool: re-picked and the cookie is reset.
    let remaining = if first == "a" { b } else { a };
    s.service("ab", &[remaining]).sticky_cookie = Some("mg".into());
    proxy.update(&s.0);
    let mut req = get(&proxy.url("/"), "x");
    req.headers_mut().insert("cookie", pair.parse().unwrap());
    let (_, headers, _) = send(&cl, req).await;
    assert_ne!(headers["x-backend"], first.as_str());
    assert!(headers["set-cookie"].to_str().unwrap() != cookie);
}

#[tokio::test]
async fn redirect_to_https() {
    let mut s = Setup::new(EntrypointKind::Http);
    s.entrypoint().redirect_to_https = true;
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let (st, headers, _) = send(&client(), get(&proxy.url("/a/b?c=1"), "shop.example:8080")).await;
    assert_eq!(st, 308);
    assert_eq!(headers["location"], "https://shop.example/a/b?c=1");
}

#[tokio::test]
async fn access_log_lines() {
    let a = backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("a", &[a]);
    s.router("r", "Host(`a`)", "a", 0);
    let config = HttpConfig {
        access_log: AccessLogConfig {
            enabled: true,
            format: LogFormat::Json,
            path: Some(path.clone()),
            buffer: 16,
        },
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;
    let cl = client();
    send(&cl, get(&proxy.url("/p?q=1"), "a")).await;
    send(&cl, get(&proxy.url("/nothing"), "zzz")).await;
    let deadline = tokio::time::Instant::now() + STEP;
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let recs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2, "{lines}");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["path"], "/p?q=1");
    assert_eq!(recs[0]["router"], "r");
    assert_eq!(recs[0]["endpoint"], a.to_string());
    assert!(recs[0]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(recs[1]["status"], 404);
    assert_eq!(proxy.ctx.access_log.as_ref().unwrap().dropped(), 0);
}
