//! Start-up wiring: config → metrics, table, listeners, control task, providers, admin, DNS.
//!
//! Start-up errors name the step that failed ([`StartError`]); after start-up nothing is fatal:
//! bad updates are rejected and reported while the last good table keeps serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::control::{Control, Status};
use crate::listener::{ListenerContext, ListenerSet};
use crate::metrics::Metrics;
use crate::provider::{self, ProviderEvent, ProviderUpdate};
use crate::stats::StatsRegistry;
use crate::table::{BuildOptions, RoutingTable};

/// Which start-up step failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("admin API: cannot bind {addr}: {source}")]
    BindAdmin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("dns: {0}")]
    Dns(#[from] crate::dns::DnsError),
    /// The kernel refused `upstream_congestion` (the message names the key).
    #[error("{0}")]
    Congestion(std::io::Error),
    #[error("demo backend: cannot bind {addr}: {source}")]
    BindDemo {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where the config came from: a watched file, or the embedded default.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

/// Run meshgate until `shutdown`, then drain and return.
pub async fn run(
    config: Config,
    source: ConfigSource,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let initial = config.to_desired()?;
    crate::proxy::copy::set_mode(config.l4_copy);
    crate::tcpio::set_upstream_congestion(config.upstream_congestion.as_ref())
        .map_err(StartError::Congestion)?;
    if config.upstream_congestion.is_none() && crate::tcpio::kernel_congestion() == "bbr" {
        tracing::info!(
            "the kernel's TCP congestion control is bbr: connections to endpoints are paced by \
             it too; `upstream_congestion: cubic` carried twice the bulk throughput through \
             meshgate on loopback (BENCHMARKS.md)"
        );
    }
    let table = Arc::new(ArcSwap::from_pointee(RoutingTable::default()));
    let stats = Arc::new(StatsRegistry::default());
    let (metrics, registry) = Metrics::new(Arc::clone(&table));
    let status = Arc::new(Mutex::new(Status::default()));
    let background = CancellationToken::new();

    if config.admin.enabled {
        let addr = config.admin.bind;
        let listener = admin::bind(addr)
            .await
            .map_err(|source| StartError::BindAdmin { addr, source })?;
        tracing::info!(%addr, "admin API listening");
        let state = Arc::new(AdminState {
            table: Arc::clone(&table),
            status: Arc::clone(&status),
            registry,
        });
        tokio::spawn(admin::serve(listener, state, background.clone()));
    }
    start_demo(&config, &background).await?;
    crate::memtrim::spawn_trimmer();
    if config.dns.enabled {
        let dns = crate::dns::DnsServer::bind(config.dns.clone()).await?;
        let (table, stop) = (Arc::clone(&table), background.clone());
        tokio::spawn(async move {
            if let Err(e) = dns.run(table, stop).await {
                tracing::error!(error = %e, "dns server stopped");
            }
        });
    }

    let listeners = ListenerSet::new(ListenerContext {
        table: Arc::clone(&table),
        metrics: Arc::clone(&metrics),
        http: crate::http::HttpContext::with_config(config.http.clone()),
        reuse_port: config.reuse_port,
    });
    let options = BuildOptions {
        dns: config.dns.clone(),
    };
    let mut control = Control::new(
        Arc::clone(&table),
        stats,
        Arc::clone(&metrics),
        listeners,
        options,
        status,
    );
    control
        .apply(ProviderUpdate {
            provider: provider::file::NAME,
            event: ProviderEvent::State(initial),
        })
        .await;

    tokio::spawn(crate::health::run(
        Arc::clone(&table),
        control.generations(),
        background.clone(),
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    if let ConfigSource::File(path) = &source {
        if config.providers.file.watch {
            tokio::spawn(provider::file::watch(
                path.clone(),
                tx.clone(),
                background.clone(),
            ));
        }
    }
    if config.providers.docker.enabled {
        tokio::spawn(provider::docker::run(
            config.providers.docker.clone(),
            tx.clone(),
            background.clone(),
        ));
    }
    drop(tx);
    control.run(rx, shutdown, config.shutdown_timeout).await;
    background.cancel();
    tracing::info!("meshgate stopped");
    Ok(())
}

async fn start_demo(config: &Config, stop: &CancellationToken) -> Result<(), StartError> {
    let demo = &config.demo;
    for b in &demo.http {
        let l = TcpListener::bind(b.bind)
            .await
            .map_err(|source| StartError::BindDemo {
                addr: b.bind,
                source,
            })?;
        tracing::info!(name = %b.name, addr = %b.bind, "demo HTTP backend");
        tokio::spawn(crate::echo::http(l, b.name.clone(), stop.clone()));
    }
    for b in &demo.tcp {
        let l = TcpListener::bind(b.bind)
            .await
            .map_err(|source| StartError::BindDemo {
                addr: b.bind,
                source,
            })?;
        tokio::spawn(crate::echo::tcp_echo(l, stop.clone()));
    }
    for b in &demo.udp {
        let s = UdpSocket::bind(b.bind)
            .await
            .map_err(|source| StartError::BindDemo {
                addr: b.bind,
                source,
            })?;
        tokio::spawn(crate::echo::udp_echo(s, stop.clone()));
    }
    Ok(())
}
