//! The gateway's own answer to `nuropb_describe` (spec §6.4), key for key what a nuropb
//! service sends, and the defaults it documents.

use serde_json::{Value, json};

/// `reason` of `disconnect_user` when the caller gives none.
pub(crate) const DEFAULT_DISCONNECT_REASON: &str = "disconnected by the mesh";

/// One parameter in nuropb's describe shape: `[name, {"type", "description", "default"}]`.
fn param(name: &str, kind: &str, default: Value) -> Value {
    json!([name, {"type": kind, "description": "", "default": default}])
}

/// A method spec in nuropb's shape (§6.4): `properties` is a list of pairs, a required
/// parameter shows `"default": ""`.
fn method(description: &str, properties: Vec<Value>, required: &[&str]) -> Value {
    json!({
        "description": description,
        "requires_encryption": false,
        "parameters": {"type": "object", "properties": properties, "required": required},
    })
}

/// The gateway's answer to `nuropb_describe`, key for key what a nuropb service sends.
pub(crate) fn gateway_description(service_name: &str) -> Value {
    let no_default = || Value::String(String::new());
    let user_params =
        || vec![param("user_id", "str", Value::Null), param("user_ids", "list", Value::Null)];
    let mut push_to_user =
        vec![param("topic", "str", no_default()), param("event", "Any", no_default())];
    push_to_user.extend(user_params());
    let mut disconnect_user = user_params();
    disconnect_user.push(param("reason", "str", Value::String(DEFAULT_DISCONNECT_REASON.into())));
    json!({
        "service_name": service_name,
        "service_version": env!("CARGO_PKG_VERSION"),
        "description": "nuropb-gateway: WebSocket gateway to the NuroPb mesh. Fan-out methods reach every gateway instance.",
        "warnings": [],
        "encrypted_methods": false,
        "public_key": null,
        "methods": {
            "disconnect_user": method(
                "Close every session of the given users (user_id or user_ids) on every gateway instance.",
                disconnect_user,
                &[],
            ),
            "push_to_all": method(
                "Send an event under a topic to every connected session on every gateway instance.",
                vec![param("topic", "str", no_default()), param("event", "Any", no_default())],
                &["topic", "event"],
            ),
            "push_to_user": method(
                "Send an event under a topic to every session of the given users (user_id or user_ids).",
                push_to_user,
                &["topic", "event"],
            ),
            "stats": method("Live figures of the gateway instance that answers.", vec![], &[]),
        },
    })
}

#[cfg(test)]
mod tests {
    use nuropb_wire::mesh::DescribeEncryption;

    use super::*;

    #[test]
    fn gateway_description_has_nuropb_shape() {
        let d = gateway_description("gw");
        assert_eq!(d["service_name"], "gw");
        assert_eq!(d["encrypted_methods"], false);
        assert_eq!(d["public_key"], Value::Null);
        let keys: Vec<_> = d.as_object().expect("object").keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "service_name",
                "service_version",
                "description",
                "warnings",
                "encrypted_methods",
                "public_key",
                "methods"
            ]
        );
        let push = &d["methods"]["push_to_user"];
        assert_eq!(
            push["parameters"]["properties"][0],
            json!(["topic", {"type": "str", "description": "", "default": ""}])
        );
        assert_eq!(push["parameters"]["required"], json!(["topic", "event"]));
        let read: DescribeEncryption = serde_json::from_value(d).expect("own description reads");
        assert_eq!(read.encrypted_methods().count(), 0);
    }
}
