//! NuroPb mesh messages (protocol `0.1.1`, spec §3–§5): the headers every message carries and
//! the four body shapes. Field order in each struct is the order Python `RMQAPI` writes them,
//! so serialising a struct reproduces nuropb's key order.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::lenient::{Field, OrDefault, or_default, text};

/// A JSON object, with keys kept in insertion order (`serde_json/preserve_order`), so that
/// re-encoding a body keeps Python's field order.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// The only wire protocol version nuropb 0.1.8 accepts (`nuropb_protocol` header).
pub const PROTOCOL_VERSION: &str = "0.1.1";
/// The library version nuropb writes in `nuropb_version` (informational, never checked).
pub const LIBRARY_VERSION: &str = "0.1.8";
/// Value of the `encrypted` header for encrypted bodies; any other value means plaintext.
pub const ENCRYPTED_YES: &str = "yes";
/// Method name that every nuropb service answers with its self-description.
pub const DESCRIBE_METHOD: &str = "nuropb_describe";

/// Header names, in the order nuropb writes them.
pub mod header {
    /// `nuropb_protocol`: the wire protocol version,
    /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION) on every message.
    pub const PROTOCOL: &str = "nuropb_protocol";
    /// `nuropb_version`: the sender's nuropb library version, informational.
    pub const VERSION: &str = "nuropb_version";
    /// `nuropb_type`: `request`, `command`, `event` or `response`
    /// ([`MessageType`](super::MessageType)).
    pub const TYPE: &str = "nuropb_type";
    /// `trace_id`: the call's trace id, or void (Python `None`).
    pub const TRACE_ID: &str = "trace_id";
    /// `encrypted`: [`ENCRYPTED_YES`](super::ENCRYPTED_YES) for an encrypted body, anything
    /// else for plaintext.
    pub const ENCRYPTED: &str = "encrypted";
}

/// The `nuropb_type` header and the body `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// A call that expects a response on the sender's `reply_to` queue (§5.1).
    Request,
    /// A call that gets no response (§5.2).
    Command,
    /// A published event, routed by topic (§5.3).
    Event,
    /// The answer to a request (§5.4).
    Response,
}

impl MessageType {
    /// The lowercase name nuropb writes in the header and the body `tag`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Request => "request",
            MessageType::Command => "command",
            MessageType::Event => "event",
            MessageType::Response => "response",
        }
    }

    /// The type named `s` (exact, lowercase), or `None` for anything else.
    pub fn parse(s: &str) -> Option<MessageType> {
        match s {
            "request" => Some(MessageType::Request),
            "command" => Some(MessageType::Command),
            "event" => Some(MessageType::Event),
            "response" => Some(MessageType::Response),
            _ => None,
        }
    }
}

/// The five NuroPb headers as the wire carries them (all long strings; `trace_id` may be void).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshHeaders {
    /// `nuropb_protocol`; nuropb 0.1.8 accepts only [`PROTOCOL_VERSION`].
    pub protocol: String,
    /// `nuropb_version`, the sender's library version (never checked).
    pub version: String,
    /// `nuropb_type`: what the body is.
    pub message_type: MessageType,
    /// `None` travels as an AMQP void value (Python `None`).
    pub trace_id: Option<String>,
    /// Whether the body is encrypted (spec §10): the header is [`ENCRYPTED_YES`].
    pub encrypted: bool,
}

impl MeshHeaders {
    /// Headers as nuropb 0.1.8 writes them for an outgoing message.
    pub fn outgoing(message_type: MessageType, trace_id: Option<String>, encrypted: bool) -> Self {
        MeshHeaders {
            protocol: PROTOCOL_VERSION.to_owned(),
            version: LIBRARY_VERSION.to_owned(),
            message_type,
            trace_id,
            encrypted,
        }
    }

    /// The `encrypted` header value.
    pub fn encrypted_value(&self) -> &'static str {
        if self.encrypted { ENCRYPTED_YES } else { "" }
    }
}

/// A `request` or `command` body (§5.1, §5.2). `tag` tells which.
///
/// Decoding is lenient where receivers do not depend on a field: a hand-built body may omit
/// `correlation_id` (receivers use the AMQP property, §3), `context` (nuropb then answers
/// `KeyError: 'context'`, §7.2; decoding it lets a receiver answer instead of dropping it)
/// and `trace_id`. Missing ones decode as `""`, `{}` and `None`, and are written back out
/// when the body is re-encoded. Unknown extra keys are ignored, as nuropb ignores them.
/// It is written through [`RequestBodyRef`], so both give the same bytes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RequestBody {
    /// [`MessageType::Request`] or [`MessageType::Command`].
    pub tag: MessageType,
    /// The target service's name, also the routing key on the RPC exchange.
    pub service: String,
    /// The method to call; names starting with `_` are private in nuropb.
    pub method: String,
    /// Keyword arguments: the service calls `method(**params)`.
    pub params: JsonObject,
    /// Matches the response to the request; the AMQP `correlation_id` property is what
    /// receivers use (§3). `""` when absent.
    #[serde(default)]
    pub correlation_id: String,
    /// The call context (`user_id`, `Authorization`, `trace_id` from the gateway); `{}`
    /// when absent.
    #[serde(default)]
    pub context: JsonObject,
    /// The trace id the call carries end to end; `None` when absent or `null`.
    #[serde(default)]
    pub trace_id: Option<String>,
}

impl Serialize for RequestBody {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RequestBodyRef {
            tag: self.tag,
            service: &self.service,
            method: &self.method,
            params: &self.params,
            correlation_id: &self.correlation_id,
            context: &self.context,
            trace_id: self.trace_id.as_deref(),
        }
        .serialize(serializer)
    }
}

/// A [`RequestBody`] to write, borrowing its fields: a sender encodes a call without first
/// copying its names and maps into an owned body. The one definition of the body's keys and
/// their order (nuropb's).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RequestBodyRef<'a> {
    /// [`MessageType::Request`] or [`MessageType::Command`].
    pub tag: MessageType,
    /// The target service's name.
    pub service: &'a str,
    /// The method to call.
    pub method: &'a str,
    /// Keyword arguments.
    pub params: &'a JsonObject,
    /// Matches the response to the request.
    pub correlation_id: &'a str,
    /// The call context.
    pub context: &'a JsonObject,
    /// The trace id the call carries end to end.
    pub trace_id: Option<&'a str>,
}

/// A `request` or `command` body as a service reads it from any peer: only what it acts
/// on, each field told apart as absent, well-typed or not, so that the service can answer
/// a malformed call with what is wrong rather than drop it (§7.2). [`RequestBody`] is
/// the strict form, for bodies the gateway writes or checks against the capture.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ReceivedCall {
    /// The `method` member: absent, a string, or something else.
    #[serde(default)]
    pub method: Field<String>,
    /// The `params` member: absent, an object, or something else.
    #[serde(default)]
    pub params: Field<JsonObject>,
    /// Echoed in the response; anything but an object reads as `{}`.
    #[serde(default, deserialize_with = "or_default")]
    pub context: JsonObject,
}

/// An `event` body (§5.3), key order of `RMQAPI.publish_event`.
///
/// Decoding is lenient, as receivers go by the `nuropb_type` header (§3) and a subscriber
/// reads only what it needs: a missing `tag` reads as `event`, a missing `event` as `null`,
/// and a missing or mistyped `topic`, `context`, `trace_id`, `correlation_id` or `target`
/// as its default (`""`, `{}`, `None`). Well-formed bodies re-encode byte for byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    /// Always [`MessageType::Event`] for a well-formed body.
    #[serde(default = "tag::event", deserialize_with = "tag::event_or")]
    pub tag: MessageType,
    /// The topic the event was published on, also its routing key; `""` when absent.
    #[serde(default, deserialize_with = "or_default")]
    pub topic: String,
    /// The event payload, any JSON value; `null` when absent.
    #[serde(default)]
    pub event: Value,
    /// The publisher's context; `{}` when absent.
    #[serde(default, deserialize_with = "or_default")]
    pub context: JsonObject,
    /// The trace id of the call that caused the event, if any.
    #[serde(default, deserialize_with = "or_default")]
    pub trace_id: Option<String>,
    /// A correlation id, if the publisher set one (informational for events).
    #[serde(default, deserialize_with = "or_default")]
    pub correlation_id: Option<String>,
    /// Advisory audience (user ids); `null` for most events. Kept as raw JSON so that a
    /// body re-encodes as it came; receivers skip items that are not strings.
    #[serde(default, deserialize_with = "or_default")]
    pub target: Option<Vec<Value>>,
}

/// A `response` body (§5.4), key order of a successful call.
///
/// Decoding is lenient, as a requester only needs `result` and `error` (the AMQP
/// properties carry the rest, §3): a missing `tag` reads as `response`, mistyped optional
/// fields as their defaults, and `error` as nuropb's requester reads it (see
/// `error_leniently`). Well-formed bodies re-encode byte for byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseBody {
    /// Always [`MessageType::Response`] for a well-formed body.
    #[serde(default = "tag::response", deserialize_with = "tag::response_or")]
    pub tag: MessageType,
    /// The method's return value; `null` when it failed.
    #[serde(default)]
    pub result: Value,
    /// The error the method raised, or `None` on success.
    #[serde(default, deserialize_with = "error_leniently")]
    pub error: Option<ErrorObject>,
    /// The request's correlation id, echoed.
    #[serde(default, deserialize_with = "or_default")]
    pub correlation_id: Option<String>,
    /// The request's trace id, echoed.
    #[serde(default, deserialize_with = "or_default")]
    pub trace_id: Option<String>,
    /// The request's context, echoed.
    #[serde(default, deserialize_with = "or_default")]
    pub context: JsonObject,
    /// A warning the service attached to the result (nuropb writes `null`).
    #[serde(default)]
    pub warning: Option<Value>,
    /// The queue the request asked the response to go to, echoed.
    #[serde(default, deserialize_with = "or_default")]
    pub reply_to: Option<String>,
}

/// The error name of an error that does not name itself.
const UNNAMED_ERROR: &str = "NuropbException";

/// What a requester reads of a response body: `result` and `error`, exactly as
/// [`ResponseBody`] reads them, with every other member skipped unread (no value tree is built
/// for the echoed `context`: this runs for every response). A member given twice counts
/// once, the last, as when the object is read whole. Anything but an object is refused (a
/// `Category::Data` error), so an array is never read as a body.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResponseOutcome {
    /// The method's return value; `null` when absent.
    pub result: Value,
    /// The error the method raised, read as [`ResponseBody::error`] is.
    pub error: Option<ErrorObject>,
}

impl<'de> Deserialize<'de> for ResponseOutcome {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};

        enum Key {
            Result,
            Error,
            Other,
        }
        impl<'de> Deserialize<'de> for Key {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct KeyVisitor;
                impl Visitor<'_> for KeyVisitor {
                    type Value = Key;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a member name")
                    }
                    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                        Ok(match key {
                            "result" => Key::Result,
                            "error" => Key::Error,
                            _ => Key::Other,
                        })
                    }
                }
                deserializer.deserialize_identifier(KeyVisitor)
            }
        }
        #[derive(Deserialize)]
        struct LenientError(#[serde(deserialize_with = "error_leniently")] Option<ErrorObject>);

        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = ResponseOutcome;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a response body (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResponseOutcome, A::Error> {
                let mut outcome = ResponseOutcome::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Result => outcome.result = map.next_value()?,
                        Key::Error => outcome.error = map.next_value::<LenientError>()?.0,
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(outcome)
            }
        }
        deserializer.deserialize_map(BodyVisitor)
    }
}

/// A response's `error` read leniently: nuropb always sends an `{"error", "description"}`
/// object, but a foreign peer might not. `null` is no error; an object with a missing or
/// empty `error` is a `NuropbException`, non-string members read as their JSON text; a
/// string or any other value is the description of a `NuropbException`.
fn error_leniently<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ErrorObject>, D::Error> {
    #[derive(Deserialize)]
    struct Loose {
        #[serde(default, deserialize_with = "text")]
        error: String,
        #[serde(default, deserialize_with = "text")]
        description: String,
    }
    // Buffered so that the shape decides, not serde's struct-from-array reading.
    Ok(match Value::deserialize(deserializer)? {
        Value::Null => None,
        object @ Value::Object(_) => {
            let Loose { error, description } =
                Loose::deserialize(object).map_err(D::Error::custom)?;
            let name = if error.is_empty() { UNNAMED_ERROR.to_owned() } else { error };
            Some(ErrorObject::new(name, description))
        }
        Value::String(description) => Some(ErrorObject::new(UNNAMED_ERROR, description)),
        other => Some(ErrorObject::new(UNNAMED_ERROR, other.to_string())),
    })
}

/// Defaults for the `tag` of bodies whose type the header already tells.
mod tag {
    use serde::Deserializer;

    use super::MessageType;
    use crate::lenient::or_default;

    pub(super) fn event() -> MessageType {
        MessageType::Event
    }

    pub(super) fn response() -> MessageType {
        MessageType::Response
    }

    pub(super) fn event_or<'de, D: Deserializer<'de>>(d: D) -> Result<MessageType, D::Error> {
        Ok(or_default::<_, Option<MessageType>>(d)?.unwrap_or(MessageType::Event))
    }

    pub(super) fn response_or<'de, D: Deserializer<'de>>(d: D) -> Result<MessageType, D::Error> {
        Ok(or_default::<_, Option<MessageType>>(d)?.unwrap_or(MessageType::Response))
    }
}

/// The NuroPb error object (§7.2): always exactly these two keys on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// The error's name, e.g. `NuropbTimeoutError` or a service's exception class.
    pub error: String,
    /// A human-readable description; for service exceptions nuropb's text, passed through
    /// unchanged.
    pub description: String,
}

impl ErrorObject {
    /// An error object with this name and description.
    pub fn new(error: impl Into<String>, description: impl Into<String>) -> Self {
        ErrorObject { error: error.into(), description: description.into() }
    }
}

/// The `result` of a `nuropb_describe` call (§6.4), key order as nuropb writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DescribeResult {
    /// The service object's `_service_name`.
    pub service_name: Option<String>,
    /// The service object's `_version`; `null` for nuropb-gw.
    pub service_version: Option<String>,
    /// The service class docstring, stripped.
    pub description: Option<String>,
    /// e.g. encrypted methods exist but the service has no private key.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Whether any method has `requires_encryption`; then `public_key` is set.
    pub encrypted_methods: bool,
    /// PEM `SubjectPublicKeyInfo`, only when `encrypted_methods` is true.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Method name → spec (`description`, `requires_encryption`, `parameters`). Kept as raw
    /// JSON: the `parameters.properties` member is an array of `[name, spec]` pairs, not an
    /// object (§6.4 quirks, N16).
    pub methods: JsonObject,
}

/// What a requester needs of a `nuropb_describe` result (§10): which methods require
/// encryption, and the key to encrypt them with. Read leniently, as a requester only
/// decides with it: a missing or `null` `methods` means nothing is encrypted, a method spec
/// that is not an object or whose `requires_encryption` is not a boolean is not encrypted,
/// and a `public_key` that is not a string is no key. A `methods` of another type, or a
/// result that is not an object, is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribeEncryption {
    /// Method name → what decides its encryption; `None` when the result has no `methods`
    /// (nothing is encrypted).
    pub methods: Option<BTreeMap<String, MethodEncryption>>,
    /// PEM `SubjectPublicKeyInfo`.
    pub public_key: Option<String>,
}

impl<'de> Deserialize<'de> for DescribeEncryption {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "methods_leniently")]
            methods: Option<BTreeMap<String, MethodEncryption>>,
            #[serde(default, deserialize_with = "or_default")]
            public_key: Option<String>,
        }
        // Only an object: serde would also read a struct out of an array (`[]` included).
        let value = Value::deserialize(deserializer)?;
        if !value.is_object() {
            return Err(D::Error::custom("describe result is not an object"));
        }
        let Fields { methods, public_key } =
            Fields::deserialize(value).map_err(D::Error::custom)?;
        Ok(DescribeEncryption { methods, public_key })
    }
}

impl DescribeEncryption {
    /// The methods whose spec says `requires_encryption: true`.
    pub fn encrypted_methods(&self) -> impl Iterator<Item = &str> {
        self.methods
            .iter()
            .flatten()
            .filter(|(_, spec)| spec.requires_encryption)
            .map(|(name, _)| name.as_str())
    }
}

/// The part of a method spec in a describe result that decides encryption.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct MethodEncryption {
    /// Whether calls to this method must be encrypted; `false` when absent or not a
    /// boolean.
    #[serde(default, deserialize_with = "or_default")]
    pub requires_encryption: bool,
}

fn methods_leniently<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, MethodEncryption>>, D::Error> {
    let methods: Option<BTreeMap<String, OrDefault<MethodEncryption>>> =
        Option::deserialize(deserializer)?;
    Ok(methods
        .map(|methods| methods.into_iter().map(|(name, OrDefault(spec))| (name, spec)).collect()))
}

/// Error names the gateway itself produces (nuropb's names where one exists).
pub mod error_name {
    /// The broker returned an unroutable request (§6.2).
    pub const NOT_DELIVERED: &str = "NuropbNotDeliveredError";
    /// The gateway gave up waiting for a response.
    pub const TIMEOUT: &str = "NuropbTimeoutError";
    /// The mesh connection is down or failed while the call was pending.
    pub const TRANSPORT: &str = "NuropbTransportError";
    /// The client's message is not acceptable.
    pub const VALIDATION: &str = "NuropbValidationError";
    /// The caller is not allowed to do this.
    pub const AUTHORIZATION: &str = "NuropbAuthorizationError";
    /// The gateway cannot handle the message (unknown method and the like).
    pub const HANDLING: &str = "NuropbHandlingError";
    /// A limit was hit (too many in-flight requests, rate).
    pub const OVERLOADED: &str = "NuropbOverloadedError";
    /// A size or count bound was exceeded (client frame, or a response too large to send).
    pub const LIMIT_EXCEEDED: &str = "LimitExceeded";
    /// The client sent frames faster than its per-connection rate allows; the frame was
    /// dropped (a gateway name, not nuropb's).
    pub const RATE_LIMITED: &str = "RateLimited";
    /// A client frame that is not JSON / MessagePack at all.
    pub const DECODE: &str = "DecodeError";
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::pyjson::{from_python_json, to_python_json};

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/vectors.json");

    #[test]
    fn message_type_names_round_trip() {
        let cases = [
            ("request", Some(MessageType::Request)),
            ("command", Some(MessageType::Command)),
            ("event", Some(MessageType::Event)),
            ("response", Some(MessageType::Response)),
            ("query", None),
            ("Request", None),
            ("", None),
        ];
        for (name, expected) in cases {
            assert_eq!(MessageType::parse(name), expected, "{name:?}");
            if let Some(t) = expected {
                assert_eq!(t.as_str(), name);
                assert_eq!(serde_json::to_value(t).expect("encodes"), Value::from(name));
            }
        }
    }

    #[test]
    fn outgoing_headers_are_nuropb_0_1_8() {
        let h = MeshHeaders::outgoing(MessageType::Request, None, true);
        assert_eq!((h.protocol.as_str(), h.version.as_str()), ("0.1.1", "0.1.8"));
        assert_eq!(h.encrypted_value(), "yes");
        let h = MeshHeaders::outgoing(MessageType::Event, Some("t".into()), false);
        assert_eq!(h.encrypted_value(), "");
    }

    /// The V13 capture: decode its `result` into [`DescribeResult`], check the fields, and
    /// re-encode it byte-identically (nuropb's key order).
    #[test]
    fn decodes_the_v13_describe_result() {
        let text = std::fs::read(VECTORS)
            .unwrap_or_else(|e| panic!("cannot read the NuroPb vectors at {VECTORS}: {e}"));
        let vectors: Value = serde_json::from_slice(&text).expect("vectors.json is JSON");
        let body = vectors["vectors"]
            .as_array()
            .and_then(|all| all.iter().find(|v| v["id"] == "V13"))
            .and_then(|v| v["messages"][1]["body"].as_str())
            .expect("V13 has a response body");
        let response: ResponseBody = from_python_json(body.as_bytes()).expect("decodes");
        let original_result = response.result.clone();

        let describe: DescribeResult =
            serde_json::from_value(response.result).expect("result is a DescribeResult");
        assert_eq!(describe.service_name.as_deref(), Some("capture-svc"));
        assert_eq!(describe.service_version.as_deref(), Some("1.2.3"));
        assert_eq!(
            describe.description.as_deref(),
            Some("Capture service used to record NuroPb wire traffic.")
        );
        assert!(describe.warnings.is_empty());
        assert!(describe.encrypted_methods);
        let key = describe.public_key.as_deref().expect("encrypted services publish a key");
        assert!(key.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{key}");
        assert!(key.trim_end().ends_with("-----END PUBLIC KEY-----"), "{key}");
        for method in ["echo", "secret"] {
            assert!(describe.methods.contains_key(method), "missing method {method}");
        }
        assert_eq!(describe.methods["secret"]["requires_encryption"], true);

        assert_eq!(serde_json::to_value(&describe).expect("encodes"), original_result);
        assert_eq!(
            to_python_json(&describe).expect("encodes"),
            to_python_json(&original_result).expect("encodes")
        );
    }

    #[test]
    fn describe_result_of_the_python_gateway() {
        let text = br#"{"service_name": "capture-gw", "service_version": null, "description": "stub", "warnings": [], "encrypted_methods": false, "public_key": null, "methods": {}}"#;
        let describe: DescribeResult = from_python_json(text).expect("decodes");
        assert_eq!(describe.service_version, None);
        assert_eq!(describe.public_key, None);
        assert!(!describe.encrypted_methods && describe.methods.is_empty());
        assert_eq!(to_python_json(&describe).expect("encodes"), text);
    }

    #[test]
    fn request_body_tolerates_missing_optional_fields() {
        // The `missing_context` edge case (§7.5): no correlation_id, context or trace_id.
        let body: RequestBody = from_python_json(
            br#"{"tag": "request", "service": "capture-svc", "method": "echo", "params": {}}"#,
        )
        .expect("decodes");
        assert_eq!(body.correlation_id, "");
        assert!(body.context.is_empty());
        assert_eq!(body.trace_id, None);
        // The required ones stay required.
        for text in [
            r#"{"tag": "request", "method": "echo", "params": {}}"#,
            r#"{"tag": "request", "service": "s", "params": {}}"#,
            r#"{"tag": "request", "service": "s", "method": "m"}"#,
            r#"{"tag": "request", "service": "s", "method": "m", "params": [1, 2]}"#,
            r#"{"tag": "query", "service": "s", "method": "m", "params": {}}"#,
        ] {
            assert!(from_python_json::<RequestBody>(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn reads_responses_like_nuropb() {
        let check = |v: Value, result: Value, error: Option<(&str, &str)>| {
            let r: ResponseBody = serde_json::from_value(v.clone()).expect("decodes");
            assert_eq!(r.result, result, "{v}");
            assert_eq!(r.error, error.map(|(e, d)| ErrorObject::new(e, d)), "{v}");
            // The requester's lean reading, from the bytes, finds the same.
            let bytes = to_python_json(&v).expect("encodes");
            let lean: ResponseOutcome = from_python_json(&bytes).expect("decodes");
            assert_eq!((lean.result, lean.error), (r.result, r.error), "{v}");
        };
        check(serde_json::json!({"tag": "response", "result": 5, "error": null}), 5.into(), None);
        check(
            serde_json::json!({"result": null, "error": {"error": "NuropbHandlingError", "description": "Unknown method x"}}),
            Value::Null,
            Some(("NuropbHandlingError", "Unknown method x")),
        );
        check(serde_json::json!({"error": "boom"}), Value::Null, Some(("NuropbException", "boom")));
        check(
            serde_json::json!({"error": {"description": 3}}),
            Value::Null,
            Some(("NuropbException", "3")),
        );
        check(serde_json::json!({"error": [1]}), Value::Null, Some(("NuropbException", "[1]")));
        check(serde_json::json!({"result": 1, "context": null, "trace_id": 7}), 1.into(), None);
    }

    #[test]
    fn lean_response_reading_keeps_the_last_member_and_refuses_non_objects() {
        let lean = |text: &str| from_python_json::<ResponseOutcome>(text.as_bytes());
        let twice = lean(r#"{"result": 1, "context": {"a": [1, {"b": 2}]}, "result": 2}"#);
        assert_eq!(twice.expect("decodes").result, Value::from(2), "the last `result` counts");
        let whole: Value = from_python_json(br#"{"result": 1, "result": 2}"#).expect("decodes");
        assert_eq!(whole["result"], 2, "as when the object is read whole");
        assert_eq!(lean("{}").expect("decodes"), ResponseOutcome::default());
        assert_eq!(lean(r#"{"result": NaN}"#).expect("decodes").result, Value::Null);
        for bad in ["[1, null]", "5", "\"x\"", "null"] {
            match lean(bad) {
                Err(crate::pyjson::PyJsonError::Decode(e)) => {
                    assert_eq!(e.classify(), serde_json::error::Category::Data, "{bad}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        for broken in ["{", r#"{"result": }"#, "{\"result\": 1} x"] {
            let e = lean(broken).expect_err(broken);
            assert!(
                matches!(e, crate::pyjson::PyJsonError::Decode(ref e) if e.classify() != serde_json::error::Category::Data),
                "{broken}"
            );
        }
    }

    #[test]
    fn reads_event_bodies_leniently() {
        let body: EventBody = serde_json::from_value(serde_json::json!({
            "topic": "t", "context": [], "trace_id": 1, "target": "u"
        }))
        .expect("decodes");
        assert_eq!(body.tag, MessageType::Event);
        assert_eq!((body.topic.as_str(), &body.event), ("t", &Value::Null));
        assert!(body.context.is_empty() && body.trace_id.is_none() && body.target.is_none());
    }

    #[test]
    fn reads_describe_encryption_leniently() {
        let check = |v: Value, methods: Option<&[&str]>, key: Option<&str>| {
            let d: DescribeEncryption = serde_json::from_value(v.clone()).expect("decodes");
            let found: Vec<&str> = d.encrypted_methods().collect();
            assert_eq!(methods.map(|_| found.as_slice()), methods, "{v}");
            assert_eq!(d.public_key.as_deref(), key, "{v}");
        };
        check(
            serde_json::json!({"methods": {"a": {"requires_encryption": false}, "b": {"requires_encryption": true}, "c": {}, "d": 1, "e": {"requires_encryption": "yes"}}, "public_key": null}),
            Some(&["b"]),
            None,
        );
        check(serde_json::json!({"methods": null, "public_key": 5}), Some(&[]), None);
        check(serde_json::json!({"public_key": "pem"}), Some(&[]), Some("pem"));
        for bad in
            [serde_json::json!([]), serde_json::json!({"methods": [1]}), serde_json::json!("x")]
        {
            assert!(serde_json::from_value::<DescribeEncryption>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_received_calls_leniently() {
        let call: ReceivedCall = serde_json::from_value(serde_json::json!({
            "tag": "request", "method": "m", "params": [1], "context": "c"
        }))
        .expect("decodes");
        assert_eq!(call.method, Field::Valid("m".to_owned()));
        assert_eq!(call.params, Field::Invalid);
        assert!(call.context.is_empty());
        let call: ReceivedCall =
            serde_json::from_value(serde_json::json!({"method": 1, "params": null}))
                .expect("decodes");
        assert_eq!((call.method, call.params), (Field::Invalid, Field::Absent));
    }
}
