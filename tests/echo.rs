//! Black-box tests of the echo backend (`meshgate::echo` and the `meshgate-echo` binary) with real
//! sockets on 127.0.0.1 and real clients: tokio TCP/UDP, hyper's HTTP/1.1 and HTTP/2 clients,
//! tokio-tungstenite, rustls. The gRPC frames are parsed here independently of the server's
//! decoder so a bug shared by both cannot hide.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::echo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Every test is bounded: a hang is a failure, not a stuck CI job.
const TEST_DEADLINE: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_DEADLINE:?}"))
}

type TestBody = BoxBody<Bytes, Infallible>;

fn client(h2_only: bool) -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .build_http()
}

fn empty() -> TestBody {
    Empty::new().boxed()
}

fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).boxed()
}

async fn get(h2: bool, url: String) -> Response<Incoming> {
    let request = Request::get(url).body(empty()).unwrap();
    client(h2).request(request).await.expect("request failed")
}

async fn body_string(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn tcp_echo_survives_half_close() {
    let server = echo::start_tcp().await.unwrap();
    bounded("tcp half-close", async {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // Bigger than socket buffers, so the echo is still being written when the client's
        // EOF arrives.
        let sent: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = stream.split();
        let write = async {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut received = Vec::new();
        let read = rd.read_to_end(&mut received);
        let ((), read) = tokio::join!(write, read);
        read.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "echo differs from what was sent");
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn udp_echo_round_trip() {
    let server = echo::start_udp().await.unwrap();
    bounded("udp round trip", async {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(server.addr).await.unwrap();
        for payload in [&b"ping"[..], &[7u8; 1400][..]] {
            socket.send(payload).await.unwrap();
            let mut buf = [0u8; 2048];
            let len = socket.recv(&mut buf).await.unwrap();
            assert_eq!(&buf[..len], payload);
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn http1_get_root_names_backend() {
    let server = echo::start_http("alpha").await.unwrap();
    let response = bounded("GET /", get(false, format!("http://{}/", server.addr))).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.headers()["x-backend"], "alpha");
    assert_eq!(response.headers()[CONTENT_TYPE], "text/plain");
    assert_eq!(body_string(response).await, "alpha\n");
    // Any other path answers the same way.
    let response = bounded(
        "GET /x",
        get(false, format!("http://{}/any/path", server.addr)),
    )
    .await;
    assert_eq!(body_string(response).await, "alpha\n");
    server.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let server = echo::start_http("beta").await.unwrap();
    let response = bounded("h2c GET /", get(true, format!("http://{}/", server.addr))).await;
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.headers()["x-backend"], "beta");
    assert_eq!(body_string(response).await, "beta\n");
    server.stop().await;
}

#[tokio::test]
async fn echo_describes_request() {
    let server = echo::start_http("gamma").await.unwrap();
    let request = Request::post(format!("http://{}/echo?a=1&b=2", server.addr))
        .header("x-custom", "one")
        .header("x-custom", "two")
        .header("x-forwarded-for", "192.0.2.7")
        .body(full("twelve bytes"))
        .unwrap();
    let response = bounded("POST /echo", client(false).request(request))
        .await
        .unwrap();
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
    assert_eq!(json["backend"], "gamma");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["uri"], "/echo?a=1&b=2");
    assert_eq!(json["query"], "a=1&b=2");
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(
        json["headers"]["x-custom"],
        serde_json::json!(["one", "two"])
    );
    assert_eq!(
        json["headers"]["x-forwarded-for"],
        serde_json::json!(["192.0.2.7"])
    );
    assert_eq!(json["body_len"], 12);
    assert_eq!(json["tls"], false);
    assert!(json["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    server.stop().await;
}

#[tokio::test]
async fn status_route_returns_requested_code() {
    let server = echo::start_http("delta").await.unwrap();
    for h2 in [false, true] {
        let response = bounded(
            "/status/503",
            get(h2, format!("http://{}/status/503", server.addr)),
        )
        .await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-backend"], "delta");
        assert_eq!(body_string(response).await, "503\n");
    }
    let response = bounded(
        "/status/204",
        get(false, format!("http://{}/status/204", server.addr)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    for bad in ["abc", "99", "100", "1000"] {
        let response = bounded(
            "bad status",
            get(false, format!("http://{}/status/{bad}", server.addr)),
        )
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "/status/{bad}");
    }
    server.stop().await;
}

#[tokio::test]
async fn delay_route_waits() {
    let server = echo::start_http("eps").await.unwrap();
    let started = Instant::now();
    let response = bounded(
        "/delay/300",
        get(false, format!("http://{}/delay/300", server.addr)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.stop().await;
}

#[tokio::test]
async fn stream_route_sends_chunks_as_they_are_made() {
    let server = echo::start_http("zeta").await.unwrap();
    for h2 in [false, true] {
        let started = Instant::now();
        let url = format!("http://{}/stream/3?delay_ms=500", server.addr);
        let mut body = bounded("/stream", get(h2, url)).await.into_body();
        let mut received = Vec::new();
        let mut first_data_at = None;
        bounded("stream body", async {
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    first_data_at.get_or_insert_with(|| started.elapsed());
                    received.extend_from_slice(&data);
                }
            }
        })
        .await;
        let total = started.elapsed();
        // The response takes ≥ 1 s (two 500 ms pauses); a buffered one would deliver its
        // first byte only then.
        assert!(total >= Duration::from_millis(1000), "total {total:?}");
        let first = first_data_at.unwrap();
        assert!(
            first < Duration::from_millis(800),
            "first chunk at {first:?}"
        );
        assert_eq!(received.len(), 3 * 1024);
        assert!(received[..1024].iter().all(|b| *b == b'a'));
        assert!(received[2048..].iter().all(|b| *b == b'c'));
    }
    server.stop().await;
}

#[tokio::test]
async fn upload_counts_streamed_body() {
    let server = echo::start_http("eta").await.unwrap();
    for h2 in [false, true] {
        // 64 chunks of 16 KiB sent through a channel: the body has no known length.
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let feed = tokio::spawn(async move {
            for _ in 0..64 {
                tx.send(Bytes::from(vec![1u8; 16 * 1024])).await.unwrap();
            }
        });
        let request = Request::post(format!("http://{}/upload", server.addr))
            .body(channel_body(rx))
            .unwrap();
        let response = bounded("/upload", client(h2).request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_string(response).await, "1048576\n");
        feed.await.unwrap();
    }
    server.stop().await;
}

fn channel_body(mut rx: mpsc::Receiver<Bytes>) -> TestBody {
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|data| data.map(|data| Ok::<_, Infallible>(Frame::data(data))))
    });
    BodyExt::boxed(StreamBody::new(frames))
}

#[tokio::test]
async fn websocket_echoes_text_and_binary() {
    let server = echo::start_http("theta").await.unwrap();
    bounded("websocket", async {
        let url = format!("ws://{}/ws", server.addr);
        let (mut socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["x-backend"], "theta");
        let sent = [
            WsMessage::text("hello"),
            WsMessage::binary(vec![0u8, 1, 2, 255]),
            WsMessage::text("x".repeat(100_000)),
        ];
        for message in sent {
            socket.send(message.clone()).await.unwrap();
            let echoed = socket.next().await.unwrap().unwrap();
            assert_eq!(echoed, message);
        }
        socket.close(None).await.unwrap();
        // The server completes the close handshake, then the stream ends.
        while let Some(message) = socket.next().await {
            if message.is_err() {
                break;
            }
        }
    })
    .await;
    // A plain GET to /ws is not an upgrade.
    let response = bounded("GET /ws", get(false, format!("http://{}/ws", server.addr))).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}

/// Frames `payload` as a gRPC message (flag 0, big-endian length).
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}

/// Reads gRPC messages and then the trailers from a response body.
struct GrpcReader {
    body: Incoming,
    buf: BytesMut,
}

enum GrpcItem {
    Message(Bytes),
    Trailers(HeaderMap),
}

impl GrpcReader {
    async fn next(&mut self) -> GrpcItem {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_u32() as usize;
                if self.buf.len() >= 5 + len {
                    assert_eq!(self.buf[0], 0, "compressed flag");
                    let mut message = self.buf.split_to(5 + len);
                    message.advance(5);
                    return GrpcItem::Message(message.freeze());
                }
            }
            let frame = self
                .body
                .frame()
                .await
                .expect("body ended before trailers")
                .unwrap();
            match frame.into_data() {
                Ok(data) => self.buf.extend_from_slice(&data),
                Err(frame) => {
                    assert!(self.buf.is_empty(), "trailers inside a message");
                    return GrpcItem::Trailers(frame.into_trailers().unwrap());
                }
            }
        }
    }

    async fn message(&mut self) -> Bytes {
        match self.next().await {
            GrpcItem::Message(message) => message,
            GrpcItem::Trailers(trailers) => panic!("expected a message, got trailers {trailers:?}"),
        }
    }

    async fn trailers(&mut self) -> HeaderMap {
        match self.next().await {
            GrpcItem::Trailers(trailers) => trailers,
            GrpcItem::Message(message) => panic!("expected trailers, got message {message:?}"),
        }
    }
}

fn grpc_request(addr: std::net::SocketAddr, method: &str, body: TestBody) -> Request<TestBody> {
    Request::post(format!("http://{addr}/meshgate.Echo/{method}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn grpc_unary_echoes_one_message() {
    let server = echo::start_http("iota").await.unwrap();
    bounded("grpc unary", async {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let request = grpc_request(server.addr, "Unary", full(grpc_frame(&payload)));
        let response = client(true).request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        let mut reader = GrpcReader {
            body: response.into_body(),
            buf: BytesMut::new(),
        };
        assert_eq!(reader.message().await, payload);
        assert_eq!(reader.trailers().await["grpc-status"], "0");
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn grpc_stream_echoes_each_message_while_client_sends() {
    let server = echo::start_http("kappa").await.unwrap();
    bounded("grpc bidi", async {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let request = grpc_request(server.addr, "Stream", channel_body(rx));
        let response = client(true).request(request).await.unwrap();
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        let mut reader = GrpcReader {
            body: response.into_body(),
            buf: BytesMut::new(),
        };
        // Each reply is awaited before the next message is sent: only a server that echoes as
        // messages arrive (not after end of stream) can pass.
        for i in 0..5u8 {
            let payload = vec![i; 10 + usize::from(i) * 1000];
            let framed = grpc_frame(&payload);
            // Split the message over two DATA frames to exercise reassembly.
            tx.send(framed.slice(..3)).await.unwrap();
            tx.send(framed.slice(3..)).await.unwrap();
            assert_eq!(reader.message().await, payload, "message {i}");
        }
        // Empty payloads are messages too.
        tx.send(grpc_frame(b"")).await.unwrap();
        assert_eq!(reader.message().await, Bytes::new());
        drop(tx);
        assert_eq!(reader.trailers().await["grpc-status"], "0");
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn grpc_errors_are_reported_as_grpc_status() {
    let server = echo::start_http("lambda").await.unwrap();
    bounded("grpc errors", async {
        // Unknown method: trailers-only response with UNIMPLEMENTED.
        let request = grpc_request(server.addr, "Nope", full(grpc_frame(b"x")));
        let response = client(true).request(request).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "12");
        // Stream cut inside a message: INTERNAL in the trailers.
        let request = grpc_request(
            server.addr,
            "Stream",
            full(grpc_frame(b"abcdef").slice(..7)),
        );
        let response = client(true).request(request).await.unwrap();
        let mut reader = GrpcReader {
            body: response.into_body(),
            buf: BytesMut::new(),
        };
        assert_eq!(reader.trailers().await["grpc-status"], "13");
        // Wrong content type: plain HTTP 415.
        let request = Request::post(format!("http://{}/meshgate.Echo/Unary", server.addr))
            .body(full("x"))
            .unwrap();
        let response = client(true).request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn https_negotiates_h2_and_reports_tls() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let server_tls = echo::tls_config_from_pem(&cert_path, &key_path).unwrap();
    let server = echo::start_https("mu", Arc::new(server_tls)).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls));

    bounded("https", async {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = Request::get("https://localhost/echo")
            .body(empty())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.headers()["x-backend"], "mu");
        let json: serde_json::Value = serde_json::from_str(&body_string(response).await).unwrap();
        assert_eq!(json["tls"], true);
        assert_eq!(json["version"], "HTTP/2.0");
        assert_eq!(json["authority"], "localhost");
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn http_stop_drains_and_closes_listener() {
    let server = echo::start_http("nu").await.unwrap();
    let addr = server.addr;
    // An in-flight slow request finishes (early, with 503) instead of holding shutdown.
    let slow = tokio::spawn(get(false, format!("http://{addr}/delay/60000")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    bounded("stop", server.stop()).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stop took {:?}",
        started.elapsed()
    );
    let response = bounded("slow request", slow).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open after stop"
    );
}

#[tokio::test]
async fn binary_announces_listeners_and_exits_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshgate-echo"))
        .args([
            "--name",
            "xi",
            "--http",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--udp",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut announced = std::collections::HashMap::new();
    bounded("listening lines", async {
        while announced.len() < 3 {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("stdout closed early");
            let mut words = line.split(' ');
            assert_eq!(words.next(), Some("listening"), "line {line:?}");
            let kind = words.next().unwrap().to_owned();
            let addr: std::net::SocketAddr = words.next().unwrap().parse().unwrap();
            announced.insert(kind, addr);
        }
    })
    .await;
    let response = bounded(
        "GET /",
        get(false, format!("http://{}/", announced["http"])),
    )
    .await;
    assert_eq!(body_string(response).await, "xi\n");
    let mut tcp = TcpStream::connect(announced["tcp"]).await.unwrap();
    tcp.write_all(b"abc").await.unwrap();
    let mut buf = [0u8; 3];
    bounded("tcp echo", tcp.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"abc");

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = bounded("exit after SIGTERM", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
