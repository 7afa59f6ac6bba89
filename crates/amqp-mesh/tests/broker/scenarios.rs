//! The scenarios, each an `async fn(Ctx)` that panics on failure (`main.rs` makes each a
//! test). Every wait is bounded.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};

use amqp_mesh::{AmqpMesh, AmqpMeshConfig, AmqpMeshError, EncryptionMode};
use handler_core::mesh::{GatewayControl, GatewayStats, MeshInbound};
use handler_core::{MeshCall, MeshError, MeshEvent, ServiceMesh, TraceId, UserId};
use nuropb_wire::JsonObject;
use tokio_util::sync::CancellationToken;

use nuropb_testkit::broker::{
    HalfOpenProxy, Peer, WAIT, connect, eventually, message_count, nuropb_headers,
    rabbitmqctl_async, silent_spy, spy, within,
};
use nuropb_testkit::fake_service::{FakeService, OTHER_PRIVATE_KEY_PEM, PRIVATE_KEY_PEM};

use crate::support::{Ctx, Gateway};

fn object(value: Value) -> JsonObject {
    value.as_object().cloned().expect("a JSON object")
}

fn call(service: &str, method: &str, params: Value) -> MeshCall {
    MeshCall {
        service: service.to_owned(),
        method: method.to_owned(),
        params: object(params),
        context: object(
            json!({"user_id": "alice-id", "Authorisation": "alice@example.com", "trace_id": "trace-1"}),
        ),
        trace_id: TraceId::new("trace-1"),
    }
}

fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| h.inner().get(key))
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------------------

pub async fn start_fails_clearly(ctx: Ctx) {
    let attempt = |url: String| async move {
        let config =
            AmqpMeshConfig { connect_timeout: Duration::from_secs(3), ..AmqpMeshConfig::new(url) };
        match AmqpMesh::start(config, CancellationToken::new()).await {
            Ok(_) => panic!("start should fail"),
            Err(error) => error,
        }
    };
    let error = attempt("http://127.0.0.1/x".into()).await;
    assert!(matches!(error, AmqpMeshError::Config { field: "url", .. }), "{error}");

    let error = attempt("amqp://guest:guest@127.0.0.1:1/x".into()).await;
    assert!(matches!(error, AmqpMeshError::Connect { .. }), "{error}");
    assert!(error.is_transient());

    let error = attempt(format!("amqp://guest:wrong-password@127.0.0.1:5672/{}", ctx.vhost)).await;
    assert!(matches!(error, AmqpMeshError::Refused { .. }), "bad password: {error:?}");
    assert!(!error.to_string().contains("wrong-password"), "password leaked: {error}");

    let error = attempt("amqp://guest:guest@127.0.0.1:5672/nuropb-test-no-such-vhost".into()).await;
    assert!(matches!(error, AmqpMeshError::Refused { .. }), "unknown vhost: {error:?}");
}

/// Several node URLs: a dead first node is skipped at start; with every node dead `start`
/// fails with the first node's error; `start_unconnected` returns at once and connects in
/// the background, or keeps answering calls at once with `Unavailable` while it cannot.
pub async fn nodes_are_tried_in_order_and_start_unconnected_waits(ctx: Ctx) {
    let dead = ctx.url.replace("127.0.0.1:5672", "127.0.0.1:1");
    let other_dead = ctx.url.replace("127.0.0.1:5672", "127.0.0.1:2");
    assert_ne!(dead, ctx.url, "the run's URL names the shared broker");
    let config = |url: &str, failover: &[&str]| {
        let mut c = ctx.config("gw-nodes");
        c.url = url.to_owned();
        c.failover_urls = failover.iter().map(|u| (*u).to_owned()).collect();
        c.connect_timeout = Duration::from_secs(3);
        c
    };

    let shutdown = CancellationToken::new();
    let (mesh, _inbound) = AmqpMesh::start(config(&dead, &[&ctx.url]), shutdown.clone())
        .await
        .expect("the second node takes the first connection");
    assert!(mesh.is_connected());
    assert!(mesh.response_queue().is_some());
    shutdown.cancel();
    within("the mesh closes", mesh.closed()).await;

    let error = match AmqpMesh::start(config(&dead, &[&other_dead]), CancellationToken::new()).await
    {
        Ok(_) => panic!("no node is up"),
        Err(error) => error,
    };
    assert!(matches!(&error, AmqpMeshError::Connect { url, .. } if url.contains(":1/")), "{error}");

    let shutdown = CancellationToken::new();
    let (mesh, _inbound) =
        AmqpMesh::start_unconnected(config(&dead, &[&ctx.url]), shutdown.clone()).expect("valid");
    // The dead first node refuses at once; the first round ends on the second, connected.
    assert!(within("the first round", mesh.first_round()).await);
    assert!(within("connected in the background", mesh.connected()).await);
    shutdown.cancel();
    within("the mesh closes", mesh.closed()).await;

    let shutdown = CancellationToken::new();
    let (mesh, _inbound) =
        AmqpMesh::start_unconnected(config(&dead, &[&other_dead]), shutdown.clone())
            .expect("valid");
    let started = Instant::now();
    assert!(!within("the first round", mesh.first_round()).await, "no node is up");
    assert!(started.elapsed() < Duration::from_secs(2), "refused nodes end the round at once");
    assert!(!mesh.is_connected());
    let started = Instant::now();
    let answer = mesh.request(call("svc", "echo", json!({})), Duration::from_secs(5)).await;
    assert_eq!(answer, Err(MeshError::Unavailable("not connected to the broker".into())));
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once");
    shutdown.cancel();
    within("the unconnected mesh closes", mesh.closed()).await;
}

pub async fn topology_matches_nuropb(ctx: Ctx) {
    let mut config = ctx.config("gw-topo");
    config.instance_id = "i1".into();
    config.event_bindings = vec!["topo.#".into(), "other.*.x".into()];
    let gw = ctx.start(config).await;

    // A nuropb service redeclaring the gateway's service queue with nuropb's arguments
    // must succeed (a 406 here would mean our arguments differ).
    let connection = connect(&ctx.url).await;
    let channel = connection.create_channel().await.expect("channel");
    let mut dlx = FieldTable::default();
    dlx.insert("x-dead-letter-exchange".into(), long("nuropb-dl-exchange"));
    channel
        .queue_declare(
            "nuropb-gw-topo-sq".into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            dlx,
        )
        .await
        .expect("nuropb's declaration of the service queue is compatible");

    let vh = ctx.vhost.as_str();
    let (exchanges, queues, bindings, consumers) = tokio::join!(
        rabbitmqctl_async(&[
            "list_exchanges",
            "-p",
            vh,
            "name",
            "type",
            "durable",
            "auto_delete",
            "internal",
            "arguments",
            "--formatter",
            "json"
        ]),
        rabbitmqctl_async(&[
            "list_queues",
            "-p",
            vh,
            "name",
            "durable",
            "auto_delete",
            "exclusive",
            "arguments",
            "--formatter",
            "json"
        ]),
        rabbitmqctl_async(&[
            "list_bindings",
            "-p",
            vh,
            "source_name",
            "destination_name",
            "routing_key",
            "--formatter",
            "json"
        ]),
        rabbitmqctl_async(&[
            "list_consumers",
            "-p",
            vh,
            "queue_name",
            "ack_required",
            "prefetch_count",
            "--formatter",
            "json"
        ]),
    );
    let parse = |s: &str| -> Vec<Value> {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("rabbitmqctl json {e}: {s}"))
    };
    let (exchanges, queues, bindings, consumers) =
        (parse(&exchanges), parse(&queues), parse(&bindings), parse(&consumers));

    let find = |rows: &[Value], name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing in {rows:?}"))
    };
    for (name, kind) in [
        ("nuropb-rpc-exchange", "direct"),
        ("nuropb-events-exchange", "topic"),
        ("nuropb-dl-exchange", "fanout"),
    ] {
        let e = find(&exchanges, name);
        assert_eq!(
            (e["type"].as_str(), &e["durable"], &e["auto_delete"], &e["internal"]),
            (Some(kind), &json!(true), &json!(false), &json!(false)),
            "{e}"
        );
        assert!(
            e["arguments"].as_array().is_none_or(|a| a.is_empty())
                && e["arguments"].as_object().is_none_or(|a| a.is_empty()),
            "{e}"
        );
    }
    // Per-connection names: `nuropb-<svc>-<instance>-<8 hex>-{rq,eq,cq}`, one token for all three.
    let named = |suffix: &str| {
        let names: Vec<String> = queues
            .iter()
            .filter_map(|q| q["name"].as_str())
            .filter(|n| n.starts_with("nuropb-gw-topo-i1-") && n.ends_with(suffix))
            .map(str::to_owned)
            .collect();
        assert_eq!(names.len(), 1, "{suffix}: {names:?}");
        let token = &names[0]["nuropb-gw-topo-i1-".len()..names[0].len() - suffix.len()];
        assert!(token.len() == 8 && token.bytes().all(|b| b.is_ascii_hexdigit()), "{}", names[0]);
        names[0].clone()
    };
    let (rq_name, eq_name, cq_name) = (named("-rq"), named("-eq"), named("-cq"));
    assert_eq!(rq_name[..rq_name.len() - 3], eq_name[..eq_name.len() - 3]);
    assert_eq!(rq_name[..rq_name.len() - 3], cq_name[..cq_name.len() - 3]);
    assert_eq!(gw.mesh.response_queue().as_deref(), Some(rq_name.as_str()));
    let rq = find(&queues, &rq_name);
    assert_eq!(
        (&rq["durable"], &rq["auto_delete"], &rq["exclusive"]),
        (&json!(false), &json!(true), &json!(false)),
        "{rq}"
    );
    let sq = find(&queues, "nuropb-gw-topo-sq");
    assert_eq!(
        (&sq["durable"], &sq["auto_delete"], &sq["exclusive"]),
        (&json!(true), &json!(false), &json!(false)),
        "{sq}"
    );
    assert!(
        sq["arguments"].to_string().contains("x-dead-letter-exchange")
            && sq["arguments"].to_string().contains("nuropb-dl-exchange"),
        "{sq}"
    );
    let eq = find(&queues, &eq_name);
    assert_eq!(
        (&eq["durable"], &eq["auto_delete"], &eq["exclusive"]),
        (&json!(false), &json!(true), &json!(true)),
        "{eq}"
    );
    assert!(eq["arguments"].to_string().contains("x-max-length"), "{eq}");
    assert!(!eq["arguments"].to_string().contains("x-overflow"), "drop-head: {eq}");
    let cq = find(&queues, &cq_name);
    assert_eq!(
        (&cq["durable"], &cq["auto_delete"], &cq["exclusive"]),
        (&json!(false), &json!(true), &json!(true)),
        "{cq}"
    );
    assert!(
        cq["arguments"].to_string().contains("x-max-length")
            && cq["arguments"].to_string().contains("reject-publish"),
        "{cq}"
    );

    let bound = |source: &str, destination: &str, key: &str| {
        bindings.iter().any(|b| {
            b["source_name"] == source
                && b["destination_name"] == destination
                && b["routing_key"] == key
        })
    };
    assert!(bound("nuropb-rpc-exchange", "nuropb-gw-topo-sq", "gw-topo"), "{bindings:?}");
    for key in ["topo.#", "other.*.x"] {
        assert!(bound("nuropb-events-exchange", &eq_name, key), "{key} not bound: {bindings:?}");
        assert!(!bound("nuropb-events-exchange", &cq_name, key), "{key} on the control queue");
    }
    let control = "nuropb-gateway.gw-topo.control";
    assert!(bound("nuropb-events-exchange", &cq_name, control), "{bindings:?}");
    assert!(!bound("nuropb-events-exchange", &eq_name, control), "control on the events queue");
    assert!(!bindings.iter().any(|b| b["source_name"] == "nuropb-events-exchange"
        && b["destination_name"] == "nuropb-gw-topo-sq"));

    let consumer = |queue: &str| {
        consumers
            .iter()
            .find(|c| c["queue_name"] == queue)
            .cloned()
            .unwrap_or_else(|| panic!("no consumer on {queue}: {consumers:?}"))
    };
    let rq = consumer(&rq_name);
    assert_eq!(&rq["ack_required"], &json!(false), "{rq}");
    // The response queue is consumed exclusively (§2.3): nobody else can read our
    // responses.
    let intruder = connection.create_channel().await.expect("channel");
    let refused = intruder
        .basic_consume(
            rq_name.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(refused.is_err(), "the response queue is in exclusive use");
    let sq = consumer("nuropb-gw-topo-sq");
    assert_eq!((&sq["ack_required"], &sq["prefetch_count"]), (&json!(true), &json!(64)), "{sq}");
    let eq = consumer(&eq_name);
    assert_eq!(&eq["ack_required"], &json!(true), "{eq}");
    let cq = consumer(&cq_name);
    assert_eq!(&cq["ack_required"], &json!(true), "{cq}");
    gw.stop().await;
}

pub async fn request_round_trip_matches_nuropb_bytes(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-rt", false).await;
    let gw = ctx.start(ctx.config("gw-rt")).await;
    let peer = Peer::new(&ctx.url).await;
    let (_spy, mut spied) = spy(&peer.channel, "nuropb-rpc-exchange", "svc-rt").await;

    let params =
        json!({"text": "h\u{e9}llo \u{2713}", "n": 1, "nested": {"list": [1, 2.5, null, true]}});
    let answer = within("echo", gw.mesh.request(call("svc-rt", "echo", params.clone()), WAIT))
        .await
        .expect("echo answered");
    assert_eq!(answer.result, params);
    assert_eq!(answer.error, None);

    // First the describe lookup (encryption is on by default), exactly as nuropb's
    // describe_service sends it: params {}, context {}, TTL 60000.
    let describe =
        within("spied describe", spied.next()).await.expect("spy open").expect("delivery");
    let cid = describe.properties.correlation_id().as_ref().expect("correlation id").to_string();
    let trace = match header(&describe.properties, "trace_id") {
        Some(AMQPValue::LongString(t)) => String::from_utf8(t.as_bytes().to_vec()).expect("utf8"),
        other => panic!("describe trace_id {other:?}"),
    };
    assert_eq!(
        String::from_utf8(describe.data.clone()).expect("utf8"),
        format!(
            r#"{{"tag": "request", "service": "svc-rt", "method": "nuropb_describe", "params": {{}}, "correlation_id": "{cid}", "context": {{}}, "trace_id": "{trace}"}}"#
        )
    );
    assert_eq!(describe.properties.expiration().as_ref().map(|e| e.as_str()), Some("60000"));

    let request = within("spied request", spied.next()).await.expect("spy open").expect("delivery");
    let props = &request.properties;
    assert_eq!(
        props.bitmask(),
        0xa700,
        "content_type, headers, correlation_id, reply_to, expiration only"
    );
    assert_eq!(props.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    let response_queue = gw.mesh.response_queue().expect("connected");
    assert_eq!(props.reply_to().as_ref().map(|r| r.as_str()), Some(response_queue.as_str()));
    assert!(response_queue.starts_with("nuropb-gw-rt-") && response_queue.ends_with("-rq"));
    assert_eq!(props.expiration().as_ref().map(|e| e.as_str()), Some("10000"), "request_ttl in ms");
    let cid = props.correlation_id().as_ref().expect("correlation id").to_string();
    assert!(is_hex32(&cid), "{cid}");
    // nuropb's five headers, as pika types them, and the relay marker (a long string
    // naming this gateway), which nuropb ignores (§3).
    let headers = props.headers().as_ref().expect("headers");
    assert_eq!(headers.inner().len(), 6, "{headers:?}");
    assert_eq!(header(props, "nuropb_protocol"), Some(&long("0.1.1")));
    assert_eq!(header(props, "nuropb_version"), Some(&long("0.1.8")));
    assert_eq!(header(props, "nuropb_type"), Some(&long("request")));
    assert_eq!(header(props, "trace_id"), Some(&long("trace-1")));
    assert_eq!(header(props, "encrypted"), Some(&long("")));
    assert_eq!(header(props, "x-nuropb-gateway"), Some(&long("gw-rt")));
    assert_eq!(header(&describe.properties, "x-nuropb-gateway"), Some(&long("gw-rt")));
    // Python json.dumps bytes: ", "/": " separators, \uXXXX escapes, nuropb's key order.
    let expected = format!(
        r#"{{"tag": "request", "service": "svc-rt", "method": "echo", "params": {{"text": "h\u00e9llo \u2713", "n": 1, "nested": {{"list": [1, 2.5, null, true]}}}}, "correlation_id": "{cid}", "context": {{"user_id": "alice-id", "Authorisation": "alice@example.com", "trace_id": "trace-1"}}, "trace_id": "trace-1"}}"#
    );
    assert_eq!(String::from_utf8(request.data.clone()).expect("ascii"), expected);

    // A command: same envelope and body with tag/type "command".
    within("command", gw.mesh.command(call("svc-rt", "note", json!({"text": "remember"}))))
        .await
        .expect("command published");
    let command = within("spied command", spied.next()).await.expect("spy open").expect("delivery");
    assert_eq!(command.properties.bitmask(), 0xa700);
    assert_eq!(header(&command.properties, "nuropb_type"), Some(&long("command")));
    assert!(String::from_utf8_lossy(&command.data).starts_with(r#"{"tag": "command", "service": "svc-rt", "method": "note", "params": {"text": "remember"}, "correlation_id": ""#));
    eventually("the service received the command", || {
        svc.received().iter().any(|r| r.plaintext.starts_with(b"{\"tag\": \"command\""))
    })
    .await;
    assert!(
        svc.received().iter().all(|r| r.properties.reply_to().as_ref().map(|q| q.as_str())
            == Some(response_queue.as_str()))
    );

    let stats = gw.mesh.stats();
    assert!(stats.connected);
    assert_eq!((stats.responses, stats.pending_requests), (2, 0), "describe and echo: {stats:?}");
    gw.stop().await;
    svc.stop().await;
}

/// Requests to a service known routable skip publisher confirms (the direct path); when its
/// queue goes, the return still fails the request within the return poll, and the service
/// is asked on the confirmed path again.
pub async fn a_routable_service_that_loses_its_queue_is_not_delivered(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-gone", false).await;
    let gw = ctx
        .start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-gone") })
        .await;
    for _ in 0..2 {
        within("echo", gw.mesh.request(call("svc-gone", "echo", json!({})), WAIT))
            .await
            .expect("echo");
    }
    svc.stop().await;
    let connection = connect(&ctx.url).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .queue_delete("nuropb-svc-gone-sq".into(), Default::default())
        .await
        .expect("delete the service queue");
    for path in ["direct", "confirmed"] {
        let started = Instant::now();
        let outcome = gw.mesh.request(call("svc-gone", "echo", json!({})), WAIT).await;
        let took = started.elapsed();
        assert_eq!(
            outcome,
            Err(MeshError::NotDelivered { service: "svc-gone".into(), method: "echo".into() }),
            "{path}"
        );
        assert!(took < Duration::from_millis(500), "{path}: not delivered after {took:?}");
    }
    assert_eq!(gw.mesh.pending_requests(), 0);
    assert_eq!(gw.mesh.stats().returned, 2);
    gw.stop().await;
}

/// A direct publish holds one of `publish_queue_capacity` permits only until lapin has
/// written its frames, not until its request ends: small bodies (given back on lapin's
/// thread, unseen by the caller) and large ones (awaited) alike. With room for two, sixteen
/// requests to a service that never answers are all published and all time out; had
/// they kept their room while waiting, the third would be refused at once.
pub async fn direct_publishes_give_their_room_back_once_written(ctx: Ctx) {
    let peer = Peer::new(&ctx.url).await;
    // A queue nobody consumes, bound as svc-mute's.
    bound_queue(&peer, "nuropb-rpc-exchange", "svc-mute").await;
    let config = AmqpMeshConfig {
        encryption: EncryptionMode::Off,
        publish_queue_capacity: 2,
        ..ctx.config("gw-room")
    };
    let gw = ctx.start(config).await;
    let big = "x".repeat(10_000);
    let ttl = Duration::from_secs(2);
    // The first is confirmed (and makes the service routable); the others go direct, one
    // every 30 ms, so all sixteen wait at once.
    let calls = (0..16u64).map(|i| {
        let params = if i % 6 == 3 { json!({"big": big}) } else { json!({"i": i}) };
        let gw = &gw;
        async move {
            tokio::time::sleep(Duration::from_millis(30 * i)).await;
            gw.mesh.request(call("svc-mute", "echo", params), ttl).await
        }
    });
    let outcomes = within("sixteen unanswered requests", futures::future::join_all(calls)).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        assert_eq!(outcome, Err(MeshError::Timeout(ttl)), "request {i}");
    }
    let stats = gw.mesh.stats();
    assert_eq!((stats.published, stats.publish_failures), (16, 0), "{stats:?}");
    assert_eq!(stats.pending_requests, 0, "{stats:?}");
    gw.stop().await;
}

pub async fn unknown_service_is_not_delivered_within_500ms(ctx: Ctx) {
    for encryption in [EncryptionMode::Auto, EncryptionMode::Off] {
        let gw = ctx.start(AmqpMeshConfig { encryption, ..ctx.config("gw-nd") }).await;
        let started = Instant::now();
        let outcome = gw.mesh.request(call("no-such-svc", "echo", json!({})), WAIT).await;
        let took = started.elapsed();
        assert_eq!(
            outcome,
            Err(MeshError::NotDelivered { service: "no-such-svc".into(), method: "echo".into() })
        );
        assert!(took < Duration::from_millis(500), "basic.return took {took:?} ({encryption:?})");
        assert_eq!(gw.mesh.pending_requests(), 0);
        let outcome =
            within("command", gw.mesh.command(call("no-such-svc", "note", json!({})))).await;
        assert!(matches!(outcome, Err(MeshError::NotDelivered { .. })), "{outcome:?}");
        gw.stop().await;
    }

    // Under load the broker confirms several publishes at once and lapin may attach a
    // return to another message's confirmation: every call must still get its own outcome.
    let svc = FakeService::start(&ctx.url, "svc-mixed", false).await;
    let gw =
        ctx.start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-nd") }).await;
    let calls = (0..300).map(|i| {
        let service = if i % 2 == 0 { "svc-mixed" } else { "no-such-svc" };
        gw.mesh.request(call(service, "echo", json!({"i": i})), WAIT)
    });
    let outcomes = within("300 mixed calls", futures::future::join_all(calls)).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(outcome.expect("routable call answered").result, json!({"i": i}));
        } else {
            assert_eq!(
                outcome,
                Err(MeshError::NotDelivered {
                    service: "no-such-svc".into(),
                    method: "echo".into()
                })
            );
        }
    }
    // The counters are updated after the callers got their answers: wait for them to settle.
    let counted = |gw: &Gateway| {
        let stats = gw.mesh.stats();
        (stats.returned, stats.responses, stats.pending_requests)
    };
    eventually("every return counted", || counted(&gw) == (150, 150, 0)).await;
    let stats = gw.mesh.stats();
    assert_eq!(
        (stats.returned, stats.responses, stats.pending_requests),
        (150, 150, 0),
        "{stats:?}"
    );

    // The same for commands, whose verdict is all their caller ever gets: a return that
    // rides on another message's confirmation must still fail its own command.
    let commands = (0..300).map(|i| {
        let service = if i % 2 == 0 { "svc-mixed" } else { "no-such-svc" };
        gw.mesh.command(call(service, "note", json!({"i": i})))
    });
    let outcomes = within("300 mixed commands", futures::future::join_all(commands)).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let expected = if i % 2 == 0 {
            Ok(())
        } else {
            Err(MeshError::NotDelivered { service: "no-such-svc".into(), method: "note".into() })
        };
        assert_eq!(outcome, expected, "command {i}");
    }
    assert_eq!(gw.mesh.stats().returned, 300);
    eventually("the service received the 150 routable commands", || {
        svc.received().iter().filter(|r| r.plaintext.starts_with(b"{\"tag\": \"command\"")).count()
            == 150
    })
    .await;
    gw.stop().await;
    svc.stop().await;
}

pub async fn duplicate_responses_first_wins(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-dup", false).await;
    let gw = ctx.start(ctx.config("gw-dup")).await;
    let answer = within("fail", gw.mesh.request(call("svc-dup", "fail", json!({})), WAIT))
        .await
        .expect("answered");
    assert_eq!(answer.result, Value::Null, "the first (error) response wins");
    let error = answer.error.expect("error object");
    assert_eq!(error.error, "NuropbException");
    assert_eq!(error.description, "Runtime exception calling svc-dup.fail:RuntimeError: boom");
    eventually("the duplicate is counted", || gw.mesh.stats().duplicates_dropped == 1).await;
    assert_eq!(gw.mesh.stats().strays_dropped, 0);
    gw.stop().await;
    svc.stop().await;
}

pub async fn timeouts_and_dropped_calls_leave_nothing_pending(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-to", false).await;
    let gw = ctx.start(ctx.config("gw-to")).await;
    // Warm the describe cache so that the timings below are the calls' own.
    within("echo", gw.mesh.request(call("svc-to", "echo", json!({})), WAIT)).await.expect("echo");

    let started = Instant::now();
    let outcome =
        gw.mesh.request(call("svc-to", "never", json!({})), Duration::from_millis(300)).await;
    assert_eq!(outcome, Err(MeshError::Timeout(Duration::from_millis(300))));
    assert!(started.elapsed() < Duration::from_millis(1000), "{:?}", started.elapsed());
    assert_eq!(gw.mesh.pending_requests(), 0, "a timed-out call leaves no entry");

    let many = (0..50).map(|i| {
        gw.mesh.request(call("svc-to", "never", json!({"i": i})), Duration::from_millis(200))
    });
    let outcomes = within("50 timeouts", futures::future::join_all(many)).await;
    assert!(outcomes.iter().all(|o| matches!(o, Err(MeshError::Timeout(_)))));
    assert_eq!(gw.mesh.pending_requests(), 0);

    // A caller that goes away (its future dropped) while the call is in flight.
    let strays = gw.mesh.stats().strays_dropped;
    let slow = gw.mesh.request(call("svc-to", "slow", json!({"ms": 300})), WAIT);
    assert!(tokio::time::timeout(Duration::from_millis(100), slow).await.is_err());
    assert_eq!(gw.mesh.pending_requests(), 0, "a dropped call leaves no entry");
    eventually("the late response is counted as a stray", || {
        gw.mesh.stats().strays_dropped == strays + 1
    })
    .await;
    gw.stop().await;
    svc.stop().await;
}

pub async fn guard_rejects_before_publishing(ctx: Ctx) {
    let gw = ctx.start(ctx.config("gw-guard")).await;
    let connection = connect(&ctx.url).await;
    let channel = connection.create_channel().await.expect("channel");
    // A consumer-less spy: every message published for svc-guard or on the events
    // exchange would wait in it.
    let spy_queue = silent_spy(
        &channel,
        &[("nuropb-rpc-exchange", "svc-guard"), ("nuropb-events-exchange", "#")],
    )
    .await;
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!([deep]);
    }
    let calls = [
        call("svc-guard", "echo", json!({"blob": "x".repeat(2 * 1024 * 1024)})),
        call("svc-guard", "echo", json!({"deep": deep})),
        call("", "echo", json!({})),
        call("svc-guard", "", json!({})),
        call(&"s".repeat(256), "echo", json!({})),
        MeshCall {
            trace_id: TraceId::new("t".repeat(300)),
            ..call("svc-guard", "echo", json!({}))
        },
    ];
    for c in calls {
        let what = format!("{}/{}", c.service.len(), c.method.len());
        assert!(
            matches!(gw.mesh.request(c.clone(), WAIT).await, Err(MeshError::Rejected(_))),
            "request {what}"
        );
        assert!(matches!(gw.mesh.command(c).await, Err(MeshError::Rejected(_))), "command {what}");
    }
    let event = |topic: &str, payload: Value| MeshEvent {
        topic: topic.to_owned(),
        event: payload,
        target: None,
        context: JsonObject::new(),
        trace_id: None,
    };
    for e in [
        event("", json!(1)),
        event("t.x", json!({"blob": "x".repeat(2 * 1024 * 1024)})),
        event("t.x", json!({"deep": deep})),
    ] {
        assert!(matches!(gw.mesh.publish_event(e).await, Err(MeshError::Rejected(_))));
    }
    assert_eq!(gw.mesh.stats().rejected_by_guard, 15);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(message_count(&channel, &spy_queue).await, 0, "nothing was published");
    gw.stop().await;
}

pub async fn own_service_is_refused_before_publishing(ctx: Ctx) {
    // Encryption on (the default): not even a describe lookup may reach our own queue.
    let mut gw = ctx.start(ctx.config("gw-self")).await;
    let connection = connect(&ctx.url).await;
    let channel = connection.create_channel().await.expect("channel");
    // A consumer-less spy bound like the gateway's service queue: whatever would reach
    // that queue waits here too.
    let spy_queue = silent_spy(&channel, &[("nuropb-rpc-exchange", "gw-self")]).await;

    let refused =
        MeshError::Rejected("service gw-self cannot be called through the gateway".into());
    for (method, params) in [
        ("push_to_all", json!({"topic": "t", "event": "from a client"})),
        ("disconnect_user", json!({"user_id": "bob-id"})),
        ("stats", json!({})),
        ("nuropb_describe", json!({})),
    ] {
        let request = gw.mesh.request(call("gw-self", method, params.clone()), WAIT).await;
        assert_eq!(request.err(), Some(refused.clone()), "request {method}");
        let command = gw.mesh.command(call("gw-self", method, params)).await;
        assert_eq!(command, Err(refused.clone()), "command {method}");
    }
    let stats = gw.mesh.stats();
    assert_eq!((stats.rejected_by_guard, stats.service_calls), (8, 0), "{stats:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(message_count(&channel, &spy_queue).await, 0, "nothing was published");
    assert!(gw.inbound.try_recv().is_err(), "nothing reached the core");

    // Mesh peers still call the gateway's methods through its service queue.
    let mut peer = Peer::new(&ctx.url).await;
    let answer = peer.call("gw-self", "push_to_all", json!({"topic": "t", "event": 1})).await;
    assert_eq!(answer["result"], json!({"accepted": true}));
    match gw.next_inbound().await {
        MeshInbound::Control { op: GatewayControl::PushToAll { topic, .. }, .. } => {
            assert_eq!(topic, "t")
        }
        other => panic!("expected a control, got {other:?}"),
    }
    gw.stop().await;
}

pub async fn encrypted_call_uses_describe(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-enc", true).await;
    let gw = ctx.start(ctx.config("gw-enc")).await;
    let peer = Peer::new(&ctx.url).await;
    let (_spy, mut spied) = spy(&peer.channel, "nuropb-rpc-exchange", "svc-enc").await;

    // Two first callers at once share one describe lookup.
    let (alice, bob) = within(
        "two secrets",
        futures::future::join(
            gw.mesh.request(call("svc-enc", "secret", json!({"name": "alice"})), WAIT),
            gw.mesh.request(call("svc-enc", "secret", json!({"name": "bob"})), WAIT),
        ),
    )
    .await;
    assert_eq!(alice.expect("alice").result, json!("secret for alice"));
    assert_eq!(bob.expect("bob").result, json!("secret for bob"));
    assert_eq!(svc.describes.load(std::sync::atomic::Ordering::SeqCst), 1, "one shared describe");
    let plain = within("echo", gw.mesh.request(call("svc-enc", "echo", json!({"a": 1})), WAIT))
        .await
        .expect("echo");
    assert_eq!(plain.result, json!({"a": 1}));
    assert_eq!(svc.describes.load(std::sync::atomic::Ordering::SeqCst), 1, "cached");

    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = within("spied", spied.next()).await.expect("open").expect("delivery");
        seen.push((header(&d.properties, "encrypted").cloned(), d.data));
    }
    let encrypted: Vec<_> = seen.iter().filter(|(h, _)| h == &Some(long("yes"))).collect();
    assert_eq!(encrypted.len(), 2, "the two secret calls travel encrypted");
    for (_, body) in &encrypted {
        assert!(serde_json::from_slice::<Value>(body).is_err(), "an encrypted body is not JSON");
        assert!(body.contains(&b'.') && !String::from_utf8_lossy(body).contains("alice"));
    }
    let decrypted: Vec<_> = svc.received().into_iter().filter(|r| r.body != r.plaintext).collect();
    assert_eq!(decrypted.len(), 2);
    assert!(
        decrypted.iter().all(|r| r.plaintext.starts_with(
            b"{\"tag\": \"request\", \"service\": \"svc-enc\", \"method\": \"secret\""
        ))
    );
    assert_eq!(gw.mesh.pending_requests(), 0);
    gw.stop().await;
    svc.stop().await;
}

pub async fn encryption_survives_a_describe_outage(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-busy", true).await;
    let config = |encryption| AmqpMeshConfig {
        encryption,
        describe_ttl: Duration::from_millis(200),
        describe_timeout: Duration::from_millis(300),
        ..ctx.config("gw-busy")
    };
    let describes = || svc.describes.load(std::sync::atomic::Ordering::SeqCst);
    let secret = |name: &str| call("svc-busy", "secret", json!({"name": name}));
    let gw = ctx.start(config(EncryptionMode::Auto)).await;
    let a = within("secret a", gw.mesh.request(secret("a"), WAIT)).await.expect("a");
    assert_eq!(a.result, json!("secret for a"));
    assert_eq!(describes(), 1);

    // The service becomes too busy to answer describe, and the description expires.
    svc.answer_describe.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let started = Instant::now();
    let b = within("secret b", gw.mesh.request(secret("b"), WAIT)).await.expect("b");
    assert_eq!(b.result, json!("secret for b"));
    assert!(started.elapsed() < Duration::from_millis(250), "waited for the refresh");
    eventually("a background refresh", || describes() == 2).await;
    // Past describe_timeout the refresh has failed; the last description stays in use
    // and is not refreshed again per call.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = within("secret c", gw.mesh.request(secret("c"), WAIT)).await.expect("c");
    assert_eq!(c.result, json!("secret for c"));
    within("command d", gw.mesh.command(secret("d"))).await.expect("command d");
    assert_eq!(describes(), 2, "retried only after describe_negative_ttl");

    // Never described since start: `Required` refuses, `Auto` falls back to plaintext
    // (the documented fallback, logged at warn).
    let required = ctx.start(config(EncryptionMode::Required)).await;
    let refused = within("secret e", required.mesh.request(secret("e"), WAIT)).await;
    assert!(
        matches!(&refused, Err(MeshError::Encryption(why)) if why.contains("svc-busy")),
        "{refused:?}"
    );
    let refused =
        within("echo", required.mesh.request(call("svc-busy", "echo", json!({})), WAIT)).await;
    assert!(matches!(refused, Err(MeshError::Encryption(_))), "{refused:?}");
    let auto = ctx.start(config(EncryptionMode::Auto)).await;
    let f = within("secret f", auto.mesh.request(secret("f"), WAIT)).await.expect("f");
    assert_eq!(f.result, json!("secret for f"));

    let secrets: Vec<_> = svc
        .received()
        .into_iter()
        .filter(|r| String::from_utf8_lossy(&r.plaintext).contains(r#""method": "secret""#))
        .collect();
    let encrypted = |r: &nuropb_testkit::fake_service::Received| {
        header(&r.properties, "encrypted") == Some(&long("yes")) && r.body != r.plaintext
    };
    assert_eq!(secrets.len(), 5, "a, b, c, d and f");
    let (sealed, plain): (Vec<_>, Vec<_>) = secrets.iter().partition(|r| encrypted(r));
    assert_eq!(sealed.len(), 4, "every call of the gateway that had a description");
    assert!(String::from_utf8_lossy(&plain[0].plaintext).contains(r#""name": "f""#));
    for gw in [gw, required, auto] {
        gw.stop().await;
    }
    svc.stop().await;
}

pub async fn events_reach_every_instance(ctx: Ctx) {
    let config = || AmqpMeshConfig { event_bindings: vec!["ev.#".into()], ..ctx.config("gw-ev") };
    let mut a = ctx.start(config()).await;
    let mut b = ctx.start(config()).await;
    let peer = Peer::new(&ctx.url).await;
    let (_spy, mut spied) = spy(&peer.channel, "nuropb-events-exchange", "ev.all").await;

    // A nuropb-style event with a target list (V18 shape), from another service.
    let body = br#"{"tag": "event", "correlation_id": "c1", "context": {"by": "svc"}, "trace_id": "t1", "topic": "ev.user.msg", "event": {"m": 1}, "target": ["u1", 5, "u2"]}"#;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(nuropb_headers("event", Some("t1"), false))
        .with_correlation_id("c1".into())
        .with_reply_to("".into());
    peer.publish("nuropb-events-exchange", "ev.user.msg", props.clone(), body).await;
    for gw in [&mut a, &mut b] {
        match gw.next_inbound().await {
            MeshInbound::Event(e) => {
                assert_eq!(e.topic, "ev.user.msg");
                assert_eq!(e.event, json!({"m": 1}));
                assert_eq!(
                    e.target,
                    Some(vec![UserId::new("u1"), UserId::new("u2")]),
                    "non-strings ignored"
                );
                assert_eq!(e.trace_id, Some(TraceId::new("t1")));
                assert_eq!(e.context, object(json!({"by": "svc"})));
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }

    // An event the gateway publishes reaches every instance, itself included.
    let event = MeshEvent {
        topic: "ev.all".into(),
        event: json!({"hello": "w\u{f6}rld"}),
        target: None,
        context: JsonObject::new(),
        trace_id: None,
    };
    within("publish", a.mesh.publish_event(event.clone())).await.expect("published");
    for gw in [&mut a, &mut b] {
        match gw.next_inbound().await {
            MeshInbound::Event(e) => assert_eq!(e, event),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    let wire = within("spied event", spied.next()).await.expect("open").expect("delivery");
    assert_eq!(wire.properties.bitmask(), 0xa600, "no expiration on events");
    assert_eq!(wire.properties.reply_to().as_ref().map(|r| r.as_str()), Some(""));
    assert_eq!(
        header(&wire.properties, "trace_id"),
        Some(&AMQPValue::Void),
        "None travels as void"
    );
    assert_eq!(header(&wire.properties, "nuropb_type"), Some(&long("event")));
    let cid = wire.properties.correlation_id().as_ref().expect("cid").to_string();
    assert!(is_hex32(&cid));
    assert_eq!(
        String::from_utf8(wire.data.clone()).expect("ascii"),
        format!(
            r#"{{"tag": "event", "topic": "ev.all", "event": {{"hello": "w\u00f6rld"}}, "context": {{}}, "trace_id": null, "correlation_id": "{cid}", "target": null}}"#
        )
    );

    // Garbage on the events queue is dropped and counted; the queue keeps flowing.
    let lying = br#"{"tag": "event", "topic": "other.topic", "event": 1}"#;
    peer.publish("nuropb-events-exchange", "ev.lie", props.clone(), lying).await;
    peer.publish("nuropb-events-exchange", "ev.raw", BasicProperties::default(), b"not json").await;
    let after = br#"{"tag": "event", "topic": "ev.after", "event": 2, "context": {}, "trace_id": null, "correlation_id": "c2", "target": null}"#;
    peer.publish("nuropb-events-exchange", "ev.after", props, after).await;
    for gw in [&mut a, &mut b] {
        match gw.next_inbound().await {
            MeshInbound::Event(e) => {
                assert_eq!((e.topic.as_str(), e.event, e.target), ("ev.after", json!(2), None))
            }
            other => panic!("expected an event, got {other:?}"),
        }
        assert_eq!(gw.mesh.stats().garbage_rejected, 2);
        assert_eq!(gw.mesh.stats().events_received, 3);
    }
    a.stop().await;
    b.stop().await;
}

pub async fn gateway_methods_and_fan_out(ctx: Ctx) {
    let mut a = ctx.start(ctx.config("gw-svc")).await;
    let mut b = ctx.start(ctx.config("gw-svc")).await;
    let mut peer = Peer::new(&ctx.url).await;

    let describe = peer.call("gw-svc", "nuropb_describe", json!({})).await;
    let keys: Vec<_> = describe.as_object().expect("object").keys().cloned().collect();
    assert_eq!(
        keys,
        ["tag", "result", "error", "correlation_id", "trace_id", "context", "warning", "reply_to"]
    );
    assert_eq!(describe["error"], Value::Null);
    assert_eq!(describe["trace_id"], "peer-trace");
    assert_eq!(describe["context"], json!({"peer": true}));
    assert_eq!(describe["reply_to"], peer.reply_queue.as_str());
    let result = &describe["result"];
    assert_eq!(result["service_name"], "gw-svc");
    assert_eq!(result["encrypted_methods"], false);
    assert_eq!(result["public_key"], Value::Null);
    let methods: Vec<_> = result["methods"].as_object().expect("methods").keys().cloned().collect();
    assert_eq!(methods, ["disconnect_user", "push_to_all", "push_to_user", "stats"]);

    let accepted = peer
        .call(
            "gw-svc",
            "push_to_user",
            json!({"user_id": "u1", "topic": "chat", "event": {"m": 1}}),
        )
        .await;
    assert_eq!(
        (&accepted["result"], &accepted["error"]),
        (&json!({"accepted": true}), &Value::Null)
    );
    let expected = GatewayControl::PushToUsers {
        user_ids: vec!["u1".into()],
        topic: "chat".into(),
        event: json!({"m": 1}),
    };
    for gw in [&mut a, &mut b] {
        match gw.next_inbound().await {
            MeshInbound::Control { op, reply: None } => assert_eq!(op, expected),
            other => panic!("expected a control, got {other:?}"),
        }
    }
    peer.call("gw-svc", "push_to_all", json!({"topic": "news", "event": "hi"})).await;
    peer.call("gw-svc", "disconnect_user", json!({"user_ids": ["u1", "u2"]})).await;
    for gw in [&mut a, &mut b] {
        let ops: Vec<_> = [gw.next_inbound().await, gw.next_inbound().await]
            .into_iter()
            .map(|m| match m {
                MeshInbound::Control { op, .. } => op,
                other => panic!("expected a control, got {other:?}"),
            })
            .collect();
        assert_eq!(
            ops,
            [
                GatewayControl::PushToAll { topic: "news".into(), event: json!("hi") },
                GatewayControl::DisconnectUsers {
                    user_ids: vec!["u1".into(), "u2".into()],
                    reason: "disconnected by the mesh".into()
                },
            ]
        );
    }

    // `stats` is answered by whichever instance takes the call, from its own core.
    let figures = GatewayStats {
        sessions: 3,
        sessions_high_water: 5,
        users: 2,
        requests_in_flight: 1,
        requests_total: 42,
        requests_timed_out: 0,
        events_delivered: 7,
        frames_dropped: 0,
        mesh_connected: true,
    };
    let url = ctx.url.clone();
    let caller = tokio::spawn(async move {
        let mut peer = Peer::new(&url).await;
        peer.call("gw-svc", "stats", json!({})).await
    });
    let reply = within("a stats request on either instance", async {
        tokio::select! {
            Some(m) = a.inbound.recv() => m,
            Some(m) = b.inbound.recv() => m,
        }
    })
    .await;
    match reply {
        MeshInbound::Stats { reply } => reply.send(figures.clone()).expect("the adapter waits"),
        other => panic!("expected stats, got {other:?}"),
    }
    let stats = within("stats answer", caller).await.expect("caller");
    assert_eq!(stats["result"], serde_json::to_value(&figures).expect("json"));

    for (method, params, error, description) in [
        ("_private", json!({}), "NuropbHandlingError", "Unknown method _private"),
        ("nope", json!({}), "NuropbHandlingError", "Unknown method nope"),
        (
            "push_to_user",
            json!({"topic": "t", "event": 1}),
            "NuropbValidationError",
            "missing parameter user_id or user_ids",
        ),
        (
            "push_to_all",
            json!({"topic": "t", "event": 1, "x": 1}),
            "NuropbValidationError",
            "unexpected parameter x",
        ),
        (
            "push_to_user",
            json!({"user_ids": [], "topic": "t", "event": 1}),
            "NuropbValidationError",
            "user_ids must not be empty",
        ),
    ] {
        let answer = peer.call("gw-svc", method, params).await;
        assert_eq!(answer["result"], Value::Null);
        assert_eq!(
            answer["error"],
            json!({"error": error, "description": description}),
            "{method}"
        );
    }
    assert_eq!(a.mesh.stats().service_calls + b.mesh.stats().service_calls, 10);
    a.stop().await;
    b.stop().await;
}

pub async fn garbage_on_service_queue_is_rejected_and_queue_flows(ctx: Ctx) {
    // Prefetch 1, like a nuropb service: a single message left unacknowledged would block
    // the describe call at the end.
    let gw = ctx.start(AmqpMeshConfig { prefetch: 1, ..ctx.config("gw-garbage") }).await;
    let mut peer = Peer::new(&ctx.url).await;
    let dead = bound_queue(&peer, "nuropb-dl-exchange", "").await;

    let sq = "nuropb-gw-garbage-sq";
    let with = |headers: FieldTable| {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_correlation_id("c-garbage".into())
            .with_reply_to(peer.reply_queue.as_str().into())
    };
    let request = br#"{"tag": "request", "service": "gw-garbage", "method": "stats", "params": {}, "correlation_id": "c", "context": {}, "trace_id": null}"#;
    let mut wrong_protocol = nuropb_headers("request", None, false);
    wrong_protocol.insert("nuropb_protocol".into(), long("9.9.9"));
    let mut unknown_type = nuropb_headers("request", None, false);
    unknown_type.insert("nuropb_type".into(), long("query"));
    let garbage: [(BasicProperties, &[u8]); 5] = [
        (with(nuropb_headers("response", None, false)), br#"{"tag": "response", "result": 1}"#),
        (BasicProperties::default(), request),
        (with(wrong_protocol), request),
        (with(unknown_type), request),
        (with(nuropb_headers("request", None, true)), request),
    ];
    for (props, body) in garbage.clone() {
        peer.publish("", sq, props, body).await;
    }
    peer.publish("", sq, with(nuropb_headers("request", None, false)), b"not json").await;
    peer.publish("", sq, with(nuropb_headers("request", None, false)), b"[1, 2, 3]").await;

    let describe = peer.call("gw-garbage", "nuropb_describe", json!({})).await;
    assert_eq!(describe["result"]["service_name"], "gw-garbage", "the queue still flows");
    assert_eq!(gw.mesh.stats().garbage_rejected, 4, "{:?}", gw.mesh.stats());
    eventually_async("7 dead letters", || async { message_count(&peer.channel, &dead).await == 7 })
        .await;
    gw.stop().await;
}

/// A server-named exclusive queue of `peer`'s, bound to `exchange` with `key`: its name.
async fn bound_queue(peer: &Peer, exchange: &str, key: &str) -> String {
    let queue = peer
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("declare a queue");
    let name = queue.name().as_str().to_owned();
    peer.channel
        .queue_bind(
            name.as_str().into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the queue");
    name
}

async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn garbage_on_response_queue_is_dropped(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-gr", false).await;
    let gw =
        ctx.start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-gr") }).await;
    let answer = within(
        "garbage_then_echo",
        gw.mesh.request(call("svc-gr", "garbage_then_echo", json!({"ok": 1})), WAIT),
    )
    .await
    .expect("answered");
    assert_eq!(answer.result, json!({"ok": 1}), "malformed envelopes do not count as the response");
    assert_eq!(gw.mesh.stats().garbage_rejected, 3);

    let answer = within("bad_body", gw.mesh.request(call("svc-gr", "bad_body", json!({})), WAIT))
        .await
        .expect("answered");
    let error = answer.error.expect("an error answer, not a hang");
    assert_eq!(error.error, "NuropbTransportError");
    assert!(error.description.contains("malformed response from svc-gr.bad_body"), "{error:?}");
    assert_eq!(gw.mesh.pending_requests(), 0);
    gw.stop().await;
    svc.stop().await;
}

pub async fn connection_loss_fails_fast_and_recovers(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-fault", false).await;
    let gw = ctx
        .start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-fault") })
        .await;
    within("warm-up", gw.mesh.request(call("svc-fault", "echo", json!({})), WAIT))
        .await
        .expect("echo");

    // Twenty calls in flight that the service answers only after 3 s.
    let in_flight: Vec<_> = (0..20)
        .map(|i| {
            let mesh = gw.mesh.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let outcome = mesh
                    .request(
                        call("svc-fault", "slow", json!({"ms": 3000, "i": i})),
                        Duration::from_secs(10),
                    )
                    .await;
                (outcome, started.elapsed())
            })
        })
        .collect();
    eventually("all 20 calls pending", || gw.mesh.pending_requests() == 20).await;

    // Cut every connection and keep the gateway out until permissions return.
    let vh = ctx.vhost.as_str();
    rabbitmqctl_async(&["clear_permissions", "-p", vh, "guest"]).await;
    let cut = Instant::now();
    rabbitmqctl_async(&["close_all_connections", "-p", vh, "amqp-mesh fault test"]).await;
    for task in in_flight {
        let (outcome, _) = within("an in-flight call ends", task).await.expect("task");
        match outcome {
            Err(MeshError::Unavailable(_)) => {}
            other => panic!("in-flight call ended with {other:?}"),
        }
    }
    assert!(
        cut.elapsed() < Duration::from_secs(3),
        "in-flight calls ended {:?} after the cut",
        cut.elapsed()
    );
    assert_eq!(gw.mesh.pending_requests(), 0);
    eventually("the gateway notices", || !gw.mesh.is_connected()).await;

    // While down, calls fail at once instead of waiting.
    let started = Instant::now();
    let outcome = gw.mesh.request(call("svc-fault", "echo", json!({})), WAIT).await;
    assert!(matches!(outcome, Err(MeshError::Unavailable(_))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!gw.mesh.is_connected(), "refused reconnects keep it down");

    rabbitmqctl_async(&["set_permissions", "-p", vh, "guest", ".*", ".*", ".*"]).await;
    let restored = Instant::now();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), gw.mesh.connected()).await.unwrap_or(false),
        "reconnected within 10 s"
    );
    let svc2 = FakeService::start(&ctx.url, "svc-fault", false).await;
    let answer = within(
        "a call after recovery",
        gw.mesh.request(call("svc-fault", "echo", json!({"back": true})), WAIT),
    )
    .await
    .expect("served again");
    assert_eq!(answer.result, json!({"back": true}));
    println!(
        "    (service resumed {:.2}s after permissions returned)",
        restored.elapsed().as_secs_f64()
    );
    assert!(gw.mesh.stats().reconnects >= 1);
    gw.stop().await;
    svc.stop().await;
    svc2.stop().await;
}

pub async fn shutdown_drains_pending_requests(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-drain", false).await;
    let gw = ctx
        .start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-drain") })
        .await;
    let mesh = gw.mesh.clone();
    let slow = tokio::spawn({
        let mesh = mesh.clone();
        async move { mesh.request(call("svc-drain", "slow", json!({"ms": 300})), WAIT).await }
    });
    let never = tokio::spawn({
        let mesh = mesh.clone();
        async move { mesh.request(call("svc-drain", "never", json!({})), WAIT).await }
    });
    eventually("both pending", || mesh.pending_requests() == 2).await;
    gw.shutdown.cancel();
    let refused = mesh.request(call("svc-drain", "echo", json!({})), WAIT).await;
    assert_eq!(refused, Err(MeshError::Unavailable("shutting down".into())));
    assert_eq!(
        within("slow", slow).await.expect("task").expect("answered during the drain").result,
        json!({"ms": 300})
    );
    let started = Instant::now();
    assert!(matches!(within("never", never).await.expect("task"), Err(MeshError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_millis(1500), "ended by drain_timeout");
    within("closed", mesh.closed()).await;
    assert!(!mesh.is_connected());
    drop(gw);
    svc.stop().await;
}

pub async fn shutdown_settles_unconfirmed_commands(ctx: Ctx) {
    // Nothing outstanding: closing follows the cancellation within a broker round trip.
    let idle = ctx.start(ctx.config("gw-idle")).await;
    let cancelled = Instant::now();
    idle.shutdown.cancel();
    within("idle closed", idle.mesh.closed()).await;
    assert!(cancelled.elapsed() < Duration::from_millis(300), "{:?}", cancelled.elapsed());

    let svc = FakeService::start(&ctx.url, "svc-settle", false).await;
    let gw = ctx
        .start(AmqpMeshConfig { encryption: EncryptionMode::Off, ..ctx.config("gw-settle") })
        .await;
    let mesh = gw.mesh.clone();
    let mut commands = Box::pin(futures::future::join_all(
        (0..200).map(|i| mesh.command(call("svc-settle", "note", json!({"i": i})))),
    ));
    // One poll hands every command to the publisher; then the token fires with most of
    // them still awaiting the broker's confirmation.
    assert!(futures::poll!(&mut commands).is_pending());
    let cancelled = Instant::now();
    gw.shutdown.cancel();
    let outcomes = within("200 commands", commands).await;
    let failed: Vec<_> = outcomes.iter().filter(|o| o.is_err()).collect();
    assert!(failed.is_empty(), "{} commands failed, e.g. {:?}", failed.len(), failed.first());
    within("closed", mesh.closed()).await;
    assert!(
        cancelled.elapsed() < Duration::from_millis(900),
        "well within drain_timeout (1 s): {:?}",
        cancelled.elapsed()
    );
    eventually("the service received all 200", || svc.received().len() == 200).await;
    drop(gw);
    svc.stop().await;
}

pub async fn encryption_key_follows_a_restarted_service(ctx: Ctx) {
    use std::sync::atomic::Ordering::SeqCst;
    // Long enough to cover stopping v1 and starting v2 on a loaded machine (the call that
    // must still use the old key comes after both); 400 ms was once not (CI, 4 test threads).
    let key_ttl = Duration::from_millis(1500);
    let gw = ctx
        .start(AmqpMeshConfig {
            encryption_key_ttl: key_ttl,
            describe_timeout: Duration::from_millis(300),
            ..ctx.config("gw-rekey")
        })
        .await;
    let secret = |name: &str| call("svc-rekey", "secret", json!({"name": name}));
    let v1 = FakeService::start_with(&ctx.url, "svc-rekey", Some(PRIVATE_KEY_PEM)).await;
    let a = within("secret a", gw.mesh.request(secret("a"), WAIT)).await.expect("a");
    assert_eq!(a.result, json!("secret for a"));

    // The service restarts with a new key. Within the key's TTL the gateway still uses
    // the old one (the residual window, documented): the service cannot read the body
    // (a nuropb service would die here) and the call times out. That drops the key.
    v1.stop().await;
    let v2 = FakeService::start_with(&ctx.url, "svc-rekey", Some(OTHER_PRIVATE_KEY_PEM)).await;
    let lost = gw.mesh.request(secret("lost"), Duration::from_millis(300)).await;
    assert_eq!(lost, Err(MeshError::Timeout(Duration::from_millis(300))));
    eventually("the new instance got an undecryptable body", || v2.undecryptable.load(SeqCst) == 1)
        .await;
    // The next encrypted call fetches the key again first, however young the old one was.
    let b = within("secret b", gw.mesh.request(secret("b"), WAIT)).await.expect("b");
    assert_eq!(b.result, json!("secret for b"));
    assert_eq!(v2.describes.load(SeqCst), 1);

    // Past the key's TTL, an encrypted call waits for a describe; plaintext calls do not.
    tokio::time::sleep(key_ttl + Duration::from_millis(100)).await;
    within("echo", gw.mesh.request(call("svc-rekey", "echo", json!({})), WAIT))
        .await
        .expect("echo");
    assert_eq!(v2.describes.load(SeqCst), 1, "plaintext methods need no current key");
    let c = within("secret c", gw.mesh.request(secret("c"), WAIT)).await.expect("c");
    assert_eq!(c.result, json!("secret for c"));
    assert_eq!(v2.describes.load(SeqCst), 2);

    // If that describe fails, the call is refused: never the old key, never plaintext.
    v2.answer_describe.store(false, SeqCst);
    tokio::time::sleep(key_ttl + Duration::from_millis(100)).await;
    let refused =
        Err(MeshError::Encryption("public key of svc-rekey could not be refreshed".into()));
    let started = Instant::now();
    assert_eq!(within("secret d", gw.mesh.request(secret("d"), WAIT)).await, refused);
    assert!(started.elapsed() >= Duration::from_millis(300), "waited for the describe");
    // Remembered for describe_negative_ttl: refused at once, without another describe.
    let started = Instant::now();
    assert_eq!(within("command e", gw.mesh.command(secret("e"))).await, refused.map(|_| ()));
    assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    assert_eq!(v2.describes.load(SeqCst), 3);
    let secrets_received = v2
        .received()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.plaintext).contains(r#""method": "secret""#))
        .count();
    assert_eq!(secrets_received, 2, "only b and c reached the service");
    assert_eq!(v2.undecryptable.load(SeqCst), 1);
    assert_eq!(gw.mesh.pending_requests(), 0);
    gw.stop().await;
    v2.stop().await;
}

pub async fn client_relayed_calls_cannot_use_another_gateways_methods(ctx: Ctx) {
    // Two gateway deployments on one vhost; a client of A names B's service.
    let a = ctx.start(ctx.config("gw-rel-a")).await;
    let mut b = ctx.start(ctx.config("gw-rel-b")).await;
    for (method, params) in [
        ("disconnect_user", json!({"user_id": "bob-id"})),
        ("push_to_all", json!({"topic": "t", "event": "from a client of A"})),
        ("push_to_user", json!({"user_id": "bob-id", "topic": "t", "event": 1})),
        ("stats", json!({})),
    ] {
        let answer = within(method, a.mesh.request(call("gw-rel-b", method, params.clone()), WAIT))
            .await
            .expect("B answers");
        assert_eq!(answer.result, Value::Null, "{method}");
        let error = answer.error.expect("an error answer");
        assert_eq!(error.error, "NuropbAuthorizationError", "{method}");
        assert!(error.description.contains("gw-rel-a"), "{error:?}");
        // A command is routed (B's queue exists) and refused there, without an answer.
        within("command", a.mesh.command(call("gw-rel-b", method, params))).await.expect("routed");
    }
    let described =
        within("describe", a.mesh.request(call("gw-rel-b", "nuropb_describe", json!({})), WAIT))
            .await
            .expect("describe answered");
    assert_eq!(described.result["service_name"], "gw-rel-b", "describe stays allowed");
    eventually("B handled the 9 calls and A's describe lookup", || {
        b.mesh.stats().service_calls == 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.inbound.try_recv().is_err(), "nothing reached B's core");

    // Mesh peers (no marker) still reach B's methods.
    let mut peer = Peer::new(&ctx.url).await;
    let answer = peer.call("gw-rel-b", "disconnect_user", json!({"user_id": "bob-id"})).await;
    assert_eq!(answer["result"], json!({"accepted": true}));
    match b.next_inbound().await {
        MeshInbound::Control { op: GatewayControl::DisconnectUsers { user_ids, .. }, .. } => {
            assert_eq!(user_ids, vec![UserId::new("bob-id")])
        }
        other => panic!("expected a control, got {other:?}"),
    }
    a.stop().await;
    b.stop().await;
}

pub async fn control_operations_survive_event_load_and_overflow_is_refused(ctx: Ctx) {
    // A core that does not read: one message in the channel, one held by each consumer.
    // The second binding also brings the control topic to the events queue: those copies
    // are skipped there (each operation is carried out once, from the control queue).
    let mut gw = ctx
        .start(AmqpMeshConfig {
            event_bindings: vec!["load.#".into(), "nuropb-gateway.#".into()],
            events_queue_max_length: 5,
            control_queue_max_length: 3,
            prefetch: 1,
            inbound_capacity: 1,
            encryption: EncryptionMode::Off,
            ..ctx.config("gw-ctl")
        })
        .await;
    let mut peer = Peer::new(&ctx.url).await;
    let event = br#"{"tag": "event", "topic": "load.x", "event": 1, "context": {}, "trace_id": null, "correlation_id": "c", "target": null}"#;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(nuropb_headers("event", None, false))
        .with_correlation_id("c".into())
        .with_reply_to("".into());
    // Event load: far beyond the events queue's bound, which drops the oldest.
    for _ in 0..50 {
        peer.publish("nuropb-events-exchange", "load.x", props.clone(), event).await;
    }
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for i in 0..8 {
        let user = format!("u{i}");
        let answer = peer.call("gw-ctl", "disconnect_user", json!({"user_id": user})).await;
        if answer["result"] == json!({"accepted": true}) {
            assert_eq!(refused, 0, "accepted after a refusal: {answer}");
            accepted.push(user);
        } else {
            assert_eq!(answer["error"]["error"], "NuropbOverloadedError", "{answer}");
            refused += 1;
        }
    }
    assert!(accepted.len() >= 3 && refused >= 1, "accepted {accepted:?}, refused {refused}");

    // Every accepted operation reaches the core, however many events were dropped; no
    // refused one does.
    let mut disconnected = Vec::new();
    let mut events = 0;
    while disconnected.len() < accepted.len() {
        match gw.next_inbound().await {
            MeshInbound::Control {
                op: GatewayControl::DisconnectUsers { user_ids, .. }, ..
            } => disconnected.extend(user_ids.into_iter().map(|u| u.as_str().to_owned())),
            MeshInbound::Event(_) => events += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(disconnected, accepted);
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), gw.inbound.recv()).await
    {
        match message {
            MeshInbound::Event(_) => events += 1,
            other => panic!("a refused operation arrived: {other:?}"),
        }
    }
    assert!(events < 50, "the events queue dropped the oldest ({events} arrived)");
    // With room again, operations are accepted.
    let answer = peer.call("gw-ctl", "push_to_all", json!({"topic": "t", "event": 1})).await;
    assert_eq!(answer["result"], json!({"accepted": true}));
    assert!(matches!(gw.next_inbound().await, MeshInbound::Control { .. }));
    assert!(gw.mesh.stats().publish_failures >= 1, "the refusals are counted");
    gw.stop().await;
}

/// `x-max-length` on the events queue drops the oldest events; the broker dead-letters
/// them to the instance's drop queue, where each is counted: every event published is
/// either delivered to the core or counted as dropped, none is lost silently.
pub async fn events_the_full_events_queue_drops_are_counted(ctx: Ctx) {
    // A core that does not read yet: one event in the channel, one held by the consumer.
    let mut gw = ctx
        .start(AmqpMeshConfig {
            event_bindings: vec!["flood.#".into()],
            events_queue_max_length: 5,
            prefetch: 1,
            inbound_capacity: 1,
            encryption: EncryptionMode::Off,
            ..ctx.config("gw-drops")
        })
        .await;
    let peer = Peer::new(&ctx.url).await;
    let event = br#"{"tag": "event", "topic": "flood.x", "event": 1, "context": {}, "trace_id": null, "correlation_id": "c", "target": null}"#;
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(nuropb_headers("event", None, false))
        .with_correlation_id("c".into())
        .with_reply_to("".into());
    const PUBLISHED: u64 = 50;
    for _ in 0..PUBLISHED {
        peer.publish("nuropb-events-exchange", "flood.x", props.clone(), event).await;
    }
    // At most 5 queued + 1 unacked + 1 in the channel (+1 on its way) are not dropped.
    eventually("the broker's drops counted", || {
        gw.mesh.stats().events_dropped_by_broker >= PUBLISHED - 8
    })
    .await;
    let mut delivered = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), gw.inbound.recv()).await
    {
        assert!(matches!(message, MeshInbound::Event(_)), "{message:?}");
        delivered += 1;
    }
    let dropped = gw.mesh.stats().events_dropped_by_broker;
    assert_eq!(delivered + dropped, PUBLISHED, "delivered {delivered}, dropped {dropped}");
    assert!(delivered >= 1, "the queue's newest events still arrive");
    gw.stop().await;
}

pub async fn oversized_response_fails_its_request_at_once(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-big", false).await;
    let gw = ctx
        .start(AmqpMeshConfig {
            max_inbound_body_bytes: 2000,
            encryption: EncryptionMode::Off,
            ..ctx.config("gw-big")
        })
        .await;
    let started = Instant::now();
    let outcome = within(
        "a too large answer",
        gw.mesh.request(call("svc-big", "echo", json!({"blob": "x".repeat(5000)})), WAIT),
    )
    .await;
    match outcome {
        Err(MeshError::ResponseTooLarge { bytes, limit }) => {
            assert!(bytes > 5000, "{bytes}");
            assert_eq!(limit, 2000);
        }
        other => panic!("expected ResponseTooLarge, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1), "not the timeout: {:?}", started.elapsed());
    assert_eq!(gw.mesh.pending_requests(), 0);
    let small = within("echo", gw.mesh.request(call("svc-big", "echo", json!({"a": 1})), WAIT))
        .await
        .expect("a small answer");
    assert_eq!(small.result, json!({"a": 1}));
    // The counters are updated after the caller got its answer: wait for them to settle.
    let counted = |gw: &Gateway| {
        let stats = gw.mesh.stats();
        (stats.garbage_rejected, stats.responses, stats.strays_dropped)
    };
    eventually("the response counted", || counted(&gw) == (1, 1, 0)).await;
    assert_eq!(counted(&gw), (1, 1, 0));
    gw.stop().await;
    svc.stop().await;
}

/// A black-holed link (no FIN, no RST, nothing passes) is noticed within the documented
/// 2.5 heartbeats (`AmqpMeshConfig::heartbeat`): the mesh reports disconnected (unready),
/// reconnects, and serves again.
pub async fn a_black_holed_link_is_noticed_within_its_heartbeats(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-hole", false).await;
    let proxy = HalfOpenProxy::start().await;
    let heartbeat = Duration::from_secs(1);
    let config = AmqpMeshConfig {
        url: proxy.url(&ctx.url),
        encryption: EncryptionMode::Off,
        heartbeat,
        ..ctx.config("gw-hole")
    };
    let gw = ctx.start(config).await;
    within("warm-up", gw.mesh.request(call("svc-hole", "echo", json!({})), WAIT))
        .await
        .expect("echo");

    proxy.black_hole();
    let cut = Instant::now();
    let bound = heartbeat.mul_f32(2.5);
    // Slack for the supervisor's reaction and a loaded machine.
    let slack = Duration::from_millis(750);
    while gw.mesh.is_connected() {
        assert!(cut.elapsed() < bound + slack, "still connected after {:?}", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = cut.elapsed();
    assert!(noticed >= heartbeat, "noticed after {noticed:?}: before any heartbeat was due?");
    assert_eq!(proxy.held(), 2, "both sides of the old connection stay open");
    eventually("reconnected", || gw.mesh.stats().reconnects == 1 && gw.mesh.is_connected()).await;
    within("echo after the reconnect", gw.mesh.request(call("svc-hole", "echo", json!({})), WAIT))
        .await
        .expect("echo");
    gw.stop().await;
    svc.stop().await;
}

pub async fn reconnect_after_a_half_open_loss_is_immediate(ctx: Ctx) {
    let svc = FakeService::start(&ctx.url, "svc-half", false).await;
    let proxy = HalfOpenProxy::start().await;
    // The default heartbeat (5 s): the broker holds on to a silent connection for about
    // 10 s, and with it any exclusive queue or consumer of it.
    let config = AmqpMeshConfig {
        url: proxy.url(&ctx.url),
        encryption: EncryptionMode::Off,
        ..ctx.config("gw-half")
    };
    let connection_name = format!("gw-half/{}", config.instance_id);
    let gw = ctx.start(config).await;
    within("warm-up", gw.mesh.request(call("svc-half", "echo", json!({})), WAIT))
        .await
        .expect("echo");
    let first_queue = gw.mesh.response_queue().expect("connected");
    let in_flight = tokio::spawn({
        let mesh = gw.mesh.clone();
        async move { mesh.request(call("svc-half", "slow", json!({"ms": 600})), WAIT).await }
    });
    eventually("the slow call pending", || gw.mesh.pending_requests() == 1).await;

    proxy.sever();
    let outcome = within("the in-flight call", in_flight).await.expect("task");
    assert!(matches!(outcome, Err(MeshError::Unavailable(_))), "{outcome:?}");
    let cut = Instant::now();
    eventually("reconnected", || gw.mesh.stats().reconnects == 1 && gw.mesh.is_connected()).await;
    assert!(cut.elapsed() < Duration::from_secs(3), "reconnect took {:?}", cut.elapsed());
    assert_eq!(proxy.held(), 1, "the old connection is half-open");
    // Each of our connections names itself `<service>/<instance>` in its client properties.
    let connections = rabbitmqctl_async(&[
        "list_connections",
        "-p",
        &ctx.vhost,
        "client_properties",
        "--formatter",
        "json",
    ])
    .await;
    let ours = connections.matches(&connection_name).count();
    assert_eq!(ours, 2, "the broker still holds the old connection: {connections}");

    let second_queue = gw.mesh.response_queue().expect("connected");
    assert_ne!(first_queue, second_queue, "a fresh response queue per connection");
    let answer =
        within("echo", gw.mesh.request(call("svc-half", "echo", json!({"back": 1})), WAIT)).await;
    assert_eq!(answer.expect("served").result, json!({"back": 1}));
    // The slow call's late answer goes to the old connection's queue: harmless.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = gw.mesh.stats();
    assert_eq!((stats.strays_dropped, stats.pending_requests), (0, 0), "{stats:?}");
    gw.stop().await;
    drop(proxy);
    svc.stop().await;
}
