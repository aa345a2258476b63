//! What the echo HTTP server answers, by path. Every response carries `x-backend: {name}`.
//!
//! | path | answer |
//! |---|---|
//! | `/echo` | JSON description of the request (method, uri, version, headers, body length, peer) |
//! | `/status/{code}` | that status code |
//! | `/delay/{ms}` | 200 after `ms` milliseconds |
//! | `/stream/{n}[?delay_ms=D]` | `n` chunks of 1 KiB, `D` ms apart (default 10), never buffered |
//! | `/upload` | the request body's byte count, counted as it streams in |
//! | `/ws` | WebSocket echo (see [`super::ws`]) |
//! | `/meshgate.Echo/{Unary,Stream}` | gRPC echo (see [`super::grpc`]) |
//! | anything else | `200 text/plain` with body `{name}\n` |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{grpc, ws};

/// The body type of every echo response: streamed, never failing (errors become status codes or
/// gRPC trailers before they reach the body).
pub type EchoBody = UnsyncBoxBody<Bytes, Infallible>;

/// Size of one `/stream` chunk.
const STREAM_CHUNK: usize = 1024;

/// Default pause between `/stream` chunks: long enough that a proxy which buffers the whole
/// response is visibly late on the first chunk, short enough for quick tests.
const STREAM_DEFAULT_DELAY: Duration = Duration::from_millis(10);

/// Upper bound on `/stream/{n}` (about 1 GiB) so a typo cannot produce an endless response.
const STREAM_MAX_CHUNKS: u64 = 1 << 20;

/// Upper bound on `/delay/{ms}`: ten minutes is past every timeout a test would check.
const DELAY_MAX: Duration = Duration::from_secs(600);

static X_BACKEND: HeaderName = HeaderName::from_static("x-backend");

/// One named backend: what every connection of an echo server shares.
#[derive(Debug)]
pub struct Backend {
    /// The name given on the command line; body of `GET /`.
    pub name: String,
    /// `name` as a header value, or `None` if it is not a valid one (then the header is omitted).
    x_backend: Option<HeaderValue>,
    /// The server's shutdown: long waits (`/delay`, WebSockets) end early on it.
    pub shutdown: CancellationToken,
}

impl Backend {
    pub fn new(name: String, shutdown: CancellationToken) -> Self {
        let x_backend = HeaderValue::from_str(&name).ok();
        if x_backend.is_none() {
            warn!(
                name,
                "backend name is not a valid header value, x-backend omitted"
            );
        }
        Self {
            name,
            x_backend,
            shutdown,
        }
    }
}

/// The downstream end of one connection, as `/echo` reports it.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Answers one request.
pub async fn handle(
    request: Request<Incoming>,
    backend: &Backend,
    downstream: Downstream,
) -> Response<EchoBody> {
    let path = request.uri().path().to_owned();
    debug!(method = %request.method(), path, peer = %downstream.peer, "echo request");
    let mut response = route(request, &path, backend, downstream).await;
    if let Some(name) = &backend.x_backend {
        response
            .headers_mut()
            .insert(X_BACKEND.clone(), name.clone());
    }
    response
}

async fn route(
    request: Request<Incoming>,
    path: &str,
    backend: &Backend,
    downstream: Downstream,
) -> Response<EchoBody> {
    if let Some(method) = path.strip_prefix(grpc::SERVICE_PATH) {
        return grpc::handle(request, method).await;
    }
    match path {
        "/echo" => return describe(request, backend, downstream).await,
        "/upload" => return upload(request).await,
        "/ws" => return ws::upgrade(request, backend.shutdown.clone()),
        _ => {}
    }
    if let Some(code) = path.strip_prefix("/status/") {
        status(code)
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        delay(ms, &backend.shutdown).await
    } else if let Some(count) = path.strip_prefix("/stream/") {
        stream(count, request.uri().query())
    } else {
        text(StatusCode::OK, format!("{}\n", backend.name))
    }
}

/// A complete `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<EchoBody> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Reads a body to its end, counting bytes as frames arrive (nothing is kept).
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len() as u64;
        }
    }
    Ok(total)
}

async fn describe(
    request: Request<Incoming>,
    backend: &Backend,
    downstream: Downstream,
) -> Response<EchoBody> {
    let (parts, body) = request.into_parts();
    let body_len = match count_body(body).await {
        Ok(len) => len,
        Err(error) => return text(StatusCode::BAD_REQUEST, format!("body error: {error}\n")),
    };
    // name -> every value in arrival order, so repeated headers (e.g. two X-Forwarded-For lines)
    // stay visible to the test.
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers
            .entry(name.as_str())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()))
        {
            serde_json::Value::Array(values) => values.push(value.into()),
            _ => unreachable!("every header entry is created as an array"),
        }
    }
    let described = serde_json::json!({
        "backend": backend.name,
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
        "peer": downstream.peer.to_string(),
        "tls": downstream.tls,
    });
    let mut response = text(StatusCode::OK, format!("{described}\n"));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn upload(request: Request<Incoming>) -> Response<EchoBody> {
    match count_body(request.into_body()).await {
        Ok(len) => text(StatusCode::OK, format!("{len}\n")),
        Err(error) => text(StatusCode::BAD_REQUEST, format!("body error: {error}\n")),
    }
}

fn status(code: &str) -> Response<EchoBody> {
    // 1xx are interim responses and cannot be the final answer.
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|status| !status.is_informational())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad status code {code:?}\n"),
        );
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return text(status, Bytes::new());
    }
    text(status, format!("{}\n", status.as_u16()))
}

async fn delay(ms: &str, shutdown: &CancellationToken) -> Response<EchoBody> {
    let Ok(ms) = ms.parse::<u64>() else {
        return text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}\n"));
    };
    let wait = Duration::from_millis(ms).min(DELAY_MAX);
    tokio::select! {
        _ = tokio::time::sleep(wait) => text(StatusCode::OK, format!("{ms}\n")),
        _ = shutdown.cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
    }
}

fn stream(count: &str, query: Option<&str>) -> Response<EchoBody> {
    let Some(count) = count
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= STREAM_MAX_CHUNKS)
    else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad chunk count {count:?}\n"),
        );
    };
    let pause = match query_param(query, "delay_ms").map(str::parse::<u64>) {
        None => STREAM_DEFAULT_DELAY,
        Some(Ok(ms)) => Duration::from_millis(ms).min(DELAY_MAX),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "bad delay_ms\n"),
    };
    let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent == count {
            return None;
        }
        if sent > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        // Chunk i is filled with one letter ('a' + i mod 26) so a test can check order.
        let letter = b'a' + (sent % 26) as u8;
        let chunk = Bytes::from(vec![letter; STREAM_CHUNK]);
        Some((Ok::<_, Infallible>(Frame::data(chunk)), sent + 1))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}
