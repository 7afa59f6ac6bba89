//! The gateway as a NuroPb service: requests and commands that mesh peers send to
//! `nuropb-<service_name>-sq`. Methods: `nuropb_describe`, `push_to_user`, `push_to_all`,
//! `disconnect_user` (fan-out: published as a control event that every instance's events
//! queue receives) and `stats` (answered by this instance's core).
//!
//! Every delivery is settled: acked when handled, rejected without requeue (dead-lettered)
//! otherwise, including response-typed and undecodable messages, which would wedge or kill
//! a Python service (§7.5). Deliveries are handled one at a time; each step is bounded
//! (`publish_timeout`, `core_reply_timeout`), so one call cannot stall the queue for long.
//!
//! Architecture invariant: these methods are for mesh peers, never for WebSocket clients.
//! A gateway marks every call it relays for a client with `x-nuropb-gateway` (see
//! `envelope`); such a call may only ask for `nuropb_describe`, anything else is answered
//! with `NuropbAuthorizationError` and rejected. Without this, a client of one gateway
//! deployment could reach another deployment's `disconnect_user` on the same vhost by
//! naming its service (the guard only stops calls to the relaying gateway's own name).

use std::sync::Arc;

use handler_core::mesh::{GatewayControl, MeshInbound};
use handler_core::{MeshError, UserId};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use nuropb_wire::mesh::{
    DESCRIBE_METHOD, EventBody, MeshHeaders, MessageType, ResponseBody, error_name,
};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::consumers::{next, settle};
use crate::control;
use crate::describe::gateway_description;
use crate::envelope::{self, TraceHeader, read_headers};
use crate::guard::{self, json_depth};
use crate::mesh::{LinkHandle, Shared};
use crate::publisher::{Mode, Outgoing, Published};
use crate::requester::new_correlation_id;
use crate::stats::bump;

/// `reason` of `disconnect_user` when the caller gives none.
pub(crate) const DEFAULT_DISCONNECT_REASON: &str = "disconnected by the mesh";

/// Most users one fan-out call may name.
const MAX_USER_IDS: usize = 10_000;

/// Runs the service-queue consumer until `link` is cancelled or the consumer ends.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut consumer: Consumer,
    link_handle: LinkHandle,
    link: CancellationToken,
) {
    while let Some(delivery) = next(&mut consumer, &link, "service").await {
        let handled = handle(&shared, &link_handle, &delivery).await;
        let settled = if handled {
            delivery.ack(BasicAckOptions::default()).await
        } else {
            delivery.reject(BasicRejectOptions { requeue: false }).await
        };
        if !settle(settled, &link) {
            return;
        }
    }
}

/// Where a request's answer goes.
struct ReplyTo {
    queue: String,
    correlation_id: String,
    trace_id: TraceHeader,
    context: JsonObject,
}

/// Handles one delivery; `true` means ack, `false` reject.
async fn handle(shared: &Shared, link: &LinkHandle, delivery: &Delivery) -> bool {
    let garbage = |why: &str| {
        bump(&shared.counters.garbage_rejected);
        warn!(why, routing_key = %delivery.routing_key, "rejected a malformed message on the service queue");
        false
    };
    if delivery.data.len() > shared.config.max_inbound_body_bytes {
        return garbage("body too large");
    }
    let headers = match read_headers(&delivery.properties) {
        Ok(headers) => headers,
        Err(why) => return garbage(why),
    };
    let is_request = match headers.message_type {
        MessageType::Request => true,
        MessageType::Command => false,
        // A response here would wedge a nuropb service; events are not subscribed here
        // (they go to the per-instance events queue), nuropb rejects them too (V26).
        MessageType::Response | MessageType::Event => return garbage("not a request or command"),
    };
    bump(&shared.counters.service_calls);
    let props = &delivery.properties;
    let reply_to =
        props.reply_to().as_ref().map(|q| q.as_str().to_owned()).filter(|q| !q.is_empty());
    let mut reply = ReplyTo {
        queue: reply_to.unwrap_or_default(),
        correlation_id: props
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
            .unwrap_or_default(),
        trace_id: headers.trace_id.clone(),
        context: JsonObject::new(),
    };

    let outcome = if headers.encrypted {
        // The gateway publishes no public key, so nobody should encrypt for it.
        Err(ErrorObject::new(error_name::HANDLING, "the gateway does not accept encrypted calls"))
    } else {
        match from_python_json::<Value>(&delivery.data) {
            Ok(Value::Object(mut body)) => {
                if let Some(Value::Object(context)) = body.remove("context") {
                    reply.context = context;
                }
                match &headers.relayed_by {
                    Some(gateway) => only_describe(shared, body, gateway),
                    None => dispatch(shared, link, body, &headers.trace_id).await,
                }
            }
            _ => Err(ErrorObject::new(error_name::VALIDATION, "body is not a JSON object")),
        }
    };
    if let Err(error) = &outcome {
        let trace_id = reply.trace_id.for_reply().unwrap_or_default();
        info!(error = %error.error, description = %error.description, trace_id, "gateway call failed");
    }
    let ok = outcome.is_ok();
    if is_request {
        // Answer first, then ack (the caller's `run`): a crash in between costs at most a
        // duplicate response, which requesters drop, never a lost one.
        respond(shared, link, &reply, outcome).await;
    }
    ok
}

/// A call some gateway relayed for one of its clients: only `nuropb_describe` is answered.
fn only_describe(
    shared: &Shared,
    mut body: JsonObject,
    gateway: &str,
) -> Result<Value, ErrorObject> {
    let method = match body.remove("method") {
        Some(Value::String(method)) => method,
        _ => return Err(invalid("method must be a string")),
    };
    if method == DESCRIBE_METHOD {
        return Ok(gateway_description(&shared.config.service_name));
    }
    warn!(method, relayed_by = gateway, "refused a client-relayed call to a gateway method");
    Err(ErrorObject::new(
        error_name::AUTHORIZATION,
        format!(
            "{method} is for mesh peers; it cannot be called on behalf of a client of gateway {gateway}"
        ),
    ))
}

/// Runs a method. `Err` is the error object for the caller.
async fn dispatch(
    shared: &Shared,
    link: &LinkHandle,
    mut body: JsonObject,
    trace: &TraceHeader,
) -> Result<Value, ErrorObject> {
    let method = match body.remove("method") {
        Some(Value::String(method)) => method,
        _ => return Err(invalid("method must be a string")),
    };
    let params = match body.remove("params") {
        Some(Value::Object(params)) => params,
        None | Some(Value::Null) => JsonObject::new(),
        Some(_) => return Err(invalid("params must be an object")),
    };
    debug!(method, "gateway call");
    let trace_id = trace.for_reply();
    match method.as_str() {
        DESCRIBE_METHOD => Ok(gateway_description(&shared.config.service_name)),
        "push_to_user" => {
            let mut p = Params::new(params, &["topic", "event", "user_id", "user_ids"])?;
            let user_ids = p.user_ids()?;
            let op = GatewayControl::PushToUsers {
                user_ids,
                topic: p.topic()?,
                event: p.required("event")?,
            };
            fan_out(shared, link, op, trace_id).await
        }
        "push_to_all" => {
            let mut p = Params::new(params, &["topic", "event"])?;
            let op = GatewayControl::PushToAll { topic: p.topic()?, event: p.required("event")? };
            fan_out(shared, link, op, trace_id).await
        }
        "disconnect_user" => {
            let mut p = Params::new(params, &["user_id", "user_ids", "reason"])?;
            let user_ids = p.user_ids()?;
            let reason = match p.take("reason") {
                None | Some(Value::Null) => DEFAULT_DISCONNECT_REASON.to_owned(),
                Some(Value::String(reason)) => reason,
                Some(_) => return Err(invalid("reason must be a string")),
            };
            fan_out(shared, link, GatewayControl::DisconnectUsers { user_ids, reason }, trace_id)
                .await
        }
        "stats" => {
            Params::new(params, &[])?;
            stats(shared).await
        }
        // nuropb's answer for private, missing and non-callable methods (§7.2).
        other => Err(ErrorObject::new(error_name::HANDLING, format!("Unknown method {other}"))),
    }
}

fn invalid(why: impl Into<String>) -> ErrorObject {
    ErrorObject::new(error_name::VALIDATION, why)
}

/// Method parameters; unknown names are refused, as Python refuses unexpected kwargs.
struct Params(JsonObject);

impl Params {
    fn new(params: JsonObject, allowed: &[&str]) -> Result<Params, ErrorObject> {
        if let Some(unknown) = params.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(invalid(format!("unexpected parameter {unknown}")));
        }
        Ok(Params(params))
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name)
    }

    fn required(&mut self, name: &str) -> Result<Value, ErrorObject> {
        self.take(name).ok_or_else(|| invalid(format!("missing parameter {name}")))
    }

    fn topic(&mut self) -> Result<String, ErrorObject> {
        match self.required("topic")? {
            Value::String(topic) if !topic.is_empty() => Ok(topic),
            _ => Err(invalid("topic must be a non-empty string")),
        }
    }

    /// `user_id` (one) or `user_ids` (a list), not both.
    fn user_ids(&mut self) -> Result<Vec<UserId>, ErrorObject> {
        let ids = match (self.take("user_id"), self.take("user_ids")) {
            (Some(Value::String(id)), None | Some(Value::Null)) if !id.is_empty() => {
                vec![UserId::new(id)]
            }
            (None | Some(Value::Null), Some(list)) => {
                control::user_id_list(Some(&list)).map_err(invalid)?
            }
            (None | Some(Value::Null), None) => {
                return Err(invalid("missing parameter user_id or user_ids"));
            }
            (Some(Value::String(_)), Some(_)) => {
                return Err(invalid("give user_id or user_ids, not both"));
            }
            _ => return Err(invalid("user_id must be a non-empty string")),
        };
        if ids.len() > MAX_USER_IDS {
            return Err(invalid(format!("at most {MAX_USER_IDS} user ids per call")));
        }
        Ok(ids)
    }
}

/// Publishes `op` on the control topic, where every instance (this one included) picks
/// it up from its control queue. Published `mandatory` and confirmed: `accepted` means
/// every instance's control queue took it. A full control queue refuses it (the broker
/// nacks), and the caller gets `NuropbOverloadedError` instead; instances whose queue had
/// room may still carry it out, so a retry may repeat it there.
async fn fan_out(
    shared: &Shared,
    link: &LinkHandle,
    op: GatewayControl,
    trace_id: Option<String>,
) -> Result<Value, ErrorObject> {
    let event = control::encode(&op);
    // The control event is an ordinary event on a shared exchange: the same limits as for
    // anything else the gateway publishes.
    if 1 + json_depth(&event) > shared.limits.max_json_depth {
        return Err(invalid("event nests too deeply"));
    }
    let body = EventBody {
        tag: MessageType::Event,
        topic: shared.control_topic.clone(),
        event,
        context: JsonObject::new(),
        trace_id: trace_id.filter(|t| t.len() <= shared.limits.max_trace_id_len),
        correlation_id: Some(new_correlation_id()),
        target: control::target(&op),
    };
    let mut message = shared.event_message(&body).map_err(|e| match e {
        MeshError::Rejected(why) => invalid(why),
        other => ErrorObject::new(error_name::TRANSPORT, other.to_string()),
    })?;
    message.mode = Mode::Mandatory;
    let published = shared.publish_bounded(link, message).await.map_err(|e| {
        ErrorObject::new(error_name::TRANSPORT, format!("could not publish the control event: {e}"))
    })?;
    match published {
        Published::Routed => Ok(json!({"accepted": true})),
        // Our own control queue is bound while we are connected; this means it was lost
        // an instant ago.
        Published::Returned => Err(ErrorObject::new(
            error_name::TRANSPORT,
            "no gateway instance receives control operations right now; not accepted",
        )),
        Published::Refused => {
            warn!("a gateway instance's control queue is full; control operation refused");
            Err(ErrorObject::new(
                error_name::OVERLOADED,
                "a gateway instance's control queue is full; the operation was not accepted",
            ))
        }
    }
}

/// Asks this instance's core for its figures.
async fn stats(shared: &Shared) -> Result<Value, ErrorObject> {
    let timeout = shared.config.core_reply_timeout;
    let too_slow = || {
        ErrorObject::new(
            error_name::TIMEOUT,
            format!("the gateway core did not answer within {} ms", timeout.as_millis()),
        )
    };
    let (reply, answer) = oneshot::channel();
    let asked = tokio::time::timeout(timeout, async {
        shared.inbound.send(MeshInbound::Stats { reply }).await.ok()?;
        answer.await.ok()
    })
    .await;
    match asked {
        Ok(Some(stats)) => serde_json::to_value(stats).map_err(|e| {
            ErrorObject::new(error_name::HANDLING, format!("cannot encode stats: {e}"))
        }),
        Ok(None) => Err(ErrorObject::new(error_name::HANDLING, "the gateway core is not running")),
        Err(_) => Err(too_slow()),
    }
}

/// Publishes the response (§5.4): default exchange, routing key = the request's
/// `reply_to`, the request's correlation id and trace id, empty `reply_to` property.
async fn respond(
    shared: &Shared,
    link: &LinkHandle,
    reply: &ReplyTo,
    outcome: Result<Value, ErrorObject>,
) {
    if reply.queue.is_empty() {
        debug!("request without reply_to; no response sent");
        return;
    }
    let published = match response_message(shared, reply, outcome) {
        Ok(message) => match shared.publish_bounded(link, message).await {
            // Not mandatory: a response to a queue that is gone is dropped by the broker.
            Ok(Published::Routed | Published::Returned) => Ok(()),
            Ok(Published::Refused) => Err("the broker refused it".to_owned()),
            Err(e) => Err(e.to_string()),
        },
        Err(why) => Err(why),
    };
    if let Err(why) = published {
        warn!(error = %why, reply_to = %reply.queue, "could not send a response");
    }
}

fn response_message(
    shared: &Shared,
    reply: &ReplyTo,
    outcome: Result<Value, ErrorObject>,
) -> Result<Outgoing, String> {
    let trace_id = reply.trace_id.for_reply();
    let (result, error) = match outcome {
        Ok(result) => (result, None),
        Err(error) => (Value::Null, Some(error)),
    };
    let body = ResponseBody {
        tag: MessageType::Response,
        result,
        error,
        correlation_id: Some(reply.correlation_id.clone()),
        trace_id: trace_id.clone(),
        context: reply.context.clone(),
        warning: None,
        reply_to: Some(reply.queue.clone()),
    };
    let mut body = body;
    let mut json = to_python_json(&body).map_err(|e| format!("cannot encode the response: {e}"))?;
    // Our results (describe, stats, `accepted`) are small; the echoed context is what a
    // peer sent us and could be large. Rather than leave the peer waiting forever (nuropb
    // requesters have no timeout), the context is dropped from an oversized response.
    if guard::check_body_size(json.len(), shared.limits).is_err() {
        body.context = Default::default();
        json = to_python_json(&body).map_err(|e| format!("cannot encode the response: {e}"))?;
    }
    guard::check_body_size(json.len(), shared.limits).map_err(|e| e.to_string())?;
    let headers = MeshHeaders::outgoing(MessageType::Response, trace_id, false);
    let properties = envelope::properties(&headers, &reply.correlation_id, "", None, None)?;
    Ok(Outgoing {
        mode: Mode::Plain,
        exchange: String::new(),
        routing_key: reply.queue.clone(),
        body: json,
        properties,
    })
}
