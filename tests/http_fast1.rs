//! The HTTP/1.1 fast path (`meshgate::http::fast1`) over real sockets, byte for byte: response
//! framings (length, chunked with extensions and trailers, until close, HEAD, 1xx, 204),
//! pipelining, streamed request bodies, header hygiene, pooled connections closed by the
//! endpoint, and the hand-off to hyper for what the fast path does not take.

mod http_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_support::*;
use meshgate::http::HttpConfig;
use meshgate::model::EntrypointKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A scripted HTTP/1.1 endpoint: answers each request head (bodies are not read) with the
/// canned bytes for its path (`/slow` after 700 ms); `/close` answers until close; with `one_shot` every connection
/// is closed after one answer (without saying so). Returns its address and accept count.
async fn scripted(one_shot: bool) -> (SocketAddr, Arc<AtomicUsize>) {
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
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let mut line = head.split_whitespace();
                    let method = line.next().unwrap_or("").to_string();
                    let target = line.next().unwrap_or("");
                    let path = target.split('?').next().unwrap_or("").to_string();
                    let reply: Vec<u8> = match (method.as_str(), path.as_str()) {
                        ("HEAD", _) => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
                        (_, "/chunked") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n".to_vec(),
                        (_, "/early") => b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        (_, "/close") => b"HTTP/1.0 200 OK\r\nx-a: 1\r\n\r\nuntil close".to_vec(),
                        (_, "/badchunk") => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX".to_vec(),
                        (_, "/hugehead") => {
                            let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
                            for i in 0..4000 {
                                r.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(20)).as_bytes());
                            }
                            r.extend_from_slice(b"content-length: 0\r\n\r\n");
                            r
                        }
                        (_, "/headers") => {
                            let body = head.to_ascii_lowercase();
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: x-private, keep-alive\r\nx-private: 1\r\nkeep-alive: timeout=5\r\n\r\n{body}", body.len()).into_bytes()
                        }
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
                    };
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                    }
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    if path == "/close" || one_shot {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn proxy_to(addr: SocketAddr) -> Proxy {
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("svc", &[addr]);
    s.router("r", "PathPrefix(`/`)", "svc", 0);
    Proxy::start(&s.0, "web", HttpConfig::default()).await
}

/// Write `req` on a new connection and read until the proxy closes it.
async fn exchange_until_close(proxy: SocketAddr, req: &[u8]) -> String {
    let mut c = TcpStream::connect(proxy).await.unwrap();
    c.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, c.read_to_end(&mut out))
        .await
        .expect("proxy closes in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Read from `c` until `n` bytes came.
async fn read_n(c: &mut TcpStream, n: usize) -> String {
    let mut out = vec![0u8; n];
    tokio::time::timeout(STEP, c.read_exact(&mut out))
        .await
        .expect("response in time")
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn pipelined_requests_keep_every_framing_byte_for_byte() {
    let (be, accepted) = scripted(false).await;
    let proxy = proxy_to(be).await;
    let req = "GET /len HTTP/1.1\r\nhost: a\r\n\r\n\
               GET /chunked HTTP/1.1\r\nhost: a\r\n\r\n\
               HEAD /len HTTP/1.1\r\nhost: a\r\n\r\n\
               GET /early HTTP/1.1\r\nhost: a\r\n\r\n\
               GET /close HTTP/1.1\r\nhost: a\r\n\r\n";
    let out = exchange_until_close(proxy.addr, req.as_bytes()).await;
    let expected = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\
        HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n\
        HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n\
        HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
        HTTP/1.1 200 OK\r\nx-a: 1\r\nconnection: close\r\n\r\nuntil close";
    assert_eq!(out, expected);
    // The first four went over one upstream connection; /close's was reused too, then closed.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn headers_are_rewritten_both_ways() {
    let (be, _) = scripted(false).await;
    let proxy = proxy_to(be).await;
    let req = "GET /headers?q=1 HTTP/1.1\r\nHost: Shop.Example:8080\r\nConnection: x-hop\r\nX-Hop: 1\r\n\
               Keep-Alive: 5\r\nTE: trailers, deflate\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\
               X-Forwarded-Proto: https\r\nX-Keep: yes\r\n\r\n";
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    let text = loop {
        let n = tokio::time::timeout(STEP, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let t = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = t.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if body.len() >= len {
                break t;
            }
        }
    };
    let (head, upstream) = text.split_once("\r\n\r\n").unwrap();
    // Response: hop-by-hop headers (and those Connection names) are gone.
    assert!(!head.contains("x-private"), "{head}");
    assert!(!head.contains("keep-alive"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection"), "{head}");
    // Request as the endpoint saw it.
    assert!(
        upstream.starts_with("get /headers?q=1 http/1.1\r\n"),
        "{upstream}"
    );
    for want in [
        "host: shop.example:8080\r\n",
        "x-keep: yes\r\n",
        "te: trailers\r\n",
        "x-forwarded-for: 127.0.0.1\r\n",
        "x-forwarded-proto: http\r\n",
        "x-forwarded-host: shop.example:8080\r\n",
        "forwarded: for=127.0.0.1;proto=http;host=\"shop.example:8080\"\r\n",
    ] {
        assert!(upstream.contains(want), "missing {want:?} in {upstream}");
    }
    for gone in [
        "x-hop",
        "keep-alive",
        "6.6.6.6",
        "https",
        "deflate",
        "connection",
    ] {
        assert!(!upstream.contains(gone), "{gone:?} leaked into {upstream}");
    }
}

#[tokio::test]
async fn request_bodies_stream_with_both_framings() {
    let be = backend("a").await;
    let proxy = proxy_to(be).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    // A Content-Length body larger than any buffer, written in pieces.
    let size = 300_000;
    c.write_all(
        format!("POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: {size}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let piece = vec![b'x'; 10_000];
    for _ in 0..size / piece.len() {
        c.write_all(&piece).await.unwrap();
    }
    // Then a chunked one on the same connection, split mid-chunk.
    c.write_all(b"POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nab")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(
        b"cd\r\n3\r\nefg\r\n0\r\n\r\nGET /last HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    assert!(out.contains(&format!("body-bytes: {size}\n")), "{out}");
    assert!(out.contains("body-bytes: 7\n"), "{out}");
    assert!(out.contains("GET /last HTTP/1.1"), "{out}");
}

#[tokio::test]
async fn endpoint_closing_pooled_connections_costs_no_error() {
    let (be, accepted) = scripted(true).await;
    let proxy = proxy_to(be).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    for (i, method) in ["GET", "POST", "GET", "DELETE"].iter().enumerate() {
        if i % 2 == 1 {
            // Let the endpoint's FIN arrive while the connection sits in the pool.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let req = format!("{method} /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let expected = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(
            read_n(&mut c, expected.len()).await,
            expected,
            "request {i}"
        );
    }
    assert!(accepted.load(Ordering::SeqCst) >= 4);
}

#[tokio::test]
async fn broken_upstream_framing_and_huge_heads() {
    let (be, _) = scripted(false).await;
    let proxy = proxy_to(be).await;
    // A response head over the limit is a 502 and the client may go on.
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /hugehead HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let head = read_n(&mut c, 24).await;
    assert_eq!(head, "HTTP/1.1 502 Bad Gateway");
    // A bad chunk in the first bytes: 502 and the client connection is closed.
    let out = exchange_until_close(proxy.addr, b"GET /badchunk HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{out}");
    assert!(!out.contains("hello"), "{out}");
}

#[tokio::test]
async fn no_route_keeps_the_connection_and_bad_heads_close_it() {
    let (be, _) = scripted(false).await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("svc", &[be]);
    s.router("r", "Host(`a`)", "svc", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let out = exchange_until_close(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: nope\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nhello"), "{out}");
    let out = exchange_until_close(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    let out = exchange_until_close(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
}

#[tokio::test]
async fn what_the_fast_path_does_not_take_goes_to_hyper() {
    let be = backend("a").await;
    let proxy = proxy_to(be).await;
    // HTTP/1.0 without Host, Expect: 100-continue: answered by the hyper path.
    let out = exchange_until_close(proxy.addr, b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
    assert!(out.contains("GET /ten HTTP/1.1"), "{out}");
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET /one HTTP/1.1\r\nhost: a\r\n\r\nPOST /two HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Send the body once the 100 Continue came, then read to the end.
    loop {
        let n = tokio::time::timeout(STEP, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains("100 Continue") {
            break;
        }
    }
    c.write_all(b"hi").await.unwrap();
    tokio::time::timeout(STEP, c.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&got);
    assert!(out.contains("GET /one HTTP/1.1"), "{out}");
    assert!(out.contains("POST /two HTTP/1.1"), "{out}");
    assert!(out.contains("body-bytes: 2\n"), "{out}");
}

/// A connection's two stop signals: the graceful one closes an idle keep-alive connection at
/// once and leaves a request in flight alone; the hard one (a drain deadline) cuts that too.
#[tokio::test]
async fn graceful_stop_closes_idle_connections_and_hard_stop_cuts_the_rest() {
    let (answers, _) = scripted(false).await;
    // An endpoint that accepts and never answers.
    let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("svc", &[answers]);
    s.service("hang", &[hang_addr]);
    s.router("r", "PathPrefix(`/`)", "svc", 0);
    s.router("h", "PathPrefix(`/hang`)", "hang", 100);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;

    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\nhello") {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(STEP, idle.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
    busy.write_all(b"GET /hang HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.shutdown.cancel();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(STEP, idle.read(&mut buf))
        .await
        .expect("the idle connection is closed at the graceful stop");
    assert_eq!(n.unwrap(), 0, "closed without a response");
    let waited = tokio::time::timeout(Duration::from_millis(500), busy.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "a request in flight outlives the graceful stop: {waited:?}"
    );

    proxy.hard_stop.cancel();
    let n = tokio::time::timeout(STEP, busy.read(&mut buf))
        .await
        .expect("the hard stop cuts the request in flight");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

/// A keep-alive connection's idle timer is made once and moved at each wait: a client that
/// comes back within the timeout each time keeps its connection well past the first deadline,
/// a response slower than the timeout (the timer fires while it is served) does not end the
/// connection, and an idle one is still closed once the timeout has passed.
#[tokio::test]
async fn keep_alive_idle_timer_moves_with_each_request() {
    let (be, _) = scripted(false).await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("svc", &[be]);
    s.router("r", "PathPrefix(`/`)", "svc", 0);
    s.entrypoint().header_read_timeout = Some(Duration::from_millis(400));
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;

    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let hello = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    let start = Instant::now();
    for path in ["/a", "/b", "/c", "/d", "/slow", "/e"] {
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_n(&mut c, hello.len()).await, hello, "{path}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(start.elapsed() > Duration::from_secs(2));
    // Idle for 250 ms already: closed (no response) about 150 ms from now.
    let idle = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(STEP, c.read(&mut buf))
        .await
        .expect("an idle connection is closed after its timeout");
    assert_eq!(n.unwrap(), 0, "closed without a response");
    let waited = idle.elapsed() + Duration::from_millis(250);
    assert!(
        waited >= Duration::from_millis(380),
        "closed after {waited:?} idle, before the 400 ms timeout"
    );
}
