//! End-to-end: real WebSocket clients over loopback against the core + WebSocket adapter on
//! the in-memory mesh. Client protocol, auth at the upgrade, concurrency, events, limits.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::time::Duration;

use e2e_tests::{Client, Gateway, Options, SECRET, token, token_with};
use futures_util::SinkExt;
use handler_core::mesh::GatewayControl;
use handler_core::{MeshEvent, UserId};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

fn is_hex32(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
}

#[tokio::test]
async fn hello_frame_has_the_original_shape() {
    let gw = Gateway::start().await;
    let (_c, hello) = gw.connect("alice").await;
    assert_eq!(hello["type"], "event");
    assert_eq!(hello["payload"]["topic"], "hello");
    let event = &hello["payload"]["event"];
    assert!(is_hex32(&event["session_id"]), "{hello}");
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["username"], "alice@example.com");
    // `expires_at`: the token's `exp` (`token` gives 600 s; the e2e gateway has no leeway).
    let now = jsonwebtoken::get_current_timestamp();
    let expires_at = event["expires_at"].as_u64().expect("expires_at is a number");
    assert!((now + 590..=now + 600).contains(&expires_at), "{hello}");
    assert_eq!(event.as_object().unwrap().len(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn request_round_trip_and_generated_trace_id() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.request("svc", "echo", json!({"text": "hi", "n": 1}), "t-1").await;
    let r = c.recv_json().await;
    assert_eq!(
        r,
        json!({"type": "response", "payload": {"trace_id": "t-1", "result": {"text": "hi", "n": 1}, "error": null}})
    );

    c.send_json(
        &json!({"type": "request", "payload": {"service": "svc", "method": "echo", "params": {}}}),
    )
    .await;
    let r = c.recv_json().await;
    assert!(is_hex32(&r["payload"]["trace_id"]), "generated trace id: {r}");

    c.request("svc", "fail", json!({}), "t-fail").await;
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["error"]["error"], "NuropbException");
    assert_eq!(r["payload"]["result"], Value::Null);

    c.request("svc", "nope", json!({}), "t-unknown-method").await;
    let r = c.recv_json().await;
    assert_eq!(
        r["payload"]["error"],
        json!({"error": "NuropbHandlingError", "description": "Unknown method nope"})
    );

    c.request("nosvc", "echo", json!({}), "t-unknown-service").await;
    let r = c.recv_json().await;
    assert_eq!(
        r["payload"]["error"],
        json!({"error": "NuropbNotDeliveredError", "description": "Service nosvc not available. unable to call method echo"})
    );
    gw.stop().await;
}

#[tokio::test]
async fn context_is_built_by_the_gateway_never_by_the_client() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.send_json(&json!({
        "type": "request",
        "payload": {"service": "svc", "method": "whoami", "params": {}, "trace_id": "w", "context": {"user_id": "mallory"}},
        "context": {"user_id": "mallory"},
    }))
    .await;
    let r = c.recv_json().await;
    let ctx = &r["payload"]["result"];
    assert_eq!(ctx["user_id"], "alice");
    assert_eq!(ctx["Authorization"], format!("Bearer {}", token_for_check(&r)));
    assert_eq!(ctx["trace_id"], "w");
    gw.stop().await;
}

#[tokio::test]
async fn an_upgrade_traceparent_is_every_calls_trace_with_a_parent_id_of_its_own() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let gw = Gateway::start().await;
    let auth = format!("Bearer {}", token("alice"));
    let mut c = Client::connect(&gw.url, &[("Authorization", &auth), ("traceparent", TP)])
        .await
        .expect("connect");
    assert_eq!(c.recv_json().await["payload"]["topic"], "hello");
    let whoami = |trace: &str| json!({"type": "request", "payload": {"service": "svc", "method": "whoami", "params": {}, "trace_id": trace}});
    let mut parents = std::collections::HashSet::new();
    for trace in ["a", "b"] {
        c.send_json(&whoami(trace)).await;
        let r = c.recv_json().await;
        assert_eq!(r["payload"]["trace_id"], trace, "the client's trace id comes back: {r}");
        let mesh_trace = r["payload"]["result"]["trace_id"].as_str().unwrap().to_owned();
        assert_eq!(mesh_trace.len(), 55, "{mesh_trace}");
        assert_eq!(&mesh_trace[..36], &TP[..36], "same version and trace-id: {mesh_trace}");
        assert_eq!(&mesh_trace[52..], "-01", "same flags: {mesh_trace}");
        assert_ne!(&mesh_trace[36..52], &TP[36..52], "a parent-id of the call's own");
        parents.insert(mesh_trace[36..52].to_owned());
    }
    assert_eq!(parents.len(), 2, "each call its own parent-id");
    // A traceparent in the frame wins over the session's.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    c.send_json(&json!({"type": "request", "payload": {"service": "svc", "method": "whoami", "params": {}, "trace_id": "c", "traceparent": own}})).await;
    assert_eq!(c.recv_json().await["payload"]["result"]["trace_id"], own);

    // An invalid header is ignored: the calls carry the client's trace id as before.
    let mut c = Client::connect(&gw.url, &[("Authorization", &auth), ("traceparent", "00-zz")])
        .await
        .expect("an invalid traceparent header does not refuse the upgrade");
    assert_eq!(c.recv_json().await["payload"]["topic"], "hello");
    c.send_json(&whoami("plain")).await;
    assert_eq!(c.recv_json().await["payload"]["result"]["trace_id"], "plain");
    gw.stop().await;
}

/// The Authorization context value must carry the very token the client connected with;
/// the test re-derives nothing, so it reads it back from the context.
fn token_for_check(r: &Value) -> String {
    let auth = r["payload"]["result"]["Authorization"].as_str().unwrap();
    let token = auth.strip_prefix("Bearer ").expect("Bearer prefix");
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &jsonwebtoken::Validation::default(),
    )
    .expect("the forwarded token is the client's valid token");
    assert_eq!(claims.claims["sub"], "alice");
    token.to_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_out_of_order() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.request("svc", "sleep", json!({"ms": 600}), "slow").await;
    c.request("svc", "echo", json!({"fast": true}), "fast").await;
    c.request("svc", "sleep", json!({"ms": 200}), "medium").await;
    let order: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let r = c.recv_json().await;
            v.push(r["payload"]["trace_id"].as_str().unwrap().to_owned());
        }
        v
    };
    assert_eq!(order, ["fast", "medium", "slow"]);
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_never_reaches_the_mesh() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    let deep_params = format!(
        r#"{{"type":"request","payload":{{"service":"svc","method":"echo","params":{{"a":{}1{}}}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let long_trace = format!(
        r#"{{"type":"request","payload":{{"service":"svc","method":"echo","params":{{}},"trace_id":"{}"}}}}"#,
        "x".repeat(200_000)
    );
    let long_name = format!(
        r#"{{"type":"request","payload":{{"service":"{}","method":"echo","params":{{}}}}}}"#,
        "s".repeat(300)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("not json", "this is not json".into(), "not valid JSON"),
        ("array", "[1, 2, 3]".into(), "must be a JSON object"),
        ("missing type", r#"{"payload": {}}"#.into(), "missing `type`"),
        ("unknown type", r#"{"type": "query", "payload": {}}"#.into(), "unknown `type`"),
        ("missing payload", r#"{"type": "request"}"#.into(), "missing `payload`"),
        ("missing method", r#"{"type":"request","payload":{"service":"svc","params":{}}}"#.into(), "payload.method"),
        ("missing params", r#"{"type":"request","payload":{"service":"svc","method":"echo"}}"#.into(), "payload.params"),
        ("params list", r#"{"type":"request","payload":{"service":"svc","method":"echo","params":[1,2]}}"#.into(), "must be an object, got array"),
        ("service number", r#"{"type":"request","payload":{"service":5,"method":"echo","params":{}}}"#.into(), "payload.service"),
        ("trace number", r#"{"type":"request","payload":{"service":"svc","method":"echo","params":{},"trace_id":7}}"#.into(), "payload.trace_id"),
        ("trace object", r#"{"type":"request","payload":{"service":"svc","method":"echo","params":{},"trace_id":{"a":1}}}"#.into(), "payload.trace_id"),
        ("trace 200 KB", long_trace, "payload.trace_id"),
        ("deep array", deep, ""),
        ("deep params", deep_params, ""),
        ("long service", long_name, "payload.service"),
    ];
    for (name, frame, needle) in &cases {
        c.send_text(frame).await;
        let r = c.recv_json().await;
        let description = r["description"]
            .as_str()
            .or_else(|| r["payload"]["error"]["description"].as_str())
            .unwrap_or_else(|| panic!("case {name}: no error in {r}"));
        assert!(description.contains(needle), "case {name}: {description:?} lacks {needle:?}");
    }
    // A request with a valid trace id gets its error as a response the client can match.
    c.send_text(r#"{"type":"request","payload":{"service":"svc","method":"echo","params":"x","trace_id":"bad-1"}}"#).await;
    let r = c.recv_json().await;
    assert_eq!(r["type"], "response");
    assert_eq!(r["payload"]["trace_id"], "bad-1");
    assert_eq!(r["payload"]["error"]["error"], "NuropbValidationError");
    // Binary garbage is bad MessagePack.
    c.send_binary(vec![0xc1, 0xff, 0x00]).await;
    let r = c.recv_msgpack().await;
    assert!(r["description"].as_str().unwrap().contains("MessagePack"), "{r}");

    assert_eq!(gw.mesh_calls(), 0, "bad input reached the mesh");
    // The connection is still usable.
    c.request("svc", "echo", json!({"still": "alive"}), "after").await;
    assert_eq!(c.recv_json().await["payload"]["result"], json!({"still": "alive"}));
    assert_eq!(gw.mesh_calls(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn messagepack_in_messagepack_out() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    let frame = json!({"type": "request", "payload": {"service": "svc", "method": "echo", "params": {"bin": [1, 2, 3], "s": "é"}, "trace_id": "mp"}});
    c.send_binary(rmp_serde::to_vec_named(&frame).unwrap()).await;
    let r = c.recv_msgpack().await;
    assert_eq!(
        r,
        json!({"type": "response", "payload": {"trace_id": "mp", "result": {"bin": [1, 2, 3], "s": "é"}, "error": null}})
    );
    // Text in, text out, on the same connection.
    c.request("svc", "echo", json!({"x": 1}), "js").await;
    assert_eq!(c.recv_json().await["payload"]["trace_id"], "js");
    gw.stop().await;
}

fn http_status(e: &tungstenite::Error) -> Option<u16> {
    match e {
        tungstenite::Error::Http(r) => Some(r.status().as_u16()),
        _ => None,
    }
}

#[tokio::test]
async fn refused_tokens_get_401_at_the_upgrade() {
    let gw = Gateway::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("garbage", vec![("Authorization", "Bearer not-a-token".into())]),
        (
            "expired",
            vec![(
                "Authorization",
                format!("Bearer {}", token_with(json!({"sub": "a", "exp": now - 3600}), SECRET)),
            )],
        ),
        (
            "wrong secret",
            vec![(
                "Authorization",
                format!(
                    "Bearer {}",
                    token_with(json!({"sub": "a", "exp": now + 60}), "another-secret-0123456789")
                ),
            )],
        ),
    ];
    for (name, headers) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = Client::connect(&gw.url, &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: connected"));
        assert_eq!(http_status(&err), Some(401), "{name}: {err}");
    }
    // A cookie works as the original allowed.
    let cookie = format!("Authorization={}", token("bob"));
    let mut c = Client::connect(&gw.url, &[("Cookie", &cookie)]).await.expect("cookie auth");
    assert_eq!(c.recv_json().await["payload"]["event"]["user_id"], "bob");
    gw.stop().await;

    // No credentials at all: 401 when the first-frame route is off.
    let mut options = Options::default();
    options.ws.auth_timeout = Duration::ZERO;
    let gw = Gateway::start_with(options).await;
    let err = Client::connect(&gw.url, &[]).await.err().expect("no credentials: connected");
    assert_eq!(http_status(&err), Some(401), "{err}");
    gw.stop().await;
}

#[tokio::test]
async fn origins_are_matched_on_a_dot_boundary() {
    let gw = Gateway::start().await;
    let auth = format!("Bearer {}", token("alice"));
    for (origin, ok) in [
        ("https://app.example.com", true),
        ("https://example.com", true),
        ("https://evil-example.com", false),
        ("https://example.org", false),
    ] {
        let r = Client::connect(&gw.url, &[("Authorization", &auth), ("Origin", origin)]).await;
        match (ok, r) {
            (true, Ok(_)) => {}
            (false, Err(e)) => assert_eq!(http_status(&e), Some(403), "{origin}: {e}"),
            (true, Err(e)) => panic!("{origin} refused: {e}"),
            (false, Ok(_)) => panic!("{origin} accepted"),
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn request_timeout_answers_with_an_error() {
    let gw = Gateway::start_with(Options {
        request_timeout: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let (mut c, _) = gw.connect("alice").await;
    c.request("svc", "never", json!({}), "stuck").await;
    c.request("svc", "echo", json!({}), "ok").await;
    assert_eq!(c.recv_json().await["payload"]["trace_id"], "ok", "a stuck request blocks nothing");
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "stuck");
    assert_eq!(r["payload"]["error"]["error"], "NuropbTimeoutError");
    assert_eq!(gw.handle.stats().requests_timed_out, 1);
    gw.stop().await;
}

#[tokio::test]
async fn in_flight_limit_per_connection() {
    let gw = Gateway::start_with(Options { max_in_flight: 2, ..Options::default() }).await;
    let (mut c, _) = gw.connect("alice").await;
    for t in ["a", "b", "c"] {
        c.request("svc", "sleep", json!({"ms": 300}), t).await;
    }
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "c");
    assert_eq!(r["payload"]["error"]["error"], "NuropbOverloadedError");
    let mut rest = [c.recv_json().await, c.recv_json().await];
    rest.sort_by_key(|r| r["payload"]["trace_id"].as_str().unwrap().to_owned());
    assert_eq!(rest[0]["payload"]["result"], json!({"slept_ms": 300}));
    assert_eq!(rest[1]["payload"]["trace_id"], "b");
    gw.stop().await;
}

#[tokio::test]
async fn events_reach_targets_subscribers_and_broadcast() {
    let gw = Gateway::start().await;
    let (mut alice1, _) = gw.connect("alice").await;
    let (mut alice2, _) = gw.connect("alice").await;
    let (mut bob, _) = gw.connect("bob").await;

    bob.send_json(&json!({"type": "subscribe", "payload": {"topics": ["news.*"]}})).await;
    assert_eq!(
        bob.recv_json().await,
        json!({"type": "subscribed", "payload": {"topics": ["news.*"]}})
    );

    let event = |topic: &str, target: Option<Vec<&str>>| MeshEvent {
        topic: topic.into(),
        event: json!({"topic_was": topic}),
        target: target.map(|t| t.into_iter().map(UserId::new).collect()),
        context: Default::default(),
        trace_id: None,
    };
    gw.mesh.inject_event(event("private.note", Some(vec!["alice"]))).await.unwrap();
    for c in [&mut alice1, &mut alice2] {
        assert_eq!(
            c.recv_json().await,
            json!({"type": "event", "payload": {"topic": "private.note", "event": {"topic_was": "private.note"}}})
        );
    }
    gw.mesh.inject_event(event("news.sport", None)).await.unwrap();
    assert_eq!(bob.recv_json().await["payload"]["topic"], "news.sport");
    gw.mesh.inject_event(event("broadcast.all", None)).await.unwrap();
    for c in [&mut alice1, &mut alice2, &mut bob] {
        assert_eq!(c.recv_json().await["payload"]["topic"], "broadcast.all");
    }
    // Nothing else arrived: bob got no private note, alice no news.
    for c in [&mut alice1, &mut alice2, &mut bob] {
        c.expect_silence(Duration::from_millis(200)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn mesh_control_pushes_and_disconnects_users() {
    let gw = Gateway::start().await;
    let (mut alice1, _) = gw.connect("alice").await;
    let (mut alice2, _) = gw.connect("alice").await;
    let (mut bob, _) = gw.connect("bob").await;
    gw.mesh
        .inject_control(GatewayControl::PushToUsers {
            user_ids: vec![UserId::new("bob")],
            topic: "notice".into(),
            event: json!("hi bob"),
        })
        .await
        .unwrap();
    assert_eq!(bob.recv_json().await["payload"]["event"], "hi bob");
    gw.mesh
        .inject_control(GatewayControl::DisconnectUsers {
            user_ids: vec![UserId::new("alice")],
            reason: "bye".into(),
        })
        .await
        .unwrap();
    for c in [&mut alice1, &mut alice2] {
        let close = c.recv_close().await.expect("close frame");
        assert_eq!(u16::from(close.code), 4001);
    }
    bob.request("svc", "echo", json!({}), "still-here").await;
    assert_eq!(bob.recv_json().await["payload"]["trace_id"], "still-here");
    // The closed sessions are gone from the registry.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.handle.stats().sessions, 1);
    gw.stop().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let mut options = Options::default();
    options.ws.max_message_size = 4096;
    options.ws.max_frame_size = 4096;
    let gw = Gateway::start_with(options).await;
    let (mut c, _) = gw.connect("alice").await;
    c.send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(10_000))).await;
    let close = c.recv_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);
    assert_eq!(gw.mesh_calls(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn ping_subscribe_errors_and_commands() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.send_json(&json!({"type": "ping"})).await;
    assert_eq!(c.recv_json().await, json!({"type": "pong", "payload": {}}));
    c.send_json(&json!({"type": "command", "payload": {"service": "svc", "method": "echo", "params": {}, "trace_id": "cmd"}})).await;
    assert_eq!(c.recv_json().await, json!({"type": "accepted", "payload": {"trace_id": "cmd"}}));
    c.send_json(&json!({"type": "command", "payload": {"service": "nosvc", "method": "x", "params": {}, "trace_id": "cmd2"}})).await;
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["error"]["error"], "NuropbNotDeliveredError");
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_closes_with_1001() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.request("svc", "sleep", json!({"ms": 400}), "drained").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.shutdown.cancel();
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "drained");
    assert_eq!(r["payload"]["result"], json!({"slept_ms": 400}));
    let close = c.recv_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    gw.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_then_closes_abusers() {
    let mut options = Options::default();
    options.ws.rate_per_second = 1;
    options.ws.rate_burst = 5;
    options.ws.max_protocol_errors = 3;
    let gw = Gateway::start_with(options).await;
    let (mut c, _) = gw.connect("alice").await;
    for _ in 0..5 {
        c.send_json(&json!({"type": "ping"})).await;
    }
    for _ in 0..5 {
        assert_eq!(c.recv_json().await["type"], "pong");
    }
    for _ in 0..4 {
        c.send_json(&json!({"type": "ping"})).await;
    }
    let mut limited = 0;
    loop {
        match c.next_message().await {
            Some(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["error"] == "RateLimited" {
                    limited += 1;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(limited >= 3, "rate-limited frames were answered ({limited})");
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_client_is_dropped_without_slowing_the_others() {
    let mut options = Options::default();
    options.ws.outbound_queue = 8;
    options.ws.write_timeout = Duration::from_millis(500);
    let gw = Gateway::start_with(options).await;
    let (_slow, _) = gw.connect("slow").await; // never reads again
    let (mut fast, _) = gw.connect("fast").await;
    let big = "x".repeat(16 * 1024);
    let fast_reader = tokio::spawn(async move {
        let mut got = 0;
        while got < 400 {
            let v = fast.recv_json().await;
            assert_eq!(v["payload"]["topic"], "broadcast.flood");
            got += 1;
        }
        got
    });
    for i in 0..400 {
        let event = MeshEvent {
            topic: "broadcast.flood".into(),
            event: json!({"i": i, "pad": big}),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        gw.mesh.inject_event(event).await.unwrap();
        tokio::task::yield_now().await;
    }
    // Every one of 400 x 16 KiB events reached the fast client, while the slow one was
    // cut off (its socket buffers hold far less than 6 MiB).
    let got = tokio::time::timeout(Duration::from_secs(20), fast_reader).await.unwrap().unwrap();
    assert_eq!(got, 400);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = gw.handle.stats();
        if stats.sessions == 1 {
            assert!(stats.frames_dropped > 0, "{stats:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slow session not dropped: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn expired_tokens_close_the_session_unless_refreshed() {
    let gw = Gateway::start().await;
    let short = |user: &str| {
        token_with(
            json!({"sub": user, "username": user, "exp": jsonwebtoken::get_current_timestamp() + 2}),
            SECRET,
        )
    };
    let connect = |t: String| {
        let url = gw.url.clone();
        async move {
            let mut c =
                Client::connect(&url, &[("Authorization", &format!("Bearer {t}"))]).await.unwrap();
            assert_eq!(c.recv_json().await["payload"]["topic"], "hello");
            c
        }
    };
    let mut expiring = connect(short("alice")).await;
    let mut refreshed = connect(short("alice")).await;

    // Another user's token cannot take over the session.
    refreshed.send_json(&json!({"type": "refresh", "payload": {"token": token("bob")}})).await;
    let r = refreshed.recv_json().await;
    assert_eq!(r["error"], "NuropbAuthorizationError", "{r}");
    refreshed.send_json(&json!({"type": "refresh", "payload": {"token": "garbage"}})).await;
    assert_eq!(refreshed.recv_json().await["error"], "NuropbAuthorizationError");

    refreshed.send_json(&json!({"type": "refresh", "payload": {"token": token("alice")}})).await;
    let r = refreshed.recv_json().await;
    assert_eq!(r["type"], "refreshed", "{r}");
    assert!(
        r["payload"]["expires_at"].as_u64().unwrap() > jsonwebtoken::get_current_timestamp() + 500
    );

    let close = expiring.recv_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 4003);

    // The refreshed session outlives its first token, and services now get the new one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    refreshed.request("svc", "whoami", json!({}), "after-refresh").await;
    let r = refreshed.recv_json().await;
    assert_eq!(r["payload"]["result"]["Authorization"], format!("Bearer {}", token_from(&r)));
    gw.stop().await;
}

/// The token a `whoami` result carries, checked to be a fresh alice token (exp > 500 s).
fn token_from(r: &Value) -> String {
    let t =
        r["payload"]["result"]["Authorization"].as_str().unwrap().strip_prefix("Bearer ").unwrap();
    let claims = jsonwebtoken::decode::<Value>(
        t,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &jsonwebtoken::Validation::default(),
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "alice");
    assert!(claims["exp"].as_u64().unwrap() > jsonwebtoken::get_current_timestamp() + 500);
    t.to_owned()
}

#[tokio::test]
async fn subscriptions_are_limited_to_subscribable_patterns() {
    let gw = Gateway::start().await;
    let (mut alice, _) = gw.connect("alice").await;
    let (mut mallory, _) = gw.connect("mallory").await;
    for pattern in ["users.alice.#", "users.*.notify", "#", "secret.stuff"] {
        mallory.send_json(&json!({"type": "subscribe", "payload": {"topics": [pattern]}})).await;
        let r = mallory.recv_json().await;
        assert_eq!(r["error"], "NuropbValidationError", "{pattern}: {r}");
        assert!(r["description"].as_str().unwrap().contains("not open to subscription"), "{r}");
    }
    alice
        .send_json(&json!({"type": "subscribe", "payload": {"topics": ["users.alice.notify"]}}))
        .await;
    assert_eq!(alice.recv_json().await["type"], "subscribed");
    let event = MeshEvent {
        topic: "users.alice.notify".into(),
        event: json!({"otp": "492113"}),
        target: None,
        context: Default::default(),
        trace_id: None,
    };
    gw.mesh.inject_event(event).await.unwrap();
    assert_eq!(alice.recv_json().await["payload"]["event"]["otp"], "492113");
    mallory.expect_silence(Duration::from_millis(200)).await;
    gw.stop().await;
}

#[tokio::test]
async fn clients_cannot_call_the_gateways_own_service() {
    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("mallory").await;
    c.request("gateway-self", "push_to_all", json!({"topic": "hello", "event": {}}), "evil").await;
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "evil");
    assert_eq!(r["payload"]["error"]["error"], "NuropbAuthorizationError", "{r}");
    assert_eq!(gw.mesh_calls(), 0, "nothing reached the mesh");
    gw.stop().await;
}

#[tokio::test]
async fn frames_over_the_former_4_mib_write_buffer_are_delivered() {
    // 5 MiB: tungstenite refused such frames under the old fixed 4 MiB write buffer limit,
    // and the connection ended without a close frame. The default limit is now 8 MiB.
    const BIG: usize = 5 << 20;
    let gw = Gateway::start().await;
    let (mut alice, _) = gw.connect("alice").await;
    let (mut bob, _) = gw.connect("bob").await;
    alice.request("svc", "big", json!({"bytes": BIG}), "big").await;
    let r = alice.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "big");
    assert_eq!(r["payload"]["result"].as_str().map(str::len), Some(BIG));
    let event = MeshEvent {
        topic: "broadcast.big".into(),
        event: json!("x".repeat(BIG)),
        target: None,
        context: Default::default(),
        trace_id: None,
    };
    gw.mesh.inject_event(event).await.unwrap();
    for c in [&mut alice, &mut bob] {
        let e = c.recv_json().await;
        assert_eq!(e["payload"]["topic"], "broadcast.big");
        assert_eq!(e["payload"]["event"].as_str().map(str::len), Some(BIG));
    }
    assert_eq!(gw.ws_stats.stats(), ws_adapter::WsStats::default());
    gw.stop().await;
}

#[tokio::test]
async fn oversized_responses_become_errors_and_oversized_events_are_dropped() {
    let mut options = Options::default();
    options.ws.max_outbound_message_size = 64 << 10;
    let gw = Gateway::start_with(options).await;
    let (mut c, _) = gw.connect("alice").await;

    c.request("svc", "big", json!({"bytes": 100_000}), "too-big").await;
    let r = c.recv_json().await;
    assert_eq!(r["type"], "response", "{r}");
    assert_eq!(r["payload"]["trace_id"], "too-big");
    assert_eq!(r["payload"]["result"], Value::Null);
    assert_eq!(r["payload"]["error"]["error"], "LimitExceeded");
    let description = r["payload"]["error"]["description"].as_str().unwrap();
    let size: usize = description
        .strip_prefix("response of ")
        .and_then(|d| d.strip_suffix(" bytes exceeds the limit of 65536 bytes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected description {description:?}"));
    assert!(size > 100_000, "{description}");

    // The same in MessagePack.
    let request = json!({"type": "request", "payload": {"service": "svc", "method": "big", "params": {"bytes": 100_000}, "trace_id": "too-big-mp"}});
    c.send_binary(rmp_serde::to_vec_named(&request).unwrap()).await;
    let r = c.recv_msgpack().await;
    assert_eq!(r["payload"]["trace_id"], "too-big-mp");
    assert_eq!(r["payload"]["error"]["error"], "LimitExceeded");

    // Back to JSON; the connection is still usable.
    c.request("svc", "echo", json!({"small": true}), "small").await;
    assert_eq!(c.recv_json().await["payload"]["result"], json!({"small": true}));

    // An oversized event is dropped for this session; the next event still arrives.
    for (topic, size) in [("broadcast.big", 100_000), ("broadcast.small", 10)] {
        let event = MeshEvent {
            topic: topic.into(),
            event: json!("x".repeat(size)),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        gw.mesh.inject_event(event).await.unwrap();
    }
    assert_eq!(c.recv_json().await["payload"]["topic"], "broadcast.small");
    let stats = gw.ws_stats.stats();
    assert_eq!((stats.responses_too_large, stats.frames_too_large_dropped), (2, 1), "{stats:?}");
    assert_eq!(gw.handle.stats().sessions, 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_client_close_is_answered_with_the_servers_close_frame() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let gw = Gateway::start().await;
    let (mut c, _) = gw.connect("alice").await;
    c.ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    // The server's reply echoes the code; before the fix the socket was dropped (1006).
    let reply = c.recv_close().await.expect("the server's close frame");
    assert_eq!((reply.code, reply.reason.as_str()), (CloseCode::Normal, "bye"));
    let end = tokio::time::timeout(e2e_tests::FRAME_WAIT, c.ws.next()).await.expect("stream end");
    assert!(end.is_none(), "the close handshake completes cleanly: {end:?}");
    e2e_tests::eventually("session removed", Duration::from_secs(5), || {
        gw.handle.stats().sessions == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_or_shed_never_held() {
    use e2e_tests::{eventually, expect_tcp_closed};
    use tokio::net::TcpStream;

    let mut options = Options::default();
    options.ws.max_connections = 2;
    options.ws.max_refusals_in_flight = 1;
    options.ws.refusal_handshake_timeout = Duration::from_secs(2);
    let gw = Gateway::start_with(options).await;
    let (mut alice, _) = gw.connect("alice").await;
    let (_bob, _) = gw.connect("bob").await;
    let auth = format!("Bearer {}", token("carol"));

    // Over the limit, with the refusal budget free: a clear 503.
    let err = Client::connect(&gw.url, &[("Authorization", &auth)])
        .await
        .err()
        .expect("connected over the limit");
    assert_eq!(http_status(&err), Some(503), "{err}");

    // An idle socket takes the one refusal slot ...
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    eventually("idle socket accepted", Duration::from_secs(5), || {
        gw.ws_stats.stats().connections_refused == 2
    })
    .await;
    // ... so further sockets over the limit are closed at once, long before the refusal
    // handshake timeout: no task, no buffers, no held descriptor.
    let mut extra = Vec::new();
    for _ in 0..20 {
        extra.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    for s in &mut extra {
        expect_tcp_closed(s, Duration::from_secs(1)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(gw.ws_stats.stats().connections_shed, 20);

    // The idle socket is dropped after the refusal handshake timeout, freeing the slot.
    expect_tcp_closed(&mut idle, Duration::from_secs(4)).await;
    let err = Client::connect(&gw.url, &[("Authorization", &auth)])
        .await
        .err()
        .expect("connected over the limit");
    assert_eq!(http_status(&err), Some(503), "{err}");

    // The sessions were never disturbed.
    alice.request("svc", "echo", json!({}), "still-here").await;
    assert_eq!(alice.recv_json().await["payload"]["trace_id"], "still-here");
    gw.stop().await;
}

#[tokio::test]
async fn the_default_config_allows_no_browser_origin() {
    let gw =
        Gateway::start_with(Options { ws: ws_adapter::WsConfig::default(), ..Options::default() })
            .await;
    let auth = format!("Bearer {}", token("alice"));
    let cookie = format!("Authorization={}", token("alice"));
    for (credentials, origin) in [
        (("Authorization", auth.as_str()), "https://example.com"),
        (("Authorization", auth.as_str()), "http://localhost:3000"),
        // Cross-site WebSocket hijacking: the browser sends the cookie on its own.
        (("Cookie", cookie.as_str()), "https://evil.example"),
    ] {
        let err = Client::connect(&gw.url, &[credentials, ("Origin", origin)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{origin} accepted"));
        assert_eq!(http_status(&err), Some(403), "{origin}: {err}");
    }
    // Non-browser clients send no Origin and still connect.
    let mut c = Client::connect(&gw.url, &[("Authorization", &auth)]).await.expect("no Origin");
    assert_eq!(c.recv_json().await["payload"]["topic"], "hello");
    gw.stop().await;
}

#[tokio::test]
async fn calls_still_pending_at_the_drain_deadline_are_answered_before_1001() {
    let gw = Gateway::start_with(Options {
        drain: Duration::from_millis(300),
        request_timeout: Duration::from_secs(10),
        ..Options::default()
    })
    .await;
    let (mut c, _) = gw.connect("alice").await;
    c.request("svc", "sleep", json!({"ms": 5000}), "too-slow").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.shutdown.cancel();
    let r = c.recv_json().await;
    assert_eq!(r["payload"]["trace_id"], "too-slow");
    assert_eq!(
        r["payload"]["error"],
        json!({"error": "NuropbTransportError", "description": "mesh unavailable: gateway shutting down"})
    );
    let close = c.recv_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    gw.stop().await;
}

#[tokio::test]
async fn the_hello_frame_is_always_first_even_during_a_broadcast_storm() {
    let gw = Gateway::start().await;
    let mesh = gw.mesh.clone();
    let storm = tokio::spawn(async move {
        for i in 0..2_000 {
            let event = MeshEvent {
                topic: "broadcast.storm".into(),
                event: json!(i),
                target: None,
                context: Default::default(),
                trace_id: None,
            };
            if mesh.inject_event(event).await.is_err() {
                break;
            }
        }
    });
    for _ in 0..20 {
        // `connect` asserts that the first frame is the hello.
        let (_c, hello) = gw.connect("alice").await;
        assert_eq!(hello["payload"]["topic"], "hello");
    }
    storm.await.unwrap();
    gw.stop().await;
}

/// Raw TCP clients for what a WebSocket library will not send: malformed handshakes and
/// protocol violations.
mod raw {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    pub(super) use e2e_tests::raw::{KEY, close_code, masked_frame as frame, status, upgrade};

    /// Sends `request`; returns the response head (status line and headers), read within
    /// 5 s, or "" if the server closed without answering.
    pub(super) async fn send(addr: std::net::SocketAddr, request: &[u8]) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let head = e2e_tests::raw::read_head(&mut stream).await;
        (stream, head)
    }
}

#[tokio::test]
async fn malformed_handshakes_get_an_http_answer() {
    let gw = Gateway::start().await;
    let auth = format!("Authorization: Bearer {}\r\n", token("alice"));
    let valid = raw::upgrade(&auth);
    let without = |header: &str| {
        valid
            .lines()
            .filter(|l| !l.starts_with(header))
            .map(|l| format!("{l}\r\n"))
            .collect::<String>()
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("no Sec-WebSocket-Key", without("Sec-WebSocket-Key"), 400),
        ("no Upgrade", without("Upgrade:"), 400),
        ("no Connection", without("Connection:"), 400),
        ("POST", valid.replacen("GET", "POST", 1), 400),
        ("HTTP/1.0", valid.replacen("HTTP/1.1", "HTTP/1.0", 1), 400),
        // No field of a handshake: plain HTTP since the port serves it (tests/tests/http.rs),
        // and this gateway has no route at `/`. Not a bad handshake.
        ("plain GET", "GET / HTTP/1.1\r\nHost: gw\r\n\r\n".into(), 404),
        ("garbage", "\u{16}\u{3}\u{1} hello\r\n\r\n".into(), 400),
        ("bad key", valid.replace(raw::KEY, "not-a-key"), 400),
        ("version 8", valid.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"), 426),
        ("no version", without("Sec-WebSocket-Version"), 426),
        ("oversized head", raw::upgrade(&format!("X-Big: {}\r\n", "a".repeat(20 << 10))), 431),
        ("too many headers", raw::upgrade(&"X-A: b\r\n".repeat(80)), 431),
    ];
    for (name, request, expected) in &cases {
        let (_stream, head) = raw::send(gw.addr, request.as_bytes()).await;
        assert_eq!(raw::status(&head), Some(*expected), "{name}: {head:?}");
        if *expected == 426 {
            assert!(head.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{name}: {head:?}");
        }
    }
    let bad = cases.iter().filter(|(_, _, expected)| *expected != 404).count();
    assert_eq!(gw.ws_stats.stats().bad_handshakes, bad as u64);
    // The valid request still upgrades (the head read first is replayed to tungstenite).
    let (_stream, head) = raw::send(gw.addr, valid.as_bytes()).await;
    assert_eq!(raw::status(&head), Some(101), "{head:?}");
    gw.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_with_1007_or_1002() {
    let gw = Gateway::start().await;
    let auth = format!("Authorization: Bearer {}\r\n", token("alice"));
    for (name, frame, expected) in [
        ("text that is not UTF-8", raw::frame(0x81, b"\xff\xfe"), 1007),
        ("reserved bit set", raw::frame(0xc1, b"{}"), 1002),
        ("unknown opcode", raw::frame(0x83, b"{}"), 1002),
        ("unmasked frame", vec![0x81, 0x02, b'{', b'}'], 1002),
    ] {
        let (mut stream, head) = raw::send(gw.addr, raw::upgrade(&auth).as_bytes()).await;
        assert_eq!(raw::status(&head), Some(101), "{head:?}");
        tokio::io::AsyncWriteExt::write_all(&mut stream, &frame).await.unwrap();
        assert_eq!(raw::close_code(&mut stream).await, Some(expected), "{name}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn connections_per_ip_and_connect_rate_get_429() {
    let mut options = Options::default();
    options.ws.max_connections_per_ip = 2;
    let gw = Gateway::start_with(options).await;
    let (alice, _) = gw.connect("alice").await;
    let (_bob, _) = gw.connect("bob").await;
    let auth = format!("Bearer {}", token("carol"));
    let err = Client::connect(&gw.url, &[("Authorization", &auth)]).await.err().expect("429");
    assert_eq!(http_status(&err), Some(429), "{err}");
    assert_eq!(gw.ws_stats.stats().per_ip_connections_refused, 1);
    // A closed connection frees its address's slot.
    drop(alice);
    e2e_tests::eventually("slot freed", Duration::from_secs(5), || gw.handle.stats().sessions == 1)
        .await;
    let (_carol, _) = gw.connect("carol").await;
    gw.stop().await;

    let mut options = Options::default();
    options.ws.connect_rate_per_ip = 1;
    options.ws.connect_burst_per_ip = 3;
    let gw = Gateway::start_with(options).await;
    for user in ["a", "b", "c"] {
        let (_c, _) = gw.connect(user).await;
    }
    let auth = format!("Bearer {}", token("d"));
    let err = Client::connect(&gw.url, &[("Authorization", &auth)]).await.err().expect("429");
    assert_eq!(http_status(&err), Some(429), "{err}");
    assert_eq!(gw.ws_stats.stats().per_ip_rate_refused, 1);
    gw.stop().await;
}

#[tokio::test]
async fn idle_sockets_hold_handshake_slots_not_session_slots() {
    use tokio::net::TcpStream;

    let mut options = Options::default();
    options.ws.max_connections = 2;
    options.ws.max_handshakes_in_flight = 4;
    let gw = Gateway::start_with(options).await;
    // Two idle sockets, as many as there are session slots: sessions still open.
    let idle: Vec<TcpStream> = vec![
        TcpStream::connect(gw.addr).await.unwrap(),
        TcpStream::connect(gw.addr).await.unwrap(),
    ];
    let (mut alice, _) = gw.connect("alice").await;
    let (_bob, _) = gw.connect("bob").await;
    drop(idle);
    alice.request("svc", "echo", json!({}), "t").await;
    assert_eq!(alice.recv_json().await["payload"]["trace_id"], "t");
    gw.stop().await;

    // With the handshake budget full of idle sockets, newcomers are told 503 at once.
    let mut options = Options::default();
    options.ws.max_handshakes_in_flight = 2;
    let gw = Gateway::start_with(options).await;
    let _idle =
        [TcpStream::connect(gw.addr).await.unwrap(), TcpStream::connect(gw.addr).await.unwrap()];
    // Let the server accept both.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let auth = format!("Bearer {}", token("carol"));
    let err = Client::connect(&gw.url, &[("Authorization", &auth)]).await.err().expect("503");
    assert_eq!(http_status(&err), Some(503), "{err}");
    assert_eq!(gw.ws_stats.stats().handshakes_refused, 1);
    gw.stop().await;
}

#[tokio::test]
async fn sessions_per_user_get_429() {
    let options = Options { max_sessions_per_user: 2, ..Options::default() };
    let gw = Gateway::start_with(options).await;
    let (_a1, _) = gw.connect("alice").await;
    let (_a2, _) = gw.connect("alice").await;
    let auth = format!("Bearer {}", token("alice"));
    let err = Client::connect(&gw.url, &[("Authorization", &auth)]).await.err().expect("429");
    assert_eq!(http_status(&err), Some(429), "{err}");
    assert_eq!(gw.ws_stats.stats().per_user_sessions_refused, 1);
    let (_bob, _) = gw.connect("bob").await;
    gw.stop().await;
}

fn selected_protocol(response: &http::Response<Option<Vec<u8>>>) -> Vec<String> {
    let values = response.headers().get_all(http::header::SEC_WEBSOCKET_PROTOCOL);
    values.iter().map(|v| v.to_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_subprotocol_route_selects_nuropb_v1_and_never_echoes_the_token() {
    let gw = Gateway::start().await;
    let entry = format!("nuropb.token.{}", token("alice"));
    // One header with a list, and the same as two headers.
    let list = format!("nuropb.v1, {entry}");
    let offers: [Vec<(&str, &str)>; 2] = [
        vec![("Sec-WebSocket-Protocol", &list)],
        vec![("Sec-WebSocket-Protocol", "nuropb.v1"), ("Sec-WebSocket-Protocol", &entry)],
    ];
    for headers in offers {
        let (mut c, response) =
            Client::connect_appending(&gw.url, &headers).await.expect("upgrade");
        assert_eq!(selected_protocol(&response), ["nuropb.v1"], "{headers:?}");
        let hello = c.recv_json().await;
        assert_eq!(hello["payload"]["event"]["user_id"], "alice", "{hello}");
        c.send_json(&json!({"type": "ping", "id": "p"})).await;
        assert_eq!(c.recv_json().await, json!({"type": "pong", "payload": {}, "id": "p"}));
    }
    // A bad token is refused at the upgrade, as in the header.
    for bad in ["nuropb.token.not-a-token", &format!("nuropb.token.{}", "x".repeat(9000))] {
        let list = format!("nuropb.v1, {bad}");
        let err = Client::connect_appending(&gw.url, &[("Sec-WebSocket-Protocol", &list)])
            .await
            .err()
            .expect("a bad subprotocol token connected");
        assert_eq!(http_status(&err), Some(401), "{err}");
    }
    // `nuropb.v1` is selected on the first-frame route too (browsers require it).
    let (_c, response) =
        Client::connect_appending(&gw.url, &[("Sec-WebSocket-Protocol", "nuropb.v1")])
            .await
            .expect("upgrade without credentials");
    assert_eq!(selected_protocol(&response), ["nuropb.v1"]);
    // Nothing is selected when it is not offered (as before).
    let auth = format!("Bearer {}", token("alice"));
    let (_c, response) =
        Client::connect_appending(&gw.url, &[("Authorization", &auth)]).await.expect("upgrade");
    assert!(selected_protocol(&response).is_empty());
    gw.stop().await;
}

/// A client on the first-frame route: upgraded with no credentials.
async fn unauthenticated(gw: &Gateway) -> Client {
    Client::connect(&gw.url, &[]).await.expect("an upgrade without credentials is accepted")
}

async fn expect_close(c: &mut Client, code: u16, reason: &str) {
    let frame = c.recv_close().await.expect("a close frame");
    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (code, reason));
}

#[tokio::test]
async fn the_first_frame_route_opens_the_session_on_a_good_auth_frame() {
    let gw = Gateway::start().await;
    let exp = jsonwebtoken::get_current_timestamp() + 321;
    let jwt = token_with(json!({"sub": "dora", "username": "Dora", "exp": exp}), SECRET);
    let mut c = unauthenticated(&gw).await;
    // Nothing before the auth frame: no hello yet.
    c.expect_silence(Duration::from_millis(200)).await;
    c.send_json(&json!({"type": "auth", "payload": {"token": jwt}, "id": "a-1"})).await;
    let hello = c.recv_json().await;
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    // The hello answers the auth frame, so it carries its id.
    assert_eq!(hello["id"], "a-1", "{hello}");
    let event = &hello["payload"]["event"];
    assert_eq!((&event["user_id"], &event["username"]), (&json!("dora"), &json!("Dora")));
    assert_eq!(event["expires_at"], exp);
    assert!(is_hex32(&event["session_id"]), "{hello}");
    c.request("svc", "echo", json!({"x": 1}), "after-auth").await;
    assert_eq!(c.recv_json().await["payload"]["result"], json!({"x": 1}));
    // A second auth frame within the session is refused, and the session lives on.
    c.send_json(&json!({"type": "auth", "payload": {"token": "t"}, "id": "a-2"})).await;
    let r = c.recv_json().await;
    assert_eq!((&r["error"], &r["id"]), (&json!("NuropbValidationError"), &json!("a-2")), "{r}");
    gw.stop().await;
}

#[tokio::test]
async fn the_first_frame_route_closes_4401_with_a_reason() {
    let mut options = Options::default();
    options.ws.auth_timeout = Duration::from_millis(300);
    let gw = Gateway::start_with(options).await;
    let expired = token_with(
        json!({"sub": "a", "exp": jsonwebtoken::get_current_timestamp() - 3600}),
        SECRET,
    );
    let auth = |token: &str| json!({"type": "auth", "payload": {"token": token}}).to_string();
    let cases: Vec<(&str, Message, &str)> = vec![
        ("garbage token", Message::text(auth("not-a-token")), "unauthorized"),
        ("expired token", Message::text(auth(&expired)), "unauthorized"),
        ("a ping frame", Message::text(r#"{"type":"ping","id":"x"}"#), "authentication required"),
        (
            "a request",
            Message::text(
                json!({"type": "request", "payload": {"service": "svc", "method": "echo", "params": {}}})
                    .to_string(),
            ),
            "authentication required",
        ),
        ("not JSON", Message::text("{"), "authentication required"),
        ("a binary frame", Message::binary(vec![0x80]), "authentication required"),
        (
            "an oversized frame",
            Message::text(auth(&"x".repeat(64 << 10))),
            "authentication frame too large",
        ),
    ];
    for (name, frame, reason) in cases {
        let mut c = unauthenticated(&gw).await;
        c.ws.send(frame).await.unwrap();
        let close = c.recv_close().await.unwrap_or_else(|| panic!("{name}: no close frame"));
        assert_eq!((u16::from(close.code), close.reason.as_str()), (4401, reason), "{name}");
    }
    assert_eq!(gw.mesh_calls(), 0, "nothing before the auth frame reaches the mesh");
    // None in time.
    let mut c = unauthenticated(&gw).await;
    let started = tokio::time::Instant::now();
    expect_close(&mut c, 4401, "authentication timeout").await;
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_waiting_to_authenticate_with_1001() {
    let gw = Gateway::start().await;
    let mut c = unauthenticated(&gw).await;
    c.expect_silence(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    gw.stop().await;
    expect_close(&mut c, 1001, "gateway shutting down").await;
    // Well before the 5 s auth timeout.
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn connections_waiting_to_authenticate_are_bounded() {
    let mut options = Options::default();
    options.ws.max_handshakes_in_flight = 2;
    let gw = Gateway::start_with(options).await;
    let _waiting = [unauthenticated(&gw).await, unauthenticated(&gw).await];
    let err = Client::connect(&gw.url, &[]).await.err().expect("a third one waits");
    assert_eq!(http_status(&err), Some(503), "{err}");
    // Authenticated clients are not held back by them.
    let (mut alice, _) = gw.connect("alice").await;
    alice.send_json(&json!({"type": "ping"})).await;
    assert_eq!(alice.recv_json().await, json!({"type": "pong", "payload": {}}));
    gw.stop().await;
}

#[tokio::test]
async fn every_answer_echoes_the_frames_id_and_frames_without_one_get_none() {
    let mut options = Options::default();
    options.ws.rate_per_second = 1;
    options.ws.rate_burst = 12;
    let gw = Gateway::start_with(options).await;
    let (mut c, _) = gw.connect("alice").await;
    let call =
        |trace: &str| json!({"service": "svc", "method": "echo", "params": {}, "trace_id": trace});
    let frames = [
        json!({"type": "subscribe", "payload": {"topics": ["news.a"]}, "id": "sub"}),
        json!({"type": "unsubscribe", "payload": {"topics": ["news.a"]}, "id": "unsub"}),
        json!({"type": "ping", "id": "ping"}),
        json!({"type": "refresh", "payload": {"token": token("alice")}, "id": "refresh"}),
        json!({"type": "request", "payload": call("t-req"), "id": "req"}),
        json!({"type": "command", "payload": call("t-cmd"), "id": "cmd"}),
        json!({"type": "subscribe", "payload": {"topics": ["secret.x"]}, "id": "refused"}),
        json!({"type": "request", "payload": {"service": "svc"}, "id": "invalid"}),
        json!({"type": "ping", "id": 5}),
    ];
    for frame in &frames {
        c.send_json(frame).await;
        let r = c.recv_json().await;
        let expected_id = frame["id"].as_str().map_or(Value::Null, |s| json!(s));
        assert_eq!(r["id"], expected_id, "answer to {frame}: {r}");
        match frame["id"].as_str() {
            Some("sub") => assert_eq!(r["payload"]["topics"], json!(["news.a"])),
            Some("unsub") => assert_eq!(r["type"], "subscribed"),
            Some("ping") => assert_eq!(r, json!({"type": "pong", "payload": {}, "id": "ping"})),
            Some("refresh") => assert!(r["payload"]["expires_at"].is_u64(), "{r}"),
            Some("req") => assert_eq!(r["payload"]["trace_id"], "t-req"),
            Some("cmd") => {
                assert_eq!(
                    r,
                    json!({"type": "accepted", "payload": {"trace_id": "t-cmd"}, "id": "cmd"})
                );
            }
            Some("refused") => assert_eq!(r["error"], "NuropbValidationError"),
            Some("invalid") => assert_eq!(r["error"], "NuropbValidationError"),
            _ => assert_eq!(r["description"], "`id` must be a string, got number", "{r}"),
        }
    }
    // Undecodable bytes: the id is read when it can be.
    c.send_text(r#"{"type":"ping","id":"big","payload":{"n":123456789012345678901234567890}}"#)
        .await;
    let r = c.recv_json().await;
    assert_eq!((&r["error"], &r["id"]), (&json!("NuropbValidationError"), &json!("big")), "{r}");
    // An id over 128 bytes is refused without it.
    c.send_json(&json!({"type": "ping", "id": "x".repeat(129)})).await;
    let r = c.recv_json().await;
    assert_eq!(
        r,
        json!({"error": "LimitExceeded", "description": "`id` is longer than 128 bytes"})
    );
    // Without an id: today's frames, byte for byte.
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_message().await, Some(Message::text(r#"{"type":"pong","payload":{}}"#)));
    // Over the rate: RateLimited, with the id and the trace id.
    for i in 0..3 {
        c.send_json(&json!({"type": "request", "payload": call(&format!("r-{i}")), "id": format!("rl-{i}")}))
            .await;
    }
    let mut limited = None;
    for _ in 0..3 {
        let r = c.recv_json().await;
        if r["error"] == "RateLimited" {
            limited = Some(r);
        }
    }
    let limited = limited.expect("a RateLimited refusal");
    let id = limited["id"].as_str().expect("the refusal carries the id");
    let trace = limited["trace_id"].as_str().expect("and the trace id");
    assert_eq!(id.strip_prefix("rl-"), trace.strip_prefix("r-"), "{limited}");
    gw.stop().await;
}
