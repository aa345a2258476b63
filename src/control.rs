//! The control path: provider states in, a new routing table out.
//!
//! One task owns this loop. It keeps the latest full [`DesiredState`] of each provider, merges
//! them, builds a [`RoutingTable`] with the next generation number, stores it atomically, and
//! then reconciles the listeners. A provider error keeps that provider's previous state; the
//! data path never sees a partial table.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::listener::ListenerSet;
use crate::metrics::Metrics;
use crate::model::{DesiredState, Problem};
use crate::provider::{ProviderEvent, ProviderUpdate};
use crate::stats::StatsRegistry;
use crate::table::{BuildOptions, RoutingTable};

/// How often listeners that failed to bind are tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// What the admin API shows about the control path.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Status {
    pub generation: u64,
    pub services: usize,
    pub listeners_open: Vec<String>,
    pub listeners_failed: BTreeMap<String, String>,
    /// Last rejected update per provider (cleared by the next accepted one).
    pub provider_errors: BTreeMap<String, String>,
    pub problems: Vec<Problem>,
}

/// Shared, read-mostly status; written only by the control task, read by the admin API.
pub type SharedStatus = Arc<Mutex<Status>>;

/// The control task's state.
pub struct Control {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub stats: Arc<StatsRegistry>,
    pub metrics: Arc<Metrics>,
    pub listeners: ListenerSet,
    pub options: BuildOptions,
    pub status: SharedStatus,
    states: BTreeMap<&'static str, DesiredState>,
    generation: u64,
    /// The generation of the table just stored, for tasks that follow table changes.
    generations: watch::Sender<u64>,
}

impl Control {
    pub fn new(
        table: Arc<ArcSwap<RoutingTable>>,
        stats: Arc<StatsRegistry>,
        metrics: Arc<Metrics>,
        listeners: ListenerSet,
        options: BuildOptions,
        status: SharedStatus,
    ) -> Self {
        Control {
            table,
            stats,
            metrics,
            listeners,
            options,
            status,
            states: BTreeMap::new(),
            generation: 0,
            generations: watch::Sender::new(0),
        }
    }

    /// Follow table changes: the receiver sees each new generation once it is stored.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generations.subscribe()
    }

    /// Apply one provider update: rebuild and swap the table, then reconcile listeners.
    pub async fn apply(&mut self, update: ProviderUpdate) {
        match update.event {
            ProviderEvent::State(state) => {
                if self.states.get(update.provider) == Some(&state) {
                    tracing::debug!(provider = update.provider, "provider state unchanged");
                    self.status_mut().provider_errors.remove(update.provider);
                    return;
                }
                self.states.insert(update.provider, state);
                self.status_mut().provider_errors.remove(update.provider);
                self.rebuild().await;
            }
            ProviderEvent::Error(message) => {
                Metrics::inc(&self.metrics.provider_errors, "provider", update.provider);
                tracing::error!(provider = update.provider, error = %message,
                    "provider update rejected; the previous table keeps serving");
                self.status_mut()
                    .provider_errors
                    .insert(update.provider.to_owned(), message);
            }
        }
    }

    /// Merge every provider's state: services by name, the first provider (by name) wins a
    /// clash and the clash is reported.
    fn merged(&self) -> DesiredState {
        let mut merged = DesiredState::default();
        for (provider, state) in &self.states {
            for (name, svc) in &state.services {
                if merged.services.contains_key(name) {
                    merged.problems.push(Problem {
                        provider: (*provider).to_owned(),
                        object: name.clone(),
                        message: "service defined by another provider too; this one is ignored"
                            .into(),
                    });
                    continue;
                }
                merged.services.insert(name.clone(), svc.clone());
            }
            for (name, ep) in &state.entrypoints {
                merged.entrypoints.entry(name.clone()).or_insert(ep.clone());
            }
            for (name, r) in &state.routers {
                merged.routers.entry(name.clone()).or_insert(r.clone());
            }
            merged.problems.extend(state.problems.iter().cloned());
        }
        merged
    }

    async fn rebuild(&mut self) {
        let desired = self.merged();
        self.generation += 1;
        let started = std::time::Instant::now();
        let table = RoutingTable::build(&desired, &self.options, &self.stats, self.generation);
        let (services, listeners, problems) = (
            table.services.len(),
            table.listeners.len(),
            table.problems.clone(),
        );
        for p in &problems {
            tracing::warn!(provider = %p.provider, object = %p.object, problem = %p.message, "configuration problem");
        }
        let wanted = table.listeners.clone();
        self.table.store(Arc::new(table));
        self.generations.send_replace(self.generation);
        // Stats of endpoints gone from this generation are forgotten; in-flight guards keep
        // their own reference until their connections end.
        self.stats.retain_generation(self.generation);
        self.metrics.table_generation.set(self.generation as i64);
        self.metrics.problems.set(problems.len() as i64);
        tracing::info!(
            generation = self.generation,
            services,
            listeners,
            problems = problems.len(),
            build_us = started.elapsed().as_micros() as u64,
            "routing table swapped"
        );
        self.listeners.reconcile(&wanted).await;
        let mut status = self.status_mut();
        status.generation = self.generation;
        status.services = services;
        status.problems = problems;
        drop(status);
        self.refresh_listener_status();
    }

    fn refresh_listener_status(&self) {
        let open = self
            .listeners
            .open_keys()
            .iter()
            .map(|k| k.to_string())
            .collect();
        let failed = self
            .listeners
            .failed()
            .iter()
            .map(|(k, e)| (k.to_string(), e.clone()))
            .collect();
        let mut status = self.status_mut();
        status.listeners_open = open;
        status.listeners_failed = failed;
    }

    fn status_mut(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().expect("status poisoned")
    }

    /// Run until `shutdown`, then close listeners and drain for at most `drain`.
    pub async fn run(
        mut self,
        mut updates: mpsc::Receiver<ProviderUpdate>,
        shutdown: CancellationToken,
        drain: Duration,
    ) {
        let mut retry = tokio::time::interval(BIND_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With no dynamic provider the channel closes at once; the last table keeps serving.
        let mut providers_open = true;
        loop {
            tokio::select! {
                u = updates.recv(), if providers_open => match u {
                    Some(u) => self.apply(u).await,
                    None => providers_open = false,
                },
                // Only while a listener is failed: otherwise the tick would wake this task
                // every 5 s for nothing.
                _ = retry.tick(), if !self.listeners.failed().is_empty() => {
                    let wanted = self.table.load().listeners.clone();
                    self.listeners.reconcile(&wanted).await;
                    self.refresh_listener_status();
                }
                _ = shutdown.cancelled() => break,
            }
        }
        tracing::info!(deadline = ?drain, "shutting down: stop accepting, draining connections");
        self.listeners.shutdown(drain).await;
    }
}
