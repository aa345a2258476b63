//! Docker and Swarm providers. PLACEHOLDER INTERFACE: the discovery helper replaces the bodies.

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::UpdateSender;

/// `providers.docker:` section of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Enable the provider.
    pub enabled: bool,
}

/// Run the Docker/Swarm provider until `shutdown`.
pub async fn run(_cfg: DockerConfig, _tx: UpdateSender, shutdown: CancellationToken) {
    shutdown.cancelled().await
}
