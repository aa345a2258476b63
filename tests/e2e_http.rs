//! Black-box tests of the HTTP edge through the real `meshgate` binary: the config file is
//! rewritten while it runs, and real clients (hyper, tokio-rustls, tokio-tungstenite) check what
//! the new generation serves.
//!
//! - Reloading adds an entrypoint (its port opens without a restart) and a router, and removing
//!   them closes the port and drops the route.
//! - An invalid router change (rule syntax error, unknown service) is rejected whole: the old
//!   routes keep serving and the error shows in `GET /api/status`.
//! - HTTPS from the config's `http.certificates` picks the certificate by SNI, with ALPN h2;
//!   WebSocket upgrades pass through an http entrypoint.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Every step of a test is bounded by this.
const STEP: Duration = Duration::from_secs(10);

/// One HTTP/1.1 GET with a Host header through `addr`; status and body.
async fn get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(STEP, tx.send_request(req))
        .await
        .map_err(|_| std::io::Error::other("response timeout"))?
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
}

/// Retry `get` until it returns `want` (status, body) or `STEP` passes; panics with the last
/// answer and meshgate's log.
async fn get_until(mg: &Meshgate, addr: SocketAddr, host: &str, want: (u16, &str)) {
    let deadline = Instant::now() + STEP;
    loop {
        let got = get(addr, host, "/").await;
        if matches!(&got, Ok((s, b)) if *s == want.0 && b == want.1) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{host} on {addr}: want {want:?}, got {got:?}\n{}",
                mg.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `file` provider error shown by `/api/status`, if any.
async fn file_error(mg: &Meshgate) -> Option<String> {
    let body = mg.get("/api/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["provider_errors"]["file"].as_str().map(str::to_owned)
}

/// Wait until `/api/status` shows a file provider error; returns it.
async fn wait_file_error(mg: &Meshgate) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(e) = file_error(mg).await {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no provider error reported:\n{}",
            mg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn services(a: SocketAddr, b: SocketAddr) -> String {
    format!(
        "services:\n  svc-a:\n    http_port: 80\n    endpoints: [\"{a}\"]\n  svc-b:\n    http_port: 80\n    endpoints: [\"{b}\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_an_entrypoint_and_a_router() {
    let (ba, bb) = (Backend::http("alpha").await, Backend::http("beta").await);
    let (p1, p2) = (free_port(), free_port());
    let base = format!(
        "{}entrypoints:\n  web: {{ bind: \"127.0.0.1:{p1}\" }}\nrouters:\n  ra: {{ entrypoints: [web], rule: \"Host(`a.test`)\", service: svc-a }}\n",
        services(ba.addr, bb.addr)
    );
    let mg = Meshgate::start(&base).await;
    let (e1, e2) = (addr(p1), addr(p2));
    get_until(&mg, e1, "a.test", (200, "alpha")).await;
    let (status, _) = get(e1, "b.test", "/").await.unwrap();
    assert_eq!(status, 404, "b.test has no router yet");
    assert!(TcpStream::connect(e2).await.is_err(), "{e2} open too early");

    // Add entrypoint web2 and router rb on both entrypoints.
    let gen = mg.generation().await;
    let added = format!(
        "{}entrypoints:\n  web: {{ bind: \"127.0.0.1:{p1}\" }}\n  web2: {{ bind: \"127.0.0.1:{p2}\" }}\nrouters:\n  ra: {{ entrypoints: [web], rule: \"Host(`a.test`)\", service: svc-a }}\n  rb: {{ entrypoints: [web, web2], rule: \"Host(`b.test`)\", service: svc-b }}\n",
        services(ba.addr, bb.addr)
    );
    mg.rewrite(&added);
    mg.wait_generation_above(gen, STEP).await;
    get_until(&mg, e2, "b.test", (200, "beta")).await;
    get_until(&mg, e1, "b.test", (200, "beta")).await;
    assert_eq!(get(e1, "a.test", "/").await.unwrap(), (200, "alpha".into()));
    // ra is not on web2.
    assert_eq!(get(e2, "a.test", "/").await.unwrap().0, 404);
    let status = mg.get("/api/status").await.unwrap();
    assert!(
        status.contains(&format!("http://127.0.0.1:{p2}")),
        "{status}"
    );

    // Remove them again: the port closes, the route is gone, the rest keeps serving.
    let gen = mg.generation().await;
    mg.rewrite(&base);
    mg.wait_generation_above(gen, STEP).await;
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(e2).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{e2} still open:\n{}",
            mg.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    get_until(
        &mg,
        e1,
        "b.test",
        (404, "404 no route matches this host and path"),
    )
    .await;
    assert_eq!(get(e1, "a.test", "/").await.unwrap(), (200, "alpha".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_router_changes_keep_the_old_routes() {
    let (ba, bb) = (Backend::http("alpha").await, Backend::http("beta").await);
    let p = free_port();
    let ep = addr(p);
    let with_router = |rule: &str, service: &str| {
        format!(
            "{}entrypoints:\n  web: {{ bind: \"127.0.0.1:{p}\" }}\nrouters:\n  ra: {{ entrypoints: [web], rule: \"{rule}\", service: {service} }}\n",
            services(ba.addr, bb.addr)
        )
    };
    let mg = Meshgate::start(&with_router("Host(`a.test`)", "svc-a")).await;
    get_until(&mg, ep, "a.test", (200, "alpha")).await;
    let gen = mg.generation().await;

    // A rule with a syntax error (unclosed parenthesis).
    mg.rewrite(&with_router("Host(`a.test`", "svc-b"));
    let err = wait_file_error(&mg).await;
    assert!(err.contains("routers.ra") && err.contains("rule"), "{err}");
    assert_eq!(
        mg.generation().await,
        gen,
        "a rejected file must not build a table"
    );
    assert_eq!(get(ep, "a.test", "/").await.unwrap(), (200, "alpha".into()));

    // A router naming a service that does not exist.
    mg.rewrite(&with_router("Host(`a.test`)", "svc-missing"));
    let deadline = Instant::now() + STEP;
    let err = loop {
        let e = wait_file_error(&mg).await;
        if e.contains("svc-missing") || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        err.contains("routers.ra") && err.contains("svc-missing"),
        "{err}"
    );
    assert_eq!(mg.generation().await, gen);
    assert_eq!(get(ep, "a.test", "/").await.unwrap(), (200, "alpha".into()));

    // A valid change clears the error and applies.
    mg.rewrite(&with_router("Host(`a.test`)", "svc-b"));
    mg.wait_generation_above(gen, STEP).await;
    get_until(&mg, ep, "a.test", (200, "beta")).await;
    assert_eq!(file_error(&mg).await, None);
}

/// A test CA (rcgen) issuing server certificates into meshgate's temp dir.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Write `<stem>.crt` / `<stem>.key` for `name`; returns the YAML entry for `http.certificates`.
    fn write(&self, dir: &std::path::Path, stem: &str, name: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        format!(
            "    - {{ cert: \"{}\", key: \"{}\" }}\n",
            c.display(),
            k.display()
        )
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.as_ref().der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sni_h2_and_websocket_through_the_binary() {
    let (ba, bb) = (Backend::http("alpha").await, Backend::http("beta").await);
    let ca = Ca::new();
    // The certificates must exist before meshgate starts: write them into a dir of our own.
    let dir = tempfile::tempdir().unwrap();
    let certs = ca.write(dir.path(), "a", "a.test") + &ca.write(dir.path(), "b", "b.test");
    let (ph, ps) = (free_port(), free_port());
    let mg = Meshgate::start(&format!(
        "{}entrypoints:\n  web: {{ bind: \"127.0.0.1:{ph}\" }}\n  websecure: {{ bind: \"127.0.0.1:{ps}\", kind: https }}\nrouters:\n  ra: {{ entrypoints: [web, websecure], rule: \"Host(`a.test`)\", service: svc-a }}\n  rb: {{ entrypoints: [websecure], rule: \"Host(`b.test`)\", service: svc-b }}\nhttp:\n  certificates:\n{certs}",
        services(ba.addr, bb.addr)
    ))
    .await;
    get_until(&mg, addr(ph), "a.test", (200, "alpha")).await;

    // SNI picks the certificate: each name verifies against the CA only with its own cert.
    for (name, want) in [("a.test", "alpha"), ("b.test", "beta")] {
        let tcp = TcpStream::connect(addr(ps)).await.unwrap();
        let tls = tokio::time::timeout(
            STEP,
            tokio_rustls::TlsConnector::from(ca.client(&[b"h2", b"http/1.1"]))
                .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp),
        )
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("TLS to {name}: {e}\n{}", mg.log_text()));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let leaf: CertificateDer<'_> = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert!(
            leaf.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name}: wrong certificate"
        );
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("https://{name}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(STEP, tx.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), format!("{want}\n").as_bytes());
    }

    // WebSocket through the http entrypoint: upgrade, then messages echoed both ways.
    let (mut ws, resp) = tokio::time::timeout(
        STEP,
        tokio_tungstenite::connect_async(
            Request::get(format!("ws://127.0.0.1:{ph}/ws"))
                .header("host", "a.test")
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header(
                    "sec-websocket-key",
                    tokio_tungstenite::tungstenite::handshake::client::generate_key(),
                )
                .body(())
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    for i in 0..5 {
        let text = format!("message {i} through meshgate");
        ws.send(Message::text(text.clone())).await.unwrap();
        let got = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got, Message::text(text));
    }
    ws.send(Message::binary(vec![7u8; 70_000])).await.unwrap();
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().len(), 70_000);
    ws.close(None).await.unwrap();
}
