//! `meshgate-echo`: the project's test backend as a process (Docker images, demo config,
//! benchmark harness). A thin CLI over [`meshgate::echo`]: it binds every listener given on the
//! command line, prints `listening {kind} {addr}` for each on stdout (tests parse these lines;
//! port 0 is resolved), serves until SIGTERM or SIGINT, then drains and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use meshgate::echo;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Upper bound on the whole shutdown. The HTTP servers drain under their own, shorter deadline;
/// this only guards against a server that does not return.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// Test backend for meshgate: TCP/UDP echo and an HTTP/1.1 + h2c + TLS echo server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Name of this backend: body of `GET /` and value of the `x-backend` response header.
    #[arg(long)]
    name: String,
    /// TCP echo listen address (repeatable).
    #[arg(long, value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
    /// UDP echo listen address (repeatable).
    #[arg(long, value_name = "ADDR")]
    udp: Vec<SocketAddr>,
    /// HTTP/1.1 + h2c listen address (repeatable).
    #[arg(long, value_name = "ADDR")]
    http: Vec<SocketAddr>,
    /// HTTPS (ALPN h2, http/1.1) listen address (repeatable); needs --cert and --key.
    #[arg(long, value_name = "ADDR", requires_all = ["cert", "key"])]
    https: Vec<SocketAddr>,
    /// PEM certificate chain for --https.
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
    /// PEM private key for --https.
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// After SIGTERM/SIGINT, keep serving (and accepting) this many milliseconds before
    /// draining: the "lame duck" period that lets a load balancer stop sending new connections
    /// first. An L4 proxy cannot replay a connection the backend closed unanswered.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    drain_delay_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr: stdout is reserved for the `listening` lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if args.tcp.is_empty() && args.udp.is_empty() && args.http.is_empty() && args.https.is_empty() {
        eprintln!(
            "meshgate-echo: nothing to serve, give at least one of --tcp --udp --http --https"
        );
        return ExitCode::from(2);
    }
    let shutdown = CancellationToken::new();
    let mut servers = match start(&args, &shutdown).await {
        Ok(servers) => servers,
        Err(message) => {
            error!("{message}");
            eprintln!("meshgate-echo: {message}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(message) = wait_for_signal().await {
        error!("{message}");
        shutdown.cancel();
        return ExitCode::FAILURE;
    }
    if args.drain_delay_ms > 0 {
        info!(
            delay_ms = args.drain_delay_ms,
            "signal received: still serving before draining"
        );
        tokio::time::sleep(Duration::from_millis(args.drain_delay_ms)).await;
    }
    info!("shutting down");
    shutdown.cancel();
    let all_done = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(EXIT_DEADLINE, all_done).await.is_err() {
        warn!(
            open = servers.len(),
            "servers still running at exit deadline"
        );
    }
    ExitCode::SUCCESS
}

/// Binds every listener first (so a bad address fails before anything is served), then spawns
/// the servers.
async fn start(args: &Args, shutdown: &CancellationToken) -> Result<JoinSet<()>, String> {
    let mut servers = JoinSet::new();
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) if !args.https.is_empty() => Some(Arc::new(
            echo::tls_config_from_pem(cert, key).map_err(|e| e.to_string())?,
        )),
        _ => None,
    };
    let bind_error = |kind: &str, addr: SocketAddr, e: std::io::Error| {
        format!("cannot bind {kind} listener {addr}: {e}")
    };
    let mut announced = Vec::new();
    for &addr in &args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| bind_error("tcp", addr, e))?;
        announced.push(("tcp", listener.local_addr().unwrap_or(addr)));
        servers.spawn(echo::tcp_echo(listener, shutdown.clone()));
    }
    for &addr in &args.udp {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|e| bind_error("udp", addr, e))?;
        announced.push(("udp", socket.local_addr().unwrap_or(addr)));
        servers.spawn(echo::udp_echo(socket, shutdown.clone()));
    }
    for &addr in &args.http {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| bind_error("http", addr, e))?;
        announced.push(("http", listener.local_addr().unwrap_or(addr)));
        servers.spawn(echo::http(listener, args.name.clone(), shutdown.clone()));
    }
    for &addr in &args.https {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| bind_error("https", addr, e))?;
        announced.push(("https", listener.local_addr().unwrap_or(addr)));
        let tls = tls
            .clone()
            .expect("clap requires --cert and --key with --https");
        servers.spawn(echo::https(
            listener,
            args.name.clone(),
            tls,
            shutdown.clone(),
        ));
    }
    // Printed only once everything is bound: a reader seeing the lines can connect right away.
    for (kind, addr) in announced {
        println!("listening {kind} {addr}");
        info!(kind, %addr, name = args.name, "listening");
    }
    Ok(servers)
}

async fn wait_for_signal() -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
