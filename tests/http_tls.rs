//! TLS: termination with SNI certificate selection, certificate reload, mTLS, passthrough by
//! SNI, and TLS (with ALPN h2) to upstreams.

mod http_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use http_support::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate::http::{CertFiles, HttpConfig};
use meshgate::model::{EntrypointKind, HttpUpstream};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    fn pem(&self) -> String {
        self.issuer.as_ref().pem()
    }
    fn der(&self) -> CertificateDer<'static> {
        self.issuer.as_ref().der().clone()
    }
    /// (cert PEM, key PEM, cert DER) for these SAN names (IPs become IP SANs).
    fn issue(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
    fn write(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> (CertFiles, CertificateDer<'static>, String) {
        let (cert, key, der) = self.issue(names);
        let files = CertFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, &key).unwrap();
        (files, der, key)
    }
}

fn client_config(
    ca: &Ca,
    alpn: &[&[u8]],
    client_cert: Option<(CertificateDer<'static>, String)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client_cert {
        Some((der, key)) => {
            let key = rustls_pemfile::private_key(&mut key.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(vec![der], key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(
        STEP,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timeout"))?
}

async fn served(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> CertificateDer<'static> {
    peer_cert(
        &tls_connect(addr, "site.example", Arc::clone(cfg))
            .await
            .unwrap(),
    )
}

fn peer_cert(s: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One HTTP/1.1 GET over an established TLS stream; returns status and body.
async fn get_over(stream: tokio_rustls::client::TlsStream<TcpStream>, host: &str) -> (u16, String) {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(STEP, tx.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn terminates_tls_with_sni_selection() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (a_files, a_der, _) = ca.write(dir.path(), "a", &["a.example"]);
    let (b_files, b_der, _) = ca.write(dir.path(), "b", &["*.b.example"]);
    let backend_addr = backend("app").await;
    let mut s = Setup::new(EntrypointKind::Https);
    s.service("app", &[backend_addr]);
    s.router("app", "PathPrefix(`/`)", "app", 0);
    let config = HttpConfig {
        certificates: vec![a_files, b_files],
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;

    let cfg = client_config(&ca, &[b"http/1.1"], None);
    let tls = tls_connect(proxy.addr, "x.b.example", Arc::clone(&cfg))
        .await
        .unwrap();
    assert_eq!(peer_cert(&tls), b_der);
    let (status, body) = get_over(tls, "x.b.example").await;
    assert_eq!(status, 200);
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    let tls = tls_connect(proxy.addr, "a.example", Arc::clone(&cfg))
        .await
        .unwrap();
    assert_eq!(peer_cert(&tls), a_der);
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    // ALPN h2 is offered, and TLS 1.2 works.
    let h2 = client_config(&ca, &[b"h2", b"http/1.1"], None);
    let tls = tls_connect(proxy.addr, "a.example", h2).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tls_connect(proxy.addr, "a.example", Arc::new(tls12))
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn certificates_reload_and_bad_files_keep_the_old_one() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (files, first, _) = ca.write(dir.path(), "site", &["site.example"]);
    let mut s = Setup::new(EntrypointKind::Https);
    s.service("app", &[backend("app").await]);
    s.router("app", "PathPrefix(`/`)", "app", 0);
    let config = HttpConfig {
        certificates: vec![files.clone()],
        cert_reload_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;
    let cfg = client_config(&ca, &[b"http/1.1"], None);
    assert_eq!(served(proxy.addr, &cfg).await, first);

    let (_, second, _) = ca.write(dir.path(), "site", &["site.example"]);
    let deadline = tokio::time::Instant::now() + STEP;
    while served(proxy.addr, &cfg).await != second {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&files.cert, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served(proxy.addr, &cfg).await,
        second,
        "a bad file must keep the old cert"
    );
}

#[tokio::test]
async fn mtls_rejects_without_client_cert_and_accepts_with_one() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (files, _, _) = ca.write(dir.path(), "api", &["api.example"]);
    let ca_file = dir.path().join("clients-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut s = Setup::new(EntrypointKind::Https);
    s.entrypoint().client_ca = Some(ca_file);
    s.service("app", &[backend("app").await]);
    s.router("app", "PathPrefix(`/`)", "app", 0);
    let config = HttpConfig {
        certificates: vec![files],
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;

    // Without a client certificate: the handshake (or, in TLS 1.3, the first read) fails.
    let anonymous = client_config(&ca, &[b"http/1.1"], None);
    if let Ok(mut tls) = tls_connect(proxy.addr, "api.example", anonymous).await {
        let _ = tls
            .write_all(b"GET / HTTP/1.1\r\nHost: api.example\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(r, Err(_) | Ok(0)),
            "anonymous client got data: {r:?}"
        );
    }

    let (_, client_key, client_der) = ca.issue(&["client.example"]);
    let with_cert = client_config(&ca, &[b"http/1.1"], Some((client_der, client_key)));
    let tls = tls_connect(proxy.addr, "api.example", with_cert)
        .await
        .unwrap();
    let (status, _) = get_over(tls, "api.example").await;
    assert_eq!(status, 200);
}

/// A TLS backend for `name` (its own certificate from `ca`) that greets each client after the
/// handshake with `greeting`, then closes, or with `hold`, keeps the connection open a minute.
async fn tls_backend(
    ca: &Ca,
    name: &str,
    greeting: &'static [u8],
    hold: bool,
) -> (std::net::SocketAddr, CertificateDer<'static>) {
    let (cert_pem, key_pem, der) = ca.issue(&[name]);
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(greeting).await;
                    if hold {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, der)
}

#[tokio::test]
async fn passthrough_routes_raw_tls_by_sni() {
    let ca = Ca::new();
    // A TLS backend (meshgate must not terminate): greets after its own handshake.
    let (db, db_der) = tls_backend(&ca, "db.example", b"hello from db", false).await;
    let mut s = Setup::new(EntrypointKind::TlsPassthrough);
    s.service("db", &[db]);
    s.router("db", "HostSNI(`db.example`)", "db", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let cfg = client_config(&ca, &[], None);
    let mut tls = tls_connect(proxy.addr, "db.example", Arc::clone(&cfg))
        .await
        .unwrap();
    assert_eq!(
        peer_cert(&tls),
        db_der,
        "the backend's own certificate, end to end"
    );
    let mut got = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"hello from db");
    // Unknown SNI: no router, the connection is closed.
    assert!(tls_connect(proxy.addr, "other.example", cfg).await.is_err());
}

#[tokio::test]
async fn https_upstream_with_alpn_h2() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert_pem, key_pem, _) = ca.issue(&["127.0.0.1"]);
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let body = format!("secure {:?}", req.version());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let mut s = Setup::new(EntrypointKind::Http);
    s.service("secure", &[up]).http_upstream = HttpUpstream::Https;
    s.router("secure", "PathPrefix(`/`)", "secure", 0);
    let config = HttpConfig {
        upstream_ca: Some(ca_file),
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;
    let (st, _, body) = send(&client(), get(&proxy.url("/"), "x")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body, "secure HTTP/2.0");
}

/// Read from `s` until what was read ends with `end` (bounded by `STEP` per read).
async fn read_until<S: tokio::io::AsyncRead + Unpin>(s: &mut S, end: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.ends_with(end) {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(STEP, s.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    got
}

/// The graceful stop reaches the connections outside the HTTP/1 fast path: on TLS HTTP/1.1
/// (hyper's connection) an idle keep-alive connection is closed and a request in flight
/// finishes; a passthrough tunnel is closed.
#[tokio::test]
async fn graceful_stop_reaches_tls_http1_and_passthrough() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().unwrap();
    let (files, _, _) = ca.write(dir.path(), "a", &["a.example"]);
    let mut s = Setup::new(EntrypointKind::Https);
    s.service("app", &[backend("app").await]);
    s.router("app", "PathPrefix(`/`)", "app", 0);
    let config = HttpConfig {
        certificates: vec![files],
        ..Default::default()
    };
    let proxy = Proxy::start(&s.0, "web", config).await;
    let cfg = client_config(&ca, &[b"http/1.1"], None);
    let mut idle = tls_connect(proxy.addr, "a.example", Arc::clone(&cfg))
        .await
        .unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: a.example\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut idle, b"body-bytes: 0\n").await;
    let mut busy = tls_connect(proxy.addr, "a.example", cfg).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nhost: a.example\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.shutdown.cancel();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(STEP, idle.read(&mut buf))
        .await
        .expect("the idle TLS connection is closed at the graceful stop");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "closed without a response: {n:?}"
    );
    let slow = read_until(&mut busy, b"body-bytes: 0\n").await;
    assert!(
        slow.starts_with(b"HTTP/1.1 200"),
        "the request in flight finished"
    );

    // Passthrough: a TLS backend that greets and then holds the connection open.
    let (db, _) = tls_backend(&ca, "db.example", b"hello", true).await;
    let mut s = Setup::new(EntrypointKind::TlsPassthrough);
    s.service("db", &[db]);
    s.router("db", "HostSNI(`db.example`)", "db", 0);
    let proxy = Proxy::start(&s.0, "web", HttpConfig::default()).await;
    let mut tunnel = tls_connect(proxy.addr, "db.example", client_config(&ca, &[], None))
        .await
        .unwrap();
    read_until(&mut tunnel, b"hello").await;
    proxy.shutdown.cancel();
    let n = tokio::time::timeout(STEP, tunnel.read(&mut buf))
        .await
        .expect("the tunnel is closed at the graceful stop");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}
