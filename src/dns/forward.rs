//! Relays queries for names outside the zone to upstream resolvers.
//!
//! A raw relay: the client's query bytes go out unchanged (same ID, same flags, same EDNS) and
//! the upstream's response comes back unchanged, so nothing is parsed or re-encoded. UDP queries
//! are relayed over UDP from a fresh ephemeral socket per query (random source port: an off-path
//! attacker has to guess it; a connected socket drops datagrams from anyone but the upstream);
//! TCP queries over TCP. Upstreams are tried in order, each getting an equal share of
//! `forward_timeout`; the caller answers SERVFAIL when every one fails.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout_at, Instant};

use super::DnsConfig;

/// Upstream resolvers and the time budget of one relayed query.
#[derive(Debug, Clone)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    /// Upstreams from the config, else `/etc/resolv.conf`; meshgate's own address is skipped so
    /// a host pointing its resolver at meshgate does not make queries loop.
    pub fn from_config(cfg: &DnsConfig, own: SocketAddr) -> Self {
        let listed = if cfg.upstreams.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|text| parse_resolv_conf(&text))
                .unwrap_or_default()
        } else {
            cfg.upstreams.clone()
        };
        let upstreams: Vec<SocketAddr> = listed.into_iter().filter(|u| !is_self(*u, own)).collect();
        if cfg.forward && upstreams.is_empty() {
            tracing::warn!(
                "dns: forwarding is on but no upstream resolver is known; answering SERVFAIL"
            );
        }
        Forwarder {
            upstreams,
            timeout: cfg.forward_timeout,
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Relay over UDP; None when no upstream answered in time.
    pub async fn relay_udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let share = self.share(deadline, i);
            match timeout_at(share, udp_once(*upstream, query)).await {
                Ok(Ok(response)) => return Some(response),
                Ok(Err(e)) => {
                    tracing::debug!(upstream = %upstream, error = %e, "dns forward failed")
                }
                Err(_) => tracing::debug!(upstream = %upstream, "dns forward timed out"),
            }
        }
        None
    }

    /// Relay over TCP; None when no upstream answered in time.
    pub async fn relay_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let share = self.share(deadline, i);
            match timeout_at(share, tcp_once(*upstream, query)).await {
                Ok(Ok(response)) => return Some(response),
                Ok(Err(e)) => {
                    tracing::debug!(upstream = %upstream, error = %e, "dns forward failed")
                }
                Err(_) => tracing::debug!(upstream = %upstream, "dns forward timed out"),
            }
        }
        None
    }

    /// Deadline for the `i`-th upstream: an equal share of what is left.
    fn share(&self, deadline: Instant, i: usize) -> Instant {
        let left = deadline.saturating_duration_since(Instant::now());
        let remaining = (self.upstreams.len() - i) as u32;
        Instant::now() + left / remaining
    }
}

async fn udp_once(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Same ID and QR set: the answer to this query, not a stray datagram.
        if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_once(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// `nameserver` lines of a resolv.conf (port 53; scoped IPv6 addresses are skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Whether `upstream` is meshgate's own DNS listener.
fn is_self(upstream: SocketAddr, own: SocketAddr) -> bool {
    if upstream.port() != own.port() {
        return false;
    }
    upstream.ip() == own.ip()
        || (own.ip().is_unspecified()
            && (upstream.ip().is_loopback() || upstream.ip().is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 10.0.0.2\nsearch example\nnameserver fe80::1%eth0\nnameserver ::1\n";
        let got = parse_resolv_conf(text);
        assert_eq!(
            got,
            vec!["10.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()]
        );
    }

    #[test]
    fn skips_self() {
        let own: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert!(is_self("127.0.0.1:53".parse().unwrap(), own));
        assert!(!is_self("127.0.0.53:5353".parse().unwrap(), own));
        assert!(!is_self("10.0.0.2:53".parse().unwrap(), own));
        assert!(is_self(
            "127.0.0.1:5353".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        ));
    }
}
