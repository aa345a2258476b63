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
use crate::stats::InFlight;
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
        let Some(i) = pool.balancer.pick(&pool.endpoints, &ctx) else {
            break;
        };
        exclude.insert(i);
        let endpoint = &pool.endpoints[i];
        let in_flight = endpoint.stats.start();
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, TcpStream::connect(endpoint.addr)).await;
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
        endpoint.stats.record_failure(clock::now_ms());
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
