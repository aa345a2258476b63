//! A minimal HTTP/1.1 client on the Engine's unix socket, for what bollard 0.21 cannot give:
//! `GET /tasks` with `NetworksAttachments` (bollard's `Task` model drops it) and an `/events`
//! subscription whose response headers prove the subscription exists before the relist starts.
//!
//! One connection per request: a unix-socket connect costs microseconds and keeps this free
//! of pooling state.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Request deadline up to the full body (lists) or up to the headers (events).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a raw request failed.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("connect to {socket}: {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("HTTP to the engine: {0}")]
    Http(#[from] hyper::Error),
    #[error("{path}: engine answered {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("{path}: bad JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{0}: timed out")]
    Timeout(String),
}

/// The Engine API on one unix socket, at one negotiated API version.
#[derive(Debug, Clone)]
pub struct RawClient {
    socket: String,
    /// `v1.41`-style prefix, from bollard's negotiated version.
    version: String,
}

impl RawClient {
    pub fn new(socket: &str, major: usize, minor: usize) -> Self {
        RawClient {
            socket: socket.to_string(),
            version: format!("v{major}.{minor}"),
        }
    }

    async fn request(&self, path_and_query: &str) -> Result<hyper::Response<Incoming>, RawError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| RawError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends when the response body is dropped or finished.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let uri = format!("/{}{}", self.version, path_and_query);
        let req = hyper::Request::get(uri)
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .expect("static request parts are valid");
        let res = sender.send_request(req).await?;
        if !res.status().is_success() {
            let status = res.status().as_u16();
            let body = res.into_body().collect().await?.to_bytes();
            return Err(RawError::Status {
                path: path_and_query.to_string(),
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(res)
    }

    /// `GET path` and decode the JSON body.
    pub async fn get_json<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, RawError> {
        let fetch = async {
            let res = self.request(path_and_query).await?;
            let body = res.into_body().collect().await?.to_bytes();
            serde_json::from_slice(&body).map_err(|source| RawError::Json {
                path: path_and_query.to_string(),
                source,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fetch)
            .await
            .map_err(|_| RawError::Timeout(path_and_query.to_string()))?
    }

    /// Subscribe to `/events` for the given types. Returns once the engine has answered with
    /// its headers, i.e. once the subscription is registered; events then arrive on the channel,
    /// which closes when the stream ends or fails.
    pub async fn subscribe_events(&self, types: &[&str]) -> Result<EventStream, RawError> {
        let filters = serde_json::json!({ "type": types }).to_string();
        let path = format!("/events?filters={}", percent_encode(&filters));
        let res = tokio::time::timeout(REQUEST_TIMEOUT, self.request(&path))
            .await
            .map_err(|_| RawError::Timeout(path.clone()))??;
        // Small buffer on purpose: the reader must keep up (the daemon drops slow subscribers),
        // and the consumer only marks flags per event.
        let (tx, rx) = mpsc::channel(1024);
        let reader = tokio::spawn(read_events(res.into_body(), tx)).abort_handle();
        Ok(EventStream { rx, reader })
    }
}

/// Events of one subscription; dropping it closes the connection to the engine.
pub struct EventStream {
    rx: mpsc::Receiver<RawEvent>,
    reader: tokio::task::AbortHandle,
}

impl EventStream {
    /// The next event; `None` once the stream ended or failed.
    pub async fn recv(&mut self) -> Option<RawEvent> {
        self.rx.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // The reader would otherwise hold the connection until the next event arrives.
        self.reader.abort();
    }
}

/// Split the newline-delimited JSON body into events until it ends or the receiver is gone.
async fn read_events(mut body: Incoming, tx: mpsc::Sender<RawEvent>) {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(nl + 1);
            let line = line.chunk();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<RawEvent>(line) {
                Ok(ev) => {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                // An unknown shape is not fatal: the periodic relist covers what it meant.
                Err(e) => tracing::warn!(error = %e, "undecodable Docker event"),
            }
        }
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One `/events` message (only the fields the providers use).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawEvent {
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Actor", default)]
    pub actor: RawActor,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawActor {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Attributes", default)]
    pub attributes: HashMap<String, String>,
}

/// A Swarm task as `GET /tasks` returns it, with the network attachments bollard drops.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawTask {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(rename = "NodeID", default)]
    pub node_id: String,
    #[serde(default)]
    pub slot: Option<u64>,
    #[serde(default)]
    pub desired_state: String,
    #[serde(default)]
    pub status: RawTaskStatus,
    #[serde(default)]
    pub networks_attachments: Vec<RawAttachment>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawTaskStatus {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub port_status: Option<RawPortStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawPortStatus {
    #[serde(default)]
    pub ports: Option<Vec<RawPort>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawPort {
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default)]
    pub published_port: Option<u16>,
    #[serde(default)]
    pub publish_mode: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawAttachment {
    pub network: RawNetworkRef,
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawNetworkRef {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub spec: Option<RawNetworkSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RawNetworkSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ingress: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_percent_encoded() {
        assert_eq!(
            percent_encode(r#"{"type":["a"]}"#),
            "%7B%22type%22%3A%5B%22a%22%5D%7D"
        );
    }

    #[test]
    fn event_decodes_with_unknown_type() {
        let ev: RawEvent = serde_json::from_str(
            r#"{"Type":"somethingnew","Action":"kill","Actor":{"ID":"c1","Attributes":{"signal":"15"}},"scope":"local"}"#,
        )
        .unwrap();
        assert_eq!(ev.kind, "somethingnew");
        assert_eq!(ev.actor.attributes["signal"], "15");
    }
}
