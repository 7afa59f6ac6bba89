//! The events- and control-queue consumer: lapin deliveries become [`MeshInbound`]
//! messages for the core here, at the adapter's edge. Bodies are read into the wire's
//! `EventBody`, control payloads into its `ControlOp`.

use std::sync::Arc;

use handler_core::mesh::MeshInbound;
use handler_core::{MeshEvent, TraceId, UserId};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use nuropb_wire::mesh::{EventBody, MessageType};
use nuropb_wire::pyjson::from_python_json;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::control;
use crate::delivery::{next, settle};
use crate::envelope::read_headers;
use crate::stats::{Counters, bump};

/// What the events and control consumers need: the control topic (to tell operations
/// from events), `max_inbound_body_bytes`, the counters, and the way to the core.
#[derive(Debug)]
pub(crate) struct Subscriber {
    pub(crate) control_topic: String,
    pub(crate) max_inbound_body_bytes: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) inbound: mpsc::Sender<MeshInbound>,
}

/// Which per-instance queue a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// The events queue: events matching `event_bindings`.
    Events,
    /// The control queue: fan-out operations on the control topic.
    Controls,
}

impl Inbound {
    fn queue(self) -> &'static str {
        match self {
            Inbound::Events => "events",
            Inbound::Controls => "control",
        }
    }
}

/// Runs the events- or control-queue consumer (manual ack, bounded by prefetch) until
/// `link` is cancelled or the consumer ends.
///
/// Overload policy: when the channel to the core is full this task waits, so no more
/// deliveries are acknowledged and the broker stops after `prefetch` unacknowledged ones;
/// the queue then absorbs the backlog up to its `x-max-length`. Beyond it the broker
/// drops the oldest events, and refuses new control operations (the peer that asked is
/// told). Memory here stays bounded either way.
pub(crate) async fn run(
    subscriber: Arc<Subscriber>,
    mut consumer: Consumer,
    kind: Inbound,
    link: CancellationToken,
) {
    while let Some(delivery) = next(&mut consumer, &link, kind.queue()).await {
        let inbound = match subscriber.decode(&delivery, kind) {
            Ok(Some(inbound)) => inbound,
            Ok(None) => {
                if !settle(delivery.ack(BasicAckOptions::default()).await, &link) {
                    return;
                }
                continue;
            }
            Err(why) => {
                bump(&subscriber.counters.garbage_rejected);
                debug!(why = %why, queue = kind.queue(), routing_key = %delivery.routing_key, "rejected a malformed message");
                if !settle(delivery.reject(BasicRejectOptions { requeue: false }).await, &link) {
                    return;
                }
                continue;
            }
        };
        // Cancellation safety: a send cancelled by the link going down loses this event,
        // which is unacknowledged; its queue goes away with the connection anyway.
        let sent = tokio::select! {
            () = link.cancelled() => return,
            sent = subscriber.inbound.send(inbound) => sent.is_ok(),
        };
        if !sent {
            debug!(queue = kind.queue(), "the core no longer listens; message dropped");
        }
        if !settle(delivery.ack(BasicAckOptions::default()).await, &link) {
            return;
        }
    }
}

/// Turns an events- or control-queue delivery into a message for the core; `None` for
/// one to acknowledge and skip.
impl Subscriber {
    fn decode(&self, delivery: &Delivery, kind: Inbound) -> Result<Option<MeshInbound>, String> {
        let routing_key = delivery.routing_key.as_str();
        let is_control = routing_key == self.control_topic;
        // Any gateway deployment's control topic (ours or another's on the same vhost): its
        // payloads (user ids, reasons) are operations, never events for clients.
        let is_any_control =
            routing_key.starts_with("nuropb-gateway.") && routing_key.ends_with(".control");
        match (kind, is_control) {
            (Inbound::Events, false) if !is_any_control => {}
            (Inbound::Controls, true) => {}
            // An `event_bindings` pattern that matches a control topic (`#`, say) brings
            // control operations here too; ours are carried out from the control queue.
            (Inbound::Events, _) => return Ok(None),
            (Inbound::Controls, false) => return Err("not on the control topic".into()),
        }
        if delivery.data.len() > self.max_inbound_body_bytes {
            return Err("body too large".into());
        }
        let headers = read_headers(&delivery.properties)?;
        if headers.message_type != MessageType::Event {
            return Err(format!("{} on the events queue", headers.message_type.as_str()));
        }
        // Events carry `encrypted: yes` with a plaintext body when a service emits them while
        // handling an encrypted request (§10, V23b); the body is read as JSON regardless. An
        // object always reads as an event body (see `EventBody`); the shape is checked first
        // so that an array is not read as one.
        let body = match from_python_json::<Value>(&delivery.data) {
            Ok(body @ Value::Object(_)) => serde_json::from_value::<EventBody>(body)
                .map_err(|e| format!("body is not an event: {e}"))?,
            _ => return Err("body is not a JSON object".into()),
        };
        let EventBody { topic, event, context, trace_id, target, .. } = body;
        if is_control {
            let op = control::decode(event)?;
            bump(&self.counters.controls_received);
            return Ok(Some(MeshInbound::Control { op, reply: None }));
        }
        // The routing key is what matched our bindings; an event claiming another topic is
        // not delivered under a topic we never subscribed to.
        if topic != routing_key {
            return Err("topic does not match the routing key".into());
        }
        // The target is advisory; items that are not user ids are skipped.
        let target = target.map(|items| {
            items
                .into_iter()
                .filter_map(|item| match item {
                    Value::String(id) => Some(UserId::new(id)),
                    _ => None,
                })
                .collect()
        });
        bump(&self.counters.events_received);
        Ok(Some(MeshInbound::Event(MeshEvent {
            topic: routing_key.to_owned(),
            event,
            target,
            context,
            trace_id: trace_id.map(TraceId::new),
        })))
    }
}
