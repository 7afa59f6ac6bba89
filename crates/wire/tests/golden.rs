//! Golden tests: the captured NuroPb traffic (spec §14, `spec/vectors/`) through the
//! mesh types and the Python JSON dialect, and byte-exact fixtures of the client protocol
//! (`tests/fixtures/server_frames/`).
//!
//! The spec vectors are the repository's `spec/vectors/` (captured traffic, kept byte for
//! byte; docs/NUROPB-WIRE.md §14). Fixtures are committed; after a deliberate change to
//! the client protocol, regenerate them with `NUROPB_BLESS=1 cargo test -p nuropb-wire --test
//! golden` and review the diff.

use std::collections::BTreeMap;
use std::path::Path;

use nuropb_wire::client::{
    ClientCall, ClientLimits, ClientMessage, Encoding, ErrorFrame, FrameErrorKind, ServerFrame,
    ServerMessage, decode_client_message, decode_server_frame, encode_server_frame,
};
use nuropb_wire::mesh::{
    DescribeResult, EventBody, MessageType, RequestBody, ResponseBody, ResponseOutcome, header,
};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::{Value, json};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/vectors.json");
const TRANSCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/ws_transcript.jsonl");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/server_frames");

fn read_vector(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "cannot read {path}: {e}\nThe NuroPb spec vectors are committed under the \
             repository's spec/vectors/."
        )
    })
}

fn vectors() -> Value {
    serde_json::from_slice(&read_vector(VECTORS)).expect("vectors.json is JSON")
}

/// The transcript's records, in order.
fn transcript() -> Vec<Value> {
    let text = String::from_utf8(read_vector(TRANSCRIPT)).expect("transcript is UTF-8");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("transcript line is JSON"))
        .collect()
}

/// One captured message body as it crossed the wire.
struct Captured {
    /// Where it comes from, for messages and the expectation tables below.
    origin: String,
    /// The AMQP headers table; `None` for the edge case that sent none.
    headers: Option<Value>,
    body: String,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name)?.as_str()
    }
}

/// Every body in vectors.json: the vectors, the dead letters, and what the edge cases sent
/// and received.
fn captured_bodies(v: &Value) -> Vec<Captured> {
    let mut out = Vec::new();
    let text = |x: &Value| x.as_str().expect("body is a string").to_owned();
    for vector in v["vectors"].as_array().expect("vectors[]") {
        let id = vector["id"].as_str().expect("id");
        for (i, m) in vector["messages"].as_array().expect("messages[]").iter().enumerate() {
            out.push(Captured {
                origin: format!("{id} message {i}"),
                headers: Some(m["properties"]["headers"].clone()),
                body: text(&m["body"]),
            });
        }
    }
    for dl in v["dead_letters"].as_array().expect("dead_letters[]") {
        out.push(Captured {
            origin: format!("dead letter {}", dl["n"]),
            headers: Some(dl["properties"]["headers"].clone()),
            body: text(&dl["body"]),
        });
    }
    for edge in v["edge_cases"].as_array().expect("edge_cases[]") {
        let case = edge["case"].as_str().expect("case");
        if let Some(body) = edge.get("sent_body") {
            let headers = Some(edge["sent_headers"].clone()).filter(|h| !h.is_null());
            out.push(Captured { origin: format!("edge {case} sent"), headers, body: text(body) });
        }
        for (i, reply) in edge["replies"].as_array().into_iter().flatten().enumerate() {
            out.push(Captured {
                origin: format!("edge {case} reply {i}"),
                headers: Some(reply["properties"]["headers"].clone()),
                body: text(&reply["body"]),
            });
        }
    }
    out
}

/// An encrypted body (§10): `<base64 key>.<base64 token>`, not JSON.
fn looks_encrypted(body: &str) -> bool {
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    };
    body.split_once('.').is_some_and(|(key, token)| b64(key) && b64(token))
}

/// Bodies in the capture that are deliberately not JSON (§7.5 edge cases).
const NOT_JSON: &[&str] = &["dead letter 24", "edge body_not_json sent"];
/// JSON bodies that are not NuroPb bodies (not an object).
const NOT_OBJECTS: &[&str] = &["dead letter 23", "edge body_not_object sent"];
/// Objects that break the body schema and so do not decode into the typed struct: nuropb-gw
/// 0.1.4 forwarded a WebSocket client's list `params` unchecked (§15.4); the service failed
/// with `TypeError` and dead-lettered it. §5.1 says `params` is an object (the service calls
/// `method(**params)`), our gateway refuses such frames, and `RequestBody` keeps the object
/// type.
const SCHEMA_VIOLATIONS: &[&str] = &["dead letter 16"];

/// Python JSON → `Value` → Python JSON gives back the captured bytes. Encrypted bodies
/// (`<b64>.<b64>` text under `encrypted: yes`, V22–V23b and one dead letter) are skipped:
/// they are not JSON; mesh-crypto's tests cover them. The plaintext event of V23b that
/// carries `encrypted: yes` (defect N9) is JSON and is checked.
#[test]
fn pyjson_reproduces_every_plain_body_byte_for_byte() {
    let v = vectors();
    let (mut exact, mut encrypted, mut not_json) = (0, 0, 0);
    for c in captured_bodies(&v) {
        if looks_encrypted(&c.body) {
            assert_eq!(c.header(header::ENCRYPTED), Some("yes"), "{}", c.origin);
            encrypted += 1;
            continue;
        }
        match from_python_json::<Value>(c.body.as_bytes()) {
            Ok(value) => {
                let again = to_python_json(&value).expect("encodes");
                assert_eq!(
                    String::from_utf8_lossy(&again),
                    c.body,
                    "{}: re-encoding changed the bytes",
                    c.origin
                );
                exact += 1;
            }
            Err(e) => {
                assert!(NOT_JSON.contains(&c.origin.as_str()), "{}: {e}: {}", c.origin, c.body);
                not_json += 1;
            }
        }
    }
    // The capture's server → client frames were written by nuropb-gw with the same encoder.
    for record in transcript() {
        if record["dir"] == "recv" {
            let text = record["text"].as_str().expect("frame text");
            let value: Value = from_python_json(text.as_bytes()).expect("frame is JSON");
            assert_eq!(String::from_utf8_lossy(&to_python_json(&value).expect("encodes")), text);
            exact += 1;
        }
    }
    assert_eq!(encrypted, 9, "encrypted bodies in the capture (V22 ×2, V23 ×3, V23b ×3, DL 9)");
    assert_eq!(not_json, NOT_JSON.len());
    assert!(exact > 100, "only {exact} bodies checked byte-for-byte");
}

/// A body decoded into its mesh type and encoded back.
enum Typed {
    Request(RequestBody),
    Event(EventBody),
    Response(ResponseBody),
}

impl Typed {
    fn decode(message_type: MessageType, body: &Value) -> Result<Typed, serde_json::Error> {
        let body = body.clone();
        Ok(match message_type {
            MessageType::Request | MessageType::Command => {
                let typed: RequestBody = serde_json::from_value(body)?;
                assert_eq!(typed.tag, message_type, "body tag and header disagree");
                Typed::Request(typed)
            }
            MessageType::Event => Typed::Event(serde_json::from_value(body)?),
            MessageType::Response => Typed::Response(serde_json::from_value(body)?),
        })
    }

    fn to_value(&self) -> Value {
        match self {
            Typed::Request(b) => serde_json::to_value(b),
            Typed::Event(b) => serde_json::to_value(b),
            Typed::Response(b) => serde_json::to_value(b),
        }
        .expect("encodes")
    }

    fn to_python_json(&self) -> Vec<u8> {
        match self {
            Typed::Request(b) => to_python_json(b),
            Typed::Event(b) => to_python_json(b),
            Typed::Response(b) => to_python_json(b),
        }
        .expect("encodes")
    }
}

/// Bodies whose typed round trip legitimately differs from the original: (origin, keys the
/// struct drops, keys it adds with their defaults).
const EXPECTED_DIFFS: &[(&str, &[&str], &[&str])] = &[
    // A hand-built body with an unknown extra key: ignored on decode, as nuropb ignores it.
    ("edge extra_headers_and_fields sent", &["unknown_field"], &[]),
    // Hand-built bodies without correlation_id, context and trace_id (the `missing_context`
    // case; nuropb answered `KeyError: 'context'` and dead-lettered it): they decode with
    // defaults, which re-encoding writes out.
    ("edge missing_context sent", &[], &["correlation_id", "context", "trace_id"]),
    ("dead letter 20", &[], &["correlation_id", "context", "trace_id"]),
];

/// Key order of the serialized structs (nuropb's order for requests/commands, for
/// `publish_event` events and for successful responses).
const REQUEST_ORDER: &[&str] =
    &["tag", "service", "method", "params", "correlation_id", "context", "trace_id"];

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default()
}

/// Every captured NuroPb body decodes into the type its `nuropb_type` header names and
/// re-encodes to the same JSON value (no field lost); where the capture's key order is the
/// struct's, to the same bytes.
#[test]
fn mesh_bodies_decode_into_their_types_without_loss() {
    let v = vectors();
    let mut checked = 0;
    let mut byte_identical = 0;
    let mut diffs_seen = Vec::new();
    let mut violations = 0;
    for c in captured_bodies(&v) {
        if looks_encrypted(&c.body) {
            continue; // See `pyjson_reproduces_every_plain_body_byte_for_byte`.
        }
        let Ok(original) = from_python_json::<Value>(c.body.as_bytes()) else {
            assert!(NOT_JSON.contains(&c.origin.as_str()), "{}", c.origin);
            continue;
        };
        if !original.is_object() {
            assert!(NOT_OBJECTS.contains(&c.origin.as_str()), "{}", c.origin);
            assert!(serde_json::from_value::<RequestBody>(original).is_err(), "{}", c.origin);
            continue;
        }
        // The header decides; two §7.5 edge cases have no usable one (`nuropb_type` "query",
        // no headers table at all) and fall back to the body tag, which is "request".
        let message_type = match c.header(header::TYPE).and_then(MessageType::parse) {
            Some(t) => t,
            None => {
                assert!(
                    ["edge unknown_type sent", "edge no_headers sent", "dead letter 22"]
                        .contains(&c.origin.as_str()),
                    "{}: no usable nuropb_type header",
                    c.origin
                );
                MessageType::parse(original["tag"].as_str().unwrap_or_default())
                    .expect("body tag is a message type")
            }
        };
        if SCHEMA_VIOLATIONS.contains(&c.origin.as_str()) {
            let err = Typed::decode(message_type, &original).err().expect("rejected");
            assert!(err.to_string().contains("expected a map"), "{}: {err}", c.origin);
            violations += 1;
            continue;
        }
        let typed = Typed::decode(message_type, &original)
            .unwrap_or_else(|e| panic!("{}: does not decode as {message_type:?}: {e}", c.origin));
        let again = typed.to_value();

        let (orig_obj, again_obj) = (original.as_object(), again.as_object());
        let (orig_obj, again_obj) = (orig_obj.expect("object"), again_obj.expect("object"));
        let lost: Vec<&str> =
            orig_obj.keys().filter(|k| !again_obj.contains_key(*k)).map(String::as_str).collect();
        let added: Vec<&str> =
            again_obj.keys().filter(|k| !orig_obj.contains_key(*k)).map(String::as_str).collect();
        for (key, value) in orig_obj {
            if let Some(after) = again_obj.get(key) {
                assert_eq!(after, value, "{}: `{key}` changed", c.origin);
            }
        }
        match EXPECTED_DIFFS.iter().find(|(origin, ..)| *origin == c.origin) {
            Some((_, want_lost, want_added)) => {
                assert_eq!((&lost[..], &added[..]), (*want_lost, *want_added), "{}", c.origin);
                diffs_seen.push(c.origin.clone());
            }
            None => assert_eq!(again, original, "{}: lost {lost:?}, added {added:?}", c.origin),
        }

        if keys(&original) == keys(&again) {
            assert_eq!(
                String::from_utf8_lossy(&typed.to_python_json()),
                c.body,
                "{}: same key order but different bytes",
                c.origin
            );
            byte_identical += 1;
        }
        // Requests and commands from RMQAPI must come out in nuropb's key order.
        if c.origin.starts_with('V') && matches!(typed, Typed::Request(_)) {
            assert_eq!(keys(&original), REQUEST_ORDER, "{}", c.origin);
        }
        checked += 1;
    }
    let mut expected_diffs: Vec<&str> = EXPECTED_DIFFS.iter().map(|(o, ..)| *o).collect();
    expected_diffs.sort_unstable();
    diffs_seen.sort_unstable();
    assert_eq!(diffs_seen, expected_diffs, "every expected difference was seen");
    assert_eq!(violations, SCHEMA_VIOLATIONS.len());
    assert!(checked > 25, "only {checked} bodies checked");
    assert!(byte_identical > 25, "only {byte_identical} bodies re-encoded byte-for-byte");
}

/// Response bodies the capture recorded already decoded (the edge cases' echo checks and the
/// gateway's own answers in the WebSocket transcript), and the describe results among them.
#[test]
fn recorded_responses_and_describe_results() {
    let mut responses: Vec<(String, Value)> = Vec::new();
    for edge in vectors()["edge_cases"].as_array().expect("edge_cases[]") {
        if edge["response"].is_object() {
            responses.push((format!("edge {}", edge["case"]), edge["response"].clone()));
        }
    }
    for record in transcript() {
        if record["response"].is_object() {
            responses.push((format!("transcript {}", record["text"]), record["response"].clone()));
        }
    }
    let mut describes = 0;
    for (origin, original) in &responses {
        let typed: ResponseBody =
            serde_json::from_value(original.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
        assert_eq!(typed.tag, MessageType::Response);
        assert_eq!(&serde_json::to_value(&typed).expect("encodes"), original, "{origin}");
        // The requester's lean reading keeps exactly the body's `result` and `error`.
        let bytes = to_python_json(original).expect("encodes");
        let lean: ResponseOutcome =
            from_python_json(&bytes).unwrap_or_else(|e| panic!("{origin}: {e}"));
        assert_eq!((&lean.result, &lean.error), (&typed.result, &typed.error), "{origin}");
        if typed.result.get("encrypted_methods").is_some() {
            let describe: DescribeResult = serde_json::from_value(typed.result.clone())
                .unwrap_or_else(|e| panic!("{origin}: {e}"));
            assert_eq!(serde_json::to_value(&describe).expect("encodes"), typed.result);
            assert_eq!(describe.service_name.as_deref(), Some("capture-gw"));
            assert_eq!((describe.service_version, describe.public_key), (None, None));
            describes += 1;
        }
    }
    assert_eq!(describes, 1, "the gateway's describe answer");
    // The edge cases' echo checks that got an answer plus the two gateway answers in the
    // transcript; counted exactly so that a changed capture is noticed.
    assert_eq!(responses.len(), 11, "recorded responses");

    // And every describe result among the captured bodies (V13, the WebSocket describe).
    let v = vectors();
    let mut found = 0;
    for c in captured_bodies(&v) {
        let Ok(body) = from_python_json::<ResponseBody>(c.body.as_bytes()) else { continue };
        if body.tag == MessageType::Response && body.result.get("encrypted_methods").is_some() {
            let describe: DescribeResult = serde_json::from_value(body.result.clone())
                .unwrap_or_else(|e| panic!("{}: {e}", c.origin));
            assert_eq!(serde_json::to_value(&describe).expect("encodes"), body.result);
            found += 1;
        }
    }
    assert!(found >= 1, "V13 carries a describe result");
}

/// The frames the capture's clients sent (C→S) and what our decoder makes of them. nuropb-gw
/// 0.1.4 silently ignored frames without `type`, without `payload` or with `type` "command"
/// (G6); we answer them: missing type/payload → error, command → `Command`. It also sent a
/// `null` trace id verbatim to the mesh (G7); we treat it as absent (the gateway generates
/// one) so responses stay distinguishable.
#[test]
fn transcript_client_frames() {
    enum Want {
        Request(&'static str, &'static str, Option<&'static str>),
        Command(&'static str, &'static str, Option<&'static str>),
        Error(FrameErrorKind, &'static str),
    }
    use FrameErrorKind::{Decode, Invalid};
    use Want::{Command, Error, Request};
    let expected = [
        Request("capture-svc", "whoami", Some("ws-cookie-whoami")),
        Request("capture-svc", "echo", Some("ws-echo-1")),
        Request("capture-svc", "add", None),
        Request("capture-svc", "fail", Some("ws-fail")),
        Request("capture-svc", "does_not_exist", Some("ws-unknown-method")),
        Request("no-such-svc", "echo", Some("ws-unknown-service")),
        Request("capture-svc", "whoami", Some("ws-whoami")),
        Request("capture-svc", "needs_token", Some("ws-needs-token")),
        Request("capture-svc", "nuropb_describe", Some("ws-describe")),
        // The rest of the message is serde_json's and may change between its versions.
        Error(Decode, "frame is not valid JSON: "),
        Error(Invalid, "frame must be a JSON object, got array"),
        Error(Invalid, "missing `payload`"),
        Error(Invalid, "missing `type`"),
        Command("capture-svc", "note", None),
        Error(Invalid, "missing `payload.method`"),
        Error(Invalid, "missing `payload.params`"),
        Error(Invalid, "`payload.params` must be an object, got array"),
        Request("capture-svc", "echo", None),
        Request("capture-svc", "echo", Some("ws-extra")),
        Request("capture-svc", "sleep", Some("ws-pipe-sleep")),
        Request("capture-svc", "echo", Some("ws-pipe-echo")),
        Request("capture-svc", "emit", Some("ws-emit")),
    ];
    let sent: Vec<String> = transcript()
        .iter()
        .filter(|r| r["dir"] == "send")
        .map(|r| r["text"].as_str().expect("frame text").to_owned())
        .collect();
    assert_eq!(sent.len(), expected.len(), "C->S frames in the transcript");

    let limits = ClientLimits::default();
    for (frame, want) in sent.iter().zip(expected) {
        let got = decode_client_message(frame.as_bytes(), Encoding::Json, &limits);
        let original: Option<Value> = serde_json::from_str(frame).ok();
        let params = || -> JsonObject {
            let p = &original.as_ref().expect("JSON")["payload"]["params"];
            p.as_object().cloned().expect("params object")
        };
        let call = |service: &str, method: &str, trace: Option<&str>| ClientCall {
            service: service.into(),
            method: method.into(),
            params: params(),
            trace_id: trace.map(Into::into),
            traceparent: None,
        };
        match (want, got) {
            (Request(s, m, t), Ok(ClientMessage::Request(c))) => assert_eq!(c, call(s, m, t)),
            (Command(s, m, t), Ok(ClientMessage::Command(c))) => assert_eq!(c, call(s, m, t)),
            (Error(Decode, prefix), Err(e)) => {
                assert_eq!(e.kind, Decode, "{frame}");
                assert!(e.message.starts_with(prefix), "{frame}: {e}");
                assert_eq!(e.trace_id, None, "{frame}");
            }
            (Error(kind, message), Err(e)) => {
                assert_eq!((e.kind, e.message.as_str()), (kind, message), "{frame}");
                assert_eq!(e.trace_id, None, "{frame}");
            }
            (_, got) => panic!("{frame}: unexpected {got:?}"),
        }
    }
}

/// Every server → client frame nuropb-gw sent decodes into our `ServerFrame` and, written
/// with Python's encoder, gives back the same bytes: our frame types carry exactly the
/// fields and key order of the original protocol (§15.3).
#[test]
fn transcript_server_frames_fit_our_types() {
    let mut seen = BTreeMap::<&str, usize>::new();
    for record in transcript() {
        if record["dir"] != "recv" {
            continue;
        }
        let text = record["text"].as_str().expect("frame text");
        let frame = decode_server_frame(text.as_bytes(), Encoding::Json)
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let kind = match &frame {
            ServerFrame::Message(ServerMessage::Event { .. }) => "event",
            ServerFrame::Message(ServerMessage::Response { .. }) => "response",
            ServerFrame::Error(_) => "error",
            ServerFrame::Message(_) | ServerFrame::Reply(_) => "other",
        };
        *seen.entry(kind).or_default() += 1;
        assert_eq!(String::from_utf8_lossy(&to_python_json(&frame).expect("encodes")), text);
    }
    let counts: Vec<(&str, usize)> = seen.into_iter().collect();
    assert_eq!(counts, [("error", 4), ("event", 5), ("response", 15)]);
}

/// The frames pinned by fixtures: name → frame.
fn fixture_frames() -> Vec<(&'static str, ServerFrame)> {
    use ServerMessage::{Accepted, Event, Pong, Response, Subscribed};
    let msg = ServerFrame::Message;
    vec![
        (
            "hello",
            msg(Event {
                topic: "hello".into(),
                event: json!({
                    "session_id": "9bee595d50294ce5a519c82353d5dcbf",
                    "user_id": "alice-id",
                    "username": "alice@example.com",
                }),
            }),
        ),
        (
            "response_result",
            msg(Response {
                trace_id: Some("ws-echo-1".into()),
                result: json!({"text": "hi", "n": 1}),
                error: None,
            }),
        ),
        (
            "response_error",
            msg(Response {
                trace_id: Some("ws-fail".into()),
                result: Value::Null,
                error: Some(ErrorObject::new(
                    "NuropbException",
                    "Runtime exception calling capture-svc.fail:ValueError: boom over ws",
                )),
            }),
        ),
        (
            "response_generated_trace_id",
            msg(Response {
                trace_id: Some("77b9632019794dba8c5ea22a15ac78e1".into()),
                result: json!(42),
                error: None,
            }),
        ),
        ("accepted", msg(Accepted { trace_id: Some("ws-note-1".into()) })),
        (
            "subscribed",
            msg(Subscribed { topics: vec!["capture.gw.#".into(), "user.alice-id.*".into()] }),
        ),
        ("pong", msg(Pong {})),
        (
            "error",
            ServerFrame::Error(ErrorFrame {
                error: "DecodeError".into(),
                description: "frame is not valid JSON: expected ident at line 1 column 2".into(),
                trace_id: None,
                id: None,
            }),
        ),
        (
            "error_with_trace_id",
            ServerFrame::Error(ErrorFrame {
                error: "NuropbValidationError".into(),
                description: "missing `payload.params`".into(),
                trace_id: Some("ws-7".into()),
                id: None,
            }),
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).expect("ASCII");
            u8::from_str_radix(pair, 16).unwrap_or_else(|e| panic!("bad hex {pair:?}: {e}"))
        })
        .collect()
}

/// Each server frame encodes to exactly the committed JSON and MessagePack bytes, and the
/// committed bytes decode back to the frame.
#[test]
fn server_frame_fixtures() {
    let bless = std::env::var_os("NUROPB_BLESS").is_some();
    for (name, frame) in fixture_frames() {
        let json_path = Path::new(FIXTURES).join(format!("{name}.json"));
        let hex_path = Path::new(FIXTURES).join(format!("{name}.msgpack.hex"));
        let json = encode_server_frame(&frame, Encoding::Json).expect("encodes");
        let msgpack = encode_server_frame(&frame, Encoding::MessagePack).expect("encodes");
        if bless {
            std::fs::create_dir_all(FIXTURES).expect("fixture directory");
            std::fs::write(&json_path, &json).expect("writes fixture");
            std::fs::write(&hex_path, format!("{}\n", to_hex(&msgpack))).expect("writes fixture");
        }
        let read = |path: &Path| {
            std::fs::read(path).unwrap_or_else(|e| {
                panic!("cannot read fixture {}: {e} (NUROPB_BLESS=1 writes it)", path.display())
            })
        };
        let want_json = read(&json_path);
        let want_msgpack = from_hex(&String::from_utf8(read(&hex_path)).expect("hex is text"));
        assert_eq!(
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&want_json),
            "{name}: JSON drifted from {}",
            json_path.display()
        );
        assert_eq!(to_hex(&msgpack), to_hex(&want_msgpack), "{name}: MessagePack drifted");
        assert_eq!(decode_server_frame(&want_json, Encoding::Json), Ok(frame.clone()), "{name}");
        assert_eq!(
            decode_server_frame(&want_msgpack, Encoding::MessagePack),
            Ok(frame.clone()),
            "{name}"
        );
    }
}

/// The hello frame is the one of spec §15.3a, key for key.
#[test]
fn hello_fixture_is_the_spec_frame() {
    let spec = r#"{"type": "event", "payload": {"topic": "hello", "event": {"session_id": "9bee595d50294ce5a519c82353d5dcbf", "user_id": "alice-id", "username": "alice@example.com"}}}"#;
    let (_, hello) = fixture_frames().into_iter().find(|(n, _)| *n == "hello").expect("hello");
    assert_eq!(String::from_utf8_lossy(&to_python_json(&hello).expect("encodes")), spec);
}

/// Event bodies carry what a subscriber's `_handle_event_` received (`service_events`).
#[test]
fn service_events_match_captured_event_bodies() {
    let v = vectors();
    let events: Vec<EventBody> = captured_bodies(&v)
        .iter()
        .filter(|c| c.header(header::TYPE) == Some("event"))
        .filter_map(|c| from_python_json(c.body.as_bytes()).ok())
        .collect();
    let mut matched = 0;
    for received in v["service_events"].as_array().expect("service_events[]") {
        let found = events.iter().any(|e| {
            received["topic"] == e.topic.as_str()
                && e.event == received["event"]
                && serde_json::to_value(&e.target).ok().as_ref() == Some(&received["target"])
                && Value::Object(e.context.clone()) == received["context"]
        });
        // `capture.anything.broadcast` was published by the capture without a spy copy.
        if found {
            matched += 1;
        } else {
            assert_eq!(received["topic"], "capture.anything.broadcast", "{received}");
        }
    }
    assert_eq!(matched, 3);
}
