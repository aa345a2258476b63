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
