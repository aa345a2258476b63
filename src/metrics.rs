//! Prometheus metrics.
//!
//! Data-path counters are plain atomics (`Counter`), never a labelled `Family`, because a family
//! lookup takes a lock. Per-service and per-endpoint numbers are not counted twice: the
//! [`TableCollector`] reads them from the current table's [`EndpointStats`] at scrape time.
//! Labelled families are only used on the control path (reloads, bind errors).

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::table::RoutingTable;

type Labels = Vec<(String, String)>;

/// Every metric meshgate exports, registered once at start-up.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Table generation currently served.
    pub table_generation: Gauge,
    /// Provider states rejected (bad file, API error), by provider.
    pub provider_errors: Family<Labels, Counter>,
    /// Provider problems (a bad label on one service) in the current table.
    pub problems: Gauge,
    /// Listener bind failures, by listener.
    pub bind_errors: Family<Labels, Counter>,
    /// Listeners currently open.
    pub listeners_open: Gauge,
    /// Downstream connections accepted (L4 and HTTP).
    pub accepted: Counter,
    /// accept(2) errors (EMFILE and friends); the loop backs off and keeps accepting.
    pub accept_errors: Counter,
    /// L4 connections that found no available endpoint.
    pub no_endpoint: Counter,
    /// Upstream connect failures (each retried on another endpoint while retries remain).
    pub connect_failures: Counter,
    /// UDP datagrams dropped because the flow table was full.
    pub udp_flows_dropped: Counter,
    /// UDP flows currently open.
    pub udp_flows: Gauge,
    /// UDP datagrams dropped because a socket's send buffer was full (either direction).
    pub udp_send_dropped: Counter,
    /// UDP flows whose endpoint proved unreachable (ICMP port/host unreachable): each ejected
    /// the endpoint, and the client's next datagram went to another.
    pub udp_upstream_unreachable: Counter,
    /// Connections closed by the idle timeout.
    pub idle_closed: Counter,
}

impl Metrics {
    /// Create the metrics and a registry that exports them plus the per-endpoint collector.
    pub fn new(table: Arc<ArcSwap<RoutingTable>>) -> (Arc<Metrics>, Registry) {
        let m = Arc::new(Metrics::default());
        let mut r = Registry::with_prefix("meshgate");
        r.register(
            "table_generation",
            "Routing table generation served",
            m.table_generation.clone(),
        );
        r.register(
            "provider_errors",
            "Provider states rejected",
            m.provider_errors.clone(),
        );
        r.register(
            "problems",
            "Provider problems in the current table",
            m.problems.clone(),
        );
        r.register(
            "listener_bind_errors",
            "Listener bind failures",
            m.bind_errors.clone(),
        );
        r.register("listeners_open", "Open listeners", m.listeners_open.clone());
        r.register(
            "downstream_accepted",
            "Downstream connections accepted",
            m.accepted.clone(),
        );
        r.register("accept_errors", "accept errors", m.accept_errors.clone());
        r.register(
            "no_endpoint",
            "Connections with no available endpoint",
            m.no_endpoint.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Upstream connect failures",
            m.connect_failures.clone(),
        );
        r.register(
            "udp_flows_dropped",
            "UDP datagrams dropped: flow table full",
            m.udp_flows_dropped.clone(),
        );
        r.register("udp_flows", "Open UDP flows", m.udp_flows.clone());
        r.register(
            "udp_send_dropped",
            "UDP datagrams dropped: socket send buffer full",
            m.udp_send_dropped.clone(),
        );
        r.register(
            "udp_upstream_unreachable",
            "UDP flows whose endpoint proved unreachable (ICMP error); the endpoint is ejected",
            m.udp_upstream_unreachable.clone(),
        );
        r.register(
            "idle_closed",
            "Connections closed by the idle timeout",
            m.idle_closed.clone(),
        );
        r.register_collector(Box::new(TableCollector { table }));
        (m, r)
    }

    /// Count a control-path event in a labelled family.
    pub fn inc(family: &Family<Labels, Counter>, key: &str, value: &str) {
        family
            .get_or_create(&vec![(key.to_owned(), value.to_owned())])
            .inc();
    }
}

/// Encodes per-endpoint numbers from the table being served.
#[derive(Debug)]
struct TableCollector {
    table: Arc<ArcSwap<RoutingTable>>,
}

impl prometheus_client::collector::Collector for TableCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.table.load_full();
        let now_ns = crate::clock::now_ns();
        let now_ms = crate::clock::now_ms();
        let endpoints = || {
            table.services.values().flat_map(|s| {
                s.pools.iter().flat_map(move |p| {
                    p.endpoints.iter().map(move |e| {
                        let labels: Labels = vec![
                            ("service".into(), s.name.to_string()),
                            ("endpoint".into(), e.addr.to_string()),
                            ("protocol".into(), p.protocol.to_string()),
                        ];
                        (labels, e)
                    })
                })
            })
        };
        {
            let mut m = encoder.encode_descriptor(
                "endpoint_in_flight",
                "Connections or requests in flight",
                None,
                MetricType::Gauge,
            )?;
            for (labels, e) in endpoints() {
                ConstGauge::new(e.stats.in_flight() as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "endpoint_connections",
                "Connections or requests sent",
                None,
                MetricType::Counter,
            )?;
            for (labels, e) in endpoints() {
                let v = e
                    .stats
                    .total_connections
                    .load(std::sync::atomic::Ordering::Relaxed);
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "endpoint_failures",
                "Upstream connect failures",
                None,
                MetricType::Counter,
            )?;
            for (labels, e) in endpoints() {
                let v = e
                    .stats
                    .total_failures
                    .load(std::sync::atomic::Ordering::Relaxed);
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "endpoint_latency_ewma_seconds",
                "Peak-EWMA latency estimate",
                None,
                MetricType::Gauge,
            )?;
            for (labels, e) in endpoints() {
                ConstGauge::new(e.stats.ewma_ns(now_ns) / 1e9).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "endpoint_available",
                "1 if the endpoint takes new connections (not ejected, not down)",
                None,
                MetricType::Gauge,
            )?;
            for (labels, e) in endpoints() {
                ConstGauge::new(e.stats.is_available(now_ms) as i64)
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
