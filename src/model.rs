//! The desired state: what every provider publishes and what the control path compiles into a
//! [`RoutingTable`](crate::table::RoutingTable).
//!
//! Everything here is a plain value (`Clone + PartialEq + Eq`, ordered maps): it can be diffed,
//! logged, compared in tests and rebuilt from scratch. Providers always publish a *full*
//! [`DesiredState`]; nothing on the control path applies partial updates.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The complete routing intent of one provider (or of several, merged).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    /// Services by name. The name is the stable identity used for stats, DNS and logs.
    pub services: BTreeMap<String, ServiceSpec>,
    /// HTTP entrypoints by name (L7; may be empty).
    pub entrypoints: BTreeMap<String, EntrypointSpec>,
    /// HTTP routers by name (L7; may be empty).
    pub routers: BTreeMap<String, RouterSpec>,
    /// Per-service problems a provider found and skipped (bad labels, …): reported, not fatal.
    pub problems: Vec<Problem>,
}

/// A problem found in one provider object; the object is left out, everything else is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Which provider reported it (`file`, `docker`, `swarm`).
    pub provider: String,
    /// The object concerned (service name, container name, …).
    pub object: String,
    /// Human-readable message naming the key or label.
    pub message: String,
}

/// One service: a set of endpoints and the ports it publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    /// Published L4 ports (TCP/UDP listeners opened by meshgate).
    pub ports: Vec<PortSpec>,
    /// Target port for HTTP routers that point at this service (L7), if any.
    pub http_port: Option<u16>,
    pub endpoints: Vec<EndpointSpec>,
    pub policy: Policy,
    pub timeouts: Timeouts,
    /// Connect attempts after the first one fails, each on a different endpoint.
    pub retries: u32,
    pub udp: UdpSettings,
    /// Send a PROXY protocol header to the upstream on L4 connections.
    pub proxy_protocol: ProxyProtocol,
    /// Sticky-session cookie name for HTTP (None = not sticky).
    pub sticky_cookie: Option<String>,
    /// Active health check (None = passive only).
    pub health_check: Option<HealthCheckSpec>,
    /// Protocol meshgate speaks to this service's endpoints on L7 (HTTP routers).
    pub http_upstream: HttpUpstream,
}

/// Protocol used from meshgate to a service's endpoints for HTTP routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpUpstream {
    /// HTTP/1.1 over TCP (keep-alive pooled).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge over TCP (gRPC backends).
    H2c,
    /// TLS to the endpoint, ALPN `h2` then `http/1.1`; the certificate must be valid for the
    /// endpoint IP and chain to the system roots or the configured upstream CA.
    Https,
}

impl ServiceSpec {
    /// A service with defaults everywhere: used by providers and tests as a starting point.
    pub fn new(name: impl Into<String>) -> Self {
        ServiceSpec {
            name: name.into(),
            ports: Vec::new(),
            http_port: None,
            endpoints: Vec::new(),
            policy: Policy::RoundRobin,
            timeouts: Timeouts::default(),
            retries: 1,
            udp: UdpSettings::default(),
            proxy_protocol: ProxyProtocol::None,
            sticky_cookie: None,
            health_check: None,
            http_upstream: HttpUpstream::Http1,
        }
    }
}

/// A port published by meshgate for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortSpec {
    /// The port meshgate listens on.
    pub published: u16,
    /// The port on the endpoint (unless the endpoint overrides it, see [`EndpointSpec::port_for`]).
    pub target: u16,
    pub protocol: Protocol,
    /// Address to bind; `0.0.0.0` by default.
    pub bind: IpAddr,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One endpoint (a task, a container, a static backend).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EndpointSpec {
    /// Stable identity (task ID, container ID, or the address for static endpoints).
    pub id: String,
    pub ip: IpAddr,
    /// Fixed port for every target (static `host:port` endpoints).
    pub port: Option<u16>,
    /// Per-target-port overrides (`target → actual`), e.g. Swarm host-mode `PortStatus`.
    pub port_map: BTreeMap<u16, u16>,
    pub weight: u32,
    /// Node the endpoint runs on (informational; used for node drain/down).
    pub node: Option<String>,
    /// Draining endpoints get no new connections; in-flight ones finish.
    pub draining: bool,
    /// Task slot (Swarm replicated services), for per-task DNS names.
    pub slot: Option<u64>,
}

impl EndpointSpec {
    /// A static endpoint at `addr` with weight 1.
    pub fn from_addr(addr: SocketAddr) -> Self {
        EndpointSpec {
            id: addr.to_string(),
            ip: addr.ip(),
            port: Some(addr.port()),
            port_map: BTreeMap::new(),
            weight: 1,
            node: None,
            draining: false,
            slot: None,
        }
    }

    /// The upstream port for a service target port: override, then fixed port, then the target.
    pub fn port_for(&self, target: u16) -> u16 {
        self.port_map
            .get(&target)
            .copied()
            .or(self.port)
            .unwrap_or(target)
    }
}

/// Balancing policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Weighted round robin over a precomputed interleaved schedule.
    #[default]
    RoundRobin,
    /// Fewest in-flight connections per unit of weight.
    LeastConn,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1).
    P2c,
    /// Maglev consistent hashing on the client IP (sticky per client).
    ConsistentHash,
}

/// Timeouts of a service. `None` means "no timeout" (never a hidden default cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    pub connect: Duration,
    /// Close an L4 connection after this long without bytes in either direction.
    pub idle: Option<Duration>,
    /// Time to wait for established connections after the service's port is removed.
    pub drain: Duration,
    /// HTTP: time from request sent to response headers.
    pub response: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            idle: None,
            drain: Duration::from_secs(30),
            response: Some(Duration::from_secs(60)),
        }
    }
}

/// UDP flow settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UdpSettings {
    pub idle: Duration,
    pub max_flows: usize,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            idle: Duration::from_secs(30),
            max_flows: 10_000,
        }
    }
}

/// PROXY protocol header sent upstream on L4 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// Active health check: a TCP connect (or HTTP GET when `http_path` is set) every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheckSpec {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures before an endpoint is marked down.
    pub fall: u32,
    /// Consecutive successes before a down endpoint is marked up.
    pub rise: u32,
    pub http_path: Option<String>,
}

/// An HTTP/HTTPS entrypoint (L7 listener). Deserialized directly from the `entrypoints:` map of
/// the config file (the map key is the name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrypointSpec {
    /// Filled from the map key.
    #[serde(skip)]
    pub name: String,
    /// Address to listen on, e.g. `0.0.0.0:80`.
    pub bind: SocketAddr,
    /// `http`, `https` or `tls_passthrough`.
    #[serde(default)]
    pub kind: EntrypointKind,
    /// `http` entrypoints only: answer every request with a 308 to `https://host[:port]/path`
    /// instead of routing it.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// Port put in the redirect location (None = 443, left out of the URL).
    #[serde(default)]
    pub redirect_port: Option<u16>,
    /// `https` entrypoints only: PEM file of the CA(s) client certificates must chain to (mTLS).
    /// Unset = no client certificate asked.
    #[serde(default)]
    pub client_ca: Option<std::path::PathBuf>,
    /// CIDRs (`10.0.0.0/8`, `::1/128`, or a bare IP) whose `X-Forwarded-*` / `Forwarded` headers
    /// are kept and appended to; from any other peer they are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Time allowed for a request head (also the keep-alive idle limit between requests);
    /// a partial head gets 408. Default 30s.
    #[serde(default, with = "opt_duration")]
    pub header_read_timeout: Option<Duration>,
    /// Largest request head in bytes (HTTP/1 buffer, HTTP/2 header list); more gets 431.
    /// Default 64 KiB.
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    /// Most header fields in a request (HTTP/1); more gets 431. Default 100.
    #[serde(default)]
    pub max_headers: Option<usize>,
}

impl EntrypointSpec {
    /// An entrypoint with defaults everywhere (used by providers and tests).
    pub fn new(name: impl Into<String>, bind: SocketAddr, kind: EntrypointKind) -> Self {
        EntrypointSpec {
            name: name.into(),
            bind,
            kind,
            redirect_to_https: false,
            redirect_port: None,
            client_ca: None,
            trusted_proxies: Vec::new(),
            header_read_timeout: None,
            max_header_bytes: None,
            max_headers: None,
        }
    }
}

/// Serde helper: an optional duration written as `250ms`, `2s`, `1m30s` (see [`parse_duration`]).
pub mod opt_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EntrypointKind {
    /// Plain HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
    #[default]
    Http,
    /// TLS terminated by meshgate (certificate chosen by SNI), then HTTP/1.1 or h2 by ALPN.
    Https,
    /// Raw TLS routed by the ClientHello's SNI (`HostSNI` rules) without terminating it.
    TlsPassthrough,
}

/// An HTTP router: a rule on one or more entrypoints that sends requests to a service.
/// Deserialized directly from the `routers:` map of the config file (the map key is the name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// Filled from the map key.
    #[serde(skip)]
    pub name: String,
    /// Entrypoint names this router listens on.
    pub entrypoints: Vec<String>,
    /// Traefik-style rule text, e.g. ``Host(`a.example`) && PathPrefix(`/api`)``.
    /// On `tls_passthrough` entrypoints only ``HostSNI(`name`)`` rules (joined by `||`).
    pub rule: String,
    /// Target service name.
    pub service: String,
    /// Higher wins; 0 means "derive from the rule": the rule text's length, as Traefik does
    /// (longer rules are usually more specific). Ties go to the router name sorting first.
    #[serde(default)]
    pub priority: i64,
}

/// Parse a Go/Traefik-style duration: `250ms`, `2s`, `1m30s`, `1h`, `0` (zero), `1.5s`.
///
/// Used by the config file and by Docker labels, so both accept exactly the same syntax.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {text:?} lacks a unit (ms, s, m, h)"))?;
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("bad number {num:?} in duration {text:?}"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
        };
        total += value * scale;
        rest = next;
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn endpoint_port_resolution() {
        let mut e = EndpointSpec::from_addr("10.0.0.1:80".parse().unwrap());
        assert_eq!(e.port_for(8080), 80);
        e.port = None;
        assert_eq!(e.port_for(8080), 8080);
        e.port_map.insert(8080, 30001);
        assert_eq!(e.port_for(8080), 30001);
    }
}
