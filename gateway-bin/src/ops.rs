//! What the operations endpoint reports about this gateway: readiness, and the core's
//! `GatewayStats` plus (on RabbitMQ) the AMQP adapter's `AmqpStats` as Prometheus metrics
//! named `nuropb_gateway_*`.

use amqp_mesh::{AmqpMesh, AmqpStats};
use handler_core::CoordinatorHandle;
use handler_core::mesh::GatewayStats;
use ops_http::{Metric, OpsSource};
use ws_adapter::{WsStats, WsStatsHandle};

/// The [`OpsSource`] of the gateway: reads the core (and the AMQP adapter) on each request.
pub struct GatewayOps {
    coordinator: CoordinatorHandle,
    ws: WsStatsHandle,
    /// `None` on the in-memory demo mesh.
    amqp: Option<AmqpMesh>,
}

impl GatewayOps {
    pub fn new(
        coordinator: CoordinatorHandle,
        ws: WsStatsHandle,
        amqp: Option<AmqpMesh>,
    ) -> GatewayOps {
        GatewayOps { coordinator, ws, amqp }
    }
}

impl OpsSource for GatewayOps {
    fn ready(&self) -> Result<(), String> {
        readiness(self.coordinator.is_shutting_down(), self.coordinator.stats().mesh_connected)
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

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
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
        Metric::gauge("nuropb_gateway_sessions", "WebSocket sessions open.", sessions as f64),
        Metric::gauge(
            "nuropb_gateway_sessions_high_water",
            "Most sessions open at once since start.",
            sessions_high_water as f64,
        ),
        Metric::gauge("nuropb_gateway_users", "Distinct users with an open session.", users as f64),
        Metric::gauge(
            "nuropb_gateway_requests_in_flight",
            "Client calls waiting for the mesh.",
            requests_in_flight as f64,
        ),
        Metric::counter(
            "nuropb_gateway_requests_total",
            "Client requests sent to the mesh.",
            requests_total as f64,
        ),
        Metric::counter(
            "nuropb_gateway_requests_timed_out_total",
            "Client requests that got no response in time.",
            requests_timed_out as f64,
        ),
        Metric::counter(
            "nuropb_gateway_events_delivered_total",
            "Mesh events queued to sessions (one per session reached).",
            events_delivered as f64,
        ),
        Metric::counter(
            "nuropb_gateway_frames_dropped_total",
            "Frames not delivered because a session's queue was full (the session is closed).",
            frames_dropped as f64,
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
            connections_refused as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_connections_shed_total",
            "Connections over the limit closed unanswered (refusal budget exhausted).",
            connections_shed as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_accept_errors_total",
            "Failed accepts on the WebSocket listener.",
            accept_errors as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_responses_too_large_total",
            "Responses over the outbound size limit, replaced by a LimitExceeded error.",
            responses_too_large as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_frames_too_large_dropped_total",
            "Events over the outbound size limit, dropped (per session).",
            frames_too_large_dropped as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_handshakes_refused_total",
            "Connections over the handshakes-in-flight budget answered with HTTP 503.",
            handshakes_refused as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_ip_connections_refused_total",
            "Connections over the per-address connection limit (HTTP 429 or shed).",
            per_ip_connections_refused as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_ip_rate_refused_total",
            "Connection attempts over the per-address connect rate (HTTP 429 or shed).",
            per_ip_rate_refused as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_bad_handshakes_total",
            "Upgrade requests that were not a valid WebSocket handshake (HTTP 400, 426, 431).",
            bad_handshakes as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_per_user_sessions_refused_total",
            "Upgrades refused with HTTP 429: the user had the most sessions allowed.",
            per_user_sessions_refused as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_tls_handshake_failures_total",
            "TLS handshakes on the WebSocket port that failed or timed out (wss:// only).",
            tls_handshake_failures as f64,
        ),
        Metric::counter(
            "nuropb_gateway_ws_proxy_refused_total",
            "Connections closed for the PROXY protocol (untrusted peer; missing or bad header).",
            proxy_refused as f64,
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
        controls_received,
        service_calls,
        reconnects,
    } = stats;
    let counter = |name: &'static str, help: &'static str, value: u64| {
        Metric::counter(name, help, value as f64)
    };
    vec![
        Metric::gauge(
            "nuropb_gateway_amqp_connected",
            "1 while the RabbitMQ connection and topology are up, else 0.",
            flag(connected),
        ),
        Metric::gauge(
            "nuropb_gateway_amqp_pending_requests",
            "Requests published and waiting for a response.",
            pending_requests as f64,
        ),
        counter(
            "nuropb_gateway_amqp_published_total",
            "Messages the broker confirmed (requests, commands, events, responses).",
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
    fn every_field_becomes_one_valid_metric() {
        let amqp =
            AmqpStats { connected: true, published: 11, reconnects: 2, ..AmqpStats::default() };
        let ws = WsStats { connections_refused: 6, ..WsStats::default() };
        let metrics: Vec<Metric> = gateway_metrics(stats())
            .into_iter()
            .chain(ws_metrics(ws))
            .chain(amqp_metrics(amqp))
            .collect();
        // 9 GatewayStats fields, 11 WsStats fields and 14 AmqpStats fields.
        assert_eq!(metrics.len(), 9 + 11 + 14);
        let mut names = HashSet::new();
        for m in &metrics {
            assert_eq!(m.check(), Ok(()), "{m:?}");
            assert!(m.name.starts_with("nuropb_gateway_"), "{m:?}");
            assert!(!m.help.is_empty(), "{m:?}");
            assert!(names.insert(m.name.clone()), "repeated {}", m.name);
        }
        let text = ops_http::encode(&metrics);
        assert_eq!(text.matches("# TYPE ").count(), metrics.len(), "nothing skipped");
        for line in [
            "nuropb_gateway_sessions 3\n",
            "nuropb_gateway_sessions_high_water 7\n",
            "nuropb_gateway_requests_total 40\n",
            "nuropb_gateway_frames_dropped_total 5\n",
            "nuropb_gateway_mesh_connected 1\n",
            "nuropb_gateway_amqp_connected 1\n",
            "nuropb_gateway_amqp_published_total 11\n",
            "nuropb_gateway_amqp_reconnects_total 2\n",
            "nuropb_gateway_amqp_pending_requests 0\n",
            "nuropb_gateway_ws_connections_refused_total 6\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
    }
}
