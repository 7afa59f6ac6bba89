//! What the operations endpoint reports about this gateway: readiness ([`GatewayOps`]),
//! and [`StatsCollector`], a `prometheus_client` collector that reads the core's
//! `GatewayStats`, the WebSocket side's `WsStats` and (on RabbitMQ) the AMQP adapter's
//! `AmqpStats` on each scrape, as the metrics named `nuropb_gateway_*` they always were.
//! The labelled metrics (histograms, refusals by reason, ...) are registered by the crates
//! that record them (see `main.rs`).

use std::borrow::Cow;

use amqp_mesh::{AmqpMesh, AmqpStats};
use handler_core::CoordinatorHandle;
use handler_core::mesh::GatewayStats;
use ops_http::OpsSource;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use ws_adapter::{WsStats, WsStatsHandle};

/// The [`OpsSource`] of the gateway: reads the core on each `/readyz`.
pub struct GatewayOps {
    coordinator: CoordinatorHandle,
}

impl GatewayOps {
    pub fn new(coordinator: CoordinatorHandle) -> GatewayOps {
        GatewayOps { coordinator }
    }
}

impl OpsSource for GatewayOps {
    fn ready(&self) -> Result<(), String> {
        readiness(self.coordinator.is_shutting_down(), self.coordinator.stats().mesh_connected)
    }
}

/// The unlabelled figures, read on each scrape (no copy of them is kept).
pub struct StatsCollector {
    coordinator: CoordinatorHandle,
    ws: WsStatsHandle,
    /// `None` on the in-memory demo mesh.
    amqp: Option<AmqpMesh>,
}

impl StatsCollector {
    pub fn new(
        coordinator: CoordinatorHandle,
        ws: WsStatsHandle,
        amqp: Option<AmqpMesh>,
    ) -> StatsCollector {
        StatsCollector { coordinator, ws, amqp }
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut metrics = gateway_metrics(self.coordinator.stats());
        metrics.extend(ws_metrics(self.ws.stats()));
        if let Some(amqp) = &self.amqp {
            metrics.extend(amqp_metrics(amqp.stats()));
        }
        metrics
    }
}

// `Collector` asks for `Debug`; the handles have nothing worth showing.
impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector").finish_non_exhaustive()
    }
}

impl Collector for StatsCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_metrics(&self.metrics(), encoder)
    }
}

fn encode_metrics(
    metrics: &[Metric],
    mut encoder: DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    for m in metrics {
        // `prometheus_client` appends `.` to registered help texts; do the same here so
        // every `# HELP` reads alike. Counters are declared without `_total` and sampled
        // with it (OpenMetrics), so the sample names stay what they were.
        let help = format!("{}.", m.help.trim_end_matches('.'));
        match m.kind {
            Kind::Counter => {
                let family = m.name.strip_suffix("_total").unwrap_or(&m.name);
                let counter = ConstCounter::new(m.value);
                let metric =
                    encoder.encode_descriptor(family, &help, None, counter.metric_type())?;
                counter.encode(metric)?;
            }
            Kind::Gauge => {
                let gauge = ConstGauge::new(i64::try_from(m.value).unwrap_or(i64::MAX));
                let metric =
                    encoder.encode_descriptor(&m.name, &help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One unlabelled figure; counters' names end in `_total`.
#[derive(Debug, Clone, PartialEq)]
struct Metric {
    name: Cow<'static, str>,
    help: Cow<'static, str>,
    kind: Kind,
    value: u64,
}

impl Metric {
    fn counter(name: &'static str, help: &'static str, value: u64) -> Metric {
        Metric { name: name.into(), help: help.into(), kind: Kind::Counter, value }
    }

    fn gauge(name: &'static str, help: &'static str, value: u64) -> Metric {
        Metric { name: name.into(), help: help.into(), kind: Kind::Gauge, value }
    }
}

/// Ready to take traffic: not draining, and the mesh is up (calls would fail otherwise).
fn readiness(shutting_down: bool, mesh_connected: bool) -> Result<(), String> {
    if shutting_down {
        Err("shutting down".to_owned())
    } else if !mesh_connected {
        Err("mesh not connected".to_owned())
    } else {
        Ok(())
    }
}

fn flag(b: bool) -> u64 {
    u64::from(b)
}

/// The core's figures. The destructuring is exhaustive on purpose: a new field of
/// `GatewayStats` does not compile until it is exported here.
fn gateway_metrics(stats: GatewayStats) -> Vec<Metric> {
    let GatewayStats {
        sessions,
        sessions_high_water,
        users,
        requests_in_flight,
        requests_total,
        requests_timed_out,
        events_delivered,
        frames_dropped,
        mesh_connected,
    } = stats;
    vec![
        Metric::gauge("nuropb_gateway_sessions", "WebSocket sessions open.", sessions as u64),
        Metric::gauge(
            "nuropb_gateway_sessions_high_water",
            "Most sessions open at once since start.",
            sessions_high_water as u64,
        ),
        Metric::gauge("nuropb_gateway_users", "Distinct users with an open session.", users as u64),
        Metric::gauge(
            "nuropb_gateway_requests_in_flight",
            "Client calls waiting for the mesh.",
            requests_in_flight as u64,
        ),
        Metric::counter(
            "nuropb_gateway_requests_total",
            "Client requests sent to the mesh.",
            requests_total,
        ),
        Metric::counter(
            "nuropb_gateway_requests_timed_out_total",
            "Client requests that got no response in time.",
            requests_timed_out,
        ),
        Metric::counter(
            "nuropb_gateway_events_delivered_total",
            "Mesh events queued to sessions (one per session reached).",
            events_delivered,
        ),
        Metric::counter(
            "nuropb_gateway_frames_dropped_total",
            "Frames not delivered because a session's queue was full (the session is closed).",
            frames_dropped,
        ),
        Metric::gauge(
            "nuropb_gateway_mesh_connected",
            "1 while the mesh is connected, else 0.",
            flag(mesh_connected),
        ),
    ]
}

/// The AMQP adapter's figures, exhaustively as above.
/// The WebSocket side's figures; exhaustive like `gateway_metrics`.
fn ws_metrics(stats: WsStats) -> Vec<Metric> {
    let WsStats {
        connections_refused,
        connections_shed,
        accept_errors,
        responses_too_large,
        frames_too_large_dropped,
        handshakes_refused,
        per_ip_connections_refused,
        per_ip_rate_refused,
        bad_handshakes,
        per_user_sessions_refused,
        tls_handshake_failures,
        proxy_refused,
    } = stats;
    vec![
        Metric::counter(
            "nuropb_gateway_ws_connections_refused_total",
            "Connections over the limit answered with HTTP 503.",
            connections_refused,
        ),
        Metric::counter(
            "nuropb_gateway_ws_connections_shed_total",
            "Connections over the limit closed unanswered (refusal budget exhausted).",
            connections_shed,
        ),
        Metric::counter(
            "nuropb_gateway_ws_accept_errors_total",
            "Failed accepts on the WebSocket listener.",
            accept_errors,
        ),
        Metric::counter(
            "nuropb_gateway_ws_responses_too_large_total",
            "Responses over the outbound size limit, replaced by a LimitExceeded error.",
            responses_too_large,
        ),
        Metric::counter(
            "nuropb_gateway_ws_frames_too_large_dropped_total",
            "Events over the outbound size limit, dropped (per session).",
            frames_too_large_dropped,
        ),
        Metric::counter(
            "nuropb_gateway_ws_handshakes_refused_total",
            "Connections over the handshakes-in-flight budget answered with HTTP 503.",
            handshakes_refused,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_ip_connections_refused_total",
            "Connections over the per-address connection limit (HTTP 429 or shed).",
            per_ip_connections_refused,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_ip_rate_refused_total",
            "Connection attempts over the per-address connect rate (HTTP 429 or shed).",
            per_ip_rate_refused,
        ),
        Metric::counter(
            "nuropb_gateway_ws_bad_handshakes_total",
            "Upgrade requests that were not a valid WebSocket handshake (HTTP 400, 426, 431).",
            bad_handshakes,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_user_sessions_refused_total",
            "Upgrades refused with HTTP 429: the user had the most sessions allowed.",
            per_user_sessions_refused,
        ),
        Metric::counter(
            "nuropb_gateway_ws_tls_handshake_failures_total",
            "TLS handshakes on the WebSocket port that failed or timed out (wss:// only).",
            tls_handshake_failures,
        ),
        Metric::counter(
            "nuropb_gateway_ws_proxy_refused_total",
            "Connections closed for the PROXY protocol (untrusted peer; missing or bad header).",
            proxy_refused,
        ),
    ]
}

fn amqp_metrics(stats: AmqpStats) -> Vec<Metric> {
    let AmqpStats {
        connected,
        pending_requests,
        published,
        publish_failures,
        rejected_by_guard,
        responses,
        duplicates_dropped,
        strays_dropped,
        returned,
        garbage_rejected,
        events_received,
        events_dropped_by_broker,
        controls_received,
        service_calls,
        reconnects,
    } = stats;
    let counter = Metric::counter;
    vec![
        Metric::gauge(
            "nuropb_gateway_amqp_connected",
            "1 while the RabbitMQ connection and topology are up, else 0.",
            flag(connected),
        ),
        Metric::gauge(
            "nuropb_gateway_amqp_pending_requests",
            "Requests published and waiting for a response.",
            pending_requests as u64,
        ),
        counter(
            "nuropb_gateway_amqp_published_total",
            "Messages published (broker-confirmed; direct requests unless their write failed).",
            published,
        ),
        counter(
            "nuropb_gateway_amqp_publish_failures_total",
            "Publishes that failed (channel down, broker nack, queue full, timeout).",
            publish_failures,
        ),
        counter(
            "nuropb_gateway_amqp_rejected_by_guard_total",
            "Calls refused by the validation guard before publishing.",
            rejected_by_guard,
        ),
        counter(
            "nuropb_gateway_amqp_responses_total",
            "Responses handed to a waiting request.",
            responses,
        ),
        counter(
            "nuropb_gateway_amqp_duplicates_dropped_total",
            "Later responses to an already answered request, dropped.",
            duplicates_dropped,
        ),
        counter(
            "nuropb_gateway_amqp_strays_dropped_total",
            "Responses nobody waited for (timed out, cancelled, not ours), dropped.",
            strays_dropped,
        ),
        counter(
            "nuropb_gateway_amqp_returned_total",
            "Requests and commands the broker returned as unroutable.",
            returned,
        ),
        counter(
            "nuropb_gateway_amqp_garbage_rejected_total",
            "Malformed deliveries dropped or rejected without requeue.",
            garbage_rejected,
        ),
        counter(
            "nuropb_gateway_amqp_events_received_total",
            "Mesh events forwarded to the core.",
            events_received,
        ),
        counter(
            "nuropb_gateway_amqp_events_dropped_by_broker_total",
            "Events the broker dropped from this instance's full events queue (x-max-length), oldest first",
            events_dropped_by_broker,
        ),
        counter(
            "nuropb_gateway_amqp_controls_received_total",
            "Control operations (push, disconnect) forwarded to the core.",
            controls_received,
        ),
        counter(
            "nuropb_gateway_amqp_service_calls_total",
            "Requests and commands handled on the gateway's service queue.",
            service_calls,
        ),
        counter(
            "nuropb_gateway_amqp_reconnects_total",
            "Successful reconnects after a lost connection.",
            reconnects,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn stats() -> GatewayStats {
        GatewayStats {
            sessions: 3,
            sessions_high_water: 7,
            users: 2,
            requests_in_flight: 1,
            requests_total: 40,
            requests_timed_out: 4,
            events_delivered: 9,
            frames_dropped: 5,
            mesh_connected: true,
        }
    }

    #[test]
    fn readiness_needs_the_mesh_and_no_shutdown() {
        assert_eq!(readiness(false, true), Ok(()));
        assert_eq!(readiness(false, false), Err("mesh not connected".to_owned()));
        assert_eq!(readiness(true, true), Err("shutting down".to_owned()));
        assert_eq!(readiness(true, false), Err("shutting down".to_owned()));
    }

    #[test]
    fn every_field_becomes_one_metric_with_its_old_sample_name() {
        let amqp =
            AmqpStats { connected: true, published: 11, reconnects: 2, ..AmqpStats::default() };
        let ws = WsStats { connections_refused: 6, ..WsStats::default() };
        let metrics: Vec<Metric> = gateway_metrics(stats())
            .into_iter()
            .chain(ws_metrics(ws))
            .chain(amqp_metrics(amqp))
            .collect();
        // 9 GatewayStats fields, 12 WsStats fields and 15 AmqpStats fields.
        assert_eq!(metrics.len(), 9 + 12 + 15);
        let mut names = HashSet::new();
        for m in &metrics {
            assert!(m.name.starts_with("nuropb_gateway_"), "{m:?}");
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{m:?}");
            assert!(!m.help.is_empty(), "{m:?}");
            assert!(names.insert(m.name.clone()), "repeated {}", m.name);
        }
        let text = encode(&Fixed(metrics.clone()));
        assert_eq!(text.matches("# TYPE ").count(), metrics.len(), "nothing skipped");
        for line in [
            "nuropb_gateway_sessions 3\n",
            "nuropb_gateway_sessions_high_water 7\n",
            "nuropb_gateway_requests_total 40\n",
            "# TYPE nuropb_gateway_requests counter\n",
            "nuropb_gateway_frames_dropped_total 5\n",
            "nuropb_gateway_mesh_connected 1\n",
            "nuropb_gateway_amqp_connected 1\n",
            "nuropb_gateway_amqp_published_total 11\n",
            "nuropb_gateway_amqp_reconnects_total 2\n",
            "nuropb_gateway_amqp_pending_requests 0\n",
            "nuropb_gateway_ws_connections_refused_total 6\n",
            "# HELP nuropb_gateway_sessions WebSocket sessions open.\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }

    /// A collector over fixed figures, encoded as `StatsCollector` encodes its own.
    #[derive(Debug)]
    struct Fixed(Vec<Metric>);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
            encode_metrics(&self.0, encoder)
        }
    }

    fn encode(collector: &Fixed) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Fixed(collector.0.clone())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        text
    }
}
