//! One proxied TCP connection: connect upstream, optional PROXY protocol header, copy bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::connect::connect;
use super::copy::{bidirectional, Outcome};
use crate::balance::hash_ip;
use crate::metrics::Metrics;
use crate::model::ProxyProtocol;
use crate::table::L4Route;

/// Proxy `downstream` to an endpoint of `route` until it closes or idles out. The listener's
/// drain deadline drops this future ([`crate::stop::Stoppable`] around it): no stop signal is
/// polled here, on every wake-up of the connection.
///
/// A function returning an `async move` block, not an `async fn`: an `async fn` keeps its
/// arguments twice in its future (as captured and as moved into locals), and this future is
/// what every idle proxied connection's task holds.
#[allow(clippy::manual_async_fn)]
pub fn proxy_connection(
    route: L4Route,
    downstream: TcpStream,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        // No `tune_tcp(&downstream)`: an accepted socket has its listener's TCP_NODELAY and
        // keepalive already.
        let spec = &route.service.spec;
        let (idle, connect_timeout, retries, pp) = (
            spec.timeouts.idle,
            spec.timeouts.connect,
            spec.retries,
            spec.proxy_protocol,
        );
        let service = Arc::clone(&route.service.name);
        // In a block: the connect result's storage ends here, not beside the copy's state.
        let mut upstream = {
            let connected = connect(
                route.pool(),
                hash_ip(peer.ip()),
                connect_timeout,
                retries,
                &metrics,
            )
            .await;
            match connected {
                Ok(u) => u,
                Err(e) => {
                    if matches!(e, super::connect::ConnectError::NoEndpoint) {
                        metrics.no_endpoint.inc();
                    }
                    tracing::warn!(%service, client = %peer, error = %e, "no upstream for connection");
                    return;
                }
            }
        };
        // The route (and with it the table generation) is not needed any more: a long-lived
        // connection must not keep old tables alive.
        drop(route);
        super::tune_tcp(&upstream.stream);
        if pp != ProxyProtocol::None {
            // Asked here, not up front: a `getsockname` per connection only where a header
            // needs the address.
            let local = downstream.local_addr().unwrap_or(peer);
            let header = proxy_header(pp, peer, local);
            if let Err(e) = upstream.stream.write_all(&header).await {
                tracing::warn!(%service, endpoint = %upstream.addr, error = %e, "PROXY header write failed");
                return;
            }
        }
        tracing::debug!(%service, client = %peer, endpoint = %upstream.addr, "proxying");
        match bidirectional(&downstream, &upstream.stream, idle).await {
            (Outcome::Idle, _) => {
                metrics.idle_closed.inc();
                tracing::debug!(%service, client = %peer, "closed idle connection");
            }
            (outcome, t) => {
                tracing::debug!(%service, client = %peer, ?outcome, up = t.up, down = t.down, "connection ended")
            }
        }
        drop(upstream.in_flight);
    }
}

/// PROXY protocol header announcing `client` → `local` (v1 text or v2 binary).
pub fn proxy_header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // Mixed families cannot be expressed; announce both as IPv6 by mapping the IPv4 one.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(l)) => (
            SocketAddr::new(c.ip().to_ipv6_mapped().into(), c.port()),
            SocketAddr::V6(l),
        ),
        (SocketAddr::V6(c), SocketAddr::V4(l)) => (
            SocketAddr::V6(c),
            SocketAddr::new(l.ip().to_ipv6_mapped().into(), l.port()),
        ),
        other => other,
    };
    match version {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, local),
        )
        .build()
        .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_parse_back() {
        let c: SocketAddr = "192.0.2.7:5555".parse().unwrap();
        let l: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v1 = proxy_header(ProxyProtocol::V1, c, l);
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\r\n");
        let v2 = proxy_header(ProxyProtocol::V2, c, l);
        let parsed = ppp::v2::Header::try_from(v2.as_slice()).unwrap();
        assert_eq!(
            parsed.addresses,
            ppp::v2::Addresses::from((c, l)),
            "v2 header carries the client address"
        );
    }
}
