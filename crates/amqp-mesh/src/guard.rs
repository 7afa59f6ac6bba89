//! The validation guard every outgoing call and event passes before anything is published.
//! Defence in depth: the client frame validator runs earlier, but a message that a Python
//! service cannot decode kills or wedges it (spec §7.5), so the adapter checks again.
//! By construction the adapter always writes all five headers, protocol `0.1.1`, a
//! `request`/`command`/`event` type and a JSON object body; what is left to check is the
//! caller-supplied content, and that the call does not target the gateway itself.

use handler_core::{MeshCall, MeshError, MeshEvent};
use serde_json::Value;

use crate::config::{AmqpMeshConfig, MAX_SHORT_STRING};

/// The limits the guard enforces (copied from the config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_trace_id_len: usize,
    pub(crate) max_json_depth: usize,
}

impl Limits {
    pub(crate) fn of(config: &AmqpMeshConfig) -> Limits {
        Limits {
            max_body_bytes: config.max_body_bytes,
            max_trace_id_len: config.max_trace_id_len,
            max_json_depth: config.max_json_depth,
        }
    }
}

/// Checks a request or command before it is serialized. `own_service` is the gateway's
/// own service name (`AmqpMeshConfig::service_name`).
///
/// Architecture invariant: calls that reach this adapter come from WebSocket clients, so
/// they never target the gateway's own service. Its methods (`push_to_all`,
/// `disconnect_user`, `stats`, …) are for mesh peers, which publish to its service queue
/// directly; routed from here they would run on behalf of an untrusted client.
pub(crate) fn check_call(
    call: &MeshCall,
    limits: Limits,
    own_service: &str,
) -> Result<(), MeshError> {
    // Direct-exchange routing keys match byte for byte, so equality is exactly the set of
    // calls that would land on our own service queue.
    if call.service == own_service {
        return Err(MeshError::Rejected(format!(
            "service {own_service} cannot be called through the gateway"
        )));
    }
    check_name("service", &call.service)?;
    check_name("method", &call.method)?;
    check_trace_id(call.trace_id.as_str(), limits)?;
    // The body is one object around `params` and `context`.
    let depth = 1 + object_depth(&call.params).max(object_depth(&call.context));
    check_depth(depth, limits)
}

/// Checks an event before it is serialized.
pub(crate) fn check_event(event: &MeshEvent, limits: Limits) -> Result<(), MeshError> {
    check_name("topic", &event.topic)?;
    if let Some(trace_id) = &event.trace_id {
        check_trace_id(trace_id.as_str(), limits)?;
    }
    let depth = 1 + json_depth(&event.event).max(object_depth(&event.context));
    check_depth(depth, limits)
}

/// Checks the serialized (and, if so, encrypted) body size.
pub(crate) fn check_body_size(len: usize, limits: Limits) -> Result<(), MeshError> {
    if len > limits.max_body_bytes {
        return Err(MeshError::Rejected(format!(
            "message body of {len} bytes exceeds the limit of {} bytes",
            limits.max_body_bytes
        )));
    }
    Ok(())
}

/// Service names, methods and topics become AMQP short strings (routing keys).
fn check_name(what: &str, value: &str) -> Result<(), MeshError> {
    if value.is_empty() {
        return Err(MeshError::Rejected(format!("{what} must not be empty")));
    }
    if value.len() > MAX_SHORT_STRING {
        return Err(MeshError::Rejected(format!("{what} is longer than {MAX_SHORT_STRING} bytes")));
    }
    Ok(())
}

fn check_trace_id(trace_id: &str, limits: Limits) -> Result<(), MeshError> {
    if trace_id.len() > limits.max_trace_id_len {
        return Err(MeshError::Rejected(format!(
            "trace_id is longer than {} bytes",
            limits.max_trace_id_len
        )));
    }
    Ok(())
}

fn check_depth(depth: usize, limits: Limits) -> Result<(), MeshError> {
    if depth > limits.max_json_depth {
        return Err(MeshError::Rejected(format!(
            "message nests deeper than {} levels",
            limits.max_json_depth
        )));
    }
    Ok(())
}

fn object_depth(object: &serde_json::Map<String, Value>) -> usize {
    1 + object.values().map(json_depth).max().unwrap_or(0)
}

/// Nesting depth of arrays and objects (a scalar is 0, `{}` and `[]` are 1): the same
/// measure the client frame validator uses.
pub(crate) use nuropb_wire::client::depth as json_depth;

#[cfg(test)]
mod tests {
    use handler_core::TraceId;
    use serde_json::json;

    use super::*;

    const LIMITS: Limits = Limits { max_body_bytes: 100, max_trace_id_len: 8, max_json_depth: 4 };

    fn call(service: &str, method: &str, params: Value, trace: &str) -> MeshCall {
        MeshCall {
            service: service.into(),
            method: method.into(),
            params: params.as_object().cloned().unwrap_or_default(),
            context: Default::default(),
            trace_id: TraceId::new(trace),
        }
    }

    #[test]
    fn depth() {
        let check = |v: Value, expected: usize| assert_eq!(json_depth(&v), expected, "{v}");
        check(json!(1), 0);
        check(json!({}), 1);
        check(json!([[]]), 2);
        check(json!({"a": [1, {"b": null}]}), 3);
    }

    #[test]
    fn calls() {
        let check =
            |c: MeshCall, ok: bool| assert_eq!(check_call(&c, LIMITS, "gw").is_ok(), ok, "{c:?}");
        check(call("svc", "m", json!({"a": [1]}), "t"), true);
        check(call("", "m", json!({}), "t"), false);
        check(call("svc", "", json!({}), "t"), false);
        check(call(&"s".repeat(256), "m", json!({}), "t"), false);
        check(call("svc", &"m".repeat(255), json!({}), "t"), true);
        check(call("svc", "m", json!({}), "123456789"), false);
        // body, params, and two arrays: four levels, the limit; a third array is one too many.
        check(call("svc", "m", json!({"a": [[1]]}), "t"), true);
        check(call("svc", "m", json!({"a": [[[1]]]}), "t"), false);
        check(call("svc", "m", json!({"a": [1]}), "t"), true);
        // The gateway's own service, whatever the method; names that merely resemble it
        // route elsewhere and pass.
        check(call("gw", "push_to_all", json!({}), "t"), false);
        check(call("gw", "nuropb_describe", json!({}), "t"), false);
        check(call("GW", "stats", json!({}), "t"), true);
        check(call("gw ", "stats", json!({}), "t"), true);
    }

    #[test]
    fn own_service_error_names_it() {
        let refused = check_call(&call("gw", "stats", json!({}), "t"), LIMITS, "gw");
        assert_eq!(
            refused,
            Err(MeshError::Rejected("service gw cannot be called through the gateway".into()))
        );
    }

    #[test]
    fn sizes() {
        assert!(check_body_size(100, LIMITS).is_ok());
        assert!(matches!(check_body_size(101, LIMITS), Err(MeshError::Rejected(_))));
    }
}
