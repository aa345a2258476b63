//! The downstream side of one connection: TLS handshake (https entrypoints), protocol choice
//! (ALPN, or the HTTP/2 preface for h2c), hyper's HTTP/1.1 or HTTP/2 server with the entrypoint's
//! limits, graceful shutdown, and the 408 hyper does not send itself.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy::{handle, ConnState};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Sent when a client started a request head and did not finish it in time (slowloris).
/// hyper only closes the connection on its header timeout; a client deserves to know why.
const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// hyper's HTTP/1 read buffer cannot be smaller than this.
const MIN_H1_BUF: usize = 8192;

/// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge when the client opens with the preface.
pub(crate) async fn serve_plain(conn: Arc<ConnState>, stream: TcpStream) {
    let limit = conn.settings.header_read_timeout;
    match tokio::time::timeout(limit, starts_with_h2_preface(&stream)).await {
        Ok(Ok(true)) => serve_h2(conn, stream).await,
        Ok(Ok(false)) => serve_h1(conn, stream).await,
        // Silent or broken client: nothing was asked, nothing to answer.
        _ => {}
    }
}

/// TLS: handshake (bounded by the header timeout), then ALPN picks the protocol.
pub(crate) async fn serve_tls(
    conn: Arc<ConnState>,
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(conn.settings.header_read_timeout, acceptor.accept(stream))
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

/// Peek until the first bytes either diverge from the HTTP/2 preface or complete it.
async fn starts_with_h2_preface(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A partial preface (rare: it is sent in one segment): wait briefly for the rest
        // instead of spinning on peek, which returns at once while data is pending.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

async fn serve_h1<S>(conn: Arc<ConnState>, io: S)
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
    let svc = service_fn(move |req| handle(Arc::clone(&state), req));
    let mut connection = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let result = tokio::select! {
        r = &mut connection => r,
        _ = shutdown.cancelled() => {
            std::pin::Pin::new(&mut connection).graceful_shutdown();
            (&mut connection).await
        }
    };
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

async fn serve_h2<S>(conn: Arc<ConnState>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = Arc::clone(&conn.settings);
    let shutdown = conn.shutdown.clone();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes.min(u32::MAX as usize) as u32)
        // Detect dead peers on long-lived (gRPC) connections.
        .keep_alive_interval(Some(std::time::Duration::from_secs(60)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let state = Arc::clone(&conn);
    let svc = service_fn(move |req| handle(Arc::clone(&state), req));
    let mut connection = builder.serve_connection(TokioIo::new(io), svc);
    let result = tokio::select! {
        r = &mut connection => r,
        _ = shutdown.cancelled() => {
            std::pin::Pin::new(&mut connection).graceful_shutdown();
            (&mut connection).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, error = %e, "HTTP/2 connection error");
    }
}
