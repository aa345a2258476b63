//! The compiled routing snapshot and its builder.
//!
//! A [`RoutingTable`] is immutable: the control path builds a new one from a [`DesiredState`]
//! and stores it in an `ArcSwap`; the data path and the DNS server read whatever generation is
//! current. Everything expensive (balancer schedules, Maglev tables, DNS answers, listener sets)
//! is computed here, once per generation, never per request.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::balance::{Balancer, Endpoint};
use crate::dns::{DnsConfig, DnsRecords};
use crate::model::{DesiredState, Problem, Protocol, ServiceSpec};
use crate::stats::StatsRegistry;

/// What kind of socket a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenKind {
    Tcp,
    Udp,
    /// An HTTP or HTTPS entrypoint (L7).
    Http,
}

impl From<Protocol> for ListenKind {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => ListenKind::Tcp,
            Protocol::Udp => ListenKind::Udp,
        }
    }
}

impl std::fmt::Display for ListenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenKind::Tcp => "tcp",
            ListenKind::Udp => "udp",
            ListenKind::Http => "http",
        })
    }
}

/// Identity of a listener: its kind and bound address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ListenKey {
    pub kind: ListenKind,
    pub addr: SocketAddr,
}

impl std::fmt::Display for ListenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.kind, self.addr)
    }
}

/// The endpoints of a service for one target port and transport, with the balancer built over
/// them.
#[derive(Debug)]
pub struct Pool {
    /// The service's target port this pool serves.
    pub target: u16,
    /// TCP (L4 TCP ports and HTTP) or UDP: the same target over both is two pools, with their
    /// own endpoint stats.
    pub protocol: Protocol,
    /// Endpoints that may take new connections (draining ones are left out).
    pub endpoints: Box<[Endpoint]>,
    pub balancer: Balancer,
}

/// A compiled service.
#[derive(Debug)]
pub struct ServiceRoute {
    pub name: Arc<str>,
    pub spec: ServiceSpec,
    /// One pool per distinct target port and transport (L4 ports and the HTTP port, TCP).
    pub pools: Vec<Pool>,
}

impl ServiceRoute {
    /// The index of the pool for a target port over `protocol`.
    pub fn pool_index(&self, target: u16, protocol: Protocol) -> Option<usize> {
        self.pools
            .iter()
            .position(|p| p.target == target && p.protocol == protocol)
    }
}

/// What an L4 listener routes to.
#[derive(Debug, Clone)]
pub struct L4Route {
    pub service: Arc<ServiceRoute>,
    /// Index into `service.pools`.
    pub pool: usize,
}

impl L4Route {
    #[inline]
    pub fn pool(&self) -> &Pool {
        &self.service.pools[self.pool]
    }
}

/// Options of a table build that do not come from providers.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub dns: DnsConfig,
}

/// One immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RoutingTable {
    pub generation: u64,
    /// Services by name.
    pub services: BTreeMap<Arc<str>, Arc<ServiceRoute>>,
    /// L4 listeners and what they route to (published ports and VIP ports).
    pub l4: HashMap<ListenKey, L4Route>,
    /// Every listener this generation wants open, with the drain timeout to use on removal.
    pub listeners: BTreeMap<ListenKey, ListenerSpec>,
    /// Stable service VIPs.
    pub vips: BTreeMap<String, IpAddr>,
    pub dns: DnsRecords,
    /// Compiled HTTP routers per entrypoint.
    pub http: crate::http::HttpTable,
    /// Provider problems and build conflicts, for logs and the admin API.
    pub problems: Vec<Problem>,
    /// The desired state this table was built from.
    pub desired: Arc<DesiredState>,
}

/// A listener the table wants open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListenerSpec {
    pub key: ListenKey,
    /// Who asked for it (service or entrypoint name).
    pub owner: String,
    pub drain: std::time::Duration,
}

impl RoutingTable {
    /// Build a table from `desired`. Conflicts (two services on one port) are reported as
    /// problems and resolved deterministically: the service whose name sorts first keeps the port.
    pub fn build(
        desired: &DesiredState,
        opts: &BuildOptions,
        stats: &StatsRegistry,
        generation: u64,
    ) -> RoutingTable {
        let mut problems = desired.problems.clone();
        let vips = crate::dns::allocate_vips(desired, &opts.dns);
        let mut services = BTreeMap::new();
        let mut l4 = HashMap::new();
        let mut listeners = BTreeMap::new();

        for (name, spec) in &desired.services {
            let route = Arc::new(build_service(spec, stats, generation));
            for port in &spec.ports {
                let pool = route
                    .pool_index(port.target, port.protocol)
                    .expect("a pool exists for every port's target and protocol");
                let mut addrs = vec![SocketAddr::new(port.bind, port.published)];
                // A wildcard bind already accepts on the VIP (a local address), and Linux refuses
                // a second listener on VIP:port beside 0.0.0.0:port (EADDRINUSE), so the VIP
                // only gets its own listener when the port binds a specific address.
                if let Some(vip) = vips.get(name) {
                    if !(port.bind.is_unspecified() && port.bind.is_ipv4() == vip.is_ipv4()) {
                        addrs.push(SocketAddr::new(*vip, port.published));
                    }
                }
                for addr in addrs {
                    let key = ListenKey {
                        kind: port.protocol.into(),
                        addr,
                    };
                    if claim(
                        &mut listeners,
                        &mut problems,
                        key,
                        name,
                        spec.timeouts.drain,
                    ) {
                        let service = Arc::clone(&route);
                        l4.insert(key, L4Route { service, pool });
                    }
                }
            }
            services.insert(Arc::clone(&route.name), route);
        }

        for (name, ep) in &desired.entrypoints {
            let key = ListenKey {
                kind: ListenKind::Http,
                addr: ep.bind,
            };
            let drain = crate::model::Timeouts::default().drain;
            claim(&mut listeners, &mut problems, key, name, drain);
        }
        let http = crate::http::HttpTable::build(desired, &services, &mut problems);
        let dns = DnsRecords::build(desired, &vips, &opts.dns);
        RoutingTable {
            http,
            generation,
            services,
            l4,
            listeners,
            vips,
            dns,
            problems,
            desired: Arc::new(desired.clone()),
        }
    }

    pub fn service(&self, name: &str) -> Option<&Arc<ServiceRoute>> {
        self.services.get(name)
    }
}

/// Reserve `key` for `owner` unless another owner has the same socket (TCP and HTTP listeners
/// share the TCP port space); a clash becomes a problem and the first claimant keeps it.
fn claim(
    listeners: &mut BTreeMap<ListenKey, ListenerSpec>,
    problems: &mut Vec<Problem>,
    key: ListenKey,
    owner: &str,
    drain: std::time::Duration,
) -> bool {
    let same_socket = |kind| ListenKey {
        kind,
        addr: key.addr,
    };
    let rivals = match key.kind {
        ListenKind::Udp => [key, key],
        ListenKind::Tcp | ListenKind::Http => {
            [same_socket(ListenKind::Tcp), same_socket(ListenKind::Http)]
        }
    };
    if let Some(other) = rivals.iter().find_map(|k| listeners.get(k)) {
        problems.push(Problem {
            provider: "table".into(),
            object: owner.to_owned(),
            message: format!("{key} is already used by {}; ignored", other.owner),
        });
        return false;
    }
    let spec = ListenerSpec {
        key,
        owner: owner.to_owned(),
        drain,
    };
    listeners.insert(key, spec);
    true
}

fn build_service(spec: &ServiceSpec, stats: &StatsRegistry, generation: u64) -> ServiceRoute {
    let name: Arc<str> = Arc::from(spec.name.as_str());
    let mut targets: Vec<(u16, Protocol)> =
        spec.ports.iter().map(|p| (p.target, p.protocol)).collect();
    targets.extend(spec.http_port.map(|t| (t, Protocol::Tcp)));
    targets.sort_unstable();
    targets.dedup();
    let pools = targets
        .into_iter()
        .map(|(target, protocol)| build_pool(&name, spec, target, protocol, stats, generation))
        .collect();
    ServiceRoute {
        name,
        spec: spec.clone(),
        pools,
    }
}

fn build_pool(
    name: &Arc<str>,
    spec: &ServiceSpec,
    target: u16,
    protocol: Protocol,
    stats: &StatsRegistry,
    generation: u64,
) -> Pool {
    let endpoints: Box<[Endpoint]> = spec
        .endpoints
        .iter()
        .filter(|e| !e.draining && e.weight > 0)
        .map(|e| {
            let addr = SocketAddr::new(e.ip, e.port_for(target));
            Endpoint {
                addr,
                weight: e.weight,
                id: Arc::from(e.id.as_str()),
                stats: stats.get(name, protocol, addr, generation),
            }
        })
        .collect();
    let balancer = Balancer::new(spec.policy, &endpoints);
    debug_assert_eq!(balancer.policy(), spec.policy);
    Pool {
        target,
        protocol,
        endpoints,
        balancer,
    }
}

/// Used by `meshgate check`: one line per listener, saying where it routes.
pub fn describe(table: &RoutingTable) -> Vec<String> {
    let mut lines = Vec::new();
    for (key, spec) in &table.listeners {
        let line = match table.l4.get(key) {
            Some(route) => {
                let eps: Vec<String> = route
                    .pool()
                    .endpoints
                    .iter()
                    .map(|e| e.addr.to_string())
                    .collect();
                format!(
                    "{key} -> service {} ({:?}) -> [{}]",
                    spec.owner,
                    route.service.spec.policy,
                    eps.join(", ")
                )
            }
            None => {
                let routers: Vec<String> = table
                    .desired
                    .routers
                    .values()
                    .filter(|r| r.entrypoints.contains(&spec.owner))
                    .map(|r| format!("{} `{}` -> {}", r.name, r.rule, r.service))
                    .collect();
                format!(
                    "{key} -> entrypoint {} -> routers [{}]",
                    spec.owner,
                    routers.join("; ")
                )
            }
        };
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointSpec, EntrypointKind, EntrypointSpec, PortSpec};

    fn svc(name: &str, port: u16) -> ServiceSpec {
        let mut s = ServiceSpec::new(name);
        s.ports.push(PortSpec {
            published: port,
            target: 80,
            protocol: Protocol::Tcp,
            bind: "0.0.0.0".parse().unwrap(),
        });
        s.endpoints
            .push(EndpointSpec::from_addr("10.0.0.1:80".parse().unwrap()));
        s
    }

    #[test]
    fn port_clashes_are_problems_first_claimant_wins() {
        let mut d = DesiredState::default();
        d.services.insert("a".into(), svc("a", 8080));
        d.services.insert("b".into(), svc("b", 8080));
        d.entrypoints.insert(
            "web".into(),
            EntrypointSpec::new("web", "0.0.0.0:8080".parse().unwrap(), EntrypointKind::Http),
        );
        let t = RoutingTable::build(&d, &BuildOptions::default(), &StatsRegistry::default(), 1);
        assert_eq!(t.listeners.len(), 1);
        assert_eq!(t.listeners.values().next().unwrap().owner, "a");
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
        assert!(t.problems.iter().any(|p| p.object == "web"));
    }

    /// The same target over TCP and UDP (DNS on 53/tcp and 53/udp) is two pools whose endpoints
    /// have their own stats: a TCP verdict does not eject the UDP endpoint, nor the reverse; and
    /// each listener routes to its own transport's pool.
    #[test]
    fn tcp_and_udp_on_one_target_keep_separate_endpoint_stats() {
        let stats = StatsRegistry::default();
        let mut s = svc("dns", 5353);
        s.ports.push(PortSpec {
            protocol: Protocol::Udp,
            ..s.ports[0]
        });
        let mut d = DesiredState::default();
        d.services.insert("dns".into(), s);
        let t = RoutingTable::build(&d, &BuildOptions::default(), &stats, 1);
        let route_of = |kind| {
            let addr = "0.0.0.0:5353".parse().unwrap();
            t.l4[&ListenKey { kind, addr }].pool()
        };
        let (tcp, udp) = (route_of(ListenKind::Tcp), route_of(ListenKind::Udp));
        assert_eq!((tcp.protocol, udp.protocol), (Protocol::Tcp, Protocol::Udp));
        assert_eq!(tcp.endpoints[0].addr, udp.endpoints[0].addr);
        udp.endpoints[0]
            .stats
            .record_failure(crate::clock::now_ms());
        let now = crate::clock::now_ms();
        assert!(!udp.endpoints[0].stats.is_available(now));
        assert!(
            tcp.endpoints[0].stats.is_available(now),
            "TCP is not ejected"
        );
        // A rebuild finds each transport's stats again.
        let t2 = RoutingTable::build(&d, &BuildOptions::default(), &stats, 2);
        let pools = &t2.services["dns"].pools;
        let udp2 = &pools[t2.services["dns"].pool_index(80, Protocol::Udp).unwrap()];
        assert!(Arc::ptr_eq(
            &udp2.endpoints[0].stats,
            &udp.endpoints[0].stats
        ));
        assert_eq!(pools.len(), 2);
    }

    #[test]
    fn draining_endpoints_leave_pools_and_stats_survive_rebuilds() {
        let stats = StatsRegistry::default();
        let mut d = DesiredState::default();
        let mut s = svc("a", 8080);
        s.endpoints
            .push(EndpointSpec::from_addr("10.0.0.2:80".parse().unwrap()));
        d.services.insert("a".into(), s.clone());
        let t1 = RoutingTable::build(&d, &BuildOptions::default(), &stats, 1);
        let first = Arc::clone(&t1.services["a"].pools[0].endpoints[0].stats);
        let _guard = first.start();
        s.endpoints[1].draining = true;
        d.services.insert("a".into(), s);
        let t2 = RoutingTable::build(&d, &BuildOptions::default(), &stats, 2);
        let pool = &t2.services["a"].pools[0];
        assert_eq!(
            pool.endpoints.len(),
            1,
            "draining endpoint gets no new connections"
        );
        assert!(
            Arc::ptr_eq(&pool.endpoints[0].stats, &first),
            "stats survive the swap"
        );
        assert_eq!(pool.endpoints[0].stats.in_flight(), 1);
    }
}
