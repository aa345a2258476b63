//! Embedded DNS and stable service VIPs.
//!
//! Flow: at every table build the control path calls [`allocate_vips`] (one stable address per
//! service, see [`vip`]) and [`DnsRecords::build`] (every answer precomputed in wire format, see
//! [`records`]). Both live in the [`RoutingTable`](crate::table::RoutingTable), so DNS answers and
//! L4 routes always come from the same generation: a drained endpoint leaves `tasks.<svc>` in the
//! generation it stops getting traffic. The server ([`server`]) answers UDP and TCP queries from
//! `table.load().dns` without locks; names it does not own are relayed to upstream resolvers
//! ([`forward`]).
//!
//! Names served (zone `meshgate.` by default; every name is also answered without the zone,
//! e.g. `web.` and `tasks.web.`):
//! - `<svc>.<zone>` A/AAAA: the VIP; without a VIP, the live endpoint IPs (rotated per answer).
//! - `tasks.<svc>.<zone>` A/AAAA: live (non-draining, weight > 0) endpoint IPs, rotated.
//! - `<slot>.<svc>.<zone>`, `<task-id>.<svc>.<zone>` A/AAAA: one task (see [`records`]).
//! - `_<published>._<tcp|udp>.<svc>.<zone>` SRV: ports have no names, so the published port number
//!   is the service label (`_8080._tcp.web.meshgate.`).
//! - PTR for every VIP (`in-addr.arpa.` / `ip6.arpa.`), SOA at the zone apex.

pub mod forward;
pub mod records;
pub mod server;
pub mod vip;
mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use records::{DnsRecords, Outcome, Transport};
pub use server::{serve, DnsServer};
pub use vip::{allocate_vips, Cidr};

/// `dns:` section of the config file.
///
/// Record-shaping options (`zone`, `ttl`, `vip_cidr`, `vips`) apply at every table build, so a
/// reload changes them; socket options (`bind`, `forward`, `upstreams`, `forward_timeout`) are
/// read once when the server starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Serve DNS at all (UDP and TCP on `bind`). Default false.
    pub enabled: bool,
    /// Address the DNS server listens on, UDP and TCP. Default `127.0.0.1:5353`.
    pub bind: SocketAddr,
    /// Zone meshgate is authoritative for. Default `meshgate.`; a missing final dot is added.
    /// Bare names (`web`, `tasks.web`) are answered too.
    pub zone: String,
    /// TTL of every answer, and the negative-caching TTL (SOA minimum), in seconds. Default 5;
    /// 0 is allowed (no caching: every lookup sees the current generation).
    pub ttl: u32,
    /// Relay names outside the zone to `upstreams`. Off: such queries get REFUSED. Default true.
    pub forward: bool,
    /// Upstream resolvers (`ip:port`). Empty (the default): the `nameserver` lines of
    /// `/etc/resolv.conf`, read when the server starts (meshgate's own `bind` is skipped).
    pub upstreams: Vec<SocketAddr>,
    /// Total time to wait for upstreams before answering SERVFAIL, e.g. `2s` (the default).
    #[serde(deserialize_with = "de_duration")]
    pub forward_timeout: Duration,
    /// Range stable service VIPs are allocated from. Default `127.77.0.0/16`: inside 127/8, so
    /// Linux accepts binds on it without interface setup. Any other CIDR works when it is routed
    /// to this host (e.g. assigned to a dummy or bridge interface).
    pub vip_cidr: Cidr,
    /// Allocate a VIP per service and listen on `VIP:published` for every port. Unset (the
    /// default): same as `enabled`, so VIP listeners only appear when DNS can name them. Set it
    /// to `true` to get VIPs with the DNS server off, `false` for DNS without VIPs (then
    /// `<svc>` answers with the endpoint IPs, like Swarm's dnsrr mode).
    pub vips: Option<bool>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 5353)),
            zone: "meshgate.".into(),
            ttl: 5,
            forward: true,
            upstreams: Vec::new(),
            forward_timeout: Duration::from_secs(2),
            vip_cidr: Cidr::default(),
            vips: None,
        }
    }
}

impl DnsConfig {
    /// Whether VIPs are allocated (see [`DnsConfig::vips`]).
    pub fn vips_enabled(&self) -> bool {
        self.vips.unwrap_or(self.enabled)
    }

    /// Check what serde cannot: the zone is a valid domain name. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        wire::name_to_wire(&self.zone)
            .map(|_| ())
            .ok_or_else(|| format!("dns.zone: {:?} is not a valid domain name", self.zone))
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::model::parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Failures of the DNS server, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns: cannot bind UDP {addr}: {source}")]
    BindUdp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dns: cannot bind TCP {addr}: {source}")]
    BindTcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dns: invalid zone {0:?}")]
    Zone(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_parsing() {
        let cfg: DnsConfig = serde_saphyr::from_str("enabled: true\n").unwrap();
        assert_eq!(cfg.bind, "127.0.0.1:5353".parse().unwrap());
        assert_eq!(
            (cfg.zone.as_str(), cfg.ttl, cfg.forward),
            ("meshgate.", 5, true)
        );
        assert_eq!(cfg.forward_timeout, Duration::from_secs(2));
        assert!(cfg.vips_enabled());
        assert!(!DnsConfig::default().vips_enabled());
        let text = "ttl: 0\nforward_timeout: 500ms\nvip_cidr: 10.9.0.0/24\nvips: true\nupstreams: [\"10.0.0.2:53\"]\n";
        let cfg: DnsConfig = serde_saphyr::from_str(text).unwrap();
        assert_eq!(
            (cfg.ttl, cfg.forward_timeout),
            (0, Duration::from_millis(500))
        );
        assert_eq!(cfg.vip_cidr.to_string(), "10.9.0.0/24");
        assert!(cfg.vips_enabled() && !cfg.enabled);
        assert!(serde_saphyr::from_str::<DnsConfig>("bogus: 1\n").is_err());
        assert!(serde_saphyr::from_str::<DnsConfig>("forward_timeout: 5\n").is_err());
        assert!(serde_saphyr::from_str::<DnsConfig>("vip_cidr: 10.9.0.1/24\n").is_err());
        assert!(DnsConfig {
            zone: "a..b".into(),
            ..DnsConfig::default()
        }
        .validate()
        .is_err());
    }
}
