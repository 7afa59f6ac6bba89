//! The gateway's client protocol (docs/PROTOCOL.md): frames a WebSocket client sends and
//! receives, decoded from and encoded to JSON (text frames) or MessagePack (binary frames).
//!
//! Decoding validates everything a frame must satisfy before any of it may reach the mesh
//! (spec §7.5): shape, types, name lengths, `trace_id` length, nesting depth. Every failure is
//! a [`ClientFrameError`] whose message names the offending field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decoded::{
    self, Budget, Segment, Violation, decode_call, decode_root, scan_id, scan_trace_id,
};
use crate::mesh::{ErrorObject, JsonObject};
use crate::traceparent::{TRACEPARENT_LEN, check_traceparent};

/// The estimated bytes a decoded value holds, counted as [`ClientLimits::max_decoded_bytes`]
/// counts a frame while decoding it. In-flight accounting uses it for a call's `params`.
pub fn estimated_size(value: &Value) -> usize {
    decoded::estimated_size(value)
}

/// [`estimated_size`] of an object (a call's `params`) without wrapping it in a `Value`.
pub fn estimated_object_size(object: &JsonObject) -> usize {
    decoded::estimated_object_size(object)
}

/// How a frame's bytes are encoded. Text frames are JSON, binary frames MessagePack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// JSON text (text frames).
    Json,
    /// MessagePack with named fields (binary frames).
    MessagePack,
}

/// Bounds applied while decoding client frames. Defaults are documented in docs/PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Deepest nesting of arrays/objects allowed anywhere in a frame (the envelope counts as
    /// two levels). Python services die for good on params ~1000 levels deep. Values above
    /// [`PARSE_DEPTH_CAP`] (127) act as that cap.
    pub max_depth: usize,
    /// Longest `trace_id`, in bytes. It travels as an AMQP header.
    pub max_trace_id_len: usize,
    /// Longest service or method name, in bytes. 255 is the AMQP short-string limit.
    pub max_name_len: usize,
    /// Most topics in one subscribe/unsubscribe frame.
    pub max_topics_per_frame: usize,
    /// Longest topic pattern, in bytes (an AMQP routing key is a short string).
    pub max_topic_len: usize,
    /// Longest token in a `refresh` or `auth` frame, in bytes.
    pub max_token_len: usize,
    /// Longest top-level `id` of a client frame, in bytes (echoed on every answer).
    pub max_id_len: usize,
    /// Most values (scalars, arrays and objects, envelope included) one frame may decode to.
    /// Checked while decoding, so a refused frame never builds its tree.
    pub max_decoded_values: usize,
    /// Most bytes one frame's decoded tree may hold, as [`estimated_size`] counts them (value
    /// slots with growth headroom, object entries, string and key bytes with allocator
    /// rounding). Checked while decoding.
    pub max_decoded_bytes: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_depth: 64,
            max_trace_id_len: 128,
            max_name_len: 255,
            max_topics_per_frame: 64,
            max_topic_len: 255,
            max_token_len: 8192,
            max_id_len: 128,
            // A 1 MiB frame of small values (`[0,0,…]`) is 512 Ki values in JSON and 1 Mi in
            // MessagePack; real calls are far below this.
            max_decoded_values: 128 * 1024,
            // 32 times the default frame size: a 1 MiB frame of small objects
            // (`{"id":12345,"name":"abcdefgh"}`, really ~18 MiB decoded) fits, while one frame
            // can no longer cost the 45-89 MiB an array of zeros did.
            max_decoded_bytes: 32 << 20,
        }
    }
}

/// A validated client call (`request` or `command`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientCall {
    /// The service to call: non-empty, at most [`ClientLimits::max_name_len`] bytes, no
    /// control characters.
    pub service: String,
    /// The method to call, with the same rules as `service`.
    pub method: String,
    /// The keyword arguments, always an object.
    pub params: JsonObject,
    /// The client's trace id; `None` when absent or `null` (the gateway then generates one).
    pub trace_id: Option<String>,
    /// A W3C `traceparent` (checked by [`crate::traceparent::check_traceparent`]); when set it
    /// is the NuroPb `trace_id` of the mesh call, while `trace_id` stays the client's key
    /// for matching the answer. `None` when absent, `null` or `""`.
    pub traceparent: Option<String>,
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
    Subscribe {
        /// The patterns to add, each checked against the topic limits.
        topics: Vec<String>,
    },
    /// `{"type":"unsubscribe","payload":{"topics":[…]}}`.
    Unsubscribe {
        /// The patterns to remove; unknown ones are ignored.
        topics: Vec<String>,
    },
    /// `{"type":"ping"}` — answered by `pong`; an application-level liveness check.
    Ping,
    /// `{"type":"refresh","payload":{"token":"<jwt>"}}` — replaces the session's token
    /// before it expires (same user only); answered by `refreshed`.
    Refresh {
        /// The new bearer token, at most [`ClientLimits::max_token_len`] bytes.
        token: String,
    },
    /// `{"type":"auth","payload":{"token":"<jwt>"}}` — the first frame of a connection
    /// that upgraded without credentials (docs/PROTOCOL.md, "First-frame authentication");
    /// answered by the hello. Within a session it is refused.
    Auth {
        /// The bearer token, at most [`ClientLimits::max_token_len`] bytes.
        token: String,
    },
}

/// A validated client frame: the message and the frame's top-level `id`, which every
/// answer to it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    /// The frame's `id`: a string of at most [`ClientLimits::max_id_len`] bytes; `None`
    /// when absent or `null`.
    pub id: Option<String>,
    /// What the frame asks for.
    pub message: ClientMessage,
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
    /// Which of the three kinds of refusal this is; decides the error name.
    pub kind: FrameErrorKind,
    /// What is wrong, naming the field by its path (`` `payload.service` ``); safe to send
    /// to the client.
    pub message: String,
    /// The frame's own trace id, when it carried a usable one.
    pub trace_id: Option<String>,
    /// The frame's top-level `id`, when it carried a usable one (a string within
    /// [`ClientLimits::max_id_len`]); the refusal echoes it.
    pub id: Option<String>,
}

impl ClientFrameError {
    fn new(kind: FrameErrorKind, message: impl Into<String>) -> Self {
        ClientFrameError { kind, message: message.into(), trace_id: None, id: None }
    }

    /// The error name clients see (nuropb style).
    pub fn error_name(&self) -> &'static str {
        match self.kind {
            FrameErrorKind::Decode => crate::mesh::error_name::DECODE,
            FrameErrorKind::Invalid => crate::mesh::error_name::VALIDATION,
            FrameErrorKind::TooLarge => crate::mesh::error_name::LIMIT_EXCEEDED,
        }
    }

    /// The error as the NuroPb error object sent to the client.
    pub fn to_error_object(&self) -> ErrorObject {
        ErrorObject::new(self.error_name(), self.message.clone())
    }
}

/// The deepest nesting either decoder accepts at all, whatever [`ClientLimits::max_depth`]
/// says: serde_json's fixed recursion limit is 127 levels, and MessagePack is held to the
/// same. Deeper frames are refused before (JSON) or while (MessagePack) parsing, as
/// [`FrameErrorKind::TooLarge`], without recursing, so a hostile frame cannot exhaust the
/// stack. `max_depth` itself is applied to the decoded value, where the frame's `trace_id`
/// can still be attached to the error.
pub const PARSE_DEPTH_CAP: usize = 127;

/// Decodes and validates one client frame, without its `id` (see [`decode_client_frame`]).
pub fn decode_client_message(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
) -> Result<ClientMessage, ClientFrameError> {
    decode_client_frame(bytes, encoding, limits).map(|f| f.message)
}

/// Decodes and validates one client frame: its message and its top-level `id`. A refusal
/// carries the frame's usable `trace_id` and `id` whenever they can be read.
pub fn decode_client_frame(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
) -> Result<ClientFrame, ClientFrameError> {
    decode(bytes, encoding, limits, true)
}

/// [`decode_client_frame`] without its fast path for plain calls: every frame is built as a
/// value tree and validated from it. The result is the same for every input; the fuzz
/// targets and tests compare the two.
#[doc(hidden)]
pub fn decode_client_frame_general(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
) -> Result<ClientFrame, ClientFrameError> {
    decode(bytes, encoding, limits, false)
}

/// Decodes a frame; with `fast`, a plain `request`/`command` frame is read straight into its
/// call ([`plain_call`]), and only another frame, or one that breaks a rule, is built as a
/// value tree first (so a refused call frame may be read twice).
fn decode(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
    fast: bool,
) -> Result<ClientFrame, ClientFrameError> {
    use FrameErrorKind::{Decode, TooLarge};

    let too_deep = || {
        ClientFrameError::new(
            TooLarge,
            format!("frame is nested deeper than {} levels", limits.max_depth.min(PARSE_DEPTH_CAP)),
        )
    };
    let value: Value = match encoding {
        Encoding::Json => {
            let scan = json_prescan(bytes, PARSE_DEPTH_CAP);
            if scan.too_deep {
                return Err(too_deep());
            }
            if fast && let Some(frame) = fast_call(bytes, encoding, limits, scan.big_integer_float)
            {
                return Ok(frame);
            }
            let mut budget = Budget::new(
                limits.max_decoded_values,
                limits.max_decoded_bytes,
                scan.big_integer_float,
            );
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let decoded = decode_root(&mut de, &mut budget).and_then(|v| de.end().map(|()| v));
            match decoded {
                Ok(v) => v,
                Err(e) => {
                    return Err(refusal(budget.violation, limits, bytes, encoding).unwrap_or_else(
                        || ClientFrameError::new(Decode, format!("frame is not valid JSON: {e}")),
                    ));
                }
            }
        }
        Encoding::MessagePack => {
            if fast && let Some(frame) = fast_call(bytes, encoding, limits, None) {
                return Ok(frame);
            }
            let mut budget = Budget::new(limits.max_decoded_values, limits.max_decoded_bytes, None);
            let mut de = msgpack_reader(bytes);
            let value = match decode_root(&mut de, &mut budget) {
                Ok(v) => v,
                Err(rmp_serde::decode::Error::DepthLimitExceeded) => return Err(too_deep()),
                Err(e) => {
                    return Err(refusal(budget.violation, limits, bytes, encoding).unwrap_or_else(
                        || {
                            ClientFrameError::new(
                                Decode,
                                format!("frame is not valid MessagePack: {e}"),
                            )
                        },
                    ));
                }
            };
            let trailing = (bytes.len() as u64).saturating_sub(de.position());
            if trailing > 0 {
                let mut error = ClientFrameError::new(
                    Decode,
                    format!("frame is not valid MessagePack: {trailing} trailing byte(s)"),
                );
                error.id = peek_id(bytes, encoding, limits);
                return Err(error);
            }
            value
        }
    };
    validate_client_value(value, limits)
}

/// The decoder's MessagePack reader, depth-capped as [`msgpack_scanner`] is; over a `Cursor`,
/// whose position tells trailing bytes.
fn msgpack_reader(
    bytes: &[u8],
) -> rmp_serde::Deserializer<rmp_serde::decode::ReadReader<std::io::Cursor<&[u8]>>> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    // rmp counts down from the limit and fails when it reaches zero.
    de.set_max_depth(PARSE_DEPTH_CAP + 1);
    de
}

/// The fast path of [`decode`]: `bytes` read as a plain call frame ([`decoded::decode_call`])
/// under a fresh budget (`big_integer_float` from the JSON pre-scan), all of them consumed,
/// then [`plain_call`]. `None` hands the frame to the general path.
fn fast_call(
    bytes: &[u8],
    encoding: Encoding,
    limits: &ClientLimits,
    big_integer_float: Option<usize>,
) -> Option<ClientFrame> {
    let mut budget =
        Budget::new(limits.max_decoded_values, limits.max_decoded_bytes, big_integer_float);
    let parts = match encoding {
        Encoding::Json => {
            // A text frame is UTF-8 already (tungstenite checks it): checked once for the
            // frame, not string by string as `from_slice` does.
            let mut de = serde_json::Deserializer::from_str(std::str::from_utf8(bytes).ok()?);
            decode_call(&mut de, &mut budget).and_then(|p| de.end().map(|()| p)).ok()?
        }
        Encoding::MessagePack => {
            let mut de = msgpack_reader(bytes);
            let parts = decode_call(&mut de, &mut budget).ok()?;
            (de.position() == bytes.len() as u64).then_some(parts)?
        }
    };
    plain_call(parts, limits)
}

/// A call frame read by the fast path ([`decoded::CallParts`]) as the frame the general
/// path (`validate_client_value`) makes of the same bytes, if every field keeps its rule;
/// `None` otherwise, and the general path then words the refusal.
fn plain_call(parts: decoded::CallParts, limits: &ClientLimits) -> Option<ClientFrame> {
    let decoded::CallParts { command, id, service, method, params, trace_id, traceparent } = parts;
    // The envelope is two levels (frame, payload) above `params`, and its other values are
    // strings, so this is `depth` of the whole frame.
    let frame_depth = 3 + params.values().map(depth).max().unwrap_or(0);
    if frame_depth > limits.max_depth || id.as_ref().is_some_and(|i| i.len() > limits.max_id_len) {
        return None;
    }
    // Absent, null and "" all mean none; a long one is refused.
    let optional = |s: Option<String>, max_len: usize| match s {
        Some(s) if s.len() > max_len => Err(()),
        Some(s) if s.is_empty() => Ok(None),
        s => Ok(s),
    };
    let trace_id = optional(trace_id, limits.max_trace_id_len).ok()?;
    let traceparent = optional(traceparent, TRACEPARENT_LEN).ok()?;
    if traceparent.as_deref().is_some_and(|t| check_traceparent(t).is_err()) {
        return None;
    }
    let name = StrRule::name(limits.max_name_len);
    let service = checked_str(|| "", service, name).ok()?;
    let method = checked_str(|| "", method, name).ok()?;
    let call = ClientCall { service, method, params, trace_id, traceparent };
    let message = if command { ClientMessage::Command(call) } else { ClientMessage::Request(call) };
    Some(ClientFrame { id, message })
}

/// The error for a frame the decoding visitor refused (`None`: the bytes themselves were bad),
/// with the frame's trace id read by [`peek_trace_id`] (only for refusals).
fn refusal(
    violation: Option<Violation>,
    limits: &ClientLimits,
    bytes: &[u8],
    encoding: Encoding,
) -> Option<ClientFrameError> {
    use FrameErrorKind::{Invalid, TooLarge};
    let located = |mut path: Vec<Segment>| {
        // The path was collected while unwinding, innermost first.
        path.reverse();
        decoded::render_path(&path)
    };
    let mut error = match violation? {
        Violation::TooManyValues(max) => {
            ClientFrameError::new(TooLarge, format!("frame decodes to more than {max} values"))
        }
        Violation::TooManyBytes(max) => ClientFrameError::new(
            TooLarge,
            format!("frame decodes to more than {max} bytes of memory"),
        ),
        Violation::BigInteger { path } => ClientFrameError::new(
            Invalid,
            format!(
                "{} is an integer beyond 64 bits (-2^63 to 2^64-1); send it as a string",
                located(path)
            ),
        ),
        Violation::NonFinite { path } => ClientFrameError::new(
            Invalid,
            format!("{} is not a finite number (NaN and Infinity are refused)", located(path)),
        ),
    };
    error.trace_id = peek_trace_id(bytes, encoding, limits);
    error.id = peek_id(bytes, encoding, limits);
    Some(error)
}

/// What one forward scan of JSON text finds before it is parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct JsonScan {
    /// Arrays/objects nest deeper than the cap.
    too_deep: bool,
    /// The index, among the number literals serde_json hands over as `f64` (those with a
    /// fraction or exponent, `-0`, and integers beyond 64 bits), of the first integer
    /// literal beyond 64 bits. serde_json turns such an integer into a float silently; the
    /// decoding visitor counts the floats it is given and refuses this one, naming its field.
    big_integer_float: Option<usize>,
}

/// Scans JSON text once, skipping string literals (outside them, digits only occur in
/// numbers). Stops early on depth; malformed text is left for the parser to reject.
fn json_prescan(bytes: &[u8], cap: usize) -> JsonScan {
    let mut scan = JsonScan::default();
    let mut depth = 0usize;
    let mut floats = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > cap {
                    scan.too_deep = true;
                    return scan;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let (len, kind) = json_number(&bytes[i..]);
                match kind {
                    NumberKind::Exact => {}
                    NumberKind::Float => floats += 1,
                    NumberKind::BigInteger => {
                        if scan.big_integer_float.is_none() {
                            scan.big_integer_float = Some(floats);
                        }
                        floats += 1;
                    }
                }
                i += len.max(1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    scan
}

#[derive(Debug, PartialEq, Eq)]
enum NumberKind {
    /// serde_json gives it as `u64`/`i64`.
    Exact,
    /// serde_json gives it as `f64`, and it is one: a fraction or exponent, or `-0`.
    Float,
    /// An integer literal beyond `i64::MIN..=u64::MAX`: serde_json would give an `f64`.
    BigInteger,
}

/// The length of the number literal at the start of `text` and how serde_json delivers it
/// (mirroring its parser: positive integers up to `u64::MAX` and negative ones down to
/// `i64::MIN` are exact, `-0` is a float).
fn json_number(text: &[u8]) -> (usize, NumberKind) {
    let negative = text.first() == Some(&b'-');
    let mut i = usize::from(negative);
    // Up to 2^128: enough to tell whether it fits 64 bits; beyond is `None` (big).
    let mut magnitude: Option<u128> = Some(0);
    while let Some(d @ b'0'..=b'9') = text.get(i) {
        magnitude = magnitude
            .and_then(|m| m.checked_mul(10))
            .and_then(|m| m.checked_add(u128::from(d - b'0')));
        i += 1;
    }
    let mut float = false;
    if text.get(i) == Some(&b'.') {
        float = true;
        i += 1;
        while text.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    if matches!(text.get(i), Some(b'e' | b'E')) {
        float = true;
        i += 1;
        if matches!(text.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        while text.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let kind = match (float, negative, magnitude) {
        (true, _, _) => NumberKind::Float,
        (false, false, Some(m)) if m <= u128::from(u64::MAX) => NumberKind::Exact,
        (false, true, Some(0)) => NumberKind::Float,
        (false, true, Some(m)) if m <= 1u128 << 63 => NumberKind::Exact,
        (false, _, _) => NumberKind::BigInteger,
    };
    (i, kind)
}

/// Whether JSON text nests arrays/objects deeper than `cap` (see [`json_prescan`]).
#[cfg(test)]
fn json_nesting_exceeds(bytes: &[u8], cap: usize) -> bool {
    json_prescan(bytes, cap).too_deep
}

/// Validates an already decoded frame. Public so other transports can reuse it.
///
/// Any rejection of a frame whose `payload.trace_id` is usable (a non-empty string within
/// [`ClientLimits::max_trace_id_len`]) carries that trace id.
pub fn validate_client_value(
    value: Value,
    limits: &ClientLimits,
) -> Result<ClientFrame, ClientFrameError> {
    let trace_id = usable_trace_id(&value, limits);
    let id = usable_id(&value, limits);
    validate_frame(value, limits).map_err(|mut e| {
        if e.trace_id.is_none() {
            e.trace_id = trace_id;
        }
        if e.id.is_none() {
            e.id = id;
        }
        e
    })
}

/// The top-level `id` of a frame that is refused without being decoded (over the rate
/// limit, or bytes that do not decode), read as [`peek_trace_id`] reads the trace id, so
/// the refusal still carries it. `None` when absent, not a string, or longer than
/// [`ClientLimits::max_id_len`].
pub fn peek_id(bytes: &[u8], encoding: Encoding, limits: &ClientLimits) -> Option<String> {
    let found = match encoding {
        Encoding::Json => scan_id(&mut serde_json::Deserializer::from_slice(bytes)),
        Encoding::MessagePack => scan_id(&mut msgpack_scanner(bytes)),
    };
    found.filter(|id| id.len() <= limits.max_id_len)
}

fn usable_id(frame: &Value, limits: &ClientLimits) -> Option<String> {
    match frame.get("id")? {
        Value::String(s) if s.len() <= limits.max_id_len => Some(s.clone()),
        _ => None,
    }
}

/// The `payload.trace_id` of a frame that is refused without being decoded (e.g. over the
/// rate limit), so the refusal can still be matched by the client. Builds nothing: every
/// other part of the frame is skipped. `None` when there is no usable trace id (absent, not a
/// string, empty, longer than [`ClientLimits::max_trace_id_len`], or the bytes are not a
/// frame).
pub fn peek_trace_id(bytes: &[u8], encoding: Encoding, limits: &ClientLimits) -> Option<String> {
    let found = match encoding {
        Encoding::Json => scan_trace_id(&mut serde_json::Deserializer::from_slice(bytes)),
        Encoding::MessagePack => scan_trace_id(&mut msgpack_scanner(bytes)),
    };
    found.filter(|t| usable(t, limits))
}

/// A MessagePack reader for the trace-id scan, depth-capped like the decoder: the scan
/// skips values by recursion, and a rate-limited client may send 1 KiB of nested arrays.
fn msgpack_scanner(
    bytes: &[u8],
) -> rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'_, [u8]>> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(PARSE_DEPTH_CAP + 1);
    de
}

/// Whether a trace id read from a refused frame may be echoed in the refusal.
fn usable(trace_id: &str, limits: &ClientLimits) -> bool {
    !trace_id.is_empty() && trace_id.len() <= limits.max_trace_id_len
}

fn usable_trace_id(frame: &Value, limits: &ClientLimits) -> Option<String> {
    match frame.get("payload")?.get("trace_id")? {
        Value::String(s) if usable(s, limits) => Some(s.clone()),
        _ => None,
    }
}

fn validate_frame(value: Value, limits: &ClientLimits) -> Result<ClientFrame, ClientFrameError> {
    use FrameErrorKind::{Invalid, TooLarge};

    // `depth` is iterative, so measuring a hostile value is safe.
    if depth(&value) > limits.max_depth {
        return Err(ClientFrameError::new(
            TooLarge,
            format!("frame is nested deeper than {} levels", limits.max_depth),
        ));
    }
    let Value::Object(frame) = value else {
        return Err(ClientFrameError::new(
            Invalid,
            format!("frame must be a JSON object, got {}", type_name(&value)),
        ));
    };
    let mut frame = Fields::top_level(frame);
    // Any string, "" included: the client's own label, echoed as it came.
    let id = match frame.object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() > limits.max_id_len => {
            return Err(too_long("`id`", limits.max_id_len));
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => return Err(frame.wrong_type("id", "a string", &other)),
    };
    let message = validate_message(frame, limits)?;
    Ok(ClientFrame { id, message })
}

fn validate_message(
    mut frame: Fields,
    limits: &ClientLimits,
) -> Result<ClientMessage, ClientFrameError> {
    use FrameErrorKind::Invalid;

    // Any string: it is matched against the known kinds below, "" included.
    let kind = frame.required_string("type")?;

    match kind.as_str() {
        "request" | "command" => {
            let mut payload = frame.payload()?;
            let trace_id = payload.optional_str("trace_id", limits.max_trace_id_len)?;
            let traceparent = payload.optional_str("traceparent", TRACEPARENT_LEN)?;
            if let Some(value) = &traceparent
                && let Err(why) = check_traceparent(value)
            {
                let message = format!("{} {why}", payload.label("traceparent"));
                return Err(ClientFrameError::new(Invalid, message));
            }
            let name = StrRule::name(limits.max_name_len);
            let service = payload.required_str("service", name)?;
            let method = payload.required_str("method", name)?;
            let params = payload.required_object("params")?;
            let call = ClientCall { service, method, params, trace_id, traceparent };
            Ok(if kind == "request" {
                ClientMessage::Request(call)
            } else {
                ClientMessage::Command(call)
            })
        }
        "subscribe" | "unsubscribe" => {
            let topics = topics_field(frame.payload()?, limits)?;
            Ok(if kind == "subscribe" {
                ClientMessage::Subscribe { topics }
            } else {
                ClientMessage::Unsubscribe { topics }
            })
        }
        "ping" => Ok(ClientMessage::Ping),
        "refresh" | "auth" => {
            // A token is opaque: any characters, but not nothing and not without bound.
            let rule = StrRule { max_len: limits.max_token_len, no_control: false };
            let token = frame.payload()?.required_str("token", rule)?;
            Ok(if kind == "refresh" {
                ClientMessage::Refresh { token }
            } else {
                ClientMessage::Auth { token }
            })
        }
        other => Err(ClientFrameError::new(
            Invalid,
            format!(
                "unknown `type` {other:?}; expected one of request, command, subscribe, \
                 unsubscribe, ping, refresh, auth"
            ),
        )),
    }
}

/// What a string must satisfy besides being one. Every checked string must not be empty.
#[derive(Clone, Copy)]
struct StrRule {
    max_len: usize,
    no_control: bool,
}

impl StrRule {
    /// A service, method or topic: it ends up in AMQP routing keys and logs.
    fn name(max_len: usize) -> StrRule {
        StrRule { max_len, no_control: true }
    }
}

/// One JSON object of a frame, whose fields are taken out by name. Every refusal names the
/// field by its path in the frame (`` `payload.service` ``), so the extractor is the one
/// place that words them.
struct Fields {
    object: JsonObject,
    // Invariant: empty for the envelope, `payload.` for the payload.
    prefix: &'static str,
}

impl Fields {
    fn top_level(object: JsonObject) -> Fields {
        Fields { object, prefix: "" }
    }

    /// The envelope's `payload`, which must be an object.
    fn payload(&mut self) -> Result<Fields, ClientFrameError> {
        Ok(Fields { object: self.required_object("payload")?, prefix: "payload." })
    }

    fn label(&self, field: &str) -> String {
        format!("`{}{field}`", self.prefix)
    }

    fn required(&mut self, field: &str) -> Result<Value, ClientFrameError> {
        self.object.remove(field).ok_or_else(|| {
            ClientFrameError::new(FrameErrorKind::Invalid, format!("missing {}", self.label(field)))
        })
    }

    fn wrong_type(&self, field: &str, expected: &str, got: &Value) -> ClientFrameError {
        let message = format!("{} must be {expected}, got {}", self.label(field), type_name(got));
        ClientFrameError::new(FrameErrorKind::Invalid, message)
    }

    fn required_object(&mut self, field: &str) -> Result<JsonObject, ClientFrameError> {
        match self.required(field)? {
            Value::Object(o) => Ok(o),
            other => Err(self.wrong_type(field, "an object", &other)),
        }
    }

    fn required_array(&mut self, field: &str) -> Result<Vec<Value>, ClientFrameError> {
        match self.required(field)? {
            Value::Array(a) => Ok(a),
            other => Err(self.wrong_type(field, "an array", &other)),
        }
    }

    fn required_string(&mut self, field: &str) -> Result<String, ClientFrameError> {
        match self.required(field)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(field, "a string", &other)),
        }
    }

    /// A string field that must keep `rule`.
    fn required_str(&mut self, field: &str, rule: StrRule) -> Result<String, ClientFrameError> {
        let s = self.required_string(field)?;
        // The label is formatted only for a refusal: this runs for every request.
        checked_str(|| self.label(field), s, rule)
    }

    /// A string that may be absent, `null` or empty (all three mean "none"), but not too long.
    fn optional_str(
        &mut self,
        field: &str,
        max_len: usize,
    ) -> Result<Option<String>, ClientFrameError> {
        match self.object.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() > max_len => {
                Err(too_long(&self.label(field), max_len))
            }
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(field, "a string", &other)),
        }
    }
}

/// `s` if it keeps `rule`; the refusal starts with `label()` (a field's path, or "a topic").
fn checked_str<L: std::fmt::Display>(
    label: impl FnOnce() -> L,
    s: String,
    rule: StrRule,
) -> Result<String, ClientFrameError> {
    use FrameErrorKind::Invalid;
    if s.is_empty() {
        Err(ClientFrameError::new(Invalid, format!("{} must not be empty", label())))
    } else if s.len() > rule.max_len {
        Err(too_long(&label().to_string(), rule.max_len))
    } else if rule.no_control && s.chars().any(char::is_control) {
        Err(ClientFrameError::new(
            Invalid,
            format!("{} must not contain control characters", label()),
        ))
    } else {
        Ok(s)
    }
}

fn too_long(label: &str, max_len: usize) -> ClientFrameError {
    ClientFrameError::new(
        FrameErrorKind::TooLarge,
        format!("{label} is longer than {max_len} bytes"),
    )
}

fn topics_field(
    mut payload: Fields,
    limits: &ClientLimits,
) -> Result<Vec<String>, ClientFrameError> {
    let list = payload.required_array("topics")?;
    if list.len() > limits.max_topics_per_frame {
        return Err(ClientFrameError::new(
            FrameErrorKind::TooLarge,
            format!("`payload.topics` has more than {} entries", limits.max_topics_per_frame),
        ));
    }
    let rule = StrRule::name(limits.max_topic_len);
    list.into_iter()
        .map(|t| match t {
            Value::String(s) => checked_str(|| "a topic", s, rule),
            other => Err(ClientFrameError::new(
                FrameErrorKind::Invalid,
                format!("`payload.topics` entries must be strings, got {}", type_name(&other)),
            )),
        })
        .collect()
}

/// Nesting depth of a value: scalars are 0, `{}`/`[]` are 1. Iterative, so a hostile value
/// cannot overflow the stack while being measured.
pub fn depth(value: &Value) -> usize {
    // Most values measured are scalars (a call's params and context): no stack for them.
    if !matches!(value, Value::Array(_) | Value::Object(_)) {
        return 0;
    }
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
    Event {
        /// The event's topic (`hello` for the hello frame).
        topic: String,
        /// The event payload, as the publisher sent it.
        event: Value,
    },
    /// The answer to one request.
    Response {
        /// The request's trace id (the client's, or the one the gateway generated).
        trace_id: Option<String>,
        /// The method's result; `null` on error.
        result: Value,
        /// The service's error object passed through, or one of the gateway's own.
        error: Option<ErrorObject>,
    },
    /// A command was published to the mesh (commands get no response from services).
    Accepted {
        /// The command's trace id.
        trace_id: Option<String>,
    },
    /// The session's topic subscriptions after a subscribe/unsubscribe.
    Subscribed {
        /// Every pattern the session is now subscribed to.
        topics: Vec<String>,
    },
    /// The answer to `ping`.
    Pong {},
    /// The session's token was replaced; `expires_at` (Unix seconds) is the new token's
    /// `exp`, as the hello reports the first token's. The gateway closes the session (4003)
    /// its clock-skew leeway after that unless it is refreshed again.
    Refreshed {
        /// Unix seconds; `None` when the new token never expires.
        expires_at: Option<u64>,
    },
}

/// Everything the gateway sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerFrame {
    /// A typed message answering a client frame that carried an `id`: the envelope plus
    /// that `id` at top level. First, so that decoding a frame with an `id` keeps it.
    Reply(Reply),
    /// A typed message in the `{"type", "payload"}` envelope.
    Message(ServerMessage),
    /// Input that could not be attributed to a request: `{"error", "description"}` at top
    /// level, as nuropb-gw 0.1.4 sent it, plus `trace_id` when known.
    Error(ErrorFrame),
}

/// A [`ServerMessage`] with the `id` of the client frame it answers:
/// `{"type", "payload", "id"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The message, flattened into the same object.
    #[serde(flatten)]
    pub message: ServerMessage,
    /// The client frame's `id`.
    pub id: String,
}

impl ServerFrame {
    /// This frame as the answer to a client frame with `id`: unchanged when `id` is
    /// `None` (the shapes of frames without an `id` are exactly those without this
    /// feature), else the same message carrying `id` at top level.
    pub fn with_id(self, id: Option<String>) -> ServerFrame {
        let Some(id) = id else { return self };
        match self {
            ServerFrame::Message(message) | ServerFrame::Reply(Reply { message, .. }) => {
                ServerFrame::Reply(Reply { message, id })
            }
            ServerFrame::Error(error) => ServerFrame::Error(ErrorFrame { id: Some(id), ..error }),
        }
    }

    /// The typed message, with or without an `id`; `None` for the error frame.
    pub fn message(&self) -> Option<&ServerMessage> {
        match self {
            ServerFrame::Message(message) | ServerFrame::Reply(Reply { message, .. }) => {
                Some(message)
            }
            ServerFrame::Error(_) => None,
        }
    }

    /// The `id` of the client frame this frame answers, if it had one.
    pub fn id(&self) -> Option<&str> {
        match self {
            ServerFrame::Reply(reply) => Some(&reply.id),
            ServerFrame::Error(error) => error.id.as_deref(),
            ServerFrame::Message(_) => None,
        }
    }
}

/// The top-level error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The error name, as in [`ErrorObject::error`].
    pub error: String,
    /// What was wrong with the frame.
    pub description: String,
    /// The frame's trace id when it had a usable one (omitted otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The refused frame's `id` when it had a usable one (omitted otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Encoding a server frame failed (only possible for values MessagePack cannot carry).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode server frame as {encoding:?}")]
pub struct EncodeError {
    /// The encoding that failed.
    pub encoding: Encoding,
    /// The encoder's error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Encodes a frame: compact JSON text or named-field MessagePack.
pub fn encode_server_frame(
    frame: &ServerFrame,
    encoding: Encoding,
) -> Result<Vec<u8>, EncodeError> {
    match encoding {
        Encoding::Json => {
            serde_json::to_vec(frame).map_err(|e| EncodeError { encoding, source: Box::new(e) })
        }
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use FrameErrorKind::{Decode, Invalid, TooLarge};

    /// What decoding a frame must give.
    #[derive(Debug)]
    enum Expect {
        Ok(ClientMessage),
        /// Kind, the exact message, and the trace id the error must carry.
        Err(FrameErrorKind, String, Option<&'static str>),
        /// Kind and a message prefix (for errors that quote the parser).
        ErrPrefix(FrameErrorKind, &'static str),
    }

    fn err(kind: FrameErrorKind, message: impl Into<String>) -> Expect {
        Expect::Err(kind, message.into(), None)
    }

    fn err_traced(kind: FrameErrorKind, message: impl Into<String>, trace: &'static str) -> Expect {
        Expect::Err(kind, message.into(), Some(trace))
    }

    #[test]
    fn peek_trace_id_reads_only_a_usable_trace_id() {
        let limits = ClientLimits::default();
        let long = "x".repeat(limits.max_trace_id_len + 1);
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (
                br#"{"type":"request","payload":{"service":"s","trace_id":"t1"}}"#.to_vec(),
                Some("t1"),
            ),
            (
                br#"{"payload":{"params":{"trace_id":"inner"},"trace_id":"t2"}}"#.to_vec(),
                Some("t2"),
            ),
            (br#"{"payload":{"trace_id":7}}"#.to_vec(), None),
            (br#"{"payload":{"trace_id":""}}"#.to_vec(), None),
            (format!(r#"{{"payload":{{"trace_id":"{long}"}}}}"#).into_bytes(), None),
            (b"not json".to_vec(), None),
        ];
        for (bytes, expected) in cases {
            let got = peek_trace_id(&bytes, Encoding::Json, &limits);
            assert_eq!(got.as_deref(), expected, "{}", String::from_utf8_lossy(&bytes));
        }
        let msgpack = rmp_serde::to_vec_named(&json!({"payload": {"trace_id": "m1"}})).unwrap();
        assert_eq!(peek_trace_id(&msgpack, Encoding::MessagePack, &limits).as_deref(), Some("m1"));
        // Nesting far past the decoder's cap is skipped, not recursed into.
        let deep: Vec<u8> =
            [0x81, 0xa7].iter().copied().chain(*b"payload").chain([0x91; 100_000]).collect();
        assert_eq!(peek_trace_id(&deep, Encoding::MessagePack, &limits), None);
        let deep_json = format!("{{\"payload\":{}}}", "[".repeat(100_000));
        assert_eq!(peek_trace_id(deep_json.as_bytes(), Encoding::Json, &limits), None);
    }

    fn call(service: &str, method: &str, params: Value, trace_id: Option<&str>) -> ClientCall {
        let Value::Object(params) = params else { panic!("params must be an object") };
        ClientCall {
            service: service.into(),
            method: method.into(),
            params,
            trace_id: trace_id.map(Into::into),
            traceparent: None,
        }
    }

    fn request(service: &str, method: &str, params: Value, trace: Option<&str>) -> Expect {
        Expect::Ok(ClientMessage::Request(call(service, method, params, trace)))
    }

    fn topics(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| (*t).to_owned()).collect()
    }

    fn check_outcome(shown: &str, got: Result<ClientMessage, ClientFrameError>, expected: &Expect) {
        match (expected, got) {
            (Expect::Ok(want), Ok(msg)) => assert_eq!(&msg, want, "frame {shown}"),
            (Expect::Err(kind, message, trace), Err(e)) => {
                assert_eq!((&e.kind, &e.message), (kind, message), "frame {shown}");
                assert_eq!(e.trace_id.as_deref(), *trace, "trace_id of error for {shown}");
                assert_eq!(e.to_string(), *message);
                assert_eq!(e.to_error_object(), ErrorObject::new(e.error_name(), message.clone()));
            }
            (Expect::ErrPrefix(kind, prefix), Err(e)) => {
                assert_eq!(&e.kind, kind, "frame {shown}: {e}");
                assert!(e.message.starts_with(prefix), "frame {shown}: {e}");
                assert_eq!(e.trace_id, None);
            }
            (expected, got) => panic!("frame {shown}: expected {expected:?}, got {got:?}"),
        }
    }

    fn check_json(input: &str, expected: &Expect) {
        let shown: String = input.chars().take(120).collect();
        let got = decode_client_message(input.as_bytes(), Encoding::Json, &ClientLimits::default());
        check_outcome(&shown, got, expected);
    }

    fn check_msgpack(bytes: &[u8], expected: &Expect) {
        let shown = format!("{:02x?}", &bytes[..bytes.len().min(24)]);
        let got = decode_client_message(bytes, Encoding::MessagePack, &ClientLimits::default());
        check_outcome(&shown, got, expected);
    }

    /// A request frame with one payload member replaced (`None` removes it).
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_payload(member: &str, value: Option<Value>) -> String {
        let mut payload = json!({"service": "svc", "method": "m", "params": {}, "trace_id": "t1"});
        match value {
            Some(v) => payload[member] = v,
            None => {
                if let Some(p) = payload.as_object_mut() {
                    p.remove(member);
                }
            }
        }
        json!({"type": "request", "payload": payload}).to_string()
    }

    /// Every rule, as JSON and (where the input is JSON at all) as the equivalent MessagePack.
    fn rule_table() -> Vec<(String, Expect)> {
        let long = |n: usize| Value::from("a".repeat(n));
        let svc_ok = |trace: Option<&str>| request("svc", "m", json!({}), trace);
        let many: Vec<String> = (0..65).map(|i| format!("t.{i}")).collect();
        vec![
            // Not JSON / not an object.
            ("this is not json".into(), Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
            ("".into(), Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
            ("{\"type\": \"ping\"".into(), Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
            ("[1, 2, 3]".into(), err(Invalid, "frame must be a JSON object, got array")),
            ("\"request\"".into(), err(Invalid, "frame must be a JSON object, got string")),
            ("42".into(), err(Invalid, "frame must be a JSON object, got number")),
            ("null".into(), err(Invalid, "frame must be a JSON object, got null")),
            // `type`.
            ("{}".into(), err(Invalid, "missing `type`")),
            (r#"{"payload": {"service": "s", "method": "m", "params": {}}}"#.into(), err(Invalid, "missing `type`")),
            (r#"{"type": null}"#.into(), err(Invalid, "`type` must be a string, got null")),
            (r#"{"type": 1}"#.into(), err(Invalid, "`type` must be a string, got number")),
            (r#"{"type": ["request"]}"#.into(), err(Invalid, "`type` must be a string, got array")),
            (
                r#"{"type": "query"}"#.into(),
                err(Invalid, "unknown `type` \"query\"; expected one of request, command, subscribe, unsubscribe, ping, refresh, auth"),
            ),
            (
                r#"{"type": "Request", "payload": {"trace_id": "t9"}}"#.into(),
                err_traced(Invalid, "unknown `type` \"Request\"; expected one of request, command, subscribe, unsubscribe, ping, refresh, auth", "t9"),
            ),
            // `payload`.
            (r#"{"type": "request"}"#.into(), err(Invalid, "missing `payload`")),
            (r#"{"type": "command"}"#.into(), err(Invalid, "missing `payload`")),
            (r#"{"type": "request", "payload": null}"#.into(), err(Invalid, "`payload` must be an object, got null")),
            (r#"{"type": "request", "payload": [1]}"#.into(), err(Invalid, "`payload` must be an object, got array")),
            (r#"{"type": "request", "payload": "x"}"#.into(), err(Invalid, "`payload` must be an object, got string")),
            // A valid request and command; unknown members are ignored (no context injection).
            (with_payload("trace_id", Some("t1".into())), svc_ok(Some("t1"))),
            (
                r#"{"type": "command", "id": "x", "payload": {"service": "svc", "method": "m", "params": {"a": [1, 2.5, null]}, "context": {"user_id": "mallory"}}}"#.into(),
                Expect::Ok(ClientMessage::Command(call("svc", "m", json!({"a": [1, 2.5, null]}), None))),
            ),
            // traceparent: a strict W3C value, else refused (with the frame's trace id).
            (
                with_payload("traceparent", Some(TP.into())),
                Expect::Ok(ClientMessage::Request(ClientCall {
                    traceparent: Some(TP.into()),
                    ..call("svc", "m", json!({}), Some("t1"))
                })),
            ),
            (with_payload("traceparent", Some(Value::Null)), svc_ok(Some("t1"))),
            (with_payload("traceparent", Some("".into())), svc_ok(Some("t1"))),
            (with_payload("traceparent", Some(TP.to_uppercase().into())), err_traced(Invalid, "`payload.traceparent` must be lowercase hexadecimal", "t1")),
            (with_payload("traceparent", Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01".into())), err_traced(Invalid, "`payload.traceparent` trace-id must not be all zeros", "t1")),
            (with_payload("traceparent", Some("junk".into())), err_traced(Invalid, "`payload.traceparent` must be 55 characters (version 00)", "t1")),
            (with_payload("traceparent", Some(long(56))), err_traced(TooLarge, "`payload.traceparent` is longer than 55 bytes", "t1")),
            (with_payload("traceparent", Some(7.into())), err_traced(Invalid, "`payload.traceparent` must be a string, got number", "t1")),
            // service and method.
            (with_payload("service", None), err_traced(Invalid, "missing `payload.service`", "t1")),
            (with_payload("service", Some("".into())), err_traced(Invalid, "`payload.service` must not be empty", "t1")),
            (with_payload("service", Some(1.into())), err_traced(Invalid, "`payload.service` must be a string, got number", "t1")),
            (with_payload("service", Some(Value::Null)), err_traced(Invalid, "`payload.service` must be a string, got null", "t1")),
            (with_payload("service", Some(json!({}))), err_traced(Invalid, "`payload.service` must be a string, got object", "t1")),
            (with_payload("service", Some(long(256))), err_traced(TooLarge, "`payload.service` is longer than 255 bytes", "t1")),
            (with_payload("service", Some("\u{e9}".repeat(128).into())), err_traced(TooLarge, "`payload.service` is longer than 255 bytes", "t1")),
            (with_payload("service", Some(long(255))), request(&"a".repeat(255), "m", json!({}), Some("t1"))),
            (with_payload("service", Some("sv\nc".into())), err_traced(Invalid, "`payload.service` must not contain control characters", "t1")),
            (with_payload("service", Some("svc\u{0}".into())), err_traced(Invalid, "`payload.service` must not contain control characters", "t1")),
            (with_payload("service", Some("svc\u{7f}".into())), err_traced(Invalid, "`payload.service` must not contain control characters", "t1")),
            (with_payload("service", Some("svc\u{85}".into())), err_traced(Invalid, "`payload.service` must not contain control characters", "t1")),
            (with_payload("method", None), err_traced(Invalid, "missing `payload.method`", "t1")),
            (with_payload("method", Some("".into())), err_traced(Invalid, "`payload.method` must not be empty", "t1")),
            (with_payload("method", Some(true.into())), err_traced(Invalid, "`payload.method` must be a string, got boolean", "t1")),
            (with_payload("method", Some(long(256))), err_traced(TooLarge, "`payload.method` is longer than 255 bytes", "t1")),
            (with_payload("method", Some("m\t".into())), err_traced(Invalid, "`payload.method` must not contain control characters", "t1")),
            // params.
            (with_payload("params", None), err_traced(Invalid, "missing `payload.params`", "t1")),
            (with_payload("params", Some(json!([1, 2]))), err_traced(Invalid, "`payload.params` must be an object, got array", "t1")),
            (with_payload("params", Some("x".into())), err_traced(Invalid, "`payload.params` must be an object, got string", "t1")),
            (with_payload("params", Some(Value::Null)), err_traced(Invalid, "`payload.params` must be an object, got null", "t1")),
            (with_payload("params", Some(json!({"x": {"y": [1]}}))), request("svc", "m", json!({"x": {"y": [1]}}), Some("t1"))),
            // trace_id: absent, null and empty mean "none" (the gateway generates one).
            (with_payload("trace_id", None), svc_ok(None)),
            (with_payload("trace_id", Some(Value::Null)), svc_ok(None)),
            (with_payload("trace_id", Some("".into())), svc_ok(None)),
            (with_payload("trace_id", Some(long(128))), svc_ok(Some(&"a".repeat(128)))),
            (with_payload("trace_id", Some(long(129))), err(TooLarge, "`payload.trace_id` is longer than 128 bytes")),
            (with_payload("trace_id", Some(7.into())), err(Invalid, "`payload.trace_id` must be a string, got number")),
            (with_payload("trace_id", Some(json!({"id": 1}))), err(Invalid, "`payload.trace_id` must be a string, got object")),
            (with_payload("trace_id", Some(json!(["t"]))), err(Invalid, "`payload.trace_id` must be a string, got array")),
            // The trace id is checked first: a bad one hides later errors.
            (
                json!({"type": "request", "payload": {"trace_id": 1}}).to_string(),
                err(Invalid, "`payload.trace_id` must be a string, got number"),
            ),
            // subscribe / unsubscribe.
            (
                r#"{"type": "subscribe", "payload": {"topics": ["capture.gw.#", "user.*.notify"]}}"#.into(),
                Expect::Ok(ClientMessage::Subscribe { topics: topics(&["capture.gw.#", "user.*.notify"]) }),
            ),
            (
                r#"{"type": "unsubscribe", "payload": {"topics": ["capture.gw.#"]}}"#.into(),
                Expect::Ok(ClientMessage::Unsubscribe { topics: topics(&["capture.gw.#"]) }),
            ),
            (
                r#"{"type": "subscribe", "payload": {"topics": []}}"#.into(),
                Expect::Ok(ClientMessage::Subscribe { topics: vec![] }),
            ),
            (
                json!({"type": "subscribe", "payload": {"topics": &many[..64]}}).to_string(),
                Expect::Ok(ClientMessage::Subscribe { topics: many[..64].to_vec() }),
            ),
            (r#"{"type": "subscribe"}"#.into(), err(Invalid, "missing `payload`")),
            (r#"{"type": "unsubscribe", "payload": ["a"]}"#.into(), err(Invalid, "`payload` must be an object, got array")),
            (r#"{"type": "subscribe", "payload": {}}"#.into(), err(Invalid, "missing `payload.topics`")),
            (r#"{"type": "subscribe", "payload": {"topics": "a.b"}}"#.into(), err(Invalid, "`payload.topics` must be an array, got string")),
            (r#"{"type": "subscribe", "payload": {"topics": null}}"#.into(), err(Invalid, "`payload.topics` must be an array, got null")),
            (
                json!({"type": "subscribe", "payload": {"topics": many}}).to_string(),
                err(TooLarge, "`payload.topics` has more than 64 entries"),
            ),
            (r#"{"type": "subscribe", "payload": {"topics": ["a", ""]}}"#.into(), err(Invalid, "a topic must not be empty")),
            (r#"{"type": "subscribe", "payload": {"topics": ["a", 1]}}"#.into(), err(Invalid, "`payload.topics` entries must be strings, got number")),
            (r#"{"type": "subscribe", "payload": {"topics": [["a"]]}}"#.into(), err(Invalid, "`payload.topics` entries must be strings, got array")),
            (r#"{"type": "subscribe", "payload": {"topics": ["a\nb"]}}"#.into(), err(Invalid, "a topic must not contain control characters")),
            (
                json!({"type": "subscribe", "payload": {"topics": ["a".repeat(256)]}}).to_string(),
                err(TooLarge, "a topic is longer than 255 bytes"),
            ),
            (
                r#"{"type": "subscribe", "payload": {"topics": [""], "trace_id": "sub-1"}}"#.into(),
                err_traced(Invalid, "a topic must not be empty", "sub-1"),
            ),
            // ping.
            (r#"{"type": "ping"}"#.into(), Expect::Ok(ClientMessage::Ping)),
            (r#"{"type": "ping", "payload": {"x": 1}}"#.into(), Expect::Ok(ClientMessage::Ping)),
            (r#"{"type": "ping", "payload": null}"#.into(), Expect::Ok(ClientMessage::Ping)),
            // `refresh`.
            (
                r#"{"type": "refresh", "payload": {"token": "abc"}}"#.into(),
                Expect::Ok(ClientMessage::Refresh { token: "abc".into() }),
            ),
            (r#"{"type": "refresh"}"#.into(), err(Invalid, "missing `payload`")),
            (r#"{"type": "refresh", "payload": {}}"#.into(), err(Invalid, "missing `payload.token`")),
            (r#"{"type": "refresh", "payload": {"token": ""}}"#.into(), err(Invalid, "`payload.token` must not be empty")),
            (r#"{"type": "refresh", "payload": {"token": 5}}"#.into(), err(Invalid, "`payload.token` must be a string, got number")),
            (
                format!(r#"{{"type": "refresh", "payload": {{"token": "{}"}}}}"#, "t".repeat(8193)),
                err(TooLarge, "`payload.token` is longer than 8192 bytes"),
            ),
        ]
    }

    #[test]
    fn validation_rules_json() {
        for (input, expected) in rule_table() {
            check_json(&input, &expected);
        }
    }

    /// The same frames as MessagePack (named maps, as `rmp_serde::to_vec_named` writes them)
    /// give the same outcome. Inputs that are not JSON have no MessagePack twin.
    #[test]
    fn validation_rules_messagepack_match_json() {
        let mut checked = 0;
        for (input, expected) in rule_table() {
            let Ok(value) = serde_json::from_str::<Value>(&input) else { continue };
            let bytes = rmp_serde::to_vec_named(&value).expect("encodes");
            check_msgpack(&bytes, &expected);
            checked += 1;
        }
        assert!(checked > 60, "only {checked} MessagePack cases");
    }

    /// Frames at the edges of the fast path's plain shape: repeated and unknown keys, `id`s,
    /// keys in any order, limits reached exactly and passed by one.
    fn fast_path_edges() -> Vec<String> {
        let plain = r#""service": "svc", "method": "m", "params": {"a": 1}"#;
        let mut frames: Vec<String> = [
            format!(r#"{{"type": "request", "payload": {{{plain}}}}}"#),
            format!(r#"{{"payload": {{{plain}, "trace_id": "t"}}, "id": "i", "type": "command"}}"#),
            format!(r#"{{"type": "request", "id": null, "payload": {{{plain}, "traceparent": null}}}}"#),
            format!(r#"{{"type": "request", "id": "", "payload": {{{plain}}}}}"#),
            format!(r#"{{"type": "request", "id": 5, "payload": {{{plain}}}}}"#),
            format!(r#"{{"type": "request", "id": "{}", "payload": {{{plain}}}}}"#, "i".repeat(128)),
            format!(r#"{{"type": "request", "id": "{}", "payload": {{{plain}}}}}"#, "i".repeat(129)),
            format!(r#"{{"type": "request", "type": "command", "payload": {{{plain}}}}}"#),
            format!(r#"{{"type": "request", "payload": {{{plain}, "service": "other"}}}}"#),
            format!(r#"{{"type": "request", "payload": {{{plain}, "params": {{"b": 2}}}}}}"#),
            format!(r#"{{"type": "request", "payload": {{{plain}}}, "payload": {{{plain}}}}}"#),
            format!(r#"{{"type": "request", "extra": 1, "payload": {{{plain}}}}}"#),
            format!(r#"{{"type": "request", "payload": {{{plain}, "context": {{"user_id": "x"}}}}}}"#),
            format!(r#"{{"type": "request", "payload": {{{plain}}}}} "#),
            format!(r#"{{"type": "request", "payload": {{{plain}}}}} x"#),
            format!(r#"{{"type": "ping", "payload": {{{plain}}}}}"#),
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {"d": 1, "d": [2]}}}"#.into(),
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {"n": 18446744073709551616}}}"#.into(),
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {"n": [1.5, -0, 1e400]}}}"#.into(),
            r#"{"type": "request", "payload": {"service": "s\u0000", "method": "m", "params": {}}}"#.into(),
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {}, "trace_id": ""}}"#.into(),
            r#"{"type": "request", "payload": {"service": "s", "method": "m", "params": {}, "traceparent": ""}}"#.into(),
        ]
        .into();
        // Depth exactly at the limit (64) and one past it; values and bytes around the bounds.
        frames.push(nested_request(60, "d1"));
        frames.push(nested_request(61, "d2"));
        frames.push(nested_request(62, "d3"));
        for n in [0, 1, 40, 50, 60, 70] {
            let list = vec!["0"; n].join(",");
            frames.push(format!(
                r#"{{"type": "request", "payload": {{"service": "s", "method": "m", "params": {{"l": [{list}]}}}}}}"#
            ));
        }
        for n in [100, 4000, 15_000, 16_000, 17_000] {
            frames.push(format!(
                r#"{{"type": "request", "payload": {{"service": "s", "method": "m", "params": {{"t": "{}"}}}}}}"#,
                "x".repeat(n)
            ));
        }
        frames
    }

    /// The fast path for plain calls gives, for every frame, exactly what the general
    /// decoder gives (message, or error kind, text, trace id and id), in both encodings and
    /// under the default and small limits, and it is taken for a plain call.
    #[test]
    fn fast_path_matches_the_general_decoder() {
        let small = ClientLimits {
            max_decoded_values: 48,
            max_decoded_bytes: 16 * 1024,
            ..ClientLimits::default()
        };
        let mut inputs: Vec<(Vec<u8>, Encoding)> = Vec::new();
        let frames = rule_table().into_iter().map(|(f, _)| f).chain(fast_path_edges());
        for frame in frames {
            if let Ok(value) = serde_json::from_str::<Value>(&frame) {
                let bytes = rmp_serde::to_vec_named(&value).expect("encodes");
                let mut trailing = bytes.clone();
                trailing.push(0xc0);
                inputs.push((bytes, Encoding::MessagePack));
                inputs.push((trailing, Encoding::MessagePack));
            }
            inputs.push((frame.into_bytes(), Encoding::Json));
        }
        // Bytes that are not UTF-8, in a string and in a key.
        inputs.push((b"{\"type\": \"request\", \"payload\": {\"service\": \"s\xff\", \"method\": \"m\", \"params\": {}}}".to_vec(), Encoding::Json));
        inputs.push((b"{\"type\": \"request\", \"payload\": {\"service\": \"s\", \"method\": \"m\", \"params\": {\"\xc3\": 1}}}".to_vec(), Encoding::Json));
        // A NaN, which only MessagePack can carry, inside plain params.
        #[derive(Serialize)]
        struct Payload {
            service: &'static str,
            method: &'static str,
            params: std::collections::BTreeMap<&'static str, f64>,
        }
        #[derive(Serialize)]
        struct Frame {
            r#type: &'static str,
            payload: Payload,
        }
        for x in [f64::NAN, f64::INFINITY, 1.5] {
            let params = [("x", x)].into_iter().collect();
            let frame =
                Frame { r#type: "request", payload: Payload { service: "s", method: "m", params } };
            inputs.push((rmp_serde::to_vec_named(&frame).expect("encodes"), Encoding::MessagePack));
        }
        let mut fast_taken = 0;
        for (bytes, encoding) in &inputs {
            for limits in [ClientLimits::default(), small.clone()] {
                let fast = decode_client_frame(bytes, *encoding, &limits);
                let general = decode_client_frame_general(bytes, *encoding, &limits);
                assert_eq!(fast, general, "{encoding:?} {}", String::from_utf8_lossy(bytes));
                if fast.is_ok() && plain_fast(bytes, *encoding, &limits).is_some() {
                    fast_taken += 1;
                }
            }
        }
        assert!(fast_taken > 40, "the fast path took only {fast_taken} frames");
        // The fast path charges the envelope as the general decoder does: swept across the
        // bounds, both refuse a frame at the same byte and value counts.
        let long = format!(
            r#"{{"id": "{}", "type": "request", "payload": {{"service": "{}", "method": "m", "trace_id": "{}", "params": {{"k": [1, "two"]}}}}}}"#,
            "i".repeat(100),
            "s".repeat(200),
            "t".repeat(120)
        );
        let value: Value = serde_json::from_str(&long).expect("JSON");
        let msgpack = rmp_serde::to_vec_named(&value).expect("encodes");
        let (mut accepted, mut refused) = (0, 0);
        for (bytes, encoding) in
            [(long.as_bytes(), Encoding::Json), (&msgpack[..], Encoding::MessagePack)]
        {
            let sweep = (1000..5000)
                .step_by(8)
                .map(|b| (usize::MAX, b))
                .chain((1..16).map(|v| (v, usize::MAX)));
            for (max_decoded_values, max_decoded_bytes) in sweep {
                let limits = ClientLimits {
                    max_decoded_values,
                    max_decoded_bytes,
                    ..ClientLimits::default()
                };
                let fast = decode_client_frame(bytes, encoding, &limits);
                let general = decode_client_frame_general(bytes, encoding, &limits);
                assert_eq!(
                    fast, general,
                    "{encoding:?} at {max_decoded_values} values, {max_decoded_bytes} bytes"
                );
                let by_fast = plain_fast(bytes, encoding, &limits);
                assert_eq!(
                    by_fast.is_some(),
                    general.is_ok(),
                    "{encoding:?} at {max_decoded_bytes} bytes"
                );
                if general.is_ok() { accepted += 1 } else { refused += 1 }
            }
        }
        assert!(
            accepted > 10 && refused > 10,
            "the sweep missed the bound: {accepted} accepted, {refused} refused"
        );
        // The plain call the benchmark sends is read by the fast path.
        let plain = br#"{"type":"request","id":"r-1","payload":{"service":"echo","method":"echo","params":{"payload":"abc"},"trace_id":"t-1"}}"#;
        let limits = ClientLimits::default();
        assert_eq!(
            plain_fast(plain, Encoding::Json, &limits),
            decode_client_frame(plain, Encoding::Json, &limits).ok()
        );
    }

    /// What the fast path alone makes of a frame (`None`: it leaves the frame to the general
    /// decoder).
    fn plain_fast(bytes: &[u8], encoding: Encoding, limits: &ClientLimits) -> Option<ClientFrame> {
        let big_integer_float = match encoding {
            Encoding::Json => {
                let scan = json_prescan(bytes, PARSE_DEPTH_CAP);
                if scan.too_deep {
                    return None;
                }
                scan.big_integer_float
            }
            Encoding::MessagePack => None,
        };
        fast_call(bytes, encoding, limits, big_integer_float)
    }

    /// A frame whose params sit `extra` levels below the envelope (frame, payload, params).
    fn nested_request(extra: usize, trace: &str) -> String {
        format!(
            r#"{{"type": "request", "payload": {{"trace_id": "{trace}", "service": "s", "method": "m", "params": {{"p": {}0{}}}}}}}"#,
            "[".repeat(extra),
            "]".repeat(extra)
        )
    }

    #[test]
    fn nesting_limits() {
        let limit_error = |trace: Option<&'static str>| {
            Expect::Err(TooLarge, "frame is nested deeper than 64 levels".into(), trace)
        };
        // Envelope (3 levels: frame, payload, params) + 61 = 64: accepted; one more is not,
        // and the error still carries the trace id because the frame could be parsed.
        let ok = nested_request(61, "deep-ok");
        let ok_value: Value = serde_json::from_str(&ok).expect("valid JSON");
        assert_eq!(depth(&ok_value), 64);
        let Ok(ClientMessage::Request(c)) =
            decode_client_message(ok.as_bytes(), Encoding::Json, &ClientLimits::default())
        else {
            panic!("a 64-level frame is accepted")
        };
        assert_eq!(c.trace_id.as_deref(), Some("deep-ok"));
        check_json(&nested_request(62, "deep-1"), &limit_error(Some("deep-1")));
        check_json(&nested_request(100, "deep-2"), &limit_error(Some("deep-2")));

        // Beyond what the parsers accept (127): refused before parsing, no trace id.
        for input in [
            nested_request(125, "deep-3"),
            nested_request(10_000, "deep-4"),
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            "{\"a\":".repeat(10_000),
        ] {
            check_json(&input, &limit_error(None));
        }
        // Brackets inside strings do not count; the real nesting here is 2.
        check_json(
            &format!(r#"{{"type": "ping", "payload": {{"s": "{}"}}}}"#, "[{".repeat(5_000)),
            &Expect::Ok(ClientMessage::Ping),
        );

        // MessagePack: 10,000 nested arrays / maps stop at the parser's depth limit.
        let mut arrays = vec![0x91u8; 10_000];
        arrays.push(0xc0);
        check_msgpack(&arrays, &limit_error(None));
        let mut maps = Vec::new();
        for _ in 0..10_000 {
            maps.extend_from_slice(&[0x81, 0xa1, b'k']);
        }
        maps.push(0xc0);
        check_msgpack(&maps, &limit_error(None));
        let value: Value = serde_json::from_str(&nested_request(62, "deep-mp")).expect("JSON");
        let bytes = rmp_serde::to_vec_named(&value).expect("encodes");
        check_msgpack(&bytes, &limit_error(Some("deep-mp")));
    }

    /// A request whose `params` is `params` (JSON text), with the trace id first or last.
    fn request_with_params(params: &str, trace_first: bool) -> String {
        if trace_first {
            format!(
                r#"{{"type": "request", "payload": {{"trace_id": "t-num", "service": "s", "method": "m", "params": {params}}}}}"#
            )
        } else {
            format!(
                r#"{{"type": "request", "payload": {{"service": "s", "method": "m", "params": {params}, "trace_id": "t-num"}}}}"#
            )
        }
    }

    /// Integers beyond 64 bits and non-finite floats never reach the mesh changed: refused,
    /// naming the field, in both encodings; the 64-bit boundaries pass exactly.
    #[test]
    fn numbers_are_passed_exactly_or_refused() {
        let big = |path: &str| {
            format!("`{path}` is an integer beyond 64 bits (-2^63 to 2^64-1); send it as a string")
        };
        let ok = |params: Value| request("s", "m", params, Some("t-num"));
        // JSON text of `params`, and the outcome.
        let json_cases: Vec<(&str, Expect)> = vec![
            (r#"{"n": 18446744073709551615}"#, ok(json!({"n": u64::MAX}))),
            (r#"{"n": -9223372036854775808}"#, ok(json!({"n": i64::MIN}))),
            (
                r#"{"n": 1.5e300, "m": 1e19, "k": -0.0}"#,
                ok(json!({"n": 1.5e300, "m": 1e19, "k": -0.0})),
            ),
            (
                r#"{"n": 18446744073709551616}"#,
                err_traced(Invalid, big("payload.params.n"), "t-num"),
            ),
            (
                r#"{"n": -9223372036854775809}"#,
                err_traced(Invalid, big("payload.params.n"), "t-num"),
            ),
            (
                r#"{"a": [1.5, "x", {"b": [0, 123456789012345678901234567890123456789012]}]}"#,
                err_traced(Invalid, big("payload.params.a[2].b[1]"), "t-num"),
            ),
            // Floats before it are counted, so the right literal is named.
            (
                r#"{"f": 2.5, "g": -0, "n": 99999999999999999999}"#,
                err_traced(Invalid, big("payload.params.n"), "t-num"),
            ),
            (
                r#"{"s": "18446744073709551616", "n": 1}"#,
                ok(json!({"s": "18446744073709551616", "n": 1})),
            ),
            (r#"{"n": NaN}"#, Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
            (r#"{"n": Infinity}"#, Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
            (r#"{"n": 1e400}"#, Expect::ErrPrefix(Decode, "frame is not valid JSON: ")),
        ];
        for trace_first in [true, false] {
            for (params, expected) in &json_cases {
                check_json(&request_with_params(params, trace_first), expected);
            }
        }
        // Beyond 64 bits in the envelope itself.
        check_json(
            r#"{"type": "request", "payload": {"trace_id": 18446744073709551616}}"#,
            &err(Invalid, big("payload.trace_id")),
        );

        // MessagePack has no integers beyond 64 bits; NaN and ±Infinity (f64 and f32) are
        // refused instead of becoming `null`.
        let mp_request = |number: &[u8]| {
            let mut frame = rmp_serde::to_vec_named(&json!({"type": "request", "payload": {
                "trace_id": "t-num", "service": "s", "method": "m"}}))
            .expect("encodes");
            // Grow the payload map by one entry: `params: {"n": <number>}`.
            let at = frame.iter().position(|&b| b == 0x83).expect("payload fixmap");
            frame[at] = 0x84;
            frame.extend_from_slice(&[0xa6]);
            frame.extend_from_slice(b"params");
            frame.extend_from_slice(&[0x81, 0xa1, b'n']);
            frame.extend_from_slice(number);
            frame
        };
        let non_finite = "`payload.params.n` is not a finite number (NaN and Infinity are refused)";
        let f64_bytes = |v: f64| {
            let mut b = vec![0xcb];
            b.extend_from_slice(&v.to_be_bytes());
            b
        };
        let f32_bytes = |v: f32| {
            let mut b = vec![0xca];
            b.extend_from_slice(&v.to_be_bytes());
            b
        };
        let mp_cases: Vec<(Vec<u8>, Expect)> = vec![
            (
                vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                ok(json!({"n": u64::MAX})),
            ),
            (vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0], ok(json!({"n": i64::MIN}))),
            (f64_bytes(2.5), ok(json!({"n": 2.5}))),
            (f32_bytes(0.5), ok(json!({"n": 0.5}))),
            (f64_bytes(f64::NAN), err_traced(Invalid, non_finite, "t-num")),
            (f64_bytes(f64::INFINITY), err_traced(Invalid, non_finite, "t-num")),
            (f64_bytes(f64::NEG_INFINITY), err_traced(Invalid, non_finite, "t-num")),
            (f32_bytes(f32::NAN), err_traced(Invalid, non_finite, "t-num")),
            (f32_bytes(f32::NEG_INFINITY), err_traced(Invalid, non_finite, "t-num")),
        ];
        for (number, expected) in mp_cases {
            check_msgpack(&mp_request(&number), &expected);
        }
    }

    /// The issue's frames: 1 MiB of zeros in an array is refused while decoding, with the
    /// trace id wherever it sits in the frame; a frame within the bounds is accepted.
    #[test]
    fn decoded_cost_limits() {
        let zeros = |n: usize| format!("{{\"a\": [{}0]}}", "0,".repeat(n - 1));
        let limits = ClientLimits::default();
        // With the defaults the value count is what an array of scalars meets first (128 Ki
        // elements are ~20 MiB by the estimate); the byte bound is tested on its own below.
        let too_many = format!("frame decodes to more than {} values", limits.max_decoded_values);
        for trace_first in [true, false] {
            let frame = request_with_params(&zeros(512 * 1024), trace_first);
            assert!(frame.len() > 1 << 20);
            check_json(&frame, &err_traced(TooLarge, too_many.clone(), "t-num"));
        }
        // MessagePack: a 1 MiB array of zeros (one byte each).
        let mut mp = vec![0xdd];
        mp.extend_from_slice(&(1u32 << 20).to_be_bytes());
        mp.resize(mp.len() + (1 << 20), 0x00);
        check_msgpack(&mp, &err(TooLarge, too_many.clone()));
        // Within the bounds, accepted.
        let within = request_with_params(&zeros(100_000), false);
        let decoded = decode_client_message(within.as_bytes(), Encoding::Json, &limits);
        assert!(matches!(decoded, Ok(ClientMessage::Request(_))), "{:?}", decoded.map(|_| ()));

        // The value count.
        let few = ClientLimits { max_decoded_values: 1000, ..ClientLimits::default() };
        let e = decode_client_message(within.as_bytes(), Encoding::Json, &few).expect_err("many");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (TooLarge, "frame decodes to more than 1000 values")
        );
        assert_eq!(e.trace_id.as_deref(), Some("t-num"));

        // The byte bound: few values, many bytes (long strings, long keys).
        let small = ClientLimits { max_decoded_bytes: 64 * 1024, ..ClientLimits::default() };
        let decode = |text: &str| decode_client_message(text.as_bytes(), Encoding::Json, &small);
        let strings =
            format!("{{\"s\": [{}\"\"]}}", format!("\"{}\",", "x".repeat(1000)).repeat(70));
        let e = decode(&request_with_params(&strings, false)).expect_err("too many bytes");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (TooLarge, "frame decodes to more than 65536 bytes of memory")
        );
        assert_eq!(e.trace_id.as_deref(), Some("t-num"));
        let keys: String = (0..400).map(|i| format!("\"{i:0>150}\": 0,")).collect();
        let keyed = format!("{{{keys}\"z\": 0}}");
        assert_eq!(decode(&request_with_params(&keyed, true)).map_err(|e| e.kind), Err(TooLarge));
        assert!(decode(&request_with_params(r#"{"s": "small"}"#, true)).is_ok());
    }

    /// With a generous `max_depth`, the parser cap (127 levels) still applies.
    #[test]
    fn parse_depth_cap() {
        let limits = ClientLimits { max_depth: 1_000, ..ClientLimits::default() };
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let decode = |bytes: &[u8], encoding| decode_client_message(bytes, encoding, &limits);

        let at_cap = nested(PARSE_DEPTH_CAP);
        let over_cap = nested(PARSE_DEPTH_CAP + 1);
        let kind = |r: Result<ClientMessage, ClientFrameError>| r.map_err(|e| e.kind);
        // At the cap the frame parses (and is then rejected for not being an object).
        assert_eq!(kind(decode(at_cap.as_bytes(), Encoding::Json)), Err(Invalid));
        assert_eq!(kind(decode(over_cap.as_bytes(), Encoding::Json)), Err(TooLarge));
        let err = decode(over_cap.as_bytes(), Encoding::Json).expect_err("too deep");
        assert_eq!(err.message, "frame is nested deeper than 127 levels");

        let to_mp = |text: &str| {
            rmp_serde::to_vec_named(&serde_json::from_str::<Value>(text).expect("JSON"))
                .expect("encodes")
        };
        assert_eq!(kind(decode(&to_mp(&at_cap), Encoding::MessagePack)), Err(Invalid));
        let mut deeper = vec![0x91u8; PARSE_DEPTH_CAP + 1];
        deeper.push(0xc0);
        assert_eq!(kind(decode(&deeper, Encoding::MessagePack)), Err(TooLarge));
    }

    #[test]
    fn messagepack_garbage() {
        let mut huge_str = vec![0xdb, 0xff, 0xff, 0xff, 0xff];
        huge_str.extend_from_slice(b"short");
        let mut huge_array = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
        huge_array.extend_from_slice(&[0x01; 16]);
        let ping = rmp_serde::to_vec_named(&json!({"type": "ping"})).expect("encodes");
        let mut trailing = ping.clone();
        trailing.push(0x00);
        let cases: Vec<(Vec<u8>, Expect)> = vec![
            (vec![], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0xc1], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0x92, 0x01], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0x81, 0x01, 0x02], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0xc4, 0x01, 0x00], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0xd4, 0x01, 0x00], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (vec![0xa1, 0xff], Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (huge_str, Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (huge_array, Expect::ErrPrefix(Decode, "frame is not valid MessagePack: ")),
            (
                b"{\"type\": \"ping\"}".to_vec(),
                Expect::ErrPrefix(Decode, "frame is not valid MessagePack: "),
            ),
            (trailing, err(Decode, "frame is not valid MessagePack: 1 trailing byte(s)")),
            (vec![0x93, 0x01, 0x02, 0x03], err(Invalid, "frame must be a JSON object, got array")),
            (ping, Expect::Ok(ClientMessage::Ping)),
        ];
        for (bytes, expected) in cases {
            check_msgpack(&bytes, &expected);
        }
    }

    #[test]
    fn json_nesting_scan() {
        let cases: &[(&str, usize, bool)] = &[
            ("[[]]", 2, false),
            ("[[[]]]", 2, true),
            (r#"{"a": "[[[[", "b": []}"#, 2, false),
            (r#"["\"[[[[", []]"#, 2, false),
            (r#"["\\", [[]]]"#, 2, true),
            ("]]]][[", 2, false),
            ("", 0, false),
        ];
        for &(text, cap, expected) in cases {
            assert_eq!(json_nesting_exceeds(text.as_bytes(), cap), expected, "{text}");
        }
    }

    #[test]
    fn depth_and_type_names() {
        let cases = [
            (json!(1), 0, "number"),
            (json!(null), 0, "null"),
            (json!("s"), 0, "string"),
            (json!(false), 0, "boolean"),
            (json!([]), 1, "array"),
            (json!({}), 1, "object"),
            (json!({"a": [1, {"b": []}], "c": {}}), 4, "object"),
        ];
        for (value, want_depth, want_name) in cases {
            assert_eq!((depth(&value), type_name(&value)), (want_depth, want_name), "{value}");
        }
    }

    #[test]
    fn error_names() {
        let cases = [
            (Decode, "DecodeError"),
            (Invalid, "NuropbValidationError"),
            (TooLarge, "LimitExceeded"),
        ];
        for (kind, name) in cases {
            assert_eq!(ClientFrameError::new(kind, "x").error_name(), name);
        }
    }

    /// Every server frame survives both encodings (byte-level goldens are in
    /// `tests/golden.rs`).
    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Message(ServerMessage::Event {
                topic: "hello".into(),
                event: json!({"session_id": "s", "user_id": "u", "username": "n"}),
            }),
            ServerFrame::Message(ServerMessage::Response {
                trace_id: None,
                result: json!([1, -2, 2.5, "\u{e9}", {"k": null}]),
                error: None,
            }),
            ServerFrame::Message(ServerMessage::Response {
                trace_id: Some("t".into()),
                result: Value::Null,
                error: Some(ErrorObject::new("E", "d")),
            }),
            ServerFrame::Message(ServerMessage::Accepted { trace_id: None }),
            ServerFrame::Message(ServerMessage::Subscribed { topics: vec![] }),
            ServerFrame::Message(ServerMessage::Pong {}),
            ServerFrame::Error(ErrorFrame {
                error: "E".into(),
                description: "d".into(),
                trace_id: None,
                id: None,
            }),
            ServerFrame::Error(ErrorFrame {
                error: "E".into(),
                description: "d".into(),
                trace_id: Some("t".into()),
                id: Some("c-1".into()),
            }),
            ServerFrame::Message(ServerMessage::Pong {}).with_id(Some("c-2".into())),
            ServerFrame::Message(ServerMessage::Refreshed { expires_at: Some(5) })
                .with_id(Some("".into())),
            ServerFrame::Message(ServerMessage::Response {
                trace_id: Some("t".into()),
                result: json!({"id": 1}),
                error: None,
            })
            .with_id(Some("c-3".into())),
        ];
        for frame in frames {
            for encoding in [Encoding::Json, Encoding::MessagePack] {
                let bytes = encode_server_frame(&frame, encoding).expect("encodes");
                let back = decode_server_frame(&bytes, encoding).expect("decodes");
                assert_eq!(back, frame, "{encoding:?}");
            }
        }
    }

    /// The top-level `id` is echoed where the client can match it, and leaves frames without
    /// it byte for byte as they were.
    #[test]
    fn ids_are_placed_at_top_level_and_absent_ids_change_nothing() {
        let pong = ServerFrame::Message(ServerMessage::Pong {});
        let plain = encode_server_frame(&pong, Encoding::Json).unwrap();
        assert_eq!(plain, br#"{"type":"pong","payload":{}}"#);
        let same = encode_server_frame(&pong.clone().with_id(None), Encoding::Json).unwrap();
        assert_eq!(same, plain);
        let with = pong.with_id(Some("a-1".into()));
        let json: Value =
            serde_json::from_slice(&encode_server_frame(&with, Encoding::Json).unwrap()).unwrap();
        assert_eq!(json, json!({"type": "pong", "payload": {}, "id": "a-1"}));
        assert_eq!(with.id(), Some("a-1"));
        assert_eq!(with.message(), Some(&ServerMessage::Pong {}));
        let error = ServerFrame::Error(ErrorFrame {
            error: "E".into(),
            description: "d".into(),
            trace_id: None,
            id: None,
        });
        let json: Value = serde_json::from_slice(
            &encode_server_frame(&error.with_id(Some("b".into())), Encoding::Json).unwrap(),
        )
        .unwrap();
        assert_eq!(json, json!({"error": "E", "description": "d", "id": "b"}));
    }

    #[test]
    fn client_frame_ids_are_read_checked_and_carried_by_refusals() {
        let limits = ClientLimits::default();
        let decode = |text: &str| decode_client_frame(text.as_bytes(), Encoding::Json, &limits);
        let f = decode(r#"{"type":"ping","id":"p-1"}"#).unwrap();
        assert_eq!(f, ClientFrame { id: Some("p-1".into()), message: ClientMessage::Ping });
        assert_eq!(decode(r#"{"type":"ping"}"#).unwrap().id, None);
        assert_eq!(decode(r#"{"type":"ping","id":null}"#).unwrap().id, None);
        let e = decode(r#"{"type":"ping","id":7}"#).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (FrameErrorKind::Invalid, "`id` must be a string, got number")
        );
        assert_eq!(e.id, None);
        let long = "x".repeat(129);
        let e = decode(&format!(r#"{{"type":"ping","id":"{long}"}}"#)).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (FrameErrorKind::TooLarge, "`id` is longer than 128 bytes")
        );
        assert_eq!(e.id, None);
        let ok = "x".repeat(128);
        assert_eq!(decode(&format!(r#"{{"type":"ping","id":"{ok}"}}"#)).unwrap().id, Some(ok));
        // A refusal for another reason carries the id, and the trace id.
        let e = decode(r#"{"id":"r-1","type":"request","payload":{"trace_id":"t","service":"s"}}"#)
            .unwrap_err();
        assert_eq!((e.id.as_deref(), e.trace_id.as_deref()), (Some("r-1"), Some("t")));
        let e = decode(r#"{"type":"nope","id":"r-2"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("r-2"));
        // Bytes refused while decoding: the id is peeked.
        let e =
            decode(r#"{"id":"r-3","type":"ping","payload":{"n":123456789012345678901234567890}}"#)
                .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("r-3"));
        assert_eq!(
            peek_id(br#"{"payload":{"id":"no"},"id":"yes"}"#, Encoding::Json, &limits),
            Some("yes".into())
        );
        assert_eq!(peek_id(br#"{"id":5}"#, Encoding::Json, &limits), None);
        assert_eq!(peek_id(long.as_bytes(), Encoding::Json, &limits), None);
        let packed = rmp_serde::to_vec_named(&json!({"type": "ping", "id": "m-1"})).unwrap();
        assert_eq!(peek_id(&packed, Encoding::MessagePack, &limits), Some("m-1".into()));
        let f = decode_client_frame(&packed, Encoding::MessagePack, &limits).unwrap();
        assert_eq!(f.id.as_deref(), Some("m-1"));
    }

    #[test]
    fn the_auth_frame_carries_a_bounded_token() {
        let limits = ClientLimits { max_token_len: 8, ..ClientLimits::default() };
        let decode = |text: &str| decode_client_frame(text.as_bytes(), Encoding::Json, &limits);
        assert_eq!(
            decode(r#"{"type":"auth","payload":{"token":"abc"},"id":"a"}"#).unwrap(),
            ClientFrame {
                id: Some("a".into()),
                message: ClientMessage::Auth { token: "abc".into() }
            }
        );
        assert_eq!(
            decode(r#"{"type":"auth","payload":{"token":"123456789"}}"#).unwrap_err().kind,
            FrameErrorKind::TooLarge
        );
        assert_eq!(
            decode(r#"{"type":"auth","payload":{"token":""}}"#).unwrap_err().kind,
            FrameErrorKind::Invalid
        );
        assert_eq!(decode(r#"{"type":"auth"}"#).unwrap_err().message, "missing `payload`");
    }
}
