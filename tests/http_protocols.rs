//! HTTP/2 (h2c) on both legs, gRPC-like bidirectional streaming with trailers, WebSocket.

mod http_support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use http_support::*;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::http::HttpConfig;
use meshgate::model::{EntrypointKind, HttpUpstream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

type ChannelBody =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(8);
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (Ok(f), rx)) },
        );
    (tx, StreamBody::new(stream.boxed()))
}

/// h2c backend echoing each request data frame as it arrives, then `grpc-status: 0` trailers.
async fn grpc_echo_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                assert_eq!(req.version(), http::Version::HTTP_2);
                let (tx, body) = channel_body();
                let mut incoming = req.into_body();
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = incoming.frame().await {
                        if let Ok(data) = frame.into_data() {
                            let _ = tx.send(Frame::data(data)).await;
                        }
                    }
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let _ = tx.send(Frame::trailers(trailers)).await;
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/grpc")
                        .body(body)
                        .unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

#[tokio::test]
async fn h2c_on_both_legs() {
    let a = backend("a").await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("a", &[a]).http_upstream = HttpUpstream::H2c;
    s.router("all", "Host(`a.example`)", "a", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let h2: TestClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // The client connects by URI; the routing host travels in the Host header.
    let req = Request::get(format!("http://{}/x", proxy.addr))
        .header("host", "a.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (st, _, body) = send(&h2, req).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        body.contains("/x HTTP/2.0\n"),
        "backend leg must be h2: {body}"
    );
}

#[tokio::test]
async fn grpc_bidirectional_streaming_with_trailers() {
    let backend = grpc_echo_backend().await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("grpc", &[backend]).http_upstream = HttpUpstream::H2c;
    s.router(
        "grpc",
        "Host(`grpc.example`) && PathPrefix(`/echo.Echo/`)",
        "grpc",
        0,
    );
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;

    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, body) = channel_body();
    let req = Request::post("http://grpc.example/echo.Echo/Chat")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(STEP, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut rx = resp.into_body();
    // Each message comes back before the next is sent: nothing is buffered on the way.
    for msg in ["ping-1", "ping-2", "ping-3"] {
        tx.send(Frame::data(Bytes::from(msg))).await.unwrap();
        let frame = tokio::time::timeout(STEP, rx.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), msg);
    }
    drop(tx);
    let trailers = loop {
        let frame = tokio::time::timeout(STEP, rx.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn websocket_through_the_proxy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("ws", &[ws_backend]);
    s.router("ws", "Host(`ws.example`)", "ws", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::client_async("ws://ws.example/chat", tcp),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "meshgate"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

/// A raw HTTP/1.1 backend: `/chunked` streams 1 MiB in 64 KiB chunks, anything else gets a
/// 2 MiB `Content-Length` body written in pieces. Counts its connections.
async fn bulk_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&conns);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let piece = vec![b'x'; 64 * 1024];
                    if head.starts_with("GET /chunked ") {
                        s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await
                            .unwrap();
                        for _ in 0..16 {
                            s.write_all(b"10000\r\n").await.unwrap();
                            s.write_all(&piece).await.unwrap();
                            s.write_all(b"\r\n").await.unwrap();
                        }
                        s.write_all(b"0\r\n\r\n").await.unwrap();
                    } else {
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2097152\r\n\r\n")
                            .await
                            .unwrap();
                        for _ in 0..32 {
                            s.write_all(&piece).await.unwrap();
                        }
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// HTTP/2 clients of HTTP/1.1 endpoints go through meshgate's own upstream client: long
/// bodies (length-delimited and chunked) stream through whole, connections are reused, and
/// hop-by-hop response headers stay behind.
#[tokio::test]
async fn h2_client_to_http1_upstream_streams_and_reuses() {
    let (bulk, conns) = bulk_backend().await;
    let named = backend("named").await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("bulk", &[bulk]);
    s.service("named", &[named]);
    s.router("bulk", "Host(`bulk.example`)", "bulk", 0);
    s.router("named", "Host(`named.example`)", "named", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let h2: TestClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for i in 0..6 {
        let path = if i % 2 == 0 { "/chunked" } else { "/length" };
        let (st, headers, body) = send(&h2, get(&proxy.url(path), "bulk.example")).await;
        assert_eq!(st, 200);
        assert!(headers.get("transfer-encoding").is_none());
        let want = if i % 2 == 0 { 1 << 20 } else { 2 << 20 };
        assert_eq!(body.len(), want, "{path}");
        assert!(body.bytes().all(|b| b == b'x'));
    }
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests share one upstream connection"
    );
    let (st, headers, body) = send(&h2, get(&proxy.url("/h"), "named.example")).await;
    assert_eq!(st, 200);
    assert!(body.starts_with("named\nGET /h HTTP/1.1\n"), "{body}");
    // A plain HTTP/2 request: Host from :authority once, and every forwarding header.
    assert_eq!(body.matches("\nhost: named.example\n").count(), 1, "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(body.contains("x-forwarded-host: named.example\n"), "{body}");
    assert!(
        body.contains("forwarded: for=127.0.0.1;proto=http;host=\"named.example\"\n"),
        "{body}"
    );
    assert_eq!(headers["x-backend"], "named");
    assert!(headers.get("x-private").is_none() && headers.get("keep-alive").is_none());
}

/// A proxy routing everything to a `backend("named")`, and an h2c client connection (prior
/// knowledge) to it, driven in the background: the request handle and the connection's end.
async fn h2_proxy() -> (
    Proxy,
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let named = backend("named").await;
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("named", &[named]);
    s.router("named", "PathPrefix(`/`)", "named", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    (proxy, send, tokio::spawn(conn))
}

/// The whole of an h2 response: status and body as text (its receive window released).
async fn h2_response(resp: h2::client::ResponseFuture) -> (u16, String) {
    let resp = tokio::time::timeout(STEP, resp)
        .await
        .expect("response in time")
        .expect("response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(STEP, body.data())
        .await
        .expect("body in time")
    {
        let chunk = chunk.expect("body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// meshgate's own HTTP/2 loop serves the streams of one connection together: many GETs and
/// uploads larger than the 1 MiB receive windows (released as the upstream takes the data),
/// each answered on its own stream.
#[tokio::test]
async fn h2_streams_of_one_connection_are_served_together() {
    let (_proxy, mut send, conn) = h2_proxy().await;
    const UPLOAD: usize = 3 << 20;
    let mut pending = Vec::new();
    for i in 0..46 {
        send = tokio::time::timeout(STEP, send.ready())
            .await
            .expect("stream slot in time")
            .unwrap();
        let upload = i % 8 == 7;
        let req = Request::builder()
            .method(if upload { "POST" } else { "GET" })
            .uri(format!("http://a.example/s{i}"))
            .body(())
            .unwrap();
        let (resp, mut body) = send.send_request(req, !upload).unwrap();
        if upload {
            body.send_data(Bytes::from(vec![b'u'; UPLOAD]), true)
                .unwrap();
        }
        pending.push((i, upload, resp));
    }
    for (i, upload, resp) in pending {
        let (status, body) = h2_response(resp).await;
        assert_eq!(status, 200, "{body}");
        let method = if upload { "POST" } else { "GET" };
        assert!(
            body.starts_with(&format!("named\n{method} /s{i} HTTP/1.1\n")),
            "stream {i}: {body}"
        );
        let bytes = if upload { UPLOAD } else { 0 };
        assert!(
            body.contains(&format!("body-bytes: {bytes}\n")),
            "stream {i}: {body}"
        );
    }
    drop(send);
    let _ = tokio::time::timeout(STEP, conn).await;
}

/// A stream reset by the client ends only that stream; a graceful stop (GOAWAY) lets the
/// streams in flight finish, then the connection closes.
#[tokio::test]
async fn h2_reset_stream_and_graceful_stop() {
    let (proxy, mut send, conn) = h2_proxy().await;
    let get = |path: &str| {
        Request::get(format!("http://a.example{path}"))
            .body(())
            .unwrap()
    };
    // Reset while the upstream takes its time: the connection goes on.
    let (resp, mut stream) = send.send_request(get("/slow"), false).unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    assert!(tokio::time::timeout(STEP, resp).await.unwrap().is_err());
    send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(get("/after-reset"), true).unwrap();
    let (status, body) = h2_response(resp).await;
    assert_eq!(status, 200);
    assert!(body.contains("GET /after-reset HTTP/1.1\n"), "{body}");
    // Graceful stop with a slow request in flight: it is answered, then the connection ends.
    send = send.ready().await.unwrap();
    let (resp, _) = send.send_request(get("/slow"), true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.shutdown.cancel();
    let (status, body) = h2_response(resp).await;
    assert_eq!(status, 200);
    assert!(body.contains("GET /slow HTTP/1.1\n"), "{body}");
    drop(send);
    tokio::time::timeout(STEP, conn)
        .await
        .expect("connection closed after the stop")
        .unwrap()
        .expect("closed cleanly");
}
