//! Swarm desired state: a pure function of what a manager listed (services, tasks, nodes,
//! networks), plus the set of tasks a local `kill -15` already told us are going away.
//!
//! Endpoint rules (docs/labels.md, "Swarm endpoints"):
//! - a task is an endpoint only while `Status.State == running` on a node that is not `down`;
//! - it is routable while `DesiredState == running` on an `active`/`pause` node; it is published
//!   `draining` as soon as `DesiredState` leaves running (rolling update, scale down,
//!   `service rm`), its node is set to `drain`, or a SIGTERM was seen for its container;
//! - `vip` and `dnsrr` services are treated the same: meshgate balances over task addresses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use bollard::models::{
    EndpointPortConfigProtocolEnum, Network, Node, NodeSpecAvailabilityEnum, NodeSpecRoleEnum,
    NodeState, Service, ServiceUpdateStatusStateEnum,
};

use super::labels::{parse_labels, ExposedPort};
use super::raw::RawTask;
use super::{insert_service, LabelSettings};
use crate::model::{DesiredState, EndpointSpec, Problem, Protocol};

/// Provider name used in updates and problems.
pub const PROVIDER: &str = "swarm";

/// Everything one relist returned.
#[derive(Debug, Clone, Default)]
pub struct SwarmSnapshot {
    pub services: Vec<Service>,
    /// Services gone from `/services` whose tasks still run: their endpoints are drained, not
    /// dropped, until the tasks stop (`service rm`).
    pub removed: Vec<Service>,
    pub tasks: Vec<RawTask>,
    pub nodes: Vec<Node>,
    pub networks: Vec<Network>,
}

impl SwarmSnapshot {
    /// True while any service is in a rolling update: tasks are then polled faster.
    pub fn any_updating(&self) -> bool {
        self.services.iter().any(|s| {
            matches!(
                s.update_status.as_ref().and_then(|u| u.state),
                Some(
                    ServiceUpdateStatusStateEnum::UPDATING
                        | ServiceUpdateStatusStateEnum::ROLLBACK_STARTED
                )
            )
        })
    }

    /// Replace the service list, remembering services that vanished while tasks still run.
    pub fn set_services(&mut self, services: Vec<Service>) {
        let listed: HashSet<&str> = services.iter().filter_map(|s| s.id.as_deref()).collect();
        let mut removed: Vec<Service> = self
            .services
            .drain(..)
            .chain(self.removed.drain(..))
            .filter(|s| s.id.as_deref().is_some_and(|id| !listed.contains(id)))
            .collect();
        removed.dedup_by(|a, b| a.id == b.id);
        self.removed = removed;
        self.services = services;
        self.prune_removed();
    }

    /// Replace the task list and forget removed services none of whose tasks still run.
    pub fn set_tasks(&mut self, tasks: Vec<RawTask>) {
        self.tasks = tasks;
        self.prune_removed();
    }

    fn prune_removed(&mut self) {
        let running: HashSet<&str> = self
            .tasks
            .iter()
            .filter(|t| t.status.state == "running")
            .map(|t| t.service_id.as_str())
            .collect();
        self.removed
            .retain(|s| s.id.as_deref().is_some_and(|id| running.contains(id)));
    }

    /// IDs of tasks whose container still runs (used to forget stale SIGTERM marks).
    pub fn running_task_ids(&self) -> HashSet<String> {
        self.tasks
            .iter()
            .filter(|t| t.status.state == "running")
            .map(|t| t.id.clone())
            .collect()
    }
}

/// How a node affects the endpoints on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeRoute {
    Routable,
    Draining,
    Gone,
}

struct NodeView {
    route: NodeRoute,
    addr: Option<IpAddr>,
}

fn node_views(nodes: &[Node]) -> HashMap<&str, NodeView> {
    nodes
        .iter()
        .filter_map(|n| {
            let id = n.id.as_deref()?;
            let state = n.status.as_ref().and_then(|s| s.state);
            let availability = n.spec.as_ref().and_then(|s| s.availability);
            let route = match (state, availability) {
                (Some(NodeState::DOWN), _) => NodeRoute::Gone,
                (_, Some(NodeSpecAvailabilityEnum::DRAIN)) => NodeRoute::Draining,
                _ => NodeRoute::Routable,
            };
            Some((
                id,
                NodeView {
                    route,
                    addr: node_addr(n),
                },
            ))
        })
        .collect()
}

/// The address where a node's host-mode ports answer: `ManagerStatus.Addr` for managers (their
/// `Status.Addr` can be 0.0.0.0), `Status.Addr` otherwise; an unspecified address (single-node
/// swarm) becomes loopback, which is right when meshgate runs on that same node.
pub fn node_addr(n: &Node) -> Option<IpAddr> {
    let is_manager = n.spec.as_ref().and_then(|s| s.role) == Some(NodeSpecRoleEnum::MANAGER);
    let manager = n
        .manager_status
        .as_ref()
        .and_then(|m| m.addr.as_deref())
        .filter(|_| is_manager)
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()));
    let status = n
        .status
        .as_ref()
        .and_then(|s| s.addr.as_deref())
        .and_then(|a| a.parse::<IpAddr>().ok());
    let ip = manager.or(status)?;
    Some(if ip.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        ip
    })
}

/// Compute the Swarm desired state.
pub fn swarm_state(
    cfg: &LabelSettings,
    snap: &SwarmSnapshot,
    sigterm: &HashSet<String>,
) -> DesiredState {
    let nodes = node_views(&snap.nodes);
    let network_ids: HashMap<&str, &str> = snap
        .networks
        .iter()
        .filter_map(|n| Some((n.name.as_deref()?, n.id.as_deref()?)))
        .collect();
    let ingress: HashSet<&str> = snap
        .networks
        .iter()
        .filter(|n| n.ingress == Some(true))
        .filter_map(|n| n.id.as_deref())
        .collect();
    let mut tasks_by_service: HashMap<&str, Vec<&RawTask>> = HashMap::new();
    for t in &snap.tasks {
        tasks_by_service
            .entry(t.service_id.as_str())
            .or_default()
            .push(t);
    }

    let mut state = DesiredState::default();
    let services = snap
        .services
        .iter()
        .map(|s| (s, false))
        .chain(snap.removed.iter().map(|s| (s, true)));
    for (service, removed) in services {
        let (Some(id), Some(spec)) = (service.id.as_deref(), service.spec.as_ref()) else {
            continue;
        };
        let name = spec.name.clone().unwrap_or_else(|| id.to_string());
        let empty = HashMap::new();
        let labels = spec.labels.as_ref().unwrap_or(&empty);
        let exposed = exposed_ports(service);
        let parsed =
            match parse_labels(&cfg.prefix, &name, labels, &exposed, cfg.exposed_by_default) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    state.problems.push(Problem {
                        provider: PROVIDER.into(),
                        object: name,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
        let network = parsed.network.as_deref().or(cfg.network.as_deref());
        let network_id = network.map(|n| network_ids.get(n).copied().unwrap_or(n));
        let mut endpoints = Vec::new();
        for task in tasks_by_service.get(id).into_iter().flatten() {
            if task.status.state != "running" {
                continue;
            }
            let Some(node) = nodes.get(task.node_id.as_str()) else {
                continue;
            };
            if node.route == NodeRoute::Gone {
                continue;
            }
            let Some((ip, port_map)) = task_address(task, network, network_id, &ingress, node.addr)
            else {
                tracing::debug!(service = %name, task = %task.id, "task has no usable address");
                continue;
            };
            let draining = removed
                || task.desired_state != "running"
                || node.route == NodeRoute::Draining
                || sigterm.contains(&task.id);
            endpoints.push(EndpointSpec {
                id: task.id.clone(),
                ip,
                port: None,
                port_map,
                weight: parsed.weight,
                node: Some(task.node_id.clone()),
                draining,
                slot: task.slot.filter(|s| *s != 0),
            });
        }
        if removed {
            if endpoints.is_empty() {
                continue;
            }
            // A new service with the same name already exists: its old tasks drain in it.
            if let Some(current) = state.services.get_mut(&name) {
                current.endpoints.extend(endpoints);
                current.endpoints.sort_by(|a, b| a.id.cmp(&b.id));
                continue;
            }
        }
        insert_service(&mut state, PROVIDER, parsed, endpoints);
    }
    state
}

/// Target ports the service declares (`Spec.EndpointSpec.Ports`), for label inference.
fn exposed_ports(service: &Service) -> Vec<ExposedPort> {
    let mut out: Vec<ExposedPort> = service
        .spec
        .as_ref()
        .and_then(|s| s.endpoint_spec.as_ref())
        .and_then(|e| e.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ExposedPort {
                port: u16::try_from(p.target_port?).ok()?,
                protocol: match p.protocol {
                    Some(EndpointPortConfigProtocolEnum::UDP) => Protocol::Udp,
                    _ => Protocol::Tcp,
                },
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where to reach a task: its address on the named network if it is attached there; else the
/// node address with its host-mode port bindings; else its first non-ingress overlay address.
fn task_address(
    task: &RawTask,
    network: Option<&str>,
    network_id: Option<&str>,
    ingress: &HashSet<&str>,
    node_addr: Option<IpAddr>,
) -> Option<(IpAddr, BTreeMap<u16, u16>)> {
    let first_ip = |a: &super::raw::RawAttachment| {
        a.addresses
            .iter()
            .find_map(|cidr| cidr.split('/').next()?.parse::<IpAddr>().ok())
    };
    if let Some(wanted) = network {
        let on_named = task.networks_attachments.iter().find(|a| {
            Some(a.network.id.as_str()) == network_id
                || a.network.spec.as_ref().is_some_and(|s| s.name == wanted)
        });
        if let Some(ip) = on_named.and_then(first_ip) {
            return Some((ip, BTreeMap::new()));
        }
    }
    let host_ports: BTreeMap<u16, u16> = task
        .status
        .port_status
        .as_ref()
        .and_then(|p| p.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| p.publish_mode.as_deref() == Some("host"))
        .filter_map(|p| Some((p.target_port?, p.published_port?)))
        .collect();
    if !host_ports.is_empty() {
        if let Some(addr) = node_addr {
            return Some((addr, host_ports));
        }
    }
    task.networks_attachments
        .iter()
        .filter(|a| {
            !ingress.contains(a.network.id.as_str())
                && !a.network.spec.as_ref().is_some_and(|s| s.ingress)
        })
        .find_map(first_ip)
        .map(|ip| (ip, BTreeMap::new()))
}

/// Whether a service's update is in progress per an event's attributes (`updatestate.new`).
pub fn event_starts_update(attrs: &HashMap<String, String>) -> bool {
    matches!(
        attrs.get("updatestate.new").map(String::as_str),
        Some("updating" | "rollback_started")
    )
}

#[cfg(test)]
#[path = "swarm_tests.rs"]
mod tests;
