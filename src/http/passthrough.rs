//! TLS passthrough: read the ClientHello (without terminating TLS), take its SNI, pick the
//! `HostSNI` router and an endpoint, then copy bytes both ways. The bytes read so far are
//! replayed to the endpoint first, so it sees the untouched handshake.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy::ConnState;
use super::rule::RequestView;
use crate::balance::{Exclude, PickContext};
use crate::clock;

/// A ClientHello larger than this is refused (real ones are < 2 KiB; post-quantum key shares
/// push them to ~1.8 KiB, large session tickets a little more).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// Outcome of parsing the start of a TLS connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Need more bytes.
    Incomplete,
    /// Not a TLS ClientHello.
    Invalid,
    /// A complete ClientHello, with its SNI host name if any.
    Complete(Option<String>),
}

/// Parse a ClientHello that may span several TLS records.
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + 5 {
            return Hello::Incomplete;
        }
        if buf[pos] != 22 || buf[pos + 1] != 3 {
            return Hello::Invalid;
        }
        let len = u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]) as usize;
        if buf.len() < pos + 5 + len {
            return Hello::Incomplete;
        }
        hs.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 1 {
                return Hello::Invalid;
            }
            let body_len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if hs.len() >= 4 + body_len {
                return match sni(&hs[4..4 + body_len]) {
                    Some(name) => Hello::Complete(name),
                    None => Hello::Invalid,
                };
            }
        }
    }
}

/// SNI of a ClientHello body: `Some(None)` = valid without SNI, `None` = malformed.
fn sni(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    let sid = r.u8()? as usize;
    r.take(sid)?;
    let suites = r.u16()? as usize;
    r.take(suites)?;
    let comp = r.u8()? as usize;
    r.take(comp)?;
    if r.0.is_empty() {
        return Some(None);
    }
    let ext_len = r.u16()? as usize;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()? as usize;
        let data = exts.take(len)?;
        if kind == 0 {
            let mut list = Reader(data);
            let list_len = list.u16()? as usize;
            let mut names = Reader(list.take(list_len)?);
            while !names.0.is_empty() {
                let name_type = names.u8()?;
                let n = names.u16()? as usize;
                let name = names.take(n)?;
                if name_type == 0 {
                    return std::str::from_utf8(name)
                        .ok()
                        .map(|s| Some(s.to_ascii_lowercase()));
                }
            }
            return Some(None);
        }
    }
    Some(None)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Serve one passthrough connection.
pub(crate) async fn serve(conn: Arc<ConnState>, mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(2048);
    let hello = tokio::time::timeout(conn.settings.header_read_timeout, async {
        loop {
            match parse_client_hello(&buf) {
                Hello::Incomplete if buf.len() < MAX_HELLO => {}
                Hello::Incomplete => return Hello::Invalid,
                done => return done,
            }
            let mut chunk = [0u8; 2048];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Hello::Invalid,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let sni = match hello {
        Ok(Hello::Complete(sni)) => sni.unwrap_or_default(),
        _ => {
            tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, "no valid ClientHello");
            return;
        }
    };
    let target = {
        let table = conn.table.load();
        let view = RequestView {
            host: &sni,
            path: "",
            method: &http::Method::GET,
            headers: None,
        };
        table
            .http
            .entrypoint(&conn.entrypoint)
            .and_then(|ep| ep.lookup(&view))
            .map(|r| Arc::clone(&r.target))
    };
    let Some(target) = target else {
        tracing::debug!(peer = %conn.peer, entrypoint = %conn.entrypoint, sni = %sni, "no HostSNI router");
        return;
    };
    let spec = &target.service.spec;
    let pool = target.pool();
    let mut exclude = Exclude::default();
    for _ in 0..=spec.retries {
        let now_ms = clock::now_ms();
        let ctx = PickContext {
            hash: conn.hash,
            now_ms,
            now_ns: clock::now_ns(),
            exclude,
        };
        let Some(idx) = pool.balancer.pick(&pool.endpoints, &ctx) else {
            break;
        };
        exclude.insert(idx);
        let endpoint = &pool.endpoints[idx];
        let started = clock::now_ns();
        let upstream = tokio::time::timeout(
            spec.timeouts.connect,
            crate::tcpio::connect_upstream(endpoint.addr),
        )
        .await;
        let mut upstream = match upstream {
            Ok(Ok(s)) => s,
            _ => {
                endpoint.stats.record_failure(now_ms);
                continue;
            }
        };
        endpoint.stats.record_success();
        let now = clock::now_ns();
        endpoint.stats.record_latency(now - started, now);
        let _in_flight = endpoint.stats.start();
        let _ = upstream.set_nodelay(true);
        if upstream.write_all(&buf).await.is_err() {
            return;
        }
        // Until either side closes or the graceful stop: its flag only, as the connection
        // wrapper (`super::Connection`) wakes this task when it is signalled.
        let mut tunnel = std::pin::pin!(tokio::io::copy_bidirectional(&mut stream, &mut upstream));
        let r = std::future::poll_fn(|cx| {
            if conn.shutdown.is_cancelled() {
                return std::task::Poll::Ready(Ok((0, 0)));
            }
            std::future::Future::poll(tunnel.as_mut(), cx)
        })
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "passthrough tunnel closed with error");
        }
        return;
    }
    tracing::debug!(peer = %conn.peer, sni = %sni, service = %target.service.name, "no endpoint reachable");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record with the given SNI.
    pub fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn parses_sni_incrementally() {
        let rec = client_hello("Db.Example");
        for cut in 0..rec.len() {
            assert_eq!(
                parse_client_hello(&rec[..cut]),
                Hello::Incomplete,
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_client_hello(&rec),
            Hello::Complete(Some("db.example".into()))
        );
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::Invalid);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_client_hello(&data);
            let mut rec = client_hello("x");
            rec.extend_from_slice(&data);
            proptest::prop_assert_eq!(parse_client_hello(&rec), Hello::Complete(Some("x".into())));
        }
    }
}
