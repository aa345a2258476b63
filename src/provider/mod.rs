//! Providers: sources of desired state. Each publishes *full* [`DesiredState`]s on a channel;
//! the control path keeps the latest one per provider and merges them.

use crate::model::DesiredState;

pub mod docker;
pub mod file;

/// What a provider tells the control path.
#[derive(Debug, Clone)]
pub enum ProviderEvent {
    /// A complete, validated desired state replacing this provider's previous one.
    State(DesiredState),
    /// The provider could not produce a state (bad file, API error). The previous state of this
    /// provider keeps serving; the message is logged, counted and shown by the admin API.
    Error(String),
}

/// A provider's message, tagged with its name (`file`, `docker`, `swarm`).
#[derive(Debug, Clone)]
pub struct ProviderUpdate {
    pub provider: &'static str,
    pub event: ProviderEvent,
}

/// Where providers send their updates.
pub type UpdateSender = tokio::sync::mpsc::Sender<ProviderUpdate>;
