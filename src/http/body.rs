//! The response body sent downstream: the upstream body streamed frame by frame (data and
//! trailers, never buffered; from hyper's client or meshgate's own) or a small local body, counting bytes. When it ends or is dropped
//! it releases the endpoint's in-flight count and its pooled upstream connection, and emits the
//! access log record.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::accesslog::{AccessLog, AccessRecord};
use super::h1client::{BoxError, RawBody};
use super::h1pool::PooledConn;
use crate::stats::InFlight;

/// A record waiting for the end of the response body.
#[derive(Debug)]
pub struct PendingLog {
    pub log: Arc<AccessLog>,
    pub record: AccessRecord,
    pub started_ns: u64,
}

#[derive(Debug)]
enum Source {
    Upstream(Incoming),
    /// Read by meshgate's own HTTP/1 client ([`super::h1client`]).
    Raw(RawBody),
    Local(Option<Bytes>),
}

/// Response body type of every downstream response.
#[derive(Debug)]
pub struct ProxyBody {
    source: Source,
    bytes: u64,
    log: Option<Box<PendingLog>>,
    in_flight: Option<InFlight>,
    /// The upstream connection (own HTTP/1 pool), put back when the body is done.
    conn: Option<PooledConn>,
}

impl ProxyBody {
    pub fn upstream(body: Incoming, in_flight: Option<InFlight>) -> ProxyBody {
        ProxyBody {
            source: Source::Upstream(body),
            bytes: 0,
            log: None,
            in_flight,
            conn: None,
        }
    }

    pub(crate) fn raw(body: RawBody, in_flight: InFlight) -> ProxyBody {
        ProxyBody {
            source: Source::Raw(body),
            bytes: 0,
            log: None,
            in_flight: Some(in_flight),
            conn: None,
        }
    }

    /// Keep the upstream connection until the body is done, then release it to its pool.
    pub fn set_conn(&mut self, conn: Option<PooledConn>) {
        self.conn = conn;
    }

    pub fn local(body: Bytes) -> ProxyBody {
        ProxyBody {
            source: Source::Local((!body.is_empty()).then_some(body)),
            bytes: 0,
            log: None,
            in_flight: None,
            conn: None,
        }
    }

    pub fn set_log(&mut self, log: Option<Box<PendingLog>>) {
        self.log = log;
    }

    fn finish(&mut self) {
        self.in_flight = None;
        self.conn = None;
        if let Some(mut pending) = self.log.take() {
            pending.record.bytes = self.bytes;
            pending.record.duration_us =
                crate::clock::now_ns().saturating_sub(pending.started_ns) / 1000;
            pending.log.log(pending.record);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match &mut this.source {
            Source::Upstream(body) => {
                std::task::ready!(Pin::new(body).poll_frame(cx)).map(|r| r.map_err(Into::into))
            }
            Source::Raw(body) => std::task::ready!(Pin::new(body).poll_frame(cx)),
            Source::Local(data) => data.take().map(|d| Ok(Frame::data(d))),
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            _ => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream(b) => b.is_end_stream(),
            Source::Raw(b) => b.is_end_stream(),
            Source::Local(d) => d.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream(b) => b.size_hint(),
            Source::Raw(b) => b.size_hint(),
            Source::Local(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A request body as the client sends it: hyper's (HTTP/1, TLS or with `Upgrade`/`Expect`) or
/// an HTTP/2 stream's (meshgate's own HTTP/2 connection loop, [`super::h2server`]).
#[derive(Debug)]
pub enum RequestBody {
    Hyper(Incoming),
    H2(H2Body),
}

/// An HTTP/2 request stream's DATA and trailers, its receive window released as data is taken
/// (the h2 crate checks the data against `content-length` itself).
#[derive(Debug)]
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    content_length: Option<u64>,
}

impl H2Body {
    pub fn new(recv: h2::RecvStream, content_length: Option<u64>) -> H2Body {
        H2Body {
            recv,
            data_done: false,
            content_length,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Taken: the client may send as much again.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.content_length = None;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::H2(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::H2(b) => match b.content_length {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod size_probe {
    /// Every response moves through several futures on its way out (the client's answer, the
    /// proxy's, the stream's): each move is a copy of this size (216 bytes; 296 when a whole
    /// body's trailers were not boxed).
    #[test]
    fn response_size() {
        let n = std::mem::size_of::<http::Response<super::ProxyBody>>();
        assert!(n <= 216, "Response<ProxyBody> is {n} bytes");
    }
}
