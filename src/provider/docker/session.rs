//! The provider's connection life cycle: connect with backoff, subscribe to `/events` before
//! relisting, then keep the desired state current from events, polls and periodic relists.
//!
//! Publishing rule: a state is sent only after every list call of that round succeeded and only
//! when it differs from the last one sent; any API failure sends `Error` and ends the session
//! (the control path keeps the previous state), and the next session resubscribes and relists.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use bollard::query_parameters::{
    ListContainersOptions, ListNetworksOptions, ListNodesOptions, ListServicesOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::raw::{RawClient, RawEvent, RawTask};
use super::standalone::{self, standalone_state};
use super::swarm::{self, swarm_state, SwarmSnapshot};
use super::{DockerConfig, DockerMode};
use crate::model::DesiredState;
use crate::provider::{ProviderEvent, ProviderUpdate, UpdateSender};

/// First reconnect delay; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// After a service event, tasks change for a while (scheduling, scale, update start): poll them
/// at the fast rate for this long so the change is seen well within the slow poll interval.
const FAST_POLL_AFTER_SERVICE_EVENT: Duration = Duration::from_secs(5);
/// After a local task container event, its task's state reaches the manager shortly after.
const FAST_POLL_AFTER_CONTAINER_EVENT: Duration = Duration::from_secs(2);
/// Bollard's per-request timeout (seconds) for list calls.
const BOLLARD_TIMEOUT_S: u64 = 30;

/// The channel to the control path is gone: nothing left to do.
struct Closed;

/// Sends full states, skipping states equal to the last one sent by this provider.
struct Publisher {
    provider: &'static str,
    tx: UpdateSender,
    last: Option<DesiredState>,
}

impl Publisher {
    fn new(provider: &'static str, tx: UpdateSender) -> Self {
        Publisher {
            provider,
            tx,
            last: None,
        }
    }

    async fn state(&mut self, state: DesiredState) -> Result<(), Closed> {
        if self.last.as_ref() == Some(&state) {
            return Ok(());
        }
        let endpoints: usize = state.services.values().map(|s| s.endpoints.len()).sum();
        tracing::info!(
            provider = self.provider,
            services = state.services.len(),
            endpoints,
            problems = state.problems.len(),
            "desired state changed"
        );
        self.last = Some(state.clone());
        self.send(ProviderEvent::State(state)).await
    }

    async fn error(&self, message: String) -> Result<(), Closed> {
        tracing::warn!(provider = self.provider, error = %message, "docker provider error");
        self.send(ProviderEvent::Error(message)).await
    }

    async fn send(&self, event: ProviderEvent) -> Result<(), Closed> {
        self.tx
            .send(ProviderUpdate {
                provider: self.provider,
                event,
            })
            .await
            .map_err(|_| Closed)
    }
}

/// How a session ended.
enum End {
    Shutdown,
    Closed,
    /// `synced`: the session had published a full relist, so the backoff restarts from the minimum.
    Failed {
        message: String,
        synced: bool,
    },
}

impl From<Closed> for End {
    fn from(_: Closed) -> Self {
        End::Closed
    }
}

/// Connection loop: sessions until shutdown, with exponential backoff between failures.
pub async fn run(cfg: DockerConfig, tx: UpdateSender, shutdown: CancellationToken) {
    let mut docker_out = Publisher::new(standalone::PROVIDER, tx.clone());
    let mut swarm_out = Publisher::new(swarm::PROVIDER, tx);
    let mut delay = BACKOFF_MIN;
    let mut last_provider = standalone::PROVIDER;
    loop {
        // Connecting can hang as long as bollard's timeout: shutdown must not wait for it.
        let end = tokio::select! {
            _ = shutdown.cancelled() => return,
            end = session(&cfg, &mut docker_out, &mut swarm_out, &mut last_provider, &shutdown) => end,
        };
        let (message, synced) = match end {
            End::Shutdown | End::Closed => return,
            End::Failed { message, synced } => (message, synced),
        };
        if synced {
            delay = BACKOFF_MIN;
        }
        let out = if last_provider == swarm::PROVIDER {
            &swarm_out
        } else {
            &docker_out
        };
        if out.error(message).await.is_err() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

fn failed(message: impl std::fmt::Display, synced: bool) -> End {
    End::Failed {
        message: message.to_string(),
        synced,
    }
}

async fn session(
    cfg: &DockerConfig,
    docker_out: &mut Publisher,
    swarm_out: &mut Publisher,
    last_provider: &mut &'static str,
    shutdown: &CancellationToken,
) -> End {
    let socket = cfg.socket_path();
    let docker = match Docker::connect_with_unix(socket, BOLLARD_TIMEOUT_S, API_DEFAULT_VERSION) {
        Ok(d) => d,
        Err(e) => return failed(format_args!("docker engine at {socket}: {e}"), false),
    };
    let docker = match docker.negotiate_version().await {
        Ok(d) => d,
        Err(e) => return failed(format_args!("docker engine at {socket}: {e}"), false),
    };
    let version = docker.client_version();
    let raw = RawClient::new(socket, version.major_version, version.minor_version);
    let swarm_mode = match cfg.mode {
        DockerMode::Swarm => true,
        DockerMode::Standalone => false,
        DockerMode::Auto => match docker.info().await {
            Ok(info) => info
                .swarm
                .and_then(|s| s.control_available)
                .unwrap_or(false),
            Err(e) => return failed(format_args!("docker /info: {e}"), false),
        },
    };
    tracing::info!(socket, swarm = swarm_mode, api = %format!("{}.{}", version.major_version, version.minor_version), "connected to docker engine");
    let result = if swarm_mode {
        *last_provider = swarm::PROVIDER;
        swarm_session(cfg, &docker, &raw, swarm_out, shutdown).await
    } else {
        *last_provider = standalone::PROVIDER;
        standalone_session(cfg, &docker, &raw, docker_out, shutdown).await
    };
    // The session loops only ever end with an `End` (as `Err`, so that `?` works inside).
    match result {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

/// SIGTERM sent to a container (`docker stop`, `docker kill -s TERM`, Swarm task shutdown).
fn is_sigterm(ev: &RawEvent) -> bool {
    ev.action == "kill"
        && matches!(
            ev.actor.attributes.get("signal").map(String::as_str),
            Some("15" | "SIGTERM" | "TERM")
        )
}

/// Container actions after which the container list may differ for us.
fn container_changed(action: &str) -> bool {
    matches!(
        action,
        "start"
            | "restart"
            | "die"
            | "stop"
            | "kill"
            | "destroy"
            | "pause"
            | "unpause"
            | "rename"
            | "update"
    ) || action.starts_with("health_status")
}

/// A coalescing timer: armed by the first trigger, fires once `window` later.
struct Debounce {
    window: Duration,
    deadline: Option<Instant>,
}

impl Debounce {
    fn arm(&mut self) {
        self.deadline
            .get_or_insert_with(|| Instant::now() + self.window);
    }

    /// Sleep until the deadline, or forever when disarmed (for `select!`).
    async fn fired(&self) {
        match self.deadline {
            Some(d) => sleep_until(d).await,
            None => std::future::pending().await,
        }
    }
}

async fn list_containers(
    docker: &Docker,
) -> Result<Vec<bollard::models::ContainerSummary>, String> {
    docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await
        .map_err(|e| format!("docker list containers: {e}"))
}

async fn standalone_session(
    cfg: &DockerConfig,
    docker: &Docker,
    raw: &RawClient,
    out: &mut Publisher,
    shutdown: &CancellationToken,
) -> Result<Infallible, End> {
    let settings = cfg.label_settings();
    let mut events = match raw.subscribe_events(&["container"]).await {
        Ok(rx) => rx,
        Err(e) => return Err(failed(format_args!("docker events: {e}"), false)),
    };
    let mut containers = match list_containers(docker).await {
        Ok(c) => c,
        Err(e) => return Err(failed(e, false)),
    };
    let mut sigterm: HashSet<String> = HashSet::new();
    out.state(standalone_state(&settings, &containers, &sigterm))
        .await?;
    let mut debounce = Debounce {
        window: cfg.debounce,
        deadline: None,
    };
    let mut next_relist = Instant::now() + cfg.relist;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            ev = events.recv() => {
                let Some(ev) = ev else { return Err(failed("docker event stream ended", true)) };
                if is_sigterm(&ev) && containers.iter().any(|c| c.id.as_deref() == Some(ev.actor.id.as_str())) && sigterm.insert(ev.actor.id.clone()) {
                    // Drain at once: the container may close its listener any moment now.
                    tracing::info!(container = %ev.actor.id, "SIGTERM seen: draining");
                    out.state(standalone_state(&settings, &containers, &sigterm)).await?;
                }
                if container_changed(&ev.action) {
                    debounce.arm();
                }
                continue;
            }
            _ = debounce.fired() => {}
            _ = sleep_until(next_relist) => {
                // `auto` re-decides the mode only per session: notice a `swarm init` here.
                if cfg.mode == DockerMode::Auto {
                    match docker.info().await {
                        Ok(info) if info.swarm.as_ref().and_then(|s| s.control_available).unwrap_or(false) => {
                            return Err(failed("the engine became a swarm manager: switching to swarm mode", true));
                        }
                        Ok(_) => {}
                        Err(e) => return Err(failed(format_args!("docker /info: {e}"), true)),
                    }
                }
            }
        }
        debounce.deadline = None;
        next_relist = Instant::now() + cfg.relist;
        containers = match list_containers(docker).await {
            Ok(c) => c,
            Err(e) => return Err(failed(e, true)),
        };
        let running: HashSet<&str> = containers.iter().filter_map(|c| c.id.as_deref()).collect();
        sigterm.retain(|id| running.contains(id.as_str()));
        out.state(standalone_state(&settings, &containers, &sigterm))
            .await?;
    }
}

/// What the next Swarm refresh must list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refresh {
    Tasks,
    Full,
}

async fn list_tasks(raw: &RawClient) -> Result<Vec<RawTask>, String> {
    raw.get_json("/tasks")
        .await
        .map_err(|e| format!("docker list tasks: {e}"))
}

async fn full_list(
    docker: &Docker,
    raw: &RawClient,
    snap: &mut SwarmSnapshot,
) -> Result<(), String> {
    let (services, tasks, nodes, networks) = tokio::try_join!(
        async {
            docker
                .list_services(None::<ListServicesOptions>)
                .await
                .map_err(|e| format!("docker list services: {e}"))
        },
        list_tasks(raw),
        async {
            docker
                .list_nodes(None::<ListNodesOptions>)
                .await
                .map_err(|e| format!("docker list nodes: {e}"))
        },
        async {
            docker
                .list_networks(None::<ListNetworksOptions>)
                .await
                .map_err(|e| format!("docker list networks: {e}"))
        },
    )?;
    snap.set_services(services);
    snap.set_tasks(tasks);
    snap.nodes = nodes;
    snap.networks = networks;
    Ok(())
}

async fn swarm_session(
    cfg: &DockerConfig,
    docker: &Docker,
    raw: &RawClient,
    out: &mut Publisher,
    shutdown: &CancellationToken,
) -> Result<Infallible, End> {
    let settings = cfg.label_settings();
    let mut events = match raw
        .subscribe_events(&["service", "node", "network", "container"])
        .await
    {
        Ok(rx) => rx,
        Err(e) => return Err(failed(format_args!("docker events: {e}"), false)),
    };
    let mut snap = SwarmSnapshot::default();
    if let Err(e) = full_list(docker, raw, &mut snap).await {
        return Err(failed(e, false));
    }
    let mut sigterm: HashSet<String> = HashSet::new();
    out.state(swarm_state(&settings, &snap, &sigterm)).await?;

    let mut debounce = Debounce {
        window: cfg.debounce,
        deadline: None,
    };
    let mut pending = Refresh::Tasks;
    let mut fast_until = Instant::now();
    let poll_interval = |snap: &SwarmSnapshot, fast_until: Instant| {
        if snap.any_updating() || Instant::now() < fast_until {
            cfg.task_poll_updating
        } else {
            cfg.task_poll
        }
    };
    let mut next_poll = Instant::now() + poll_interval(&snap, fast_until);
    let mut next_relist = Instant::now() + cfg.relist;
    loop {
        let refresh = tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            ev = events.recv() => {
                let Some(ev) = ev else { return Err(failed("docker event stream ended", true)) };
                match ev.kind.as_str() {
                    "service" | "node" | "network" => {
                        if ev.kind == "service" {
                            fast_until = Instant::now() + FAST_POLL_AFTER_SERVICE_EVENT;
                            if swarm::event_starts_update(&ev.actor.attributes) {
                                next_poll = next_poll.min(Instant::now() + cfg.task_poll_updating);
                            }
                        }
                        pending = Refresh::Full;
                        debounce.arm();
                    }
                    "container" => {
                        let task = ev.actor.attributes.get("com.docker.swarm.task.id");
                        let Some(task) = task else { continue };
                        if is_sigterm(&ev)
                            && snap.tasks.iter().any(|t| &t.id == task && t.status.state == "running")
                            && sigterm.insert(task.clone())
                        {
                            tracing::info!(task = %task, "SIGTERM seen for a task container: draining");
                            out.state(swarm_state(&settings, &snap, &sigterm)).await?;
                        }
                        if container_changed(&ev.action) {
                            debounce.arm();
                            // The manager learns the task's new state from the agent a little
                            // after the container event: keep polling fast for a while.
                            fast_until = fast_until.max(Instant::now() + FAST_POLL_AFTER_CONTAINER_EVENT);
                            next_poll = next_poll.min(Instant::now() + cfg.task_poll_updating);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            _ = debounce.fired() => std::mem::replace(&mut pending, Refresh::Tasks),
            _ = sleep_until(next_poll) => Refresh::Tasks,
            _ = sleep_until(next_relist) => Refresh::Full,
        };
        if refresh == Refresh::Full {
            debounce.deadline = None;
            pending = Refresh::Tasks;
            next_relist = Instant::now() + cfg.relist;
            if let Err(e) = full_list(docker, raw, &mut snap).await {
                return Err(failed(e, true));
            }
        } else {
            if debounce.deadline.is_some_and(|d| d <= Instant::now()) {
                debounce.deadline = None;
            }
            match list_tasks(raw).await {
                Ok(tasks) => snap.set_tasks(tasks),
                Err(e) => return Err(failed(e, true)),
            }
        }
        next_poll = Instant::now() + poll_interval(&snap, fast_until);
        let running = snap.running_task_ids();
        sigterm.retain(|id| running.contains(id));
        out.state(swarm_state(&settings, &snap, &sigterm)).await?;
    }
}
