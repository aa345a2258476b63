//! The admin API: Prometheus metrics, status, the current table, and a small dashboard.
//!
//! Bound to loopback by default. Read-only: nothing here changes routing.
//!
//! - `GET /metrics`: Prometheus text format.
//! - `GET /api/status`: generation, listeners (open and failed), provider errors, problems.
//! - `GET /api/table`: services with their endpoints and live stats.
//! - `GET /healthz`: 200 once the first table is served.
//! - `GET /`: a dashboard page over `/api/table` and `/api/status`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::SharedStatus;
use crate::table::RoutingTable;

/// Everything the admin handlers read.
pub struct AdminState {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub status: SharedStatus,
    pub registry: Registry,
}

/// Serve the admin API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Bind the admin listener (separately, so start-up reports a bind error clearly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn handle<B>(state: &AdminState, req: Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encode error",
                );
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        "/api/status" => {
            let status = state.status.lock().expect("status poisoned").clone();
            json_reply(serde_json::to_value(status).unwrap_or_default())
        }
        "/api/table" => json_reply(table_json(&state.table.load())),
        "/healthz" => {
            if state.table.load().generation > 0 {
                reply(StatusCode::OK, "text/plain", "ok\n")
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no table yet\n",
                )
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            include_str!("admin_dashboard.html"),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The table as JSON: services, pools, endpoints with live stats.
pub fn table_json(table: &RoutingTable) -> serde_json::Value {
    let now_ms = crate::clock::now_ms();
    let now_ns = crate::clock::now_ns();
    let services: Vec<_> = table
        .services
        .values()
        .map(|s| {
            let pools: Vec<_> = s
                .pools
                .iter()
                .map(|p| {
                    let eps: Vec<_> = p
                        .endpoints
                        .iter()
                        .map(|e| {
                            json!({
                                "id": &*e.id,
                                "address": e.addr.to_string(),
                                "weight": e.weight,
                                "in_flight": e.stats.in_flight(),
                                "available": e.stats.is_available(now_ms),
                                "health": format!("{:?}", e.stats.health()),
                                "ewma_ms": e.stats.ewma_ns(now_ns) / 1e6,
                                "connections": e.stats.total_connections.load(std::sync::atomic::Ordering::Relaxed),
                                "failures": e.stats.total_failures.load(std::sync::atomic::Ordering::Relaxed),
                            })
                        })
                        .collect();
                    json!({ "target_port": p.target, "protocol": p.protocol, "endpoints": eps })
                })
                .collect();
            let draining: Vec<_> = s
                .spec
                .endpoints
                .iter()
                .filter(|e| e.draining)
                .map(|e| e.id.clone())
                .collect();
            json!({
                "name": &*s.name,
                "policy": s.spec.policy,
                "ports": s.spec.ports,
                "vip": table.vips.get(&*s.name),
                "pools": pools,
                "draining": draining,
            })
        })
        .collect();
    let listeners: Vec<_> = table.listeners.values().collect();
    json!({
        "generation": table.generation,
        "services": services,
        "listeners": listeners,
        "problems": table.problems,
    })
}

fn json_reply(v: serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&v).unwrap_or_default(),
    )
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, ctype)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}
