//! Standalone desired state: a pure function of the local container list, plus the containers a
//! `kill -15` event already marked as going away.
//!
//! Containers with the same service name (compose `com.docker.compose.service` label, else the
//! container name) form one service. Only running containers that are healthy (or have no
//! healthcheck) are endpoints; the service's settings come from the container with the smallest
//! ID whose labels parse (all containers of a compose service carry the same labels).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use bollard::models::{
    ContainerSummary, ContainerSummaryHealthStatusEnum, ContainerSummaryStateEnum,
    PortSummaryTypeEnum,
};

use super::labels::{parse_labels, ExposedPort, ServiceLabels};
use super::{insert_service, LabelSettings};
use crate::model::{DesiredState, EndpointSpec, Problem, Protocol};

/// Provider name used in updates and problems.
pub const PROVIDER: &str = "docker";

/// The compose label naming a container's service.
const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// The service name of a container: compose service, else the container name.
pub fn service_name(c: &ContainerSummary) -> Option<String> {
    if let Some(s) = c.labels.as_ref().and_then(|l| l.get(COMPOSE_SERVICE)) {
        return Some(s.clone());
    }
    let name = c.names.as_ref()?.first()?;
    Some(name.trim_start_matches('/').to_string())
}

/// Whether the container may receive traffic: running, not paused, and healthy if it has a
/// healthcheck. API ≥ 1.50 reports `Health`; older engines only say it in `Status` text
/// (`Up 3 seconds (healthy)`, `(health: starting)`, `(unhealthy)`).
pub fn is_serving(c: &ContainerSummary) -> bool {
    if c.state != Some(ContainerSummaryStateEnum::RUNNING) {
        return false;
    }
    match c.health.as_ref().and_then(|h| h.status) {
        Some(ContainerSummaryHealthStatusEnum::HEALTHY) => return true,
        Some(
            ContainerSummaryHealthStatusEnum::STARTING
            | ContainerSummaryHealthStatusEnum::UNHEALTHY,
        ) => return false,
        _ => {}
    }
    let status = c.status.as_deref().unwrap_or("");
    !(status.contains("(health: starting)")
        || status.contains("(unhealthy)")
        || status.contains("(Paused)"))
}

fn exposed_ports(c: &ContainerSummary) -> Vec<ExposedPort> {
    let mut out: Vec<ExposedPort> = c
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.typ {
                Some(PortSummaryTypeEnum::UDP) => Protocol::Udp,
                Some(PortSummaryTypeEnum::SCTP) => return None,
                _ => Protocol::Tcp,
            };
            Some(ExposedPort {
                port: p.private_port,
                protocol,
            })
        })
        .collect();
    // One exposed port published on IPv4 and IPv6 is listed twice.
    out.sort();
    out.dedup();
    out
}

/// The container's address on `network` if given and attached, else on its first network by
/// name; `host`-network containers answer on loopback.
fn container_ip(c: &ContainerSummary, network: Option<&str>) -> Option<IpAddr> {
    let nets = c.network_settings.as_ref()?.networks.as_ref()?;
    let ip_of = |name: &str| {
        let settings = nets.get(name)?;
        if name == "host" {
            return Some(IpAddr::from([127, 0, 0, 1]));
        }
        settings.ip_address.as_deref()?.parse().ok()
    };
    if let Some(wanted) = network {
        return ip_of(wanted);
    }
    let mut names: Vec<&String> = nets.keys().collect();
    names.sort();
    names.into_iter().find_map(|n| ip_of(n))
}

/// The containers of one service while grouping.
#[derive(Default)]
struct Group {
    /// Settings from the first container (smallest ID) whose labels parsed.
    labels: Option<ServiceLabels>,
    endpoints: Vec<EndpointSpec>,
    /// First label error of any container: the whole service is left out.
    error: Option<String>,
}

/// Compute the standalone desired state.
pub fn standalone_state(
    cfg: &LabelSettings,
    containers: &[ContainerSummary],
    sigterm: &HashSet<String>,
) -> DesiredState {
    let empty = HashMap::new();
    // Grouped by service name (sorted, so the state is deterministic).
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut sorted: Vec<&ContainerSummary> = containers.iter().filter(|c| is_serving(c)).collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut state = DesiredState::default();
    for c in sorted {
        let (Some(id), Some(name)) = (c.id.as_deref(), service_name(c)) else {
            continue;
        };
        let labels = c.labels.as_ref().unwrap_or(&empty);
        let parsed = match parse_labels(
            &cfg.prefix,
            &name,
            labels,
            &exposed_ports(c),
            cfg.exposed_by_default,
        ) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                let group = groups.entry(name).or_default();
                group.error.get_or_insert_with(|| e.to_string());
                continue;
            }
        };
        let network = parsed.network.as_deref().or(cfg.network.as_deref());
        let Some(ip) = container_ip(c, network) else {
            state.problems.push(Problem {
                provider: PROVIDER.into(),
                object: name.clone(),
                message: format!(
                    "container {} has no address on network {}",
                    short(id),
                    network.unwrap_or("(any)")
                ),
            });
            continue;
        };
        let endpoint = EndpointSpec {
            id: id.to_string(),
            ip,
            port: None,
            port_map: BTreeMap::new(),
            weight: parsed.weight,
            node: None,
            draining: sigterm.contains(id),
            slot: None,
        };
        let group = groups.entry(name).or_default();
        group.endpoints.push(endpoint);
        group.labels.get_or_insert(parsed);
    }
    for (name, group) in groups {
        if let Some(message) = group.error {
            state.problems.push(Problem {
                provider: PROVIDER.into(),
                object: name,
                message,
            });
            continue;
        }
        if let Some(parsed) = group.labels {
            insert_service(&mut state, PROVIDER, parsed, group.endpoints);
        }
    }
    state
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
#[path = "standalone_tests.rs"]
mod tests;
