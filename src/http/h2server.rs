//! meshgate's own HTTP/2 connection loop, on the `h2` crate's framing, HPACK and flow control.
//!
//! hyper's HTTP/2 server spawns one tokio task per stream and records every frame for its
//! keep-alive pings; on small requests that was most of meshgate's user-space time per request
//! (task allocation and the copy of the request future into it, scheduling, waker clones, the
//! ping recorder's lock). Here a connection is ONE task: its streams are futures polled by that
//! task ([`FuturesUnordered`]), never spawned.
//!
//! One turn of the loop polls the streams that are ready (each may queue a response), then the
//! connection (which reads new frames, hands out new streams and writes what the streams
//! queued), and again while new streams arrived. So the responses of every stream made ready
//! by the same I/O event leave in one write, the way HAProxy and nginx write at the end of
//! their event loop.
//!
//! Kept from hyper's server: its flow-control windows (1 MiB per stream and per connection),
//! 16 KiB frames, 200 concurrent streams, 400 KiB send buffer, the limit on streams reset by
//! local errors (rapid-reset), `content-length` from an exact body size, and keep-alive pings
//! (every 60 s; no answer within 20 s closes the connection).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderValue, Request, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::body::{H2Body, ProxyBody, RequestBody};
use super::proxy::{handle, ConnState};

const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_STREAMS: u32 = 200;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Emptied stream boxes a connection keeps for its next streams.
const SPARE_STREAMS: usize = 16;
const PING_INTERVAL: Duration = Duration::from_secs(60);
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Serve one HTTP/2 connection (after TLS with ALPN `h2`, or h2c with the preface).
pub(super) async fn serve_h2<S>(conn: Arc<ConnState>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_header_list_size(conn.settings.max_header_bytes.min(u32::MAX as usize) as u32);
    let handshake = tokio::time::timeout(conn.settings.header_read_timeout, builder.handshake(io));
    let mut h2 = match handshake.await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "HTTP/2 handshake timed out");
            return;
        }
    };
    let mut ping = h2.ping_pong().map(KeepAlive::new);
    let mut stopping = false;
    let mut streams = FuturesUnordered::new();
    // Stream futures are a few KiB, too big for malloc's thread cache: the boxes of finished
    // streams are kept for the next ones (FuturesUnordered's own node then is small).
    let mut spare = Vec::new();
    let result = poll_fn(|cx| {
        loop {
            // Streams first: the responses they queue leave in the connection's poll below.
            while let Poll::Ready(Some(done)) = streams.poll_next_unpin(cx) {
                if spare.len() < SPARE_STREAMS {
                    spare.push(done);
                }
            }
            let mut accepted = false;
            loop {
                match h2.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        let mut slot = spare.pop().unwrap_or_else(|| Box::pin(None));
                        slot.set(Some(serve_stream(Arc::clone(&conn), req, respond)));
                        streams.push(Recycle(Some(slot)));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed, or drained after a GOAWAY: every stream has ended.
                    Poll::Ready(None) => return Poll::Ready(Ok(Ended::Closed)),
                    Poll::Pending => break,
                }
            }
            // The connection's wrapper (`http::serve_connection`) waits for the graceful stop
            // and polls this task when it comes; here the flag is enough.
            if !stopping && conn.shutdown.is_cancelled() {
                // GOAWAY; the streams in progress finish, new ones are refused.
                h2.graceful_shutdown();
                stopping = true;
                continue;
            }
            if let Some(ka) = ping.as_mut() {
                match ka.poll(cx) {
                    Poll::Ready(KeepAliveEvent::Dead) => {
                        return Poll::Ready(Ok(Ended::PingUnanswered))
                    }
                    Poll::Ready(KeepAliveEvent::Sent) => continue,
                    Poll::Pending => {}
                }
            }
            if !accepted {
                return Poll::Pending;
            }
        }
    })
    .await;
    match result {
        Ok(Ended::PingUnanswered) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "HTTP/2 keep-alive ping not answered; connection closed");
        }
        Ok(Ended::Closed) => {}
        Err(e) => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, error = %e, "HTTP/2 connection error");
        }
    }
}

/// How a connection ended without an error.
enum Ended {
    Closed,
    PingUnanswered,
}

/// A stream future in a reusable box: done, it empties the box and hands it back.
struct Recycle<F>(Option<Pin<Box<Option<F>>>>);

impl<F: Future<Output = ()>> Future for Recycle<F> {
    type Output = Pin<Box<Option<F>>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = self.0.as_mut().expect("polled after completion");
        let fut = slot
            .as_mut()
            .as_pin_mut()
            .expect("a pushed box holds a stream");
        std::task::ready!(fut.poll(cx));
        slot.set(None);
        Poll::Ready(self.0.take().expect("slot present"))
    }
}

/// One stream: the proxy's answer (given up if the client resets the stream), then its body
/// piped into the stream under HTTP/2 flow control.
#[allow(clippy::manual_async_fn)]
fn serve_stream(
    conn: Arc<ConnState>,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
) -> impl Future<Output = ()> + Send {
    // A function returning `async move`: the arguments are stored once, and the proxy's future
    // lives only inside `Answer` (the stream's box is 2.3 KiB instead of 3.6).
    async move {
        let mut respond = respond;
        let content_length = content_length(req.headers());
        let req = req.map(|recv| RequestBody::H2(H2Body::new(recv, content_length)));
        let answer = Answer {
            answer: handle(conn, req),
            respond: &mut respond,
        };
        let Some(response) = answer.await else { return };
        let (mut head, body) = response.into_parts();
        if body.is_end_stream() {
            let _ = respond.send_response(Response::from_parts(head, ()), true);
            return;
        }
        if let Some(n) = body.size_hint().exact() {
            if !head.headers.contains_key(header::CONTENT_LENGTH) {
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        match respond.send_response(Response::from_parts(head, ()), false) {
            Ok(send) => pipe(body, send).await,
            Err(e) => tracing::debug!(error = %e, "HTTP/2 response not sent"),
        }
    }
}

pin_project_lite::pin_project! {
    /// The proxy's answer to a stream, or `None` if the client resets the stream first.
    struct Answer<'a, F> {
        #[pin]
        answer: F,
        respond: &'a mut h2::server::SendResponse<Bytes>,
    }
}

impl<F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>> Future
    for Answer<'_, F>
{
    type Output = Option<Response<ProxyBody>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(Ok(response)) = this.answer.poll(cx) {
            return Poll::Ready(Some(response));
        }
        // Waiting: a RST_STREAM from the client cancels the request.
        match this.respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The response body into the stream: a chunk is taken from the body only once the stream
/// has send capacity for it (backpressure towards the upstream), trailers end the stream
/// (gRPC), and a reset from the client stops it.
async fn pipe(mut body: ProxyBody, mut send: h2::SendStream<Bytes>) {
    let mut pending: Option<(Bytes, bool)> = None;
    poll_fn(|cx| -> Poll<()> {
        loop {
            if let Some((data, end)) = pending.take() {
                while send.capacity() == 0 {
                    match send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(_) => return Poll::Ready(()),
                        Poll::Pending => {
                            pending = Some((data, end));
                            return reset_or_pending(&mut send, cx);
                        }
                    }
                }
                if send.send_data(data, end).is_err() {
                    return Poll::Ready(());
                }
                if end {
                    return Poll::Ready(());
                }
                continue;
            }
            // The next frame first: claiming capacity before there is data to send could pin
            // the connection's window while another stream waits for it (hyper#4003).
            let frame = match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => return reset_or_pending(&mut send, cx),
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = body.is_end_stream();
                        if data.is_empty() || (end && data.len() <= MAX_FRAME as usize) {
                            // The last chunk, and one frame at most (a small response, read
                            // whole with its head): h2 asks for the capacity it needs itself
                            // and holds the chunk until it has it, so no reservation first.
                            if send.send_data(data, end).is_err() || end {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        send.reserve_capacity(1);
                        pending = Some((data, end));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            send.reserve_capacity(0);
                            let _ = send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; stream reset");
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                None => {
                    let _ = send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    })
    .await
}

/// Waiting on the body or for capacity: a RST_STREAM from the client ends the pipe (checked
/// only here, before waiting, not on every chunk: a reset stream also fails `send_data`).
fn reset_or_pending(send: &mut h2::SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<()> {
    match send.poll_reset(cx) {
        Poll::Ready(reason) => {
            tracing::debug!(reason = ?reason, "HTTP/2 stream reset by the client");
            Poll::Ready(())
        }
        Poll::Pending => Poll::Pending,
    }
}

/// Keep-alive pings: one every [`PING_INTERVAL`]; a ping not answered within [`PING_TIMEOUT`]
/// means the peer is gone. One timer per connection, touched once a minute, not per frame.
struct KeepAlive {
    ping: h2::PingPong,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

enum KeepAliveEvent {
    /// A ping went out (poll again: the connection must write it).
    Sent,
    /// No pong in time.
    Dead,
}

impl KeepAlive {
    fn new(ping: h2::PingPong) -> KeepAlive {
        KeepAlive {
            ping,
            timer: Box::pin(tokio::time::sleep(PING_INTERVAL)),
            waiting: false,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<KeepAliveEvent> {
        if self.waiting {
            if let Poll::Ready(result) = self.ping.poll_pong(cx) {
                self.waiting = false;
                if result.is_err() {
                    return Poll::Ready(KeepAliveEvent::Dead);
                }
                self.timer.as_mut().reset(Instant::now() + PING_INTERVAL);
            }
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.waiting || self.ping.send_ping(h2::Ping::opaque()).is_err() {
            return Poll::Ready(KeepAliveEvent::Dead);
        }
        self.waiting = true;
        self.timer.as_mut().reset(Instant::now() + PING_TIMEOUT);
        Poll::Ready(KeepAliveEvent::Sent)
    }
}

#[cfg(test)]
mod size_probe {
    /// A connection keeps up to `SPARE_STREAMS` boxes of this size: the bound keeps that in
    /// check: 2,416 B in debug with the proxy's `handle` at 2,088 B (it was 3,656 B as an
    /// `async fn` awaiting a `poll_fn` over the pinned `handle`).
    #[test]
    fn stream_future_size() {
        let n = crate::http::future_size3(super::serve_stream);
        assert!(n <= 2448, "serve_stream future is {n} bytes");
    }
}
