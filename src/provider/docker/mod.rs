//! Docker and Swarm providers: turn the Engine's view (Swarm services and tasks on a manager, or
//! standalone containers) plus meshgate labels into full [`DesiredState`]s.
//!
//! Flow: [`run`] connects (with backoff) → picks the mode (`/info`: `ControlAvailable` → Swarm)
//! → [`session`] subscribes to `/events` FIRST, then relists everything, then reacts to events
//! (debounced relists, immediate drains on SIGTERM), polls tasks (Swarm has no task events) and
//! relists periodically. The desired state itself is a pure function of what was listed:
//! [`swarm::swarm_state`] and [`standalone::standalone_state`], with the label schema in
//! [`labels`] (documented in docs/labels.md).

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio_util::sync::CancellationToken;

use super::UpdateSender;
use crate::model::{parse_duration, DesiredState, EndpointSpec, Problem};

pub mod labels;
pub mod raw;
mod session;
pub mod standalone;
pub mod swarm;

/// Which API the provider reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DockerMode {
    /// Swarm when the engine is a manager (`/info` → `Swarm.ControlAvailable`), else standalone.
    #[default]
    Auto,
    /// Swarm services and tasks (the engine must be a manager).
    Swarm,
    /// Local containers only.
    Standalone,
}

/// `providers.docker:` section of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Enable the provider.
    pub enabled: bool,
    /// Engine API unix socket (`unix://` prefix accepted).
    pub endpoint: String,
    /// `auto`, `swarm` or `standalone`.
    pub mode: DockerMode,
    /// Prefix of the labels meshgate reads (`<prefix>.enable`, `<prefix>.ports`, …).
    pub label_prefix: String,
    /// Network whose task/container address to use; a `<prefix>.network` label overrides it.
    /// Unset: the first network the task/container is on (see docs/labels.md).
    pub network: Option<String>,
    /// Publish objects without `<prefix>.enable=true` too (`<prefix>.enable=false` opts out).
    pub exposed_by_default: bool,
    /// Coalescing window after an event before relisting (bursts become one relist).
    #[serde(deserialize_with = "de_duration")]
    pub debounce: Duration,
    /// Swarm: task reconciliation interval (there are no task events).
    #[serde(deserialize_with = "de_duration")]
    pub task_poll: Duration,
    /// Swarm: task reconciliation interval while a service is updating or just changed.
    #[serde(deserialize_with = "de_duration")]
    pub task_poll_updating: Duration,
    /// Full relist interval, whatever the events said (covers lost events).
    #[serde(deserialize_with = "de_duration")]
    pub relist: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: false,
            endpoint: "/var/run/docker.sock".into(),
            mode: DockerMode::Auto,
            label_prefix: "meshgate".into(),
            network: None,
            exposed_by_default: false,
            debounce: Duration::from_millis(150),
            task_poll: Duration::from_secs(1),
            task_poll_updating: Duration::from_millis(250),
            relist: Duration::from_secs(30),
        }
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl DockerConfig {
    /// The socket path without a `unix://` scheme.
    pub fn socket_path(&self) -> &str {
        self.endpoint
            .strip_prefix("unix://")
            .unwrap_or(&self.endpoint)
    }

    fn label_settings(&self) -> LabelSettings {
        LabelSettings {
            prefix: self.label_prefix.clone(),
            network: self.network.clone(),
            exposed_by_default: self.exposed_by_default,
        }
    }
}

/// The config the pure state functions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSettings {
    pub prefix: String,
    pub network: Option<String>,
    pub exposed_by_default: bool,
}

impl Default for LabelSettings {
    fn default() -> Self {
        DockerConfig::default().label_settings()
    }
}

/// Add one parsed service with its endpoints (sorted by ID so equal inputs give equal states).
/// A router name already taken by another service is a problem; the service is still served.
fn insert_service(
    state: &mut DesiredState,
    provider: &str,
    parsed: labels::ServiceLabels,
    mut endpoints: Vec<EndpointSpec>,
) {
    endpoints.sort_by(|a, b| a.id.cmp(&b.id));
    let mut spec = parsed.spec;
    spec.endpoints = endpoints;
    for router in parsed.routers {
        if let Some(existing) = state.routers.get(&router.name) {
            state.problems.push(Problem {
                provider: provider.into(),
                object: spec.name.clone(),
                message: format!(
                    "router {:?} is already defined by service {:?}; this one is ignored",
                    router.name, existing.service
                ),
            });
            continue;
        }
        state.routers.insert(router.name.clone(), router);
    }
    state.services.insert(spec.name.clone(), spec);
}

/// Run the Docker/Swarm provider until `shutdown`.
pub async fn run(cfg: DockerConfig, tx: UpdateSender, shutdown: CancellationToken) {
    session::run(cfg, tx, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_durations() {
        let cfg: DockerConfig = serde_json::from_str(r#"{"enabled": true}"#).unwrap();
        assert_eq!(
            cfg,
            DockerConfig {
                enabled: true,
                ..DockerConfig::default()
            }
        );
        let cfg: DockerConfig = serde_json::from_str(
            r#"{"endpoint":"unix:///tmp/d.sock","mode":"swarm","debounce":"100ms","task_poll":"2s","relist":"1m","network":"app"}"#,
        )
        .unwrap();
        assert_eq!(cfg.socket_path(), "/tmp/d.sock");
        assert_eq!(cfg.mode, DockerMode::Swarm);
        assert_eq!(cfg.debounce, Duration::from_millis(100));
        assert_eq!(cfg.task_poll, Duration::from_secs(2));
        assert_eq!(cfg.relist, Duration::from_secs(60));
        assert_eq!(cfg.network.as_deref(), Some("app"));
        assert!(serde_json::from_str::<DockerConfig>(r#"{"debounce":"soon"}"#).is_err());
        assert!(serde_json::from_str::<DockerConfig>(r#"{"mode":"kubernetes"}"#).is_err());
        assert!(serde_json::from_str::<DockerConfig>(r#"{"bogus":1}"#).is_err());
    }
}
