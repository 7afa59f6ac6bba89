//! The response-, events- and control-queue consumers: lapin deliveries become
//! pending-request completions and [`MeshInbound`] messages here, at the adapter's edge.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::StreamExt;
use handler_core::mesh::MeshInbound;
use handler_core::{MeshError, MeshEvent, TraceId, UserId};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use nuropb_wire::mesh::MessageType;
use nuropb_wire::pyjson::from_python_json;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::control;
use crate::envelope::read_headers;
use crate::mesh::Shared;
use crate::pending::RawResponse;
use crate::stats::bump;

/// How many answered correlation ids are remembered to tell duplicates (§6.1: nuropb
/// sends a second response after every error) from strays. Older ones count as strays.
const ANSWERED_MEMORY: usize = 4096;

/// Runs the response-queue consumer (auto-ack) until `link` is cancelled or the consumer
/// ends. Unbounded by prefetch (auto-ack), but responses only come for our own requests,
/// which the core bounds; anything else is dropped at once.
pub(crate) async fn responses(
    shared: Arc<Shared>,
    mut consumer: Consumer,
    link: CancellationToken,
) {
    let mut answered = RecentIds::default();
    while let Some(delivery) = next(&mut consumer, &link, "response").await {
        on_response(&shared, &mut answered, delivery);
    }
}

fn on_response(shared: &Shared, answered: &mut RecentIds, delivery: Delivery) {
    let garbage = |why: &str| {
        bump(&shared.counters.garbage_rejected);
        debug!(why, "dropped a malformed message on the response queue");
    };
    let headers = match read_headers(&delivery.properties) {
        Ok(headers) if headers.message_type == MessageType::Response => headers,
        Ok(_) => return garbage("not a response"),
        Err(why) => return garbage(why),
    };
    let Some(correlation_id) = delivery.properties.correlation_id().as_ref() else {
        return garbage("no correlation_id");
    };
    let correlation_id = correlation_id.as_str();
    let (bytes, limit) = (delivery.data.len(), shared.config.max_inbound_body_bytes);
    if bytes > limit {
        // The body is dropped unread, but the request it answers ends now, not at its
        // timeout. Counted with the other deliveries dropped as unusable.
        bump(&shared.counters.garbage_rejected);
        if shared
            .pending
            .complete(correlation_id, Err(MeshError::ResponseTooLarge { bytes, limit }))
        {
            warn!(
                correlation_id,
                bytes, limit, "response larger than max_inbound_body_bytes; its request fails"
            );
            answered.insert(correlation_id);
        } else {
            debug!(
                correlation_id,
                bytes,
                limit,
                "dropped a response larger than max_inbound_body_bytes that nobody waits for"
            );
        }
        return;
    }
    let raw = RawResponse { body: delivery.data, encrypted: headers.encrypted };
    if shared.pending.complete(correlation_id, Ok(raw)) {
        bump(&shared.counters.responses);
        answered.insert(correlation_id);
    } else if answered.contains(correlation_id) {
        bump(&shared.counters.duplicates_dropped);
        debug!(correlation_id, "dropped a duplicate response");
    } else {
        bump(&shared.counters.strays_dropped);
        debug!(correlation_id, "dropped a response nobody waits for");
    }
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
pub(crate) async fn inbound(
    shared: Arc<Shared>,
    mut consumer: Consumer,
    kind: Inbound,
    link: CancellationToken,
) {
    while let Some(delivery) = next(&mut consumer, &link, kind.queue()).await {
        let inbound = match decode_inbound(&shared, &delivery, kind) {
            Ok(Some(inbound)) => inbound,
            Ok(None) => {
                if !settle(delivery.ack(BasicAckOptions::default()).await, &link) {
                    return;
                }
                continue;
            }
            Err(why) => {
                bump(&shared.counters.garbage_rejected);
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
            sent = shared.inbound.send(inbound) => sent.is_ok(),
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
fn decode_inbound(
    shared: &Shared,
    delivery: &Delivery,
    kind: Inbound,
) -> Result<Option<MeshInbound>, String> {
    let routing_key = delivery.routing_key.as_str();
    let is_control = routing_key == shared.control_topic;
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
    if delivery.data.len() > shared.config.max_inbound_body_bytes {
        return Err("body too large".into());
    }
    let headers = read_headers(&delivery.properties)?;
    if headers.message_type != MessageType::Event {
        return Err(format!("{} on the events queue", headers.message_type.as_str()));
    }
    // Events carry `encrypted: yes` with a plaintext body when a service emits them while
    // handling an encrypted request (§10, V23b); the body is read as JSON regardless.
    let Ok(Value::Object(mut body)) = from_python_json::<Value>(&delivery.data) else {
        return Err("body is not a JSON object".into());
    };
    let event = body.remove("event").unwrap_or(Value::Null);
    if is_control {
        let op = control::decode(&event)?;
        bump(&shared.counters.controls_received);
        return Ok(Some(MeshInbound::Control { op, reply: None }));
    }
    // The routing key is what matched our bindings; an event claiming another topic is
    // not delivered under a topic we never subscribed to.
    match body.get("topic").and_then(Value::as_str) {
        Some(topic) if topic == routing_key => {}
        _ => return Err("topic does not match the routing key".into()),
    }
    let target = match body.remove("target") {
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(UserId::new(s)),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    };
    let context = match body.remove("context") {
        Some(Value::Object(context)) => context,
        _ => Default::default(),
    };
    let trace_id = match body.remove("trace_id") {
        Some(Value::String(t)) => Some(TraceId::new(t)),
        _ => None,
    };
    bump(&shared.counters.events_received);
    Ok(Some(MeshInbound::Event(MeshEvent {
        topic: routing_key.to_owned(),
        event,
        target,
        context,
        trace_id,
    })))
}

/// The next delivery, or `None` when the link is cancelled or the consumer ended (which
/// cancels the link: the connection or channel is gone).
pub(crate) async fn next(
    consumer: &mut Consumer,
    link: &CancellationToken,
    queue: &str,
) -> Option<Delivery> {
    // Cancellation safety: deliveries wait in lapin's buffer until polled; dropping
    // `next` loses none.
    let delivery = tokio::select! {
        () = link.cancelled() => return None,
        delivery = consumer.next() => delivery,
    };
    match delivery {
        Some(Ok(delivery)) => Some(delivery),
        Some(Err(error)) => {
            if !link.is_cancelled() {
                warn!(queue, error = %error, "consumer failed");
                link.cancel();
            }
            None
        }
        None => {
            if !link.is_cancelled() {
                warn!(queue, "consumer cancelled by the broker");
                link.cancel();
            }
            None
        }
    }
}

/// An ack/reject result: a failure means the channel is gone; cancels the link.
pub(crate) fn settle(result: lapin::Result<bool>, link: &CancellationToken) -> bool {
    match result {
        Ok(_) => true,
        Err(error) => {
            if !link.is_cancelled() {
                warn!(error = %error, "acknowledgement failed");
                link.cancel();
            }
            false
        }
    }
}

/// A bounded memory of recently answered correlation ids (oldest forgotten first).
#[derive(Debug, Default)]
struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    fn insert(&mut self, id: &str) {
        if self.set.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > ANSWERED_MEMORY
                && let Some(oldest) = self.order.pop_front()
            {
                self.set.remove(&oldest);
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_are_bounded() {
        let mut recent = RecentIds::default();
        for i in 0..ANSWERED_MEMORY + 10 {
            recent.insert(&i.to_string());
        }
        assert!(!recent.contains("0"));
        assert!(recent.contains(&(ANSWERED_MEMORY + 9).to_string()));
        assert_eq!(recent.set.len(), ANSWERED_MEMORY);
    }
}
