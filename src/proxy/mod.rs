//! L4 data path: from an accepted downstream connection (or datagram) to bytes moving upstream.
//!
//! - [`connect`]: pick an endpoint and connect, retrying on a different endpoint.
//! - [`tcp`]: one proxied TCP connection (PROXY protocol, idle timeout, half-close).
//! - [`copy`]: moving bytes: splice(2) on Linux, a buffered fallback elsewhere.
//! - [`udp`]: the per-client UDP flow table.

pub mod connect;
pub mod copy;
pub mod tcp;
pub mod udp;

use std::time::Duration;

/// TCP keepalive on both legs: finds dead peers of long-lived idle connections without a proxy
/// timeout (the kernel's own 2 h default is too slow for a load balancer).
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The keepalive settings of both legs.
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
}

/// Set TCP_NODELAY and keepalive on a socket meshgate connected (the upstream leg). Failures are
/// not fatal: the connection works without them. Accepted sockets need no call: they inherit
/// both from their listener ([`crate::listener::bind_tcp`]), which saves four system calls per
/// connection.
pub fn tune_tcp(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive());
}
