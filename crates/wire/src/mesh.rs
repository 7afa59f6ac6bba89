//! NuroPb mesh messages (protocol `0.1.1`, spec §3–§5): the headers every message carries and
//! the four body shapes. Field order in each struct is the order Python `RMQAPI` writes them,
//! so serialising a struct reproduces nuropb's key order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::JsonObject;

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
    pub const PROTOCOL: &str = "nuropb_protocol";
    pub const VERSION: &str = "nuropb_version";
    pub const TYPE: &str = "nuropb_type";
    pub const TRACE_ID: &str = "trace_id";
    pub const ENCRYPTED: &str = "encrypted";
}

/// The `nuropb_type` header and the body `tag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Request,
    Command,
    Event,
    Response,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Request => "request",
            MessageType::Command => "command",
            MessageType::Event => "event",
            MessageType::Response => "response",
        }
    }

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
    pub protocol: String,
    pub version: String,
    pub message_type: MessageType,
    /// `None` travels as an AMQP void value (Python `None`).
    pub trace_id: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestBody {
    pub tag: MessageType,
    pub service: String,
    pub method: String,
    pub params: JsonObject,
    pub correlation_id: String,
    pub context: JsonObject,
    pub trace_id: Option<String>,
}

/// An `event` body (§5.3), key order of `RMQAPI.publish_event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    pub tag: MessageType,
    pub topic: String,
    pub event: Value,
    #[serde(default)]
    pub context: JsonObject,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Advisory audience (user ids); `null` for most events.
    #[serde(default)]
    pub target: Option<Vec<Value>>,
}

/// A `response` body (§5.4), key order of a successful call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseBody {
    pub tag: MessageType,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: Option<ErrorObject>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub context: JsonObject,
    #[serde(default)]
    pub warning: Option<Value>,
    #[serde(default)]
    pub reply_to: Option<String>,
}

/// The NuroPb error object (§7.2): always exactly these two keys on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub error: String,
    pub description: String,
}

impl ErrorObject {
    pub fn new(error: impl Into<String>, description: impl Into<String>) -> Self {
        ErrorObject { error: error.into(), description: description.into() }
    }
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
}
