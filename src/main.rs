//! The `meshgate` binary: CLI parsing, logging, signals; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshgate::config::{Config, LogFormat, EMBEDDED_DEFAULT};
use meshgate::server::{self, ConfigSource};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "meshgate",
    version,
    about = "Edge load balancer and routing mesh for Docker Swarm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy. Without --config, the embedded default (config/meshgate.yaml) is used.
    Run {
        /// YAML config file (watched for changes).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print what would be routed.
    Check {
        /// YAML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config),
        Command::Run { config } => run(config),
    }
}

fn load(path: &Option<PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| format!("{}: {e}", p.display())),
        None => Config::parse(EMBEDDED_DEFAULT).map_err(|e| format!("embedded default: {e}")),
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let desired = match cfg.to_desired() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // What `run` would refuse at start: a congestion control this kernel does not offer.
    if let Err(e) = meshgate::tcpio::set_upstream_congestion(cfg.upstream_congestion.as_ref()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let stats = meshgate::stats::StatsRegistry::default();
    let opts = meshgate::table::BuildOptions {
        dns: cfg.dns.clone(),
    };
    let table = meshgate::table::RoutingTable::build(&desired, &opts, &stats, 1);
    // Write errors (a closed pipe, as in `meshgate check | head -1`) end the listing quietly.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "config OK: {} services, {} listeners, {} routers",
        table.services.len(),
        table.listeners.len(),
        desired.routers.len()
    );
    for line in meshgate::table::describe(&table) {
        let _ = writeln!(out, "  {line}");
    }
    for p in &table.problems {
        let _ = writeln!(out, "  problem: {} {}: {}", p.provider, p.object, p.message);
    }
    ExitCode::SUCCESS
}

/// `log.level` as a tracing filter. rustls logs what a client sends wrong at `warn`, one line per
/// connection (wrk, for one, sends an IP address as SNI): a client must not be able to fill the
/// log, so rustls is held to `error` unless the filter names it.
fn log_filter(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(&cfg.log.level)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    let cfg = match load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let source = match path {
        Some(p) => ConfigSource::File(p),
        None => ConfigSource::Embedded,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        match server::run(cfg, source, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "start-up failed");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGTERM or SIGINT: begin the graceful shutdown.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
