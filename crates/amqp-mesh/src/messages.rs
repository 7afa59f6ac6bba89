//! Message builders: the requests, commands, events and responses the gateway publishes,
//! as bodies in Python's JSON bytes (§4, §5) with their AMQP envelope, size-checked by the
//! guard. Pure: nothing here publishes.

use std::time::Duration;

use handler_core::{MeshCall, MeshError};
use nuropb_wire::mesh::{EventBody, MeshHeaders, MessageType, RequestBodyRef, ResponseBody};
use nuropb_wire::pyjson::to_python_json;
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::Value;

use crate::envelope::{self, TraceHeader};
use crate::guard::{self, Limits};
use crate::ids::new_correlation_id;
use crate::publisher::{Mode, Outgoing};
use crate::stats::{Counters, bump};

/// A call serialized under its correlation id, not yet encrypted.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) correlation_id: String,
    pub(crate) json: Vec<u8>,
}

/// The request or command body in Python's JSON bytes (§4, §5.1), under a fresh
/// correlation id; refused when larger than `max_body_bytes`. Written from borrowed fields
/// (`RequestBodyRef`); `params` and `context` are then freed, since nothing reads them once
/// the body exists.
pub(crate) fn encode_call(
    tag: MessageType,
    call: &mut MeshCall,
    limits: Limits,
    counters: &Counters,
) -> Result<Encoded, MeshError> {
    let correlation_id = new_correlation_id();
    let body = RequestBodyRef {
        tag,
        service: &call.service,
        method: &call.method,
        params: &call.params,
        correlation_id: &correlation_id,
        context: &call.context,
        trace_id: Some(call.trace_id.as_str()),
    };
    let encoded = to_python_json(&body);
    drop(std::mem::take(&mut call.params));
    drop(std::mem::take(&mut call.context));
    let json = encoded.map_err(|e| MeshError::Rejected(format!("call cannot be encoded: {e}")))?;
    guard::check_body_size(json.len(), limits)
        .inspect_err(|_| bump(&counters.rejected_by_guard))?;
    Ok(Encoded { correlation_id, json })
}

/// Where a request or command goes and how it is marked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallRoute<'a> {
    /// The rpc exchange.
    pub(crate) exchange: &'a str,
    /// The connection's response queue.
    pub(crate) reply_to: &'a str,
    /// The AMQP expiration.
    pub(crate) ttl: Duration,
    /// The gateway's service name, for the `x-nuropb-gateway` header (see `envelope`).
    pub(crate) relayed_by: &'a str,
}

/// A request or command (already encoded, and encrypted when `encrypted`) as published
/// on behalf of a client.
pub(crate) fn call(
    tag: MessageType,
    call: &MeshCall,
    correlation_id: &str,
    body: Vec<u8>,
    encrypted: bool,
    route: CallRoute<'_>,
) -> Result<Outgoing, MeshError> {
    let headers = MeshHeaders::outgoing(tag, Some(call.trace_id.as_str().to_owned()), encrypted);
    let properties = envelope::properties(
        &headers,
        correlation_id,
        route.reply_to,
        Some(route.ttl),
        Some(route.relayed_by),
    )
    .map_err(MeshError::Rejected)?;
    let mode = match tag {
        MessageType::Request => Mode::Request,
        _ => Mode::Mandatory,
    };
    Ok(Outgoing {
        mode,
        exchange: route.exchange.to_owned(),
        routing_key: call.service.clone(),
        body,
        properties,
    })
}

/// A §5.3 event on `exchange`, ready to publish (not mandatory); the guard's size limit
/// applies.
pub(crate) fn event(
    body: &EventBody,
    exchange: &str,
    limits: Limits,
    counters: &Counters,
) -> Result<Outgoing, MeshError> {
    let json = to_python_json(body)
        .map_err(|e| MeshError::Rejected(format!("event cannot be encoded: {e}")))?;
    guard::check_body_size(json.len(), limits)
        .inspect_err(|_| bump(&counters.rejected_by_guard))?;
    let headers = MeshHeaders::outgoing(MessageType::Event, body.trace_id.clone(), false);
    let correlation_id = body.correlation_id.clone().unwrap_or_default();
    let properties = envelope::properties(&headers, &correlation_id, "", None, None)
        .map_err(MeshError::Rejected)?;
    Ok(Outgoing {
        mode: Mode::Plain,
        exchange: exchange.to_owned(),
        routing_key: body.topic.clone(),
        body: json,
        properties,
    })
}

/// Where a request's answer goes.
#[derive(Debug)]
pub(crate) struct ReplyTo {
    pub(crate) queue: String,
    pub(crate) correlation_id: String,
    pub(crate) trace_id: TraceHeader,
    pub(crate) context: JsonObject,
}

/// The response (§5.4): default exchange, routing key = the request's `reply_to`, the
/// request's correlation id and trace id, empty `reply_to` property.
pub(crate) fn response(
    reply: &ReplyTo,
    outcome: Result<Value, ErrorObject>,
    limits: Limits,
) -> Result<Outgoing, String> {
    let trace_id = reply.trace_id.for_reply();
    let (result, error) = match outcome {
        Ok(result) => (result, None),
        Err(error) => (Value::Null, Some(error)),
    };
    let mut body = ResponseBody {
        tag: MessageType::Response,
        result,
        error,
        correlation_id: Some(reply.correlation_id.clone()),
        trace_id: trace_id.clone(),
        context: reply.context.clone(),
        warning: None,
        reply_to: Some(reply.queue.clone()),
    };
    let mut json = to_python_json(&body).map_err(|e| format!("cannot encode the response: {e}"))?;
    // Our results (describe, stats, `accepted`) are small; the echoed context is what a
    // peer sent us and could be large. Rather than leave the peer waiting forever (nuropb
    // requesters have no timeout), the context is dropped from an oversized response.
    if guard::check_body_size(json.len(), limits).is_err() {
        body.context = Default::default();
        json = to_python_json(&body).map_err(|e| format!("cannot encode the response: {e}"))?;
    }
    guard::check_body_size(json.len(), limits).map_err(|e| e.to_string())?;
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
