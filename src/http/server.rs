//! The downstream side of one connection: TLS handshake (https entrypoints), protocol choice
//! (ALPN, or the HTTP/2 preface for h2c), hyper's HTTP/1.1 server or meshgate's own HTTP/2
//! loop ([`super::h2server`]) with the entrypoint's limits, graceful shutdown, and the 408
//! hyper does not send itself.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::proxy::{handle, ConnState};

pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sent when a client started a request head and did not finish it in time (slowloris).
/// hyper only closes the connection on its header timeout; a client deserves to know why.
pub(super) const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// hyper's HTTP/1 read buffer cannot be smaller than this.
const MIN_H1_BUF: usize = 8192;

/// TLS: handshake (bounded by the header timeout), then ALPN picks the protocol.
pub(crate) async fn serve_tls(
    conn: Arc<ConnState>,
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(
        conn.settings.header_read_timeout,
        acceptor.accept(crate::tcpio::RawTcp(stream)),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "TLS handshake timed out");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_h2(conn, tls).await
    } else {
        serve_h1(conn, tls).await
    }
}

pub(super) async fn serve_h1<S>(conn: Arc<ConnState>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = Arc::clone(&conn.settings);
    let shutdown = conn.shutdown.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(MIN_H1_BUF))
        .max_headers(settings.max_headers)
        .keep_alive(true);
    let state = Arc::clone(&conn);
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        handle(Arc::clone(&state), req.map(RequestBody::Hyper))
    });
    let mut connection = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    // The graceful stop is the flag only: the connection wrapper (`super::Connection`) wakes
    // this task when it is signalled, so no wait of our own (whose every poll takes locks).
    let mut stopping = false;
    let result = std::future::poll_fn(|cx| {
        if !stopping && shutdown.is_cancelled() {
            stopping = true;
            std::pin::Pin::new(&mut connection).graceful_shutdown();
        }
        std::future::Future::poll(std::pin::Pin::new(&mut connection), cx)
    })
    .await;
    let Err(e) = result else { return };
    if e.is_timeout() {
        // Only answer a client that started a request; an idle keep-alive connection is
        // simply closed (a 408 there could be read as the answer to its next request).
        if let Some(parts) = connection.into_parts() {
            if !parts.read_buf.is_empty() {
                let mut io = parts.io.into_inner();
                let _ = io.write_all(RESPONSE_408).await;
                let _ = io.shutdown().await;
            }
        }
        tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "request head timed out");
    } else {
        tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, error = %e, "HTTP/1 connection error");
    }
}

pub(super) use super::h2server::serve_h2;
