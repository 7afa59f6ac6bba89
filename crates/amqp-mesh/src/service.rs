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
use std::time::Duration;

use handler_core::mesh::{GatewayControl, MeshInbound};
use handler_core::{MeshError, UserId};
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use nuropb_wire::lenient::Field;
use nuropb_wire::mesh::{DESCRIBE_METHOD, EventBody, MessageType, ReceivedCall, error_name};
use nuropb_wire::pyjson::from_python_json;
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::AmqpMeshConfig;
use crate::control;
use crate::delivery::{next, settle};
use crate::envelope::{TraceHeader, read_headers};
use crate::gateway_description::{DEFAULT_DISCONNECT_REASON, gateway_description};
use crate::guard::{Limits, json_depth};
use crate::ids::new_correlation_id;
use crate::messages::{self, ReplyTo};
use crate::publisher::{Mode, Published, Publisher};
use crate::stats::{Counters, bump};

/// The gateway's own service: what its methods need, and nothing of the requester.
#[derive(Debug)]
pub(crate) struct GatewayService {
    service_name: String,
    /// Where fan-out operations are published (`AmqpMeshConfig::control_topic`).
    control_topic: String,
    events_exchange: String,
    limits: Limits,
    max_inbound_body_bytes: usize,
    publish_timeout: Duration,
    core_reply_timeout: Duration,
    counters: Arc<Counters>,
    /// The way to this instance's core, for `stats`.
    inbound: mpsc::Sender<MeshInbound>,
}

impl GatewayService {
    pub(crate) fn new(
        config: &AmqpMeshConfig,
        counters: Arc<Counters>,
        inbound: mpsc::Sender<MeshInbound>,
    ) -> Self {
        GatewayService {
            service_name: config.service_name.clone(),
            control_topic: config.control_topic(),
            events_exchange: config.events_exchange.clone(),
            limits: Limits::of(config),
            max_inbound_body_bytes: config.max_inbound_body_bytes,
            publish_timeout: config.publish_timeout,
            core_reply_timeout: config.core_reply_timeout,
            counters,
            inbound,
        }
    }
}

/// Most users one fan-out call may name.
const MAX_USER_IDS: usize = 10_000;

/// Runs the service-queue consumer until `link` is cancelled or the consumer ends.
pub(crate) async fn run(
    service: Arc<GatewayService>,
    mut consumer: Consumer,
    publisher: Publisher,
    link: CancellationToken,
) {
    while let Some(delivery) = next(&mut consumer, &link, "service").await {
        let handled = handle(&service, &publisher, &delivery).await;
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

/// Handles one delivery; `true` means ack, `false` reject.
async fn handle(gateway: &GatewayService, publisher: &Publisher, delivery: &Delivery) -> bool {
    let garbage = |why: &str| {
        bump(&gateway.counters.garbage_rejected);
        warn!(why, routing_key = %delivery.routing_key, "rejected a malformed message on the service queue");
        false
    };
    if delivery.data.len() > gateway.max_inbound_body_bytes {
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
    bump(&gateway.counters.service_calls);
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
        // An object always reads as a call (see `ReceivedCall`); the shape is checked
        // first so that an array is not read as one.
        let call = match from_python_json::<Value>(&delivery.data) {
            Ok(body @ Value::Object(_)) => serde_json::from_value::<ReceivedCall>(body).ok(),
            _ => None,
        };
        match call {
            Some(ReceivedCall { method, params, context }) => {
                reply.context = context;
                match (&headers.relayed_by, method) {
                    (_, Field::Absent | Field::Invalid) => Err(invalid("method must be a string")),
                    (Some(relaying), Field::Valid(method)) => {
                        only_describe(gateway, method, relaying)
                    }
                    (None, Field::Valid(method)) => {
                        dispatch(gateway, publisher, method, params, &headers.trace_id).await
                    }
                }
            }
            None => Err(ErrorObject::new(error_name::VALIDATION, "body is not a JSON object")),
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
        respond(gateway, publisher, &reply, outcome).await;
    }
    ok
}

/// A call some gateway relayed for one of its clients: only `nuropb_describe` is answered.
fn only_describe(
    gateway: &GatewayService,
    method: String,
    relaying: &str,
) -> Result<Value, ErrorObject> {
    if method == DESCRIBE_METHOD {
        return Ok(gateway_description(&gateway.service_name));
    }
    warn!(method, relayed_by = relaying, "refused a client-relayed call to a gateway method");
    Err(ErrorObject::new(
        error_name::AUTHORIZATION,
        format!(
            "{method} is for mesh peers; it cannot be called on behalf of a client of gateway {relaying}"
        ),
    ))
}

/// Runs a method. `Err` is the error object for the caller.
async fn dispatch(
    gateway: &GatewayService,
    publisher: &Publisher,
    method: String,
    params: Field<JsonObject>,
    trace: &TraceHeader,
) -> Result<Value, ErrorObject> {
    let params = match params {
        Field::Valid(params) => params,
        Field::Absent => JsonObject::new(),
        Field::Invalid => return Err(invalid("params must be an object")),
    };
    debug!(method, "gateway call");
    let trace_id = trace.for_reply();
    match method.as_str() {
        DESCRIBE_METHOD => Ok(gateway_description(&gateway.service_name)),
        "push_to_user" => {
            let mut p = Params::new(params, &["topic", "event", "user_id", "user_ids"])?;
            let user_ids = p.user_ids()?;
            let op = GatewayControl::PushToUsers {
                user_ids,
                topic: p.topic()?,
                event: p.required("event")?,
            };
            fan_out(gateway, publisher, op, trace_id).await
        }
        "push_to_all" => {
            let mut p = Params::new(params, &["topic", "event"])?;
            let op = GatewayControl::PushToAll { topic: p.topic()?, event: p.required("event")? };
            fan_out(gateway, publisher, op, trace_id).await
        }
        "disconnect_user" => {
            let mut p = Params::new(params, &["user_id", "user_ids", "reason"])?;
            let user_ids = p.user_ids()?;
            let reason = match p.take("reason") {
                None | Some(Value::Null) => DEFAULT_DISCONNECT_REASON.to_owned(),
                Some(Value::String(reason)) => reason,
                Some(_) => return Err(invalid("reason must be a string")),
            };
            fan_out(
                gateway,
                publisher,
                GatewayControl::DisconnectUsers { user_ids, reason },
                trace_id,
            )
            .await
        }
        "stats" => {
            Params::new(params, &[])?;
            stats(gateway).await
        }
        // nuropb's answer for private, missing and non-callable methods (§7.2).
        other => Err(ErrorObject::new(error_name::HANDLING, format!("Unknown method {other}"))),
    }
}

fn invalid(why: impl Into<String>) -> ErrorObject {
    ErrorObject::new(error_name::VALIDATION, why)
}

/// Method parameters; unknown names are refused, as Python refuses unexpected kwargs.
///
/// Read by name from the JSON object rather than decoded into a struct per method: each
/// answer names the parameter that is wrong (`missing parameter topic`, `unexpected
/// parameter x`, `topic must be a non-empty string`), as peers have always been told, and
/// `event` is any JSON value anyway.
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
                control::user_id_list(list).map_err(invalid)?
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
    gateway: &GatewayService,
    publisher: &Publisher,
    op: GatewayControl,
    trace_id: Option<String>,
) -> Result<Value, ErrorObject> {
    let event = serde_json::to_value(control::to_wire(&op))
        .map_err(|e| invalid(format!("control operation cannot be encoded: {e}")))?;
    // The control event is an ordinary event on a gateway exchange: the same limits as for
    // anything else the gateway publishes.
    if 1 + json_depth(&event) > gateway.limits.max_json_depth {
        return Err(invalid("event nests too deeply"));
    }
    let body = EventBody {
        tag: MessageType::Event,
        topic: gateway.control_topic.clone(),
        event,
        context: JsonObject::new(),
        trace_id: trace_id.filter(|t| t.len() <= gateway.limits.max_trace_id_len),
        correlation_id: Some(new_correlation_id()),
        target: control::target(&op),
    };
    let mut message =
        messages::event(&body, &gateway.events_exchange, gateway.limits, &gateway.counters)
            .map_err(|e| match e {
                MeshError::Rejected(why) => invalid(why),
                other => ErrorObject::new(error_name::TRANSPORT, other.to_string()),
            })?;
    message.mode = Mode::Mandatory;
    let published =
        publisher.publish_within(message, gateway.publish_timeout).await.map_err(|e| {
            ErrorObject::new(
                error_name::TRANSPORT,
                format!("could not publish the control event: {e}"),
            )
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
async fn stats(gateway: &GatewayService) -> Result<Value, ErrorObject> {
    let timeout = gateway.core_reply_timeout;
    let too_slow = || {
        ErrorObject::new(
            error_name::TIMEOUT,
            format!("the gateway core did not answer within {} ms", timeout.as_millis()),
        )
    };
    let (reply, answer) = oneshot::channel();
    let asked = tokio::time::timeout(timeout, async {
        gateway.inbound.send(MeshInbound::Stats { reply }).await.ok()?;
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
    gateway: &GatewayService,
    publisher: &Publisher,
    reply: &ReplyTo,
    outcome: Result<Value, ErrorObject>,
) {
    if reply.queue.is_empty() {
        debug!("request without reply_to; no response sent");
        return;
    }
    let published = match messages::response(reply, outcome, gateway.limits) {
        Ok(message) => match publisher.publish_within(message, gateway.publish_timeout).await {
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
