//! The AMQP envelope of NuroPb messages (spec §3): building `BasicProperties` for what we
//! publish and reading the five headers of what we receive. This is the only place that
//! knows how the headers are typed on the wire (long strings, `trace_id` void for `None`).
//!
//! lapin keeps header tables in a `BTreeMap`, so headers go out sorted by name
//! (`encrypted, nuropb_protocol, nuropb_type, nuropb_version, trace_id`, and
//! `x-nuropb-gateway` last when present) rather than in pika's insertion order. Receivers
//! index by name (§3: order is not significant).
//!
//! Requests and commands published on behalf of a WebSocket client carry one header
//! beyond nuropb's five, [`GATEWAY_HEADER`], naming the gateway that relayed them. nuropb
//! ignores unknown headers (§3, capture `extra_headers_and_fields`); gateways use it to
//! refuse their own privileged methods to client-relayed calls (see `service`).

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use nuropb_wire::mesh::{MeshHeaders, MessageType, PROTOCOL_VERSION, header};

/// `content_type` of every NuroPb message, encrypted or not.
pub(crate) const CONTENT_TYPE: &str = "application/json";

/// What a receiver copies into its reply when a request has no `trace_id` header (§3).
pub(crate) const UNKNOWN_TRACE_ID: &str = "unknown";

/// The header marking a request or command that a gateway published on behalf of one of
/// its WebSocket clients; its value (a long string) is that gateway's service name.
pub(crate) const GATEWAY_HEADER: &str = "x-nuropb-gateway";

/// Builds the property set of §3: content type, the five headers, correlation id and
/// reply-to always (`reply_to` is present but empty on events and responses), expiration
/// only for requests and commands. Nothing else is set: no delivery mode (transient
/// messages, like nuropb), no message id, no timestamp. `relayed_by` (the gateway's
/// service name, for calls made on behalf of a client) adds [`GATEWAY_HEADER`].
///
/// Fails only if a short string is too long, which the guard and config validation rule
/// out for everything the gateway builds itself.
pub(crate) fn properties(
    headers: &MeshHeaders,
    correlation_id: &str,
    reply_to: &str,
    expiration: Option<Duration>,
    relayed_by: Option<&str>,
) -> Result<BasicProperties, String> {
    let mut table = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    table.insert(header::PROTOCOL.into(), long(&headers.protocol));
    table.insert(header::VERSION.into(), long(&headers.version));
    table.insert(header::TYPE.into(), long(headers.message_type.as_str()));
    let trace = headers.trace_id.as_deref().map_or(AMQPValue::Void, long);
    table.insert(header::TRACE_ID.into(), trace);
    table.insert(header::ENCRYPTED.into(), long(headers.encrypted_value()));
    if let Some(gateway) = relayed_by {
        table.insert(GATEWAY_HEADER.into(), long(gateway));
    }

    let short = |what: &str, s: &str| {
        ShortString::try_new(s).map_err(|_| format!("{what} is longer than 255 bytes"))
    };
    let mut props = BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_headers(table)
        .with_correlation_id(short("correlation_id", correlation_id)?)
        .with_reply_to(short("reply_to", reply_to)?);
    if let Some(ttl) = expiration {
        props = props.with_expiration(ttl.as_millis().to_string().as_str().into());
    }
    Ok(props)
}

/// The `trace_id` header as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TraceHeader {
    /// No such header (a reply then carries `"unknown"`).
    Missing,
    /// Void (Python `None`).
    Void,
    Value(String),
}

impl TraceHeader {
    /// The value a reply carries, in the header and in the body (§5.4).
    pub(crate) fn for_reply(&self) -> Option<String> {
        match self {
            TraceHeader::Missing => Some(UNKNOWN_TRACE_ID.to_owned()),
            TraceHeader::Void => None,
            TraceHeader::Value(v) => Some(v.clone()),
        }
    }
}

/// The NuroPb headers of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboundHeaders {
    pub(crate) message_type: MessageType,
    pub(crate) trace_id: TraceHeader,
    pub(crate) encrypted: bool,
    /// [`GATEWAY_HEADER`]: the gateway that relayed this call for a client. Any value
    /// counts, whatever its type (a non-string one reads as `"?"`).
    pub(crate) relayed_by: Option<String>,
}

/// Reads and checks the headers the way nuropb's `decode_rmq_body` does: a headers table
/// must exist, `nuropb_protocol` must be `0.1.1` and `nuropb_type` one of the four types.
/// `Err` says what was wrong, for the log.
pub(crate) fn read_headers(props: &BasicProperties) -> Result<InboundHeaders, &'static str> {
    let table = props.headers().as_ref().ok_or("no headers table")?;
    let get = |key: &str| table.inner().get(key);
    match get(header::PROTOCOL).and_then(text) {
        Some(p) if p == PROTOCOL_VERSION => {}
        Some(_) => return Err("unsupported nuropb_protocol"),
        None => return Err("missing nuropb_protocol"),
    }
    let message_type = get(header::TYPE)
        .and_then(text)
        .and_then(|t| MessageType::parse(&t))
        .ok_or("missing or unknown nuropb_type")?;
    let trace_id = match get(header::TRACE_ID) {
        None => TraceHeader::Missing,
        Some(AMQPValue::Void) => TraceHeader::Void,
        // Any other type: treat like a missing header rather than refuse the message.
        Some(other) => text(other).map_or(TraceHeader::Missing, TraceHeader::Value),
    };
    let encrypted = get(header::ENCRYPTED)
        .and_then(text)
        .is_some_and(|v| v == nuropb_wire::mesh::ENCRYPTED_YES);
    let relayed_by = get(GATEWAY_HEADER).map(|v| text(v).unwrap_or_else(|| "?".to_owned()));
    Ok(InboundHeaders { message_type, trace_id, encrypted, relayed_by })
}

/// A header's string value: pika writes long strings; short strings are accepted too.
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::basic::parse_properties;

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // Raw content-header property lists published by pika (spec §14.2).
    const V01: &str = "a700106170706c69636174696f6e2f6a736f6e000000720f6e75726f70625f70726f746f636f6c5300000005302e312e310e6e75726f70625f76657273696f6e5300000005302e312e380b6e75726f70625f747970655300000007726571756573740874726163655f6964530000000a74726163652d6563686f09656e637279707465645300000000203462623837373162343837633430323739643534303163306132613735646661286e75726f70622d6e75726f70622d636170747572652d636c69656e742d636c69656e742d312d72710733363030303030";
    const V02: &str = "a700106170706c69636174696f6e2f6a736f6e000000640f6e75726f70625f70726f746f636f6c5300000005302e312e310e6e75726f70625f76657273696f6e5300000005302e312e380b6e75726f70625f747970655300000007726571756573740874726163655f69645609656e637279707465645300000000203130616566393432316237613430316239383964626632323563663963333061286e75726f70622d6e75726f70622d636170747572652d636c69656e742d636c69656e742d312d72710733363030303030";
    const V16: &str = "a600106170706c69636174696f6e2f6a736f6e0000007a0f6e75726f70625f70726f746f636f6c5300000005302e312e310e6e75726f70625f76657273696f6e5300000005302e312e380b6e75726f70625f7479706553000000056576656e740874726163655f6964530000001474726163652d6576656e745f7376635f70696e6709656e63727970746564530000000020663437306331626636323761346461663831633663386563643835346263383300";
    const V22: &str = "a700106170706c69636174696f6e2f6a736f6e000000810f6e75726f70625f70726f746f636f6c5300000005302e312e310e6e75726f70625f76657273696f6e5300000005302e312e380b6e75726f70625f747970655300000007726571756573740874726163655f6964530000001674726163652d7365637265745f656e6372797074656409656e637279707465645300000003796573203530323063303833613035313430306361656564363063663332363839323435286e75726f70622d6e75726f70622d636170747572652d636c69656e742d636c69656e742d312d72710733363030303030";

    /// Our properties equal, value for value and type for type, what pika published.
    fn check(raw: &str, ours: BasicProperties, flags: u16) {
        let bytes = unhex(raw);
        let (rest, theirs) = parse_properties(bytes.as_slice()).expect("parse vector");
        assert!(rest.is_empty());
        assert_eq!(theirs.bitmask(), flags);
        assert_eq!(ours.bitmask(), flags);
        assert_eq!(ours, theirs);
    }

    const CLIENT_RQ: &str = "nuropb-nuropb-capture-client-client-1-rq";

    #[test]
    fn request_properties_match_v01_v02_v22() {
        let hour = Some(Duration::from_secs(3600));
        let h = MeshHeaders::outgoing(MessageType::Request, Some("trace-echo".into()), false);
        check(
            V01,
            properties(&h, "4bb8771b487c40279d5401c0a2a75dfa", CLIENT_RQ, hour, None)
                .expect("props"),
            0xa700,
        );
        let h = MeshHeaders::outgoing(MessageType::Request, None, false);
        check(
            V02,
            properties(&h, "10aef9421b7a401b989dbf225cf9c30a", CLIENT_RQ, hour, None)
                .expect("props"),
            0xa700,
        );
        let h = MeshHeaders::outgoing(
            MessageType::Request,
            Some("trace-secret_encrypted".into()),
            true,
        );
        check(
            V22,
            properties(&h, "5020c083a051400caeed60cf32689245", CLIENT_RQ, hour, None)
                .expect("props"),
            0xa700,
        );
    }

    /// A client-relayed request is pika's request plus exactly one header: the marker, a
    /// long string. The five nuropb headers keep their values and types, and the property
    /// flag word is unchanged (the marker lives inside the headers table). So the vectors
    /// are compared with the marker taken out, and the marker is checked on its own.
    #[test]
    fn relayed_request_is_v01_plus_the_gateway_header() {
        let hour = Some(Duration::from_secs(3600));
        let h = MeshHeaders::outgoing(MessageType::Request, Some("trace-echo".into()), false);
        let cid = "4bb8771b487c40279d5401c0a2a75dfa";
        let marked = properties(&h, cid, CLIENT_RQ, hour, Some("gw-a")).expect("props");
        let mut table = marked.headers().clone().expect("headers");
        assert_eq!(table.inner().len(), 6);
        assert_eq!(
            table.inner().get(GATEWAY_HEADER),
            Some(&AMQPValue::LongString(LongString::from("gw-a")))
        );
        assert_eq!(
            table.inner().keys().last().map(|k| k.as_str()),
            Some(GATEWAY_HEADER),
            "lapin sorts the table: the marker goes last"
        );
        let mut without = FieldTable::default();
        for (key, value) in table.inner() {
            if key.as_str() != GATEWAY_HEADER {
                without.insert(key.clone(), value.clone());
            }
        }
        table = without;
        check(V01, marked.with_headers(table), 0xa700);
        assert_eq!(
            read_headers(&properties(&h, cid, CLIENT_RQ, hour, Some("gw-a")).expect("props"))
                .expect("valid")
                .relayed_by
                .as_deref(),
            Some("gw-a")
        );
    }

    #[test]
    fn event_properties_match_v16() {
        let h =
            MeshHeaders::outgoing(MessageType::Event, Some("trace-event_svc_ping".into()), false);
        check(
            V16,
            properties(&h, "f470c1bf627a4daf81c6c8ecd854bc83", "", None, None).expect("props"),
            0xa600,
        );
    }

    #[test]
    fn reads_headers_like_nuropb() {
        let bytes = unhex(V02);
        let (_, props) = parse_properties(bytes.as_slice()).expect("parse vector");
        let h = read_headers(&props).expect("valid");
        assert_eq!(h.message_type, MessageType::Request);
        assert_eq!(h.trace_id, TraceHeader::Void);
        assert!(!h.encrypted);
        assert_eq!(h.trace_id.for_reply(), None);
        assert_eq!(TraceHeader::Missing.for_reply().as_deref(), Some("unknown"));

        assert_eq!(read_headers(&BasicProperties::default()), Err("no headers table"));
        let with = |k: &str, v: &str| {
            let mut t = FieldTable::default();
            t.insert(header::PROTOCOL.into(), AMQPValue::LongString("0.1.1".into()));
            t.insert(header::TYPE.into(), AMQPValue::LongString("request".into()));
            t.insert(k.into(), AMQPValue::LongString(v.into()));
            BasicProperties::default().with_headers(t)
        };
        assert!(read_headers(&with(header::PROTOCOL, "9.9.9")).is_err());
        assert!(read_headers(&with(header::TYPE, "query")).is_err());
        let minimal = read_headers(&with("x-origin", "test")).expect("minimal headers are fine");
        assert_eq!(minimal.trace_id, TraceHeader::Missing);
        assert_eq!(minimal.relayed_by, None);
        assert_eq!(h.relayed_by, None, "pika's requests carry no marker");
        let relayed = read_headers(&with(GATEWAY_HEADER, "gw-b")).expect("valid");
        assert_eq!(relayed.relayed_by.as_deref(), Some("gw-b"));
        let mut odd = with("x", "y");
        if let Some(table) = odd.headers().clone() {
            let mut table = table;
            table.insert(GATEWAY_HEADER.into(), AMQPValue::Boolean(true));
            odd = odd.with_headers(table);
        }
        assert_eq!(
            read_headers(&odd).expect("valid").relayed_by.as_deref(),
            Some("?"),
            "any value marks"
        );
        assert!(read_headers(&with(header::ENCRYPTED, "yes")).expect("valid").encrypted);
    }
}
