//! The gateway's client protocol (docs/PROTOCOL.md): frames a WebSocket client sends and
//! receives, decoded from and encoded to JSON (text frames) or MessagePack (binary frames).
//!
//! Decoding validates everything a frame must satisfy before any of it may reach the mesh
//! (spec §7.5): shape, types, name lengths, `trace_id` length, nesting depth. Every failure is
//! a [`ClientFrameError`] whose message names the offending field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ErrorObject, JsonObject};

/// How a frame's bytes are encoded. Text frames are JSON, binary frames MessagePack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    Json,
    MessagePack,
}

/// Bounds applied while decoding client frames. Defaults are documented in docs/PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Deepest nesting of arrays/objects allowed anywhere in a frame (the envelope counts as
    /// two levels). Python services die for good on params ~1000 levels deep.
    pub max_depth: usize,
    /// Longest `trace_id`, in bytes. It travels as an AMQP header.
    pub max_trace_id_len: usize,
    /// Longest service or method name, in bytes. 255 is the AMQP short-string limit.
    pub max_name_len: usize,
    /// Most topics in one subscribe/unsubscribe frame.
    pub max_topics_per_frame: usize,
    /// Longest topic pattern, in bytes (an AMQP routing key is a short string).
    pub max_topic_len: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_depth: 64,
            max_trace_id_len: 128,
            max_name_len: 255,
            max_topics_per_frame: 64,
            max_topic_len: 255,
        }
    }
}

/// A validated client call (`request` or `command`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCall {
    pub service: String,
    pub method: String,
    pub params: JsonObject,
    /// The client's trace id; `None` when absent or `null` (the gateway then generates one).
    pub trace_id: Option<String>,
}

/// A validated client message.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `{"type":"request","payload":{service, method, params, trace_id?}}` — answered by one
    /// `response` frame.
    Request(ClientCall),
    /// `{"type":"command", …}` — same payload; answered by `accepted` once published.
    Command(ClientCall),
    /// `{"type":"subscribe","payload":{"topics":[…]}}` — event topic patterns (AMQP topic
    /// syntax) this session wants events for.
    Subscribe { topics: Vec<String> },
    /// `{"type":"unsubscribe","payload":{"topics":[…]}}`.
    Unsubscribe { topics: Vec<String> },
    /// `{"type":"ping"}` — answered by `pong`; an application-level liveness check.
    Ping,
}

/// What went wrong with a client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameErrorKind {
    /// The bytes are not JSON / MessagePack.
    Decode,
    /// Decoded, but the shape or a value is wrong.
    Invalid,
    /// A bound was exceeded (depth, lengths, counts).
    TooLarge,
}

/// A rejected client frame. `trace_id` is set when the frame carried a usable one, so the
/// error can be sent as a `response` the client can match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClientFrameError {
    pub kind: FrameErrorKind,
    pub message: String,
    pub trace_id: Option<String>,
}

impl ClientFrameError {
    fn new(kind: FrameErrorKind, message: impl Into<String>) -> Self {
        ClientFrameError { kind, message: message.into(), trace_id: None }
    }

    /// The error name clients see (nuropb style).
    pub fn error_name(&self) -> &'static str {
        match self.kind {
            FrameErrorKind::Decode => "DecodeError",
            FrameErrorKind::Invalid => crate::mesh::error_name::VALIDATION,
            FrameErrorKind::TooLarge => "LimitExceeded",
        }
    }

    pub fn to_error_object(&self) -> ErrorObject {
        ErrorObject::new(self.error_name(), self.message.clone())
    }
}

/// Decodes and validates one client frame.
pub fn decode_client_message(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
) -> Result<ClientMessage, ClientFrameError> {
    let value: Value = match encoding {
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| {
            ClientFrameError::new(FrameErrorKind::Decode, format!("frame is not valid JSON: {e}"))
        })?,
        Encoding::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| {
            ClientFrameError::new(
                FrameErrorKind::Decode,
                format!("frame is not valid MessagePack: {e}"),
            )
        })?,
    };
    validate_client_value(value, limits)
}

/// Validates an already decoded frame. Public so other transports can reuse it.
pub fn validate_client_value(
    value: Value,
    limits: &ClientLimits,
) -> Result<ClientMessage, ClientFrameError> {
    use FrameErrorKind::{Invalid, TooLarge};

    if depth(&value) > limits.max_depth {
        return Err(ClientFrameError::new(
            TooLarge,
            format!("frame is nested deeper than {} levels", limits.max_depth),
        ));
    }
    let Value::Object(mut frame) = value else {
        return Err(ClientFrameError::new(
            Invalid,
            format!("frame must be a JSON object, got {}", type_name(&value)),
        ));
    };
    let kind = match frame.remove("type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(ClientFrameError::new(
                Invalid,
                format!("`type` must be a string, got {}", type_name(&other)),
            ));
        }
        None => return Err(ClientFrameError::new(Invalid, "missing `type`")),
    };
    let payload = frame.remove("payload");

    match kind.as_str() {
        "request" | "command" => {
            let mut payload = match payload {
                Some(Value::Object(p)) => p,
                Some(other) => {
                    return Err(ClientFrameError::new(
                        Invalid,
                        format!("`payload` must be an object, got {}", type_name(&other)),
                    ));
                }
                None => return Err(ClientFrameError::new(Invalid, "missing `payload`")),
            };
            // The trace id first, so later errors can be matched by the client.
            let trace_id = match payload.remove("trace_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.len() > limits.max_trace_id_len => {
                    return Err(ClientFrameError::new(
                        TooLarge,
                        format!(
                            "`payload.trace_id` is longer than {} bytes",
                            limits.max_trace_id_len
                        ),
                    ));
                }
                Some(Value::String(s)) if s.is_empty() => None,
                Some(Value::String(s)) => Some(s),
                Some(other) => {
                    return Err(ClientFrameError::new(
                        Invalid,
                        format!("`payload.trace_id` must be a string, got {}", type_name(&other)),
                    ));
                }
            };
            let with_trace = |mut e: ClientFrameError| {
                e.trace_id.clone_from(&trace_id);
                e
            };
            let service = name_field(&mut payload, "service", limits).map_err(with_trace)?;
            let method = name_field(&mut payload, "method", limits).map_err(with_trace)?;
            let params = match payload.remove("params") {
                Some(Value::Object(p)) => p,
                Some(other) => {
                    return Err(with_trace(ClientFrameError::new(
                        Invalid,
                        format!("`payload.params` must be an object, got {}", type_name(&other)),
                    )));
                }
                None => {
                    return Err(with_trace(ClientFrameError::new(
                        Invalid,
                        "missing `payload.params`",
                    )));
                }
            };
            let call = ClientCall { service, method, params, trace_id };
            Ok(if kind == "request" {
                ClientMessage::Request(call)
            } else {
                ClientMessage::Command(call)
            })
        }
        "subscribe" | "unsubscribe" => {
            let topics = topics_field(payload, limits)?;
            Ok(if kind == "subscribe" {
                ClientMessage::Subscribe { topics }
            } else {
                ClientMessage::Unsubscribe { topics }
            })
        }
        "ping" => Ok(ClientMessage::Ping),
        other => Err(ClientFrameError::new(
            Invalid,
            format!(
                "unknown `type` {other:?}; expected one of request, command, subscribe, \
                 unsubscribe, ping"
            ),
        )),
    }
}

fn name_field(
    payload: &mut JsonObject,
    field: &str,
    limits: &ClientLimits,
) -> Result<String, ClientFrameError> {
    use FrameErrorKind::{Invalid, TooLarge};
    match payload.remove(field) {
        Some(Value::String(s)) if s.is_empty() => {
            Err(ClientFrameError::new(Invalid, format!("`payload.{field}` must not be empty")))
        }
        Some(Value::String(s)) if s.len() > limits.max_name_len => Err(ClientFrameError::new(
            TooLarge,
            format!("`payload.{field}` is longer than {} bytes", limits.max_name_len),
        )),
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(ClientFrameError::new(
            Invalid,
            format!("`payload.{field}` must not contain control characters"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ClientFrameError::new(
            Invalid,
            format!("`payload.{field}` must be a string, got {}", type_name(&other)),
        )),
        None => Err(ClientFrameError::new(Invalid, format!("missing `payload.{field}`"))),
    }
}

fn topics_field(
    payload: Option<Value>,
    limits: &ClientLimits,
) -> Result<Vec<String>, ClientFrameError> {
    use FrameErrorKind::{Invalid, TooLarge};
    let mut payload = match payload {
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(ClientFrameError::new(
                Invalid,
                format!("`payload` must be an object, got {}", type_name(&other)),
            ));
        }
        None => return Err(ClientFrameError::new(Invalid, "missing `payload`")),
    };
    let list = match payload.remove("topics") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ClientFrameError::new(
                Invalid,
                format!("`payload.topics` must be an array, got {}", type_name(&other)),
            ));
        }
        None => return Err(ClientFrameError::new(Invalid, "missing `payload.topics`")),
    };
    if list.len() > limits.max_topics_per_frame {
        return Err(ClientFrameError::new(
            TooLarge,
            format!("`payload.topics` has more than {} entries", limits.max_topics_per_frame),
        ));
    }
    list.into_iter()
        .map(|t| match t {
            Value::String(s) if s.is_empty() => {
                Err(ClientFrameError::new(Invalid, "a topic must not be empty"))
            }
            Value::String(s) if s.len() > limits.max_topic_len => Err(ClientFrameError::new(
                TooLarge,
                format!("a topic is longer than {} bytes", limits.max_topic_len),
            )),
            Value::String(s) => Ok(s),
            other => Err(ClientFrameError::new(
                Invalid,
                format!("`payload.topics` entries must be strings, got {}", type_name(&other)),
            )),
        })
        .collect()
}

/// Nesting depth of a value: scalars are 0, `{}`/`[]` are 1. Iterative, so a hostile value
/// cannot overflow the stack while being measured.
pub fn depth(value: &Value) -> usize {
    let mut max = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(a) => {
                max = max.max(d + 1);
                stack.extend(a.iter().map(|c| (c, d + 1)));
            }
            Value::Object(o) => {
                max = max.max(d + 1);
                stack.extend(o.values().map(|c| (c, d + 1)));
            }
            _ => {}
        }
    }
    max
}

/// A JSON type's name for error messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A message the gateway sends inside the `{"type": …, "payload": …}` envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "lowercase")]
pub enum ServerMessage {
    /// The hello frame (topic `hello`) and every mesh event.
    Event { topic: String, event: Value },
    /// The answer to one request.
    Response { trace_id: Option<String>, result: Value, error: Option<ErrorObject> },
    /// A command was published to the mesh (commands get no response from services).
    Accepted { trace_id: Option<String> },
    /// The session's topic subscriptions after a subscribe/unsubscribe.
    Subscribed { topics: Vec<String> },
    /// The answer to `ping`.
    Pong {},
}

/// Everything the gateway sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    Message(ServerMessage),
    /// Input that could not be attributed to a request: `{"error", "description"}` at top
    /// level, as nuropb-gw 0.1.4 sent it, plus `trace_id` when known.
    Error(ErrorFrame),
}

/// The top-level error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub error: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Encoding a server frame failed (only possible for values MessagePack cannot carry).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode server frame as {encoding:?}")]
pub struct EncodeError {
    pub encoding: Encoding,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Encodes a frame: compact JSON text or named-field MessagePack.
pub fn encode_server_frame(frame: &ServerFrame, encoding: Encoding) -> Result<Vec<u8>, EncodeError> {
    match encoding {
        Encoding::Json => serde_json::to_vec(frame)
            .map_err(|e| EncodeError { encoding, source: Box::new(e) }),
        Encoding::MessagePack => rmp_serde::to_vec_named(frame)
            .map_err(|e| EncodeError { encoding, source: Box::new(e) }),
    }
}

/// Decodes a server frame (used by tests and Rust clients).
pub fn decode_server_frame(bytes: &[u8], encoding: Encoding) -> Result<ServerFrame, String> {
    match encoding {
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        Encoding::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
    }
}
