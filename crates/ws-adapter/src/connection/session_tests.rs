//! The session loop end to end over `tokio::io::duplex`, with a tokio-tungstenite client on
//! the other end and the real coordinator on an in-memory mesh, under paused time: pings,
//! idle timeout, rate limit, slow client. Every test asserts what the client sees.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use handler_core::auth::MockAuthenticator;
use handler_core::in_memory::InMemoryMesh;
use handler_core::{Coordinator, CoordinatorHandle, CoreConfig, Identity, MeshEvent, UserId};
use nuropb_wire::client::{Encoding, ErrorFrame, ServerFrame, ServerMessage, decode_server_frame};

use super::{Admission, run};
use crate::config::WsConfig;
use crate::stats::WsStatsHandle;

/// Long enough for anything the gateway does on its own (the longest: an idle close after
/// 80 s); under paused time, waiting it out costs nothing.
const PATIENCE: Duration = Duration::from_secs(600);

struct Session {
    client: WebSocketStream<DuplexStream>,
    /// The connection task; it ends when the gateway has closed the connection.
    server: JoinHandle<()>,
    mesh: InMemoryMesh,
    coordinator: CoordinatorHandle,
    // Kept so that the coordinator keeps running for the whole test (when the session has
    // the gateway to itself).
    _shutdown: Option<tokio_util::sync::DropGuard>,
}

/// A client connected over a duplex pipe of `pipe_bytes` per direction, past the hello.
async fn connect(config: WsConfig, pipe_bytes: usize) -> Session {
    let gateway = Gateway::start(config);
    let mut session = gateway.connect(pipe_bytes).await;
    session._shutdown = Some(gateway.shutdown);
    session
}

/// A coordinator on an in-memory mesh, and the config its connections run with.
struct Gateway {
    config: Arc<WsConfig>,
    mesh: InMemoryMesh,
    coordinator: CoordinatorHandle,
    shutdown: tokio_util::sync::DropGuard,
}

impl Gateway {
    fn start(config: WsConfig) -> Gateway {
        let (mesh, inbound) = InMemoryMesh::builder().build();
        let mut auth = MockAuthenticator::new();
        auth.expect_authenticate().returning(|token| match token {
            // The mesh token check could not ask its service / refused the token.
            "tok-mesh-down" => Err(handler_core::auth::AuthError::Unavailable),
            "tok-refused" => Err(handler_core::auth::AuthError::Refused),
            _ => Ok(Identity {
                user_id: UserId::new("alice-id"),
                username: "alice".into(),
                token: token.to_owned(),
                expires_at: None,
                token_expires_at: None,
            }),
        });
        let core =
            CoreConfig { broadcast_topics: vec!["broadcast.#".into()], ..CoreConfig::default() };
        let shutdown = CancellationToken::new();
        let (coordinator, handle) = Coordinator::new(
            core,
            Arc::new(auth),
            Arc::new(mesh.clone()),
            inbound,
            TaskTracker::new(),
            shutdown.clone(),
        );
        tokio::spawn(coordinator.run(Duration::from_secs(1)));
        Gateway {
            config: Arc::new(config),
            mesh,
            coordinator: handle,
            shutdown: shutdown.drop_guard(),
        }
    }

    /// One more client, over a duplex pipe of `pipe_bytes` per direction, past the hello.
    async fn connect(&self, pipe_bytes: usize) -> Session {
        let (client_io, server_io) = tokio::io::duplex(pipe_bytes);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let server = tokio::spawn(run(
            server_io,
            Admission::Session {
                _permit: permit,
                deadline: tokio::time::Instant::now() + Duration::from_secs(10),
            },
            Arc::clone(&self.config),
            self.coordinator.clone(),
            WsStatsHandle::new(),
        ));
        let mut request = "ws://gateway/ws".into_client_request().unwrap();
        request.headers_mut().insert("Authorization", "Bearer tok-alice".parse().unwrap());
        let (client, _response) =
            tokio_tungstenite::client_async(request, client_io).await.unwrap();
        let mut session = Session {
            client,
            server,
            mesh: self.mesh.clone(),
            coordinator: self.coordinator.clone(),
            _shutdown: None,
        };
        let hello = session.json().await;
        assert!(
            matches!(&hello, ServerFrame::Message(ServerMessage::Event { topic, .. }) if topic == "hello"),
            "{hello:?}"
        );
        session
    }

    async fn broadcast(&self, n: usize, bytes: usize) {
        self.mesh.inject_event(broadcast(n, bytes)).await.unwrap();
    }

    /// Yields (paused time stands still) until `deliveries` event deliveries were queued or
    /// dropped.
    async fn delivered(&self, deliveries: u64) {
        let mut yields = 0;
        loop {
            let stats = self.coordinator.stats();
            if stats.events_delivered + stats.frames_dropped >= deliveries {
                break;
            }
            yields += 1;
            assert!(yields < 100_000, "events not delivered: {stats:?}");
            tokio::task::yield_now().await;
        }
    }
}

fn broadcast(n: usize, bytes: usize) -> MeshEvent {
    MeshEvent {
        topic: format!("broadcast.{n}"),
        event: "x".repeat(bytes).into(),
        target: None,
        context: Default::default(),
        trace_id: None,
    }
}

fn is_broadcast(frame: &ServerFrame, n: usize) -> bool {
    matches!(frame, ServerFrame::Message(ServerMessage::Event { topic, .. }) if *topic == format!("broadcast.{n}"))
}

impl Session {
    async fn next(&mut self) -> Message {
        tokio::time::timeout(PATIENCE, self.client.next())
            .await
            .expect("a frame in time")
            .expect("the connection open")
            .expect("a frame")
    }

    async fn json(&mut self) -> ServerFrame {
        match self.next().await {
            Message::Text(t) => decode_server_frame(t.as_bytes(), Encoding::Json).unwrap(),
            other => panic!("not a text frame: {other:?}"),
        }
    }

    async fn send(&mut self, text: &str) {
        self.client.send(Message::text(text)).await.unwrap();
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code: WsCloseCode::from(code), reason: reason.into() }))
}

fn pong() -> ServerFrame {
    ServerFrame::Message(ServerMessage::Pong {})
}

#[tokio::test(start_paused = true)]
async fn a_ping_goes_out_every_ping_interval_and_a_client_that_answers_stays() {
    let t0 = Instant::now();
    let mut s = connect(WsConfig::default(), 64 << 10).await;
    // Past the 60 s idle timeout: each read also sends tungstenite's pong to the last ping.
    for n in 1..=5 {
        assert_eq!(s.next().await, Message::Ping(Bytes::new()), "ping {n}");
        assert_eq!(t0.elapsed(), Duration::from_secs(20) * n, "ping {n}");
    }
    assert!(!s.server.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_nothing_is_closed_with_1001_idle_timeout() {
    let mut s = connect(WsConfig::default(), 64 << 10).await;
    // The client reads nothing, so it answers no ping. Ticks come every 20 s; the first one
    // more than 60 s after the last client frame (at 0 s) closes: 80 s.
    assert!(tokio::time::timeout(Duration::from_secs(79), &mut s.server).await.is_err());
    tokio::time::timeout(Duration::from_secs(2), &mut s.server).await.unwrap().unwrap();
    // Read below tungstenite: reading a ping through it would answer with a pong, into a
    // pipe whose other end is gone. Three pings (unmasked, empty), then the close frame.
    let mut wire = Vec::new();
    s.client.get_mut().read_to_end(&mut wire).await.unwrap();
    let mut expected = [0x89, 0x00].repeat(3);
    expected.extend([0x88, 14, 0x03, 0xe9]); // 1001
    expected.extend(b"idle timeout");
    assert_eq!(wire, expected);
}

#[tokio::test(start_paused = true)]
async fn frames_over_the_rate_get_rate_limited_and_too_many_close_with_1008() {
    let config = WsConfig {
        rate_per_second: 1,
        rate_burst: 2,
        max_protocol_errors: 1,
        ..WsConfig::default()
    };
    let mut s = connect(config, 64 << 10).await;
    let rate_limited = ServerFrame::Error(ErrorFrame {
        error: "RateLimited".into(),
        description: "more than 1 frames per second; frame dropped".into(),
        trace_id: None,
        id: None,
    });
    // The burst passes; the third frame is dropped with an error frame. The error is written
    // by the connection task, the pongs go through the queue: their order is not fixed.
    for _ in 0..3 {
        s.send(r#"{"type":"ping"}"#).await;
    }
    let mut answers = vec![s.json().await, s.json().await, s.json().await];
    answers.sort_by_key(|f| matches!(f, ServerFrame::Error(_)));
    assert_eq!(answers, [pong(), pong(), rate_limited.clone()]);
    // One second refills one token.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.send(r#"{"type":"ping"}"#).await;
    assert_eq!(s.json().await, pong());
    // A second frame over the rate is one bad frame more than `max_protocol_errors`. A
    // refused request is answered with its own trace id, so its client can settle it.
    // Its `id` too.
    s.send(r#"{"type":"request","id":"q-1","payload":{"service":"svc","method":"echo","params":{},"trace_id":"over-1"}}"#).await;
    let ServerFrame::Error(refused) = rate_limited else { unreachable!() };
    assert_eq!(
        s.json().await,
        ServerFrame::Error(ErrorFrame {
            trace_id: Some("over-1".into()),
            id: Some("q-1".into()),
            ..refused
        })
    );
    assert_eq!(s.next().await, close(1008, "too many bad frames"));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_keep_up_is_closed_with_1013_and_the_drop_counted() {
    const EVENTS: usize = 10;
    // A pipe smaller than one event: the connection task blocks writing the first event
    // until the client reads, and the queue (2 frames) fills behind it.
    let config = WsConfig { outbound_queue: 2, ..WsConfig::default() };
    let mut s = connect(config, 512).await;
    for n in 0..EVENTS {
        let event = MeshEvent {
            topic: format!("broadcast.{n}"),
            event: "x".repeat(2000).into(),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        s.mesh.inject_event(event).await.unwrap();
    }
    // The client is slow, not dead: it reads again well within the write timeout. Yielding
    // (rather than sleeping) keeps paused time still while the coordinator delivers.
    let mut yields = 0;
    loop {
        let stats = s.coordinator.stats();
        if stats.events_delivered + stats.frames_dropped == EVENTS as u64 {
            break;
        }
        yields += 1;
        assert!(yields < 100_000, "events not delivered: {stats:?}");
        tokio::task::yield_now().await;
    }
    let dropped = s.coordinator.stats().frames_dropped as usize;
    assert!(dropped >= 1, "nothing dropped");
    // What was queued still arrives, in order, then the close.
    for n in 0..EVENTS - dropped {
        let frame = s.json().await;
        assert!(
            matches!(&frame, ServerFrame::Message(ServerMessage::Event { topic, .. }) if *topic == format!("broadcast.{n}")),
            "event {n}: {frame:?}"
        );
    }
    assert_eq!(s.next().await, close(1013, "outbound queue full: client too slow"));
}

#[tokio::test(start_paused = true)]
async fn a_reader_over_the_byte_bound_is_closed_at_once_while_a_healthy_one_keeps_receiving() {
    const EVENTS: usize = 20;
    // Room for 256 frames but only 8 KiB: the byte bound trips first. Both pipes are
    // smaller than one event, so the dead reader's connection task is stuck writing the
    // first one while the others queue behind it.
    let config = WsConfig { outbound_queue_bytes: 8 << 10, ..WsConfig::default() };
    let gateway = Gateway::start(config);
    let mut healthy = gateway.connect(512).await;
    let mut dead = gateway.connect(512).await;
    let t0 = Instant::now();
    for n in 0..EVENTS {
        gateway.broadcast(n, 2000).await;
        let frame = healthy.json().await;
        assert!(is_broadcast(&frame, n), "event {n}: {frame:?}");
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "the healthy reader never waited");
    let stats = gateway.coordinator.stats();
    assert!(stats.frames_dropped >= 1, "the byte bound did not trip: {stats:?}");
    // Closed at once (the stuck write is abandoned; the close gets a short grace), not at
    // the 10 s write timeout.
    tokio::time::timeout(Duration::from_secs(2), &mut dead.server)
        .await
        .expect("the dead reader is dropped within the slow-client grace")
        .unwrap();
    assert!(!healthy.server.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_dropped_after_one_write_timeout_not_two() {
    let gateway = Gateway::start(WsConfig::default());
    let mut s = gateway.connect(512).await;
    // One event larger than the pipe, so the write blocks; the queue never fills.
    gateway.broadcast(0, 2000).await;
    gateway.delivered(1).await;
    let t0 = Instant::now();
    (&mut s.server).await.unwrap();
    let gone = t0.elapsed();
    assert!(gone >= Duration::from_secs(10) && gone < Duration::from_secs(11), "{gone:?}");
}

/// The upgrade shares one budget with reading the head: a connection whose deadline has
/// passed (its head took the whole `handshake_timeout`) gets no second timeout of its own.
#[tokio::test(start_paused = true)]
async fn an_upgrade_past_its_deadline_is_dropped_not_given_a_second_timeout() {
    let gateway = Gateway::start(WsConfig::default());
    // A client that sends nothing: the handshake can only end by the deadline.
    let (_client_io, server_io) = tokio::io::duplex(4096);
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(1);
    run(
        server_io,
        Admission::Session { _permit: permit, deadline },
        Arc::clone(&gateway.config),
        gateway.coordinator.clone(),
        WsStatsHandle::new(),
    )
    .await;
    // Ended at its deadline, not after `handshake_timeout` (10 s) more.
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

/// A client over a duplex pipe that upgraded with no credentials (the first-frame route).
async fn unauthenticated(gateway: &Gateway) -> (WebSocketStream<DuplexStream>, JoinHandle<()>) {
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    let server = tokio::spawn(run(
        server_io,
        Admission::Session {
            _permit: permit,
            deadline: tokio::time::Instant::now() + Duration::from_secs(10),
        },
        Arc::clone(&gateway.config),
        gateway.coordinator.clone(),
        WsStatsHandle::new(),
    ));
    let request = "ws://gateway/ws".into_client_request().unwrap();
    let (client, _response) = tokio_tungstenite::client_async(request, client_io).await.unwrap();
    (client, server)
}

#[tokio::test(start_paused = true)]
async fn the_first_frame_route_closes_4401_at_the_auth_timeout_and_opens_on_an_auth_frame() {
    let gateway = Gateway::start(WsConfig::default());
    let t0 = Instant::now();
    let (mut client, server) = unauthenticated(&gateway).await;
    let next = tokio::time::timeout(PATIENCE, client.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next, close(4401, "authentication timeout"));
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    drop(client);
    server.await.unwrap();

    // Pings are not acted on (tungstenite answers them), but only so many pass.
    let (mut client, server) = unauthenticated(&gateway).await;
    for _ in 0..=16 {
        client.send(Message::Ping(Bytes::new())).await.unwrap();
    }
    let mut seen = Vec::new();
    while let Some(Ok(m)) = tokio::time::timeout(PATIENCE, client.next()).await.unwrap() {
        let end = matches!(m, Message::Close(_));
        seen.push(m);
        if end {
            break;
        }
    }
    assert_eq!(seen.last(), Some(&close(4401, "authentication required")));
    assert!(seen[..seen.len() - 1].iter().all(|m| matches!(m, Message::Pong(_))), "{seen:?}");
    drop(client);
    server.await.unwrap();

    let (mut client, _server) = unauthenticated(&gateway).await;
    client
        .send(Message::text(r#"{"type":"auth","payload":{"token":"tok"},"id":"a"}"#))
        .await
        .unwrap();
    let hello = tokio::time::timeout(PATIENCE, client.next()).await.unwrap().unwrap().unwrap();
    let Message::Text(hello) = hello else { panic!("{hello:?}") };
    let hello = decode_server_frame(hello.as_bytes(), Encoding::Json).unwrap();
    assert!(
        matches!(hello.message(), Some(ServerMessage::Event { topic, .. }) if topic == "hello")
    );
    // The hello answers the auth frame: it carries its id.
    assert_eq!(hello.id(), Some("a"));
}

#[tokio::test(start_paused = true)]
async fn a_token_that_cannot_be_checked_is_503_and_a_refused_one_401() {
    let gateway = Gateway::start(WsConfig::default());
    for (token, status, body) in
        [("tok-mesh-down", 503, "authentication unavailable"), ("tok-refused", 401, "unauthorized")]
    {
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let server = tokio::spawn(run(
            server_io,
            Admission::Session {
                _permit: permit,
                deadline: tokio::time::Instant::now() + Duration::from_secs(10),
            },
            Arc::clone(&gateway.config),
            gateway.coordinator.clone(),
            WsStatsHandle::new(),
        ));
        let mut request = "ws://gateway/ws".into_client_request().unwrap();
        let bearer = format!("Bearer {token}");
        request.headers_mut().insert("Authorization", bearer.parse().unwrap());
        match tokio_tungstenite::client_async(request, client_io).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), status, "{token}");
                let text = response.body().as_deref().map(String::from_utf8_lossy);
                assert_eq!(text.as_deref(), Some(body), "{token}");
            }
            other => panic!("{token}: not refused: {other:?}"),
        }
        server.await.unwrap();
    }
}
