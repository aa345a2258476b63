//! Embedded DNS and service VIPs. PLACEHOLDER INTERFACE: the DNS helper replaces the bodies.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::model::DesiredState;

/// `dns:` section of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Serve DNS at all.
    pub enabled: bool,
}

/// DNS answers precomputed at table build; part of one [`RoutingTable`](crate::table::RoutingTable).
#[derive(Debug, Default)]
pub struct DnsRecords {}

impl DnsRecords {
    /// Build records for `desired`; `vips` maps service name → VIP.
    pub fn build(
        _desired: &DesiredState,
        _vips: &BTreeMap<String, IpAddr>,
        _cfg: &DnsConfig,
    ) -> Self {
        DnsRecords {}
    }
}

/// Stable VIP per service (empty when VIPs are off).
pub fn allocate_vips(_desired: &DesiredState, _cfg: &DnsConfig) -> BTreeMap<String, IpAddr> {
    BTreeMap::new()
}
