//! Stable service VIPs: one address per service from `dns.vip_cidr`, a pure function of the set
//! of service names, so every meshgate node and every restart computes the same VIPs.
//!
//! Allocation: each name's *home* is `FNV-1a-64(name) mod usable` (FNV because its output is
//! fixed by its definition, unlike `std`'s hasher, and VIPs must not change across releases).
//! Phase 1: every home address goes to the first name (in name order) that wants it. Phase 2:
//! the names that lost, in (home, name) order, take the first free address after their home
//! (linear probing, wrapping). Consequences, checked by property tests:
//! - same names → same VIPs, all distinct, all inside the CIDR;
//! - adding a service never moves a service that sits at its home address, unless the newcomer
//!   has the same home and sorts first by name; only services that already collided (placed by
//!   probing) can shift;
//! - adding a service whose home is free moves nobody.
//!
//! Network and broadcast addresses of IPv4 ranges shorter than /31 are never handed out, nor is
//! the all-zero (subnet-router anycast) address of IPv6 ranges. When the range is full, the
//! services that do not fit get no VIP (DNS then answers `<svc>` with its endpoint IPs).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::DnsConfig;
use crate::model::DesiredState;

/// An IP network `addr/prefix`, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Default for Cidr {
    fn default() -> Self {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(127, 77, 0, 0)),
            prefix: 16,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (expected addr/prefix)"))?;
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("bad address {ip:?} in {s:?}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("bad prefix in {s:?}"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(format!("prefix /{prefix} too long for {addr}"));
        }
        let cidr = Cidr { addr, prefix };
        if to_u128(addr) & cidr.host_mask() != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(cidr)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Cidr {
    fn host_mask(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        let host = bits - self.prefix as u32;
        if host == 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        }
    }

    fn ip_at_u128(&self, v: u128) -> IpAddr {
        if self.addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::from(v as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(v))
        }
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && to_u128(ip) & !self.host_mask() == to_u128(self.addr)
    }

    /// First usable host offset and how many usable addresses there are.
    fn usable(&self) -> (u128, u128) {
        let mask = self.host_mask();
        if self.addr.is_ipv4() && self.prefix >= 31 {
            // /31 and /32 have no network/broadcast address (RFC 3021).
            (0, mask + 1)
        } else if self.addr.is_ipv4() {
            (1, mask - 1)
        } else if mask == 0 {
            (0, 1)
        } else {
            // Skip offset 0, the subnet-router anycast address.
            (1, mask)
        }
    }

    /// The usable address at `offset` (0-based among usable addresses).
    fn addr_at(&self, offset: u128) -> IpAddr {
        let (first, _) = self.usable();
        self.ip_at_u128(to_u128(self.addr) + first + offset)
    }
}

/// FNV-1a, 64 bit: stable by definition (VIPs must survive upgrades).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Stable VIP per service (empty when VIPs are off); see the module doc for the algorithm.
pub fn allocate_vips(desired: &DesiredState, cfg: &DnsConfig) -> BTreeMap<String, IpAddr> {
    if !cfg.vips_enabled() {
        return BTreeMap::new();
    }
    allocate(desired.services.keys().map(String::as_str), cfg.vip_cidr)
}

/// The allocation over plain names (what [`allocate_vips`] and the property tests call).
pub fn allocate<'a>(
    names: impl IntoIterator<Item = &'a str>,
    cidr: Cidr,
) -> BTreeMap<String, IpAddr> {
    let (_, size) = cidr.usable();
    let mut order: Vec<(u128, &str)> = names
        .into_iter()
        .map(|n| ((fnv1a(n.as_bytes()) as u128) % size, n))
        .collect();
    order.sort_unstable();
    order.dedup();
    let mut taken: HashSet<u128> = HashSet::with_capacity(order.len());
    let mut out = BTreeMap::new();
    let mut losers = Vec::new();
    // Phase 1: homes. Sorted by (home, name): the first of each home is the name-order winner.
    for (home, name) in order {
        if taken.insert(home) {
            out.insert(name.to_string(), cidr.addr_at(home));
        } else {
            losers.push((home, name));
        }
    }
    // Phase 2: collisions probe forward, never taking an address a phase-1 winner holds.
    for (home, name) in losers {
        if taken.len() as u128 >= size {
            tracing::warn!(service = name, cidr = %cidr, "dns.vip_cidr is full; service gets no VIP");
            continue;
        }
        let mut offset = (home + 1) % size;
        while taken.contains(&offset) {
            offset = (offset + 1) % size;
        }
        taken.insert(offset);
        out.insert(name.to_string(), cidr.addr_at(offset));
    }
    debug_assert!(out.values().all(|ip| cidr.contains(*ip)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_rejects() {
        assert_eq!(cidr("127.77.0.0/16"), Cidr::default());
        assert!("127.77.0.1/16".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!(cidr("fd00::/64").contains("fd00::5".parse().unwrap()));
        assert!(!cidr("fd00::/64").contains("fd01::5".parse().unwrap()));
    }

    #[test]
    fn skips_network_and_broadcast() {
        let vips = allocate(["a", "b", "c"], cidr("10.0.0.0/30"));
        // Two usable hosts: .1 and .2; the third service gets none.
        assert_eq!(vips.len(), 2);
        for ip in vips.values() {
            assert!(
                ["10.0.0.1", "10.0.0.2"].contains(&ip.to_string().as_str()),
                "{ip}"
            );
        }
        assert_eq!(
            allocate(["x"], cidr("10.0.0.7/32"))["x"].to_string(),
            "10.0.0.7"
        );
        let v6 = allocate(["x"], cidr("fd00::/127"))["x"];
        assert_eq!(v6.to_string(), "fd00::1");
    }

    #[test]
    fn known_values_are_stable() {
        // Pinned: a change here changes every deployment's VIPs. FNV-1a test vector first.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let vips = allocate(["web", "api"], Cidr::default());
        for n in ["web", "api"] {
            let home = (fnv1a(n.as_bytes()) as u128 % 65534) + 1;
            let IpAddr::V4(v4) = vips[n] else { panic!() };
            assert_eq!(
                (u32::from(v4) - u32::from(Ipv4Addr::new(127, 77, 0, 0))) as u128,
                home
            );
        }
        assert_eq!(vips["web"].to_string(), PINNED_WEB);
    }

    const PINNED_WEB: &str = "127.77.41.72";

    fn set() -> impl Strategy<Value = std::collections::BTreeSet<String>> {
        proptest::collection::btree_set("[a-z0-9-]{1,12}", 0..60)
    }

    proptest! {
        #[test]
        fn deterministic_distinct_inside(names in set(), prefix in 24u8..=30) {
            let c = cidr(&format!("10.1.0.0/{prefix}"));
            let a = allocate(names.iter().map(String::as_str), c);
            let b = allocate(names.iter().rev().map(String::as_str), c);
            prop_assert_eq!(&a, &b);
            let distinct: HashSet<_> = a.values().collect();
            prop_assert_eq!(distinct.len(), a.len());
            let usable = (1u128 << (32 - prefix)) - 2;
            prop_assert_eq!(a.len() as u128, (names.len() as u128).min(usable));
            let broadcast = c.ip_at_u128(to_u128(c.addr) | c.host_mask());
            for ip in a.values() {
                prop_assert!(c.contains(*ip));
                prop_assert_ne!(*ip, c.addr);
                prop_assert_ne!(*ip, broadcast);
            }
        }

        /// A service at its home keeps it unless the newcomer wants the same home; a newcomer
        /// whose home is free moves nobody.
        #[test]
        fn adding_a_service_keeps_the_others(names in set(), newcomer in "[a-z0-9-]{1,12}", prefix in 22u8..=28) {
            prop_assume!(!names.contains(&newcomer));
            let c = cidr(&format!("10.1.0.0/{prefix}"));
            let (_, size) = c.usable();
            prop_assume!((names.len() as u128) < size);
            let before = allocate(names.iter().map(String::as_str), c);
            let after = allocate(names.iter().map(String::as_str).chain([newcomer.as_str()]), c);
            let new_home = c.addr_at(fnv1a(newcomer.as_bytes()) as u128 % size);
            let home_free = !before.values().any(|ip| *ip == new_home);
            for (name, ip) in &before {
                let home = c.addr_at(fnv1a(name.as_bytes()) as u128 % size);
                if home_free || (*ip == home && home != new_home) {
                    prop_assert_eq!(Some(ip), after.get(name), "{} moved", name);
                }
            }
            if home_free {
                prop_assert_eq!(after[&newcomer], new_home);
            }
        }
    }
}
