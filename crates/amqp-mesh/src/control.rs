//! Control operations between the gateway core's [`GatewayControl`] and the wire's
//! [`ControlOp`] (`nuropb_wire::control`): how a fan-out operation received by one gateway
//! instance (on the shared service queue) reaches every instance (each one's control
//! queue is bound to the control topic). The payload is the `event` of an ordinary NuroPb
//! event, so a Python service that happens to bind `#` receives a well-formed event.

use handler_core::UserId;
use handler_core::mesh::GatewayControl;
use nuropb_wire::control::ControlOp;
use serde_json::Value;

/// The wire payload for `op`.
pub(crate) fn to_wire(op: &GatewayControl) -> ControlOp {
    let ids = |user_ids: &[UserId]| user_ids.iter().map(|u| u.as_str().to_owned()).collect();
    match op {
        GatewayControl::PushToUsers { user_ids, topic, event } => ControlOp::PushToUsers {
            user_ids: ids(user_ids),
            topic: topic.clone(),
            event: event.clone(),
        },
        GatewayControl::PushToAll { topic, event } => {
            ControlOp::PushToAll { topic: topic.clone(), event: event.clone() }
        }
        GatewayControl::DisconnectUsers { user_ids, reason } => {
            ControlOp::DisconnectUsers { user_ids: ids(user_ids), reason: reason.clone() }
        }
    }
}

/// The users a control event is about, for the event's advisory `target`.
pub(crate) fn target(op: &GatewayControl) -> Option<Vec<Value>> {
    match op {
        GatewayControl::PushToUsers { user_ids, .. }
        | GatewayControl::DisconnectUsers { user_ids, .. } => {
            Some(user_ids.iter().map(|u| Value::String(u.as_str().to_owned())).collect())
        }
        GatewayControl::PushToAll { .. } => None,
    }
}

/// Reads a control payload (the `event` of a control event); `Err` says what is wrong
/// with it.
pub(crate) fn decode(payload: Value) -> Result<GatewayControl, String> {
    // Only an object: serde would also read the tagged enum out of an array.
    if !payload.is_object() {
        return Err("control payload is not an object".into());
    }
    serde_json::from_value::<ControlOp>(payload)
        .map_err(|e| format!("malformed control payload: {e}"))
        .and_then(from_wire)
}

/// A decoded payload as an operation; `Err` says what is wrong with it.
fn from_wire(op: ControlOp) -> Result<GatewayControl, String> {
    Ok(match op {
        ControlOp::PushToUsers { user_ids, topic, event } => {
            GatewayControl::PushToUsers { user_ids: user_ids_of(user_ids)?, topic, event }
        }
        ControlOp::PushToAll { topic, event } => GatewayControl::PushToAll { topic, event },
        ControlOp::DisconnectUsers { user_ids, reason } => {
            GatewayControl::DisconnectUsers { user_ids: user_ids_of(user_ids)?, reason }
        }
    })
}

/// A non-empty list of non-empty ids.
fn user_ids_of(ids: Vec<String>) -> Result<Vec<UserId>, String> {
    if ids.is_empty() {
        return Err("user_ids must not be empty".to_owned());
    }
    ids.into_iter()
        .map(|id| {
            if id.is_empty() {
                Err("user_ids must be a list of non-empty strings".to_owned())
            } else {
                Ok(UserId::new(id))
            }
        })
        .collect()
}

/// The `user_ids` parameter of a gateway method: a non-empty list of non-empty strings.
pub(crate) fn user_id_list(value: Value) -> Result<Vec<UserId>, String> {
    let ids: Vec<Value> = match value {
        Value::Array(items) => items,
        _ => return Err("user_ids must be a list of strings".to_owned()),
    };
    let ids = ids
        .into_iter()
        .map(|v| match v {
            Value::String(s) if !s.is_empty() => Ok(s),
            _ => Err("user_ids must be a list of non-empty strings".to_owned()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    user_ids_of(ids)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trip() {
        let ops = [
            GatewayControl::PushToUsers {
                user_ids: vec!["u1".into(), "u2".into()],
                topic: "t".into(),
                event: json!({"x": [1, 2]}),
            },
            GatewayControl::PushToAll { topic: "t".into(), event: json!("hi") },
            GatewayControl::DisconnectUsers { user_ids: vec!["u1".into()], reason: "bye".into() },
        ];
        for op in ops {
            let encoded = serde_json::to_value(to_wire(&op)).expect("encodes");
            assert_eq!(decode(encoded), Ok(op));
        }
    }

    #[test]
    fn rejects_malformed() {
        let check = |v: Value| assert!(decode(v.clone()).is_err(), "{v}");
        check(json!([]));
        check(json!(["push_to_all", "t"]));
        check(json!({"op": "explode"}));
        check(json!({"op": "push_to_users", "user_ids": [], "topic": "t"}));
        check(json!({"op": "push_to_users", "user_ids": [1], "topic": "t"}));
        check(json!({"op": "push_to_users", "user_ids": [""], "topic": "t"}));
        check(json!({"op": "push_to_all"}));
        check(json!({"op": "disconnect_users", "user_ids": ["u"]}));
    }

    #[test]
    fn user_id_parameters() {
        assert_eq!(user_id_list(json!(["a"])), Ok(vec![UserId::new("a")]));
        for bad in [json!("a"), json!([]), json!([""]), json!([1])] {
            assert!(user_id_list(bad.clone()).is_err(), "{bad}");
        }
    }
}
