//! The echo HTTP server: accept loop, optional TLS, and one task per downstream connection serving
//! HTTP/1.1 or h2c (prior knowledge, detected from the connection preface) with the same routes.
//!
//! Shutdown: cancelling the token stops the accept loop and asks every connection for a graceful
//! shutdown (HTTP/1.1 closes after the in-flight response, HTTP/2 sends GOAWAY). Connections get
//! [`DRAIN_GRACE`] to finish, then are aborted, so a slow `/delay` or `/stream` cannot hold the
//! process forever.

use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::routes::{self, Backend, Downstream};
use super::{EchoError, ACCEPT_BACKOFF};

/// How long open connections may keep running after shutdown is requested. Long enough for any
/// ordinary in-flight request, short enough that a test or `docker stop` does not wait on a
/// client that keeps a stream open.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A TLS client that has not finished its handshake by then is dropped: it holds a task and a
/// socket, and no legitimate client on loopback or a LAN needs longer.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the echo routes over plain HTTP/1.1 and h2c on `listener` until `shutdown`.
///
/// `name` is this backend's identity: the body of `GET /` and the `x-backend` header of every
/// response, so tests can tell which endpoint meshgate picked.
pub async fn http(listener: TcpListener, name: String, shutdown: CancellationToken) {
    let backend = Arc::new(Backend::new(name, shutdown.clone()));
    serve(listener, backend, None, shutdown).await;
}

/// Same service as [`http`] behind TLS. ALPN offers `h2` and `http/1.1` unless `tls` already sets
/// its own protocol list.
pub async fn https(
    listener: TcpListener,
    name: String,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let tls = if tls.alpn_protocols.is_empty() {
        let mut config = (*tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    } else {
        tls
    };
    let backend = Arc::new(Backend::new(name, shutdown.clone()));
    serve(listener, backend, Some(TlsAcceptor::from(tls)), shutdown).await;
}

/// Builds a TLS server config (ring provider, ALPN h2 + http/1.1) from PEM files.
pub fn tls_config_from_pem(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, EchoError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EchoError::ReadPem { path, source }
    };
    let mut cert_reader = BufReader::new(File::open(cert).map_err(read_error(cert))?);
    let chain = rustls_pemfile::certs(&mut cert_reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error(cert))?;
    let mut key_reader = BufReader::new(File::open(key).map_err(read_error(key))?);
    let private_key = rustls_pemfile::private_key(&mut key_reader)
        .map_err(read_error(key))?
        .ok_or_else(|| EchoError::NoPrivateKey {
            path: key.to_path_buf(),
        })?;
    // Explicit provider: rcgen or another crate enabling a second rustls backend must not make
    // the process-default lookup ambiguous.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve(
    listener: TcpListener,
    backend: Arc<Backend>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // Reap finished connections so the set does not grow with every request.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(connection(
                        stream,
                        peer,
                        backend.clone(),
                        tls.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(error) => {
                    warn!(%error, "http echo accept failed, backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = conns.len(),
            "http echo drain deadline passed, aborting connections"
        );
        conns.shutdown().await;
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    backend: Arc<Backend>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        let downstream = Downstream { peer, tls: false };
        return serve_io(stream, backend, downstream, shutdown).await;
    };
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return,
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return debug!(%peer, %error, "tls handshake failed"),
            Err(_) => return debug!(%peer, "tls handshake timed out"),
        },
    };
    let downstream = Downstream { peer, tls: true };
    serve_io(stream, backend, downstream, shutdown).await;
}

async fn serve_io<IO>(
    io: IO,
    backend: Arc<Backend>,
    downstream: Downstream,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = service_fn(move |request| {
        let backend = backend.clone();
        async move {
            Ok::<_, std::convert::Infallible>(routes::handle(request, &backend, downstream).await)
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => {
            if let Err(error) = done {
                debug!(peer = %downstream.peer, %error, "http echo connection ended with error");
            }
            return;
        }
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(error) = conn.await {
        debug!(peer = %downstream.peer, %error, "http echo connection failed while draining");
    }
}
