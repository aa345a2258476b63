//! Endpoint picking. PLACEHOLDER INTERFACE: the balance helper replaces the bodies.
//!
//! Pure functions over an immutable endpoint slice plus per-endpoint atomics; no allocation and
//! no lock per pick. Expensive state (schedules, Maglev tables) is built with the table.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::Policy;
use crate::stats::EndpointStats;

/// One endpoint as the data path sees it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Resolved upstream address.
    pub addr: SocketAddr,
    pub weight: u32,
    /// Stable identity (task ID, container ID or address).
    pub id: Arc<str>,
    pub stats: Arc<EndpointStats>,
}

/// Indices already tried for this request (retries go to a different endpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exclude {
    idx: [u32; 4],
    len: u8,
}

impl Exclude {
    pub fn insert(&mut self, i: usize) {
        if (self.len as usize) < self.idx.len() {
            self.idx[self.len as usize] = i as u32;
            self.len += 1;
        }
    }
    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        self.idx[..self.len as usize].contains(&(i as u32))
    }
}

/// Inputs of one pick.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickContext {
    /// Hash of the stickiness key (client IP for consistent hashing).
    pub hash: u64,
    pub now_ms: u64,
    pub now_ns: u64,
    pub exclude: Exclude,
}

/// Per-pool balancer state, built on the control path.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
}

impl Balancer {
    pub fn new(policy: Policy, _endpoints: &[Endpoint]) -> Self {
        Balancer { policy }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Index of the endpoint to use, or `None` if no endpoint is available.
    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext) -> Option<usize> {
        (0..endpoints.len())
            .find(|&i| !ctx.exclude.contains(i) && endpoints[i].stats.is_available(ctx.now_ms))
    }
}

/// Hash of a client IP for consistent hashing.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u64,
        IpAddr::V6(v6) => u128::from(v6) as u64,
    }
}
