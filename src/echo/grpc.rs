//! gRPC echo service `meshgate.Echo` with methods `Unary` and `Stream`, without protobuf.
//!
//! gRPC over HTTP/2 frames every message as 1 byte "compressed" flag + 4 bytes big-endian length +
//! payload. Payloads are echoed as opaque bytes, so a client can call the service with identity
//! (bytes in, bytes out) serializers, e.g. Python grpcio's generic `channel.unary_unary(...)`.
//!
//! - `Unary` reads exactly one message, answers it, then the `grpc-status: 0` trailer.
//! - `Stream` is bidirectional: each message is echoed as soon as it is complete, while the
//!   client is still sending; the trailer follows the client's end of stream.
//!
//! Errors are reported the gRPC way (HTTP 200, `grpc-status`/`grpc-message` in trailers or a
//! trailers-only response), except a wrong HTTP method or content type, which gets the plain HTTP
//! status the gRPC spec asks for (405 / 415).

use std::convert::Infallible;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};

use super::routes::{text, EchoBody};

/// Path prefix of the service: `/{package}.{Service}/`.
pub const SERVICE_PATH: &str = "/meshgate.Echo/";

/// Bytes before each payload: compressed flag + big-endian u32 length.
pub const PREFIX_LEN: usize = 5;

/// Largest payload accepted, the gRPC default receive limit. The length prefix is
/// attacker-chosen; without a bound one prefix could make the server buffer 4 GiB.
pub const MAX_MESSAGE: usize = 4 << 20;

/// gRPC status codes used here (see grpc/doc/statuscodes.md).
pub mod code {
    pub const OK: u32 = 0;
    pub const CANCELLED: u32 = 1;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
}

/// One length-prefixed gRPC message, kept in its wire form so echoing it copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    framed: Bytes,
}

impl Message {
    /// Frames `payload` as an uncompressed message.
    pub fn encode(payload: &[u8]) -> Self {
        let len = u32::try_from(payload.len()).expect("gRPC message length fits in u32");
        let mut framed = BytesMut::with_capacity(PREFIX_LEN + payload.len());
        framed.extend_from_slice(&[0]);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(payload);
        Self {
            framed: framed.freeze(),
        }
    }

    /// The compressed flag as sent (echoed as is: the payload is opaque here).
    pub fn compressed(&self) -> bool {
        self.framed[0] != 0
    }

    /// The payload without its prefix.
    pub fn payload(&self) -> Bytes {
        self.framed.slice(PREFIX_LEN..)
    }

    /// The message as sent on the wire (prefix + payload).
    pub fn into_framed(self) -> Bytes {
        self.framed
    }
}

/// A length prefix announced a payload larger than [`MAX_MESSAGE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("gRPC message of {len} bytes exceeds the {MAX_MESSAGE} byte limit")]
pub struct TooLarge {
    pub len: usize,
}

/// Splits the first complete message off `buf`; `Ok(None)` if more bytes are needed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, TooLarge> {
    if buf.len() < PREFIX_LEN {
        return Ok(None);
    }
    let len = (&buf[1..PREFIX_LEN]).get_u32() as usize;
    if len > MAX_MESSAGE {
        return Err(TooLarge { len });
    }
    if buf.len() < PREFIX_LEN + len {
        // Reserve once for the whole message instead of growing frame by frame.
        buf.reserve(PREFIX_LEN + len - buf.len());
        return Ok(None);
    }
    Ok(Some(Message {
        framed: buf.split_to(PREFIX_LEN + len).freeze(),
    }))
}

/// Answers one call to `/meshgate.Echo/{method}`.
pub async fn handle(request: Request<Incoming>, method: &str) -> Response<EchoBody> {
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "gRPC calls are POST\n");
    }
    let is_grpc = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if !is_grpc {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/grpc\n",
        );
    }
    match method {
        "Unary" => unary(request.into_body()).await,
        "Stream" => bidi(request.into_body()),
        other => trailers_only(
            code::UNIMPLEMENTED,
            &format!("unknown method meshgate.Echo/{other}"),
        ),
    }
}

/// What reading the request stream produced next.
enum Step {
    Message(Message),
    /// The request stream is over: answer with this status.
    End(u32, String),
}

/// Reads complete messages out of a request body as its frames arrive.
struct Reader {
    body: Incoming,
    buf: BytesMut,
}

impl Reader {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
        }
    }

    async fn step(&mut self) -> Step {
        loop {
            match decode(&mut self.buf) {
                Ok(Some(message)) => return Step::Message(message),
                Ok(None) => {}
                Err(error) => return Step::End(code::RESOURCE_EXHAUSTED, error.to_string()),
            }
            match self.body.frame().await {
                // Request trailers carry nothing a gRPC client sends to a server: skip them.
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buf.extend_from_slice(data);
                    }
                }
                Some(Err(error)) => {
                    return Step::End(code::CANCELLED, format!("request stream failed: {error}"))
                }
                None if self.buf.is_empty() => return Step::End(code::OK, String::new()),
                None => {
                    return Step::End(
                        code::INTERNAL,
                        format!(
                            "request ended inside a message ({} bytes left)",
                            self.buf.len()
                        ),
                    )
                }
            }
        }
    }
}

async fn unary(body: Incoming) -> Response<EchoBody> {
    let mut reader = Reader::new(body);
    let request = match reader.step().await {
        Step::Message(message) => message,
        Step::End(code::OK, _) => {
            return trailers_only(code::INTERNAL, "unary call without a request message")
        }
        Step::End(status, message) => return trailers_only(status, &message),
    };
    match reader.step().await {
        Step::Message(_) => {
            trailers_only(code::INTERNAL, "unary call with several request messages")
        }
        Step::End(code::OK, _) => {
            let frames = [
                Frame::data(request.into_framed()),
                Frame::trailers(trailers(code::OK, "")),
            ];
            let frames = futures_util::stream::iter(frames.map(Ok::<_, Infallible>));
            grpc_response(StreamBody::new(frames).boxed_unsync())
        }
        Step::End(status, message) => trailers_only(status, &message),
    }
}

fn bidi(body: Incoming) -> Response<EchoBody> {
    // State `None` = trailers sent, the response is over.
    let frames = futures_util::stream::unfold(Some(Reader::new(body)), |reader| async move {
        let mut reader = reader?;
        let frame = match reader.step().await {
            Step::Message(message) => {
                return Some((Ok(Frame::data(message.into_framed())), Some(reader)))
            }
            Step::End(status, message) => Frame::trailers(trailers(status, &message)),
        };
        Some((Ok::<_, Infallible>(frame), None))
    });
    grpc_response(StreamBody::new(frames).boxed_unsync())
}

fn grpc_response(body: EchoBody) -> Response<EchoBody> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A response with no messages: the status goes in the headers and the stream ends there.
fn trailers_only(status: u32, message: &str) -> Response<EchoBody> {
    let mut response = grpc_response(Empty::new().boxed_unsync());
    response.headers_mut().extend(trailers(status, message));
    response
}

fn trailers(status: u32, message: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert("grpc-status", HeaderValue::from(status));
    let message = HeaderValue::from_str(&percent_encode(message))
        .expect("percent-encoded text is a valid header value");
    map.insert("grpc-message", message);
    map
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and '%' itself, as %XX.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_waits_for_whole_message_then_splits_it() {
        let wire = [
            Message::encode(b"hello").into_framed(),
            Message::encode(b"").into_framed(),
        ]
        .concat();
        let mut buf = BytesMut::new();
        // Feed one byte at a time: a message appears only once its last byte is in.
        let mut got = Vec::new();
        for byte in &wire {
            buf.extend_from_slice(&[*byte]);
            while let Some(message) = decode(&mut buf).unwrap() {
                got.push(message.payload());
            }
        }
        assert_eq!(got, vec![Bytes::from_static(b"hello"), Bytes::new()]);
        assert!(buf.is_empty());
    }

    #[test]
    fn decode_rejects_oversized_prefix() {
        let mut buf = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode(&mut buf),
            Err(TooLarge {
                len: u32::MAX as usize
            })
        );
    }

    #[test]
    fn encode_sets_prefix() {
        let message = Message::encode(b"abc");
        assert!(!message.compressed());
        assert_eq!(
            &message.into_framed()[..],
            &[0, 0, 0, 0, 3, b'a', b'b', b'c']
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("ok 100%"), "ok 100%25");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
