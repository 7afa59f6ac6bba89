//! Wire types: the NuroPb mesh messages (`mesh`), the gateway-to-gateway control payload
//! (`control`), the gateway's client protocol (`client`), the JSON dialects both sides
//! speak (`pyjson`) and serde helpers for lenient decoding (`lenient`). Pure data and codecs, no I/O.
//!
//! The bottom floor of the layering (docs/ARCHITECTURE.md): it depends on serde and its
//! codecs only, and every other crate of the gateway depends on it. Wire types are
//! contracts, pinned by golden fixtures; `serde_json::Value` and [`JsonObject`] are the
//! data model on purpose (params, results and events are whatever services send).
//!
//! Decoding a client frame and encoding the answer:
//!
//! ```
//! use nuropb_wire::client::{
//!     ClientLimits, ClientMessage, Encoding, ServerFrame, ServerMessage, decode_client_message,
//!     encode_server_frame,
//! };
//! use serde_json::json;
//!
//! let frame = br#"{"type":"request","payload":{"service":"orders","method":"get","params":{"id":7},"trace_id":"t-1"}}"#;
//! let ClientMessage::Request(call) =
//!     decode_client_message(frame, Encoding::Json, &ClientLimits::default())?
//! else {
//!     panic!("a request frame decodes as a request");
//! };
//! assert_eq!((call.service.as_str(), call.method.as_str()), ("orders", "get"));
//! assert_eq!(call.params["id"], 7);
//!
//! let answer = ServerFrame::Message(ServerMessage::Response {
//!     trace_id: call.trace_id,
//!     result: json!({"id": 7, "status": "shipped"}),
//!     error: None,
//! });
//! let bytes = encode_server_frame(&answer, Encoding::Json)?;
//! assert_eq!(
//!     std::str::from_utf8(&bytes)?,
//!     r#"{"type":"response","payload":{"trace_id":"t-1","result":{"id":7,"status":"shipped"},"error":null}}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod control;
mod decoded;
pub mod lenient;
pub mod mesh;
pub mod pyjson;
pub mod traceparent;

pub use mesh::{ErrorObject, JsonObject};
