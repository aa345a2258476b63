//! The label schema (docs/labels.md): a pure parser from one object's labels (a Swarm service's
//! `Spec.Labels` or a standalone container's labels) to the service template it describes.
//!
//! Called by both the Swarm and the standalone provider; errors name the offending label so a
//! [`Problem`](crate::model::Problem) can be reported and only that service left out.

use std::collections::HashMap;

use crate::model::{
    parse_duration, Policy, PortSpec, Protocol, ProxyProtocol, RouterSpec, ServiceSpec,
};

/// A port the object exposes (Swarm `Spec.EndpointSpec.Ports[].TargetPort`, or a container's
/// exposed port): used to infer targets that the labels leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExposedPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// What the labels of one object say: the service without endpoints, plus per-endpoint settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLabels {
    /// Service template: ports, policy, timeouts… `endpoints` is empty.
    pub spec: ServiceSpec,
    /// HTTP routers declared on this object.
    pub routers: Vec<RouterSpec>,
    /// Weight of each endpoint of this object (`<prefix>.weight`, default 1).
    pub weight: u32,
    /// Network whose address to use (`<prefix>.network`), overriding the provider config.
    pub network: Option<String>,
}

/// A label that could not be used; the whole object is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelError {
    /// Full label key, e.g. `meshgate.ports`.
    pub label: String,
    pub message: String,
}

impl std::fmt::Display for LabelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "label {}: {}", self.label, self.message)
    }
}

/// Router fields collected before validation (labels arrive in any order).
#[derive(Default)]
struct RouterDraft {
    rule: Option<String>,
    entrypoints: Vec<String>,
    priority: i64,
    service: Option<String>,
}

/// Parse the labels of one object named `name`.
///
/// Returns `Ok(None)` when the object is not enabled (`<prefix>.enable` absent and
/// `exposed_by_default` false, or `<prefix>.enable=false`). Unknown keys under the prefix are
/// errors: a typo must not silently drop a setting.
pub fn parse_labels(
    prefix: &str,
    name: &str,
    labels: &HashMap<String, String>,
    exposed: &[ExposedPort],
    exposed_by_default: bool,
) -> Result<Option<ServiceLabels>, LabelError> {
    let dotted = format!("{prefix}.");
    // Sorted so that the first error reported is deterministic.
    let mut ours: Vec<(&str, &str, &str)> = labels
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&dotted)
                .map(|rest| (k.as_str(), rest, v.as_str()))
        })
        .collect();
    ours.sort();

    let err = |label: &str, message: String| LabelError {
        label: label.to_string(),
        message,
    };

    let enable_key = format!("{prefix}.enable");
    let enabled = match labels.get(&enable_key) {
        Some(v) => parse_bool(v).map_err(|m| err(&enable_key, m))?,
        None => exposed_by_default,
    };
    if !enabled {
        return Ok(None);
    }

    let mut spec = ServiceSpec::new(name);
    let mut routers: std::collections::BTreeMap<String, RouterDraft> = Default::default();
    let mut weight = 1u32;
    let mut network = None;
    let mut ports_text = None;
    let mut http_port_label = None;

    for (key, rest, value) in ours {
        let value = value.trim();
        match rest {
            "enable" => {}
            "ports" => ports_text = Some((key, value)),
            "http.port" => http_port_label = Some(parse_port(value).map_err(|m| err(key, m))?),
            "policy" => spec.policy = parse_policy(value).map_err(|m| err(key, m))?,
            "sticky.cookie" => {
                if value.is_empty() || value.contains([';', '=', ' ', ',']) {
                    return Err(err(key, format!("invalid cookie name {value:?}")));
                }
                spec.sticky_cookie = Some(value.to_string());
            }
            "retries" => {
                spec.retries = value
                    .parse()
                    .map_err(|_| err(key, format!("expected a count, got {value:?}")))?
            }
            "timeouts.connect" => {
                spec.timeouts.connect = parse_duration(value).map_err(|m| err(key, m))?
            }
            "timeouts.drain" => {
                spec.timeouts.drain = parse_duration(value).map_err(|m| err(key, m))?
            }
            "timeouts.idle" => {
                spec.timeouts.idle = parse_optional_duration(value).map_err(|m| err(key, m))?
            }
            "timeouts.response" => {
                spec.timeouts.response = parse_optional_duration(value).map_err(|m| err(key, m))?
            }
            "proxy_protocol" => {
                spec.proxy_protocol = match value {
                    "v1" => ProxyProtocol::V1,
                    "v2" => ProxyProtocol::V2,
                    "none" | "" => ProxyProtocol::None,
                    _ => return Err(err(key, format!("expected v1, v2 or none, got {value:?}"))),
                }
            }
            "weight" => {
                weight = value
                    .parse()
                    .map_err(|_| err(key, format!("expected a weight 0..2^32, got {value:?}")))?
            }
            "network" => {
                if value.is_empty() {
                    return Err(err(key, "empty network name".into()));
                }
                network = Some(value.to_string())
            }
            _ => {
                let Some(router_rest) = rest.strip_prefix("http.routers.") else {
                    return Err(err(key, "unknown label".into()));
                };
                let Some((router, field)) = router_rest.rsplit_once('.') else {
                    return Err(err(key, "expected http.routers.<name>.<field>".into()));
                };
                if router.is_empty() {
                    return Err(err(key, "empty router name".into()));
                }
                let draft = routers.entry(router.to_string()).or_default();
                match field {
                    "rule" => draft.rule = Some(value.to_string()),
                    "entrypoints" => {
                        draft.entrypoints = value
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    }
                    "priority" => {
                        draft.priority = value
                            .parse()
                            .map_err(|_| err(key, format!("expected an integer, got {value:?}")))?
                    }
                    "service" => draft.service = Some(value.to_string()),
                    _ => return Err(err(key, format!("unknown router field {field:?}"))),
                }
            }
        }
    }

    if let Some((key, text)) = ports_text {
        spec.ports = parse_ports(text, exposed).map_err(|m| err(key, m))?;
    }

    let single_tcp = single_exposed(exposed);
    spec.http_port = http_port_label.or(single_tcp);

    let mut out_routers = Vec::with_capacity(routers.len());
    for (router, draft) in routers {
        let rule_key = format!("{prefix}.http.routers.{router}.rule");
        let rule = draft
            .rule
            .filter(|r| !r.is_empty())
            .ok_or_else(|| err(&rule_key, "router has no rule".into()))?;
        let service = draft.service.unwrap_or_else(|| name.to_string());
        // A router to this service needs to know which port of the endpoints speaks HTTP.
        if service == name && spec.http_port.is_none() {
            return Err(err(
                &format!("{prefix}.http.port"),
                "required: the HTTP port cannot be inferred (the service does not expose exactly one port)"
                    .into(),
            ));
        }
        out_routers.push(RouterSpec {
            name: router,
            entrypoints: draft.entrypoints,
            rule,
            service,
            priority: draft.priority,
        });
    }

    Ok(Some(ServiceLabels {
        spec,
        routers: out_routers,
        weight,
        network,
    }))
}

/// The exposed port when there is exactly one (any protocol): the natural inference target.
fn single_exposed(exposed: &[ExposedPort]) -> Option<u16> {
    match exposed {
        [only] => Some(only.port),
        _ => None,
    }
}

/// `published[:target][/proto]` entries separated by commas.
fn parse_ports(text: &str, exposed: &[ExposedPort]) -> Result<Vec<PortSpec>, String> {
    let mut ports = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (addr, proto) = match entry.split_once('/') {
            Some((a, "tcp")) => (a, Protocol::Tcp),
            Some((a, "udp")) => (a, Protocol::Udp),
            Some((_, p)) => {
                return Err(format!("unknown protocol {p:?} in {entry:?} (tcp or udp)"))
            }
            None => (entry, Protocol::Tcp),
        };
        let (published, target) = match addr.split_once(':') {
            Some((p, t)) => (parse_port(p)?, parse_port(t)?),
            None => {
                let published = parse_port(addr)?;
                let target = single_exposed(exposed).ok_or_else(|| {
                    format!(
                        "{entry:?} has no target port and it cannot be inferred \
                         (the service exposes {} ports; write published:target)",
                        exposed.len()
                    )
                })?;
                (published, target)
            }
        };
        let spec = PortSpec {
            published,
            target,
            protocol: proto,
            bind: std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        if ports
            .iter()
            .any(|p: &PortSpec| p.published == published && p.protocol == proto)
        {
            return Err(format!("port {published}/{proto} is listed twice"));
        }
        ports.push(spec);
    }
    if ports.is_empty() {
        return Err("no ports listed".into());
    }
    ports.sort();
    Ok(ports)
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("invalid port {text:?} (1-65535)")),
    }
}

fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, got {text:?}")),
    }
}

fn parse_policy(text: &str) -> Result<Policy, String> {
    Ok(match text {
        "round_robin" => Policy::RoundRobin,
        "least_conn" => Policy::LeastConn,
        "p2c" => Policy::P2c,
        "consistent_hash" => Policy::ConsistentHash,
        _ => {
            return Err(format!(
                "unknown policy {text:?} (round_robin, least_conn, p2c, consistent_hash)"
            ))
        }
    })
}

/// `none` or `0` disables the timeout; otherwise a duration.
fn parse_optional_duration(text: &str) -> Result<Option<std::time::Duration>, String> {
    if text == "none" {
        return Ok(None);
    }
    let d = parse_duration(text)?;
    Ok((!d.is_zero()).then_some(d))
}

#[cfg(test)]
#[path = "labels_tests.rs"]
mod tests;
