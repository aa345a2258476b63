//! WebSocket echo on `/ws`: the HTTP/1.1 upgrade handshake is answered here (101 with
//! `Sec-WebSocket-Accept`), then the upgraded connection runs tungstenite in server role and every
//! text or binary message is sent back as is. Pings are answered by tungstenite itself.

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::routes::{text, EchoBody};

/// Answers the upgrade request and spawns the echo loop on the upgraded connection.
///
/// The echo task is not joined by the HTTP server (hyper hands the socket over only after the
/// 101 is written); it watches `shutdown` itself and closes with 1001 "going away".
pub fn upgrade(mut request: Request<Incoming>, shutdown: CancellationToken) -> Response<EchoBody> {
    let key = match handshake_key(request.headers()) {
        Ok(key) => key,
        Err(reason) => return text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => echo(upgraded, shutdown).await,
            Err(error) => debug!(%error, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Empty::new().boxed_unsync());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a valid header value"),
    );
    response
}

/// Checks an RFC 6455 opening handshake and returns its `Sec-WebSocket-Key`.
fn handshake_key(headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
        return Err("expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)");
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    headers
        .get(SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or("missing Sec-WebSocket-Key")
}

async fn echo(upgraded: Upgraded, shutdown: CancellationToken) {
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => {
                let close = CloseFrame { code: CloseCode::Away, reason: "shutting down".into() };
                let _ = socket.close(Some(close)).await;
                return;
            }
            message = socket.next() => message,
        };
        let reply = match message {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => message,
            // Ping, pong and the close handshake are handled inside tungstenite.
            Some(Ok(_)) => continue,
            Some(Err(error)) => return debug!(%error, "websocket echo ended with error"),
            None => return,
        };
        if let Err(error) = socket.send(reply).await {
            return debug!(%error, "websocket echo send failed");
        }
    }
}
