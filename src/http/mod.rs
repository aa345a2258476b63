//! L7 HTTP edge. PLACEHOLDER INTERFACE: the HTTP helper replaces the bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::model::{DesiredState, Problem};
use crate::table::{RoutingTable, ServiceRoute};

/// Long-lived HTTP state shared by all connections and all table generations
/// (upstream connection pools, TLS certificate store, access log writer).
#[derive(Debug, Default)]
pub struct HttpContext {}

impl HttpContext {
    pub fn new() -> Arc<Self> {
        Arc::new(HttpContext {})
    }
}

/// Compiled routers per entrypoint; part of one [`RoutingTable`] generation.
#[derive(Debug, Default)]
pub struct HttpTable {}

impl HttpTable {
    /// Compile `desired.routers` against the compiled services; problems are pushed, not fatal.
    pub fn build(
        _desired: &DesiredState,
        _services: &BTreeMap<Arc<str>, Arc<ServiceRoute>>,
        _problems: &mut Vec<Problem>,
    ) -> HttpTable {
        HttpTable {}
    }
}

/// Serve one accepted downstream connection on entrypoint `entrypoint` until it closes or
/// `shutdown` fires (then finish in-flight requests and close).
pub async fn serve_connection(
    _ctx: Arc<HttpContext>,
    _table: Arc<ArcSwap<RoutingTable>>,
    _entrypoint: Arc<str>,
    _stream: TcpStream,
    _peer: SocketAddr,
    _shutdown: CancellationToken,
) {
}
