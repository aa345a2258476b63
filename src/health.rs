//! Active health checks (control path).
//!
//! One task walks the current table on a short tick and checks every endpoint of every service
//! that has a `health_check`, each on its own interval: a TCP connect, or an HTTP/1.0 GET of
//! `http_path` expecting a 2xx/3xx status. `fall` consecutive failures mark the endpoint
//! [`Health::Down`] (balancers skip it); `rise` consecutive successes mark it up again. The result
//! lands in the endpoint's [`EndpointStats`], which survive table swaps, so a rebuild neither
//! forgets a down endpoint nor re-checks a known one from scratch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::model::HealthCheckSpec;
use crate::stats::{EndpointStats, Health};
use crate::table::RoutingTable;

/// Scheduling granularity: the shortest useful check interval.
const TICK: Duration = Duration::from_millis(50);

/// Bytes of the response read to find the status line.
const STATUS_LINE_MAX: usize = 256;

/// Per-endpoint check state, keyed by service and address like the stats.
struct CheckState {
    next: Instant,
    ok_streak: u32,
    fail_streak: u32,
    running: bool,
}

/// Run checks until `shutdown`.
pub async fn run(table: Arc<ArcSwap<RoutingTable>>, shutdown: CancellationToken) {
    let mut states: HashMap<(Arc<str>, SocketAddr), CheckState> = HashMap::new();
    let (tx, mut rx) = mpsc::channel::<((Arc<str>, SocketAddr), bool)>(256);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((key, ok)) = rx.recv() => {
                apply_result(&table, &mut states, key, ok);
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        let current = table.load_full();
        let mut seen = std::collections::HashSet::new();
        for service in current.services.values() {
            let Some(spec) = &service.spec.health_check else {
                continue;
            };
            for endpoint in service.pools.iter().flat_map(|p| p.endpoints.iter()) {
                let key = (Arc::clone(&service.name), endpoint.addr);
                seen.insert(key.clone());
                let state = states.entry(key.clone()).or_insert(CheckState {
                    next: now,
                    ok_streak: 0,
                    fail_streak: 0,
                    running: false,
                });
                if state.running || state.next > now {
                    continue;
                }
                state.running = true;
                state.next = now + spec.interval;
                let (tx, spec, addr) = (tx.clone(), spec.clone(), endpoint.addr);
                tokio::spawn(async move {
                    let ok = check(addr, &spec).await;
                    let _ = tx.send((key, ok)).await;
                });
            }
        }
        // Endpoints gone from the table (or whose service lost its check) are forgotten.
        states.retain(|k, _| seen.contains(k));
    }
}

fn apply_result(
    table: &ArcSwap<RoutingTable>,
    states: &mut HashMap<(Arc<str>, SocketAddr), CheckState>,
    key: (Arc<str>, SocketAddr),
    ok: bool,
) {
    let current = table.load();
    let Some(service) = current.services.get(&key.0) else {
        states.remove(&key);
        return;
    };
    let (Some(spec), Some(state)) = (&service.spec.health_check, states.get_mut(&key)) else {
        return;
    };
    state.running = false;
    if ok {
        state.ok_streak += 1;
        state.fail_streak = 0;
    } else {
        state.fail_streak += 1;
        state.ok_streak = 0;
    }
    let stats: Vec<&Arc<EndpointStats>> = service
        .pools
        .iter()
        .flat_map(|p| p.endpoints.iter())
        .filter(|e| e.addr == key.1)
        .map(|e| &e.stats)
        .collect();
    let Some(stats) = stats.first() else { return };
    let before = stats.health();
    let after = if state.fail_streak >= spec.fall {
        Health::Down
    } else if state.ok_streak >= spec.rise || (before == Health::Unknown && ok) {
        Health::Up
    } else {
        before
    };
    if after != before {
        stats.set_health(after);
        if after == Health::Down {
            tracing::warn!(service = %key.0, endpoint = %key.1, "health check: endpoint down");
        } else {
            tracing::info!(service = %key.0, endpoint = %key.1, "health check: endpoint up");
        }
    }
}

/// One check: TCP connect, then optionally an HTTP/1.0 GET expecting 2xx or 3xx.
pub async fn check(addr: SocketAddr, spec: &HealthCheckSpec) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let Some(path) = &spec.http_path else {
            return Some(true);
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: meshgate-health\r\n\r\n",
            addr.ip()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; STATUS_LINE_MAX];
        let mut len = 0;
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream.read(&mut buf[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Some(status_ok(&buf[..len]))
    };
    matches!(
        tokio::time::timeout(spec.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// Is this an HTTP status line with a 2xx or 3xx code?
fn status_ok(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let version_ok = parts.next().is_some_and(|v| v.starts_with(b"HTTP/1."));
    let code = parts.next().unwrap_or_default();
    version_ok && code.len() == 3 && (code[0] == b'2' || code[0] == b'3')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }
}
