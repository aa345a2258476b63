//! The downstream side of one connection: TLS handshake (https entrypoints), protocol choice
//! (ALPN, or the HTTP/2 preface for h2c), hyper's HTTP/1.1 or HTTP/2 server with the entrypoint's
//! limits, graceful shutdown, and the 408 hyper does not send itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// The writes of an HTTP/2 connection, each deferred once to the back of the run queue.
///
/// An HTTP/2 connection task writes as soon as one stream's response is queued; with tokio the
/// stream that queued it wakes the connection task into the scheduler's next slot, so every
/// response tends to go out alone: its own TLS record, `writev` and client wake-up. Yielding
/// once before a write lets the other streams made ready by the same I/O event queue their
/// responses first, and they leave together (HAProxy and nginx get the same effect by writing
/// at the end of their event loop). A task that wakes itself while being polled is
/// rescheduled behind the tasks already queued, not in that next slot.
///
/// Only the first write after a flush waits: the rest of a burst (a long body) goes straight on.
struct Coalesce<S> {
    io: S,
    state: Burst,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Burst {
    /// The next write yields first.
    Idle,
    /// Yielded once; the next write goes out.
    Yielded,
    /// Writing a burst, until the next flush.
    Writing,
}

impl<S> Coalesce<S> {
    fn new(io: S) -> Coalesce<S> {
        Coalesce {
            io,
            state: Burst::Idle,
        }
    }

    fn defer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.state {
            Burst::Idle => {
                self.state = Burst::Yielded;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Burst::Yielded | Burst::Writing => {
                self.state = Burst::Writing;
                Poll::Ready(())
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.defer(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.defer(cx));
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = std::task::ready!(Pin::new(&mut self.io).poll_flush(cx));
        if self.state == Burst::Writing {
            self.state = Burst::Idle;
        }
        Poll::Ready(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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

pub(super) async fn serve_h2<S>(conn: Arc<ConnState>, io: S)
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
    let mut connection = builder.serve_connection(TokioIo::new(Coalesce::new(io)), svc);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use tokio::io::AsyncReadExt;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn first_write_of_a_burst_yields_once() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesce::new(a);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let mut w = Pin::new(&mut w);
        // The first write waits one turn (and asks to be polled again).
        assert!(w.as_mut().poll_write(&mut cx, b"ab").is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Then it goes out, and so does the rest of the burst, without yielding.
        assert!(matches!(
            w.as_mut().poll_write(&mut cx, b"ab"),
            Poll::Ready(Ok(2))
        ));
        assert!(matches!(
            w.as_mut().poll_write(&mut cx, b"cd"),
            Poll::Ready(Ok(2))
        ));
        assert!(w.as_mut().poll_flush(&mut cx).is_ready());
        // After a flush, the next burst yields again.
        assert!(w.as_mut().poll_write(&mut cx, b"ef").is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            w.as_mut().poll_write(&mut cx, b"ef"),
            Poll::Ready(Ok(2))
        ));
        let mut got = [0u8; 6];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdef");
    }
}
