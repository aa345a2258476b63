//! The project's own test backend: TCP echo, UDP echo and an HTTP/1.1 + h2c (+ TLS) server with
//! routes made for proxy tests (request introspection, status codes, delays, streaming, uploads,
//! WebSocket echo and a gRPC echo service).
//!
//! It sits outside the data path: integration tests, the demo config, the benchmark harness and
//! the Docker images run it as an upstream *endpoint* behind meshgate. The `meshgate-echo` binary
//! is a thin CLI over this module.
//!
//! Every server takes an already-bound socket (tests bind `127.0.0.1:0` and read the port back)
//! and a [`CancellationToken`]; it stops accepting when the token is cancelled and returns once
//! its connections are done (HTTP drains gracefully under a deadline, raw TCP/UDP stop at once).
//!
//! Layout:
//! - this file: raw TCP and UDP echo, [`EchoHandle`] and the `start_*` helpers for tests;
//! - [`http`]: accept loop, optional TLS, per-connection HTTP/1.1 + h2c serving and draining;
//! - [`routes`]: what each path answers;
//! - [`grpc`]: gRPC length-prefixed message framing and the echo streams;
//! - [`ws`]: the WebSocket upgrade and echo loop.

pub mod grpc;
pub mod http;
pub mod routes;
pub mod ws;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::http::{http, https, tls_config_from_pem};

/// Pause after a failed `accept()` before trying again. Failures such as EMFILE are usually
/// temporary; spinning on them would burn the CPU the other connections need to finish.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Largest UDP payload (IPv4 max minus headers, rounded up): any datagram fits in one buffer.
const MAX_DATAGRAM: usize = 65_536;

/// What can fail when setting up an echo server; one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// Binding the listening socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Reading or parsing a PEM file (certificate chain or private key) failed.
    #[error("cannot read PEM file {path}: {source}")]
    ReadPem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The key file holds no private key.
    #[error("no private key found in {path}")]
    NoPrivateKey { path: PathBuf },
    /// rustls rejected the certificate/key pair.
    #[error("invalid TLS certificate or key: {0}")]
    Tls(#[from] rustls::Error),
}

/// Echoes bytes back on every accepted connection until `shutdown` is cancelled.
///
/// When the downstream half-closes (EOF), everything received is still written back, then the
/// write side is shut down, so a client can `shutdown()` its write side and read the full echo
/// followed by EOF. On cancellation open connections are dropped: a raw echo has no request
/// boundary to drain to.
pub async fn tcp_echo(listener: TcpListener, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(echo_connection(stream, peer));
                }
                Err(error) => {
                    warn!(%error, "tcp echo accept failed, backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    debug!(open = conns.len(), "tcp echo stopped");
    conns.shutdown().await;
}

async fn echo_connection(mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.split();
    // `copy` returns at EOF after everything read has been written and flushed.
    match tokio::io::copy(&mut rd, &mut wr).await {
        Ok(bytes) => {
            let _ = wr.shutdown().await;
            debug!(%peer, bytes, "tcp echo connection done");
        }
        Err(error) => debug!(%peer, %error, "tcp echo connection failed"),
    }
}

/// Sends every datagram back to its sender until `shutdown` is cancelled.
pub async fn udp_echo(socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, peer)) => {
                    if let Err(error) = socket.send_to(&buf[..len], peer).await {
                        debug!(%peer, %error, "udp echo send failed");
                    }
                }
                // On Linux an ICMP port unreachable from an earlier send surfaces here as
                // ECONNREFUSED: it concerns one peer, the socket is fine.
                Err(error) => debug!(%error, "udp echo receive failed"),
            },
        }
    }
}

/// A server started by one of the `start_*` helpers: its address and how to stop it.
///
/// Dropping the handle cancels the server too, so a failing test does not leak it.
#[derive(Debug)]
pub struct EchoHandle {
    /// The address the server is bound to (port 0 resolved).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl EchoHandle {
    /// Runs `server` on a task; it must return when `shutdown` is cancelled.
    pub fn spawn<F>(addr: SocketAddr, shutdown: CancellationToken, server: F) -> Self
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        Self {
            addr,
            shutdown,
            task: Some(tokio::spawn(server)),
        }
    }

    /// The token that stops this server (clone it to stop it from elsewhere).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Cancels the server and waits for it to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EchoHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, EchoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EchoError::Bind { addr, source })
}

fn local_addr(addr: SocketAddr, got: io::Result<SocketAddr>) -> Result<SocketAddr, EchoError> {
    got.map_err(|source| EchoError::Bind { addr, source })
}

/// Starts [`tcp_echo`] on `127.0.0.1:0`.
pub async fn start_tcp() -> Result<EchoHandle, EchoError> {
    let listener = bind_tcp(loopback()).await?;
    let addr = local_addr(loopback(), listener.local_addr())?;
    let shutdown = CancellationToken::new();
    info!(%addr, "tcp echo started");
    Ok(EchoHandle::spawn(
        addr,
        shutdown.clone(),
        tcp_echo(listener, shutdown),
    ))
}

/// Starts [`udp_echo`] on `127.0.0.1:0`.
pub async fn start_udp() -> Result<EchoHandle, EchoError> {
    let socket = UdpSocket::bind(loopback())
        .await
        .map_err(|source| EchoError::Bind {
            addr: loopback(),
            source,
        })?;
    let addr = local_addr(loopback(), socket.local_addr())?;
    let shutdown = CancellationToken::new();
    info!(%addr, "udp echo started");
    Ok(EchoHandle::spawn(
        addr,
        shutdown.clone(),
        udp_echo(socket, shutdown),
    ))
}

/// Starts [`http`] (HTTP/1.1 + h2c) named `name` on `127.0.0.1:0`.
pub async fn start_http(name: &str) -> Result<EchoHandle, EchoError> {
    let listener = bind_tcp(loopback()).await?;
    let addr = local_addr(loopback(), listener.local_addr())?;
    let shutdown = CancellationToken::new();
    info!(%addr, name, "http echo started");
    Ok(EchoHandle::spawn(
        addr,
        shutdown.clone(),
        http(listener, name.to_owned(), shutdown),
    ))
}

/// Starts [`https`] named `name` on `127.0.0.1:0`.
pub async fn start_https(
    name: &str,
    tls: Arc<rustls::ServerConfig>,
) -> Result<EchoHandle, EchoError> {
    let listener = bind_tcp(loopback()).await?;
    let addr = local_addr(loopback(), listener.local_addr())?;
    let shutdown = CancellationToken::new();
    info!(%addr, name, "https echo started");
    Ok(EchoHandle::spawn(
        addr,
        shutdown.clone(),
        https(listener, name.to_owned(), tls, shutdown),
    ))
}
