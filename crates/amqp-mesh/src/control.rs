//! The payload of control events: how a fan-out operation received by one gateway
//! instance (on the shared service queue) reaches every instance (each one's events queue
//! is bound to the control topic). The payload is the `event` of an ordinary NuroPb event,
//! so a Python service that happens to bind `#` receives a well-formed event.
//!
//! ```json
//! {"op": "push_to_users", "user_ids": ["u1"], "topic": "t", "event": {…}}
//! {"op": "push_to_all", "topic": "t", "event": {…}}
//! {"op": "disconnect_users", "user_ids": ["u1"], "reason": "…"}
//! ```

use handler_core::UserId;
use handler_core::mesh::GatewayControl;
use serde_json::{Map, Value, json};

const PUSH_TO_USERS: &str = "push_to_users";
const PUSH_TO_ALL: &str = "push_to_all";
const DISCONNECT_USERS: &str = "disconnect_users";

/// The event payload for `op`.
pub(crate) fn encode(op: &GatewayControl) -> Value {
    let ids = |user_ids: &[UserId]| -> Value {
        user_ids.iter().map(|u| Value::String(u.as_str().to_owned())).collect()
    };
    match op {
        GatewayControl::PushToUsers { user_ids, topic, event } => {
            json!({"op": PUSH_TO_USERS, "user_ids": ids(user_ids), "topic": topic, "event": event})
        }
        GatewayControl::PushToAll { topic, event } => {
            json!({"op": PUSH_TO_ALL, "topic": topic, "event": event})
        }
        GatewayControl::DisconnectUsers { user_ids, reason } => {
            json!({"op": DISCONNECT_USERS, "user_ids": ids(user_ids), "reason": reason})
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

/// Reads a control payload; `Err` says what is wrong with it.
pub(crate) fn decode(payload: &Value) -> Result<GatewayControl, String> {
    let object = payload.as_object().ok_or("control payload is not an object")?;
    let op = object.get("op").and_then(Value::as_str).ok_or("control payload has no op")?;
    match op {
        PUSH_TO_USERS => Ok(GatewayControl::PushToUsers {
            user_ids: user_id_list(object.get("user_ids"))?,
            topic: string(object, "topic")?,
            event: object.get("event").cloned().unwrap_or(Value::Null),
        }),
        PUSH_TO_ALL => Ok(GatewayControl::PushToAll {
            topic: string(object, "topic")?,
            event: object.get("event").cloned().unwrap_or(Value::Null),
        }),
        DISCONNECT_USERS => Ok(GatewayControl::DisconnectUsers {
            user_ids: user_id_list(object.get("user_ids"))?,
            reason: string(object, "reason")?,
        }),
        other => Err(format!("unknown control op {other}")),
    }
}

fn string(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    object
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("{key} must be a string"))
}

/// A non-empty list of non-empty strings.
pub(crate) fn user_id_list(value: Option<&Value>) -> Result<Vec<UserId>, String> {
    let items = value.and_then(Value::as_array).ok_or("user_ids must be a list of strings")?;
    let ids = items
        .iter()
        .map(|v| match v.as_str() {
            Some(s) if !s.is_empty() => Ok(UserId::new(s)),
            _ => Err("user_ids must be a list of non-empty strings".to_owned()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.is_empty() {
        return Err("user_ids must not be empty".to_owned());
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
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
            assert_eq!(decode(&encode(&op)), Ok(op));
        }
    }

    #[test]
    fn rejects_malformed() {
        let check = |v: Value| assert!(decode(&v).is_err(), "{v}");
        check(json!([]));
        check(json!({"op": "explode"}));
        check(json!({"op": "push_to_users", "user_ids": [], "topic": "t"}));
        check(json!({"op": "push_to_users", "user_ids": [1], "topic": "t"}));
        check(json!({"op": "push_to_all"}));
        check(json!({"op": "disconnect_users", "user_ids": ["u"]}));
    }
}
