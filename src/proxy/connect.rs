//! Endpoint selection plus upstream connect, with retries on a different endpoint.
//!
//! The retry rule for L4: a failed connect never sent a byte, so it is always safe to retry, on
//! an endpoint not yet tried. Each failure ejects the endpoint (passive health) so the next
//! connection does not try it again while it is down.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::balance::{Exclude, PickContext};
use crate::clock;
use crate::metrics::Metrics;
use crate::stats::{Health, InFlight};
use crate::table::Pool;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no available endpoint")]
    NoEndpoint,
    #[error("connect to {addr} failed after {attempts} attempt(s): {source}")]
    Failed {
        addr: SocketAddr,
        attempts: u32,
        source: std::io::Error,
    },
}

/// A connected upstream, counted in flight on its endpoint until dropped.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub in_flight: InFlight,
}

/// Errors that come from this host running out of something, not from the endpoint.
fn is_local_exhaustion(err: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let local = [
        Errno::MFILE,
        Errno::NFILE,
        Errno::NOBUFS,
        Errno::NOMEM,
        Errno::ADDRNOTAVAIL,
    ];
    err.raw_os_error()
        .is_some_and(|code| local.iter().any(|e| e.raw_os_error() == code))
}

/// Panic mode (as Envoy's panic threshold): when every endpoint is passively ejected, a failed
/// connect is cheaper than refusing everyone, so try the non-excluded endpoint whose ejection
/// ends first. Endpoints marked down by an active health check stay out. UDP flows open the same
/// way.
pub(super) fn panic_pick(pool: &Pool, ctx: &PickContext) -> Option<usize> {
    pool.endpoints
        .iter()
        .enumerate()
        .filter(|(i, e)| !ctx.exclude.contains(*i) && e.stats.health() != Health::Down)
        .min_by_key(|(_, e)| e.stats.ejected_until_ms())
        .map(|(i, _)| i)
}

/// Pick and connect, trying at most `1 + retries` distinct endpoints.
pub async fn connect(
    pool: &Pool,
    hash: u64,
    timeout: std::time::Duration,
    retries: u32,
    metrics: &Metrics,
) -> Result<Upstream, ConnectError> {
    let mut exclude = Exclude::default();
    let mut last_err = None;
    for attempt in 0..=retries {
        let ctx = PickContext {
            hash,
            now_ms: clock::now_ms(),
            now_ns: clock::now_ns(),
            exclude,
        };
        let Some(i) = pool
            .balancer
            .pick(&pool.endpoints, &ctx)
            .or_else(|| panic_pick(pool, &ctx))
        else {
            break;
        };
        exclude.insert(i);
        let endpoint = &pool.endpoints[i];
        let in_flight = endpoint.stats.start();
        let started = Instant::now();
        let result =
            tokio::time::timeout(timeout, crate::tcpio::connect_upstream(endpoint.addr)).await;
        let err = match result {
            Ok(Ok(stream)) => {
                endpoint
                    .stats
                    .record_latency(started.elapsed().as_nanos() as u64, clock::now_ns());
                endpoint.stats.record_success();
                return Ok(Upstream {
                    stream,
                    addr: endpoint.addr,
                    in_flight,
                });
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        };
        // Our own resource exhaustion says nothing about the endpoint: ejecting it would turn a
        // burst of EMFILE into an outage of the service.
        if !is_local_exhaustion(&err) {
            endpoint.stats.record_failure(clock::now_ms());
        }
        metrics.connect_failures.inc();
        tracing::warn!(endpoint = %endpoint.addr, attempt, error = %err, "upstream connect failed");
        last_err = Some((endpoint.addr, attempt + 1, err));
    }
    match last_err {
        Some((addr, attempts, source)) => Err(ConnectError::Failed {
            addr,
            attempts,
            source,
        }),
        None => Err(ConnectError::NoEndpoint),
    }
}
