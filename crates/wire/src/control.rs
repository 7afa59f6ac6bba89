//! The gateway-to-gateway control payload: the `event` of a NuroPb event on a gateway
//! deployment's control topic, carrying one fan-out operation to every instance. Tagged by
//! `op`; the key order below is the one gateways have always written.
//!
//! ```json
//! {"op": "push_to_users", "user_ids": ["u1"], "topic": "t", "event": {…}}
//! {"op": "push_to_all", "topic": "t", "event": {…}}
//! {"op": "disconnect_users", "user_ids": ["u1"], "reason": "…"}
//! ```
//!
//! Decoding checks types only; what the gateway further requires (non-empty user ids) is
//! checked where the operation is built.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One fan-out operation. Unknown keys are ignored; a missing `event` reads as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlOp {
    /// Deliver `event` on `topic` to every session of these users.
    PushToUsers {
        /// The users (`sub` of their tokens) whose sessions get the event.
        user_ids: Vec<String>,
        /// The topic the sessions see the event under.
        topic: String,
        /// The payload, any JSON value.
        #[serde(default)]
        event: Value,
    },
    /// Deliver `event` on `topic` to every session.
    PushToAll {
        /// The topic the sessions see the event under.
        topic: String,
        /// The payload, any JSON value.
        #[serde(default)]
        event: Value,
    },
    /// Close every session of these users (WebSocket close code 4001 with `reason`).
    DisconnectUsers {
        /// The users whose sessions are closed.
        user_ids: Vec<String>,
        /// The close frame's reason text.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::pyjson::to_python_json;

    #[test]
    fn encodes_in_the_gateways_key_order() {
        let check = |op: ControlOp, expected: &str| {
            let bytes = to_python_json(&op).expect("encodes");
            assert_eq!(String::from_utf8_lossy(&bytes), expected);
            assert_eq!(serde_json::from_slice::<ControlOp>(&bytes).expect("decodes"), op);
        };
        check(
            ControlOp::PushToUsers {
                user_ids: vec!["u1".into()],
                topic: "t".into(),
                event: json!({"x": 1}),
            },
            r#"{"op": "push_to_users", "user_ids": ["u1"], "topic": "t", "event": {"x": 1}}"#,
        );
        check(
            ControlOp::PushToAll { topic: "t".into(), event: json!("hi") },
            r#"{"op": "push_to_all", "topic": "t", "event": "hi"}"#,
        );
        check(
            ControlOp::DisconnectUsers { user_ids: vec!["u".into()], reason: "bye".into() },
            r#"{"op": "disconnect_users", "user_ids": ["u"], "reason": "bye"}"#,
        );
    }

    #[test]
    fn rejects_malformed() {
        for v in [
            json!([]),
            json!({"op": "explode"}),
            json!({"op": "push_to_users", "user_ids": [1], "topic": "t"}),
            json!({"op": "push_to_all"}),
            json!({"op": "disconnect_users", "user_ids": ["u"]}),
        ] {
            assert!(serde_json::from_value::<ControlOp>(v.clone()).is_err(), "{v}");
        }
        let op: ControlOp = serde_json::from_value(json!({"op": "push_to_all", "topic": "t"}))
            .expect("event defaults to null");
        assert_eq!(op, ControlOp::PushToAll { topic: "t".into(), event: Value::Null });
    }
}
