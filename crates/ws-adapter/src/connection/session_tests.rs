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
    // Kept so that the coordinator keeps running for the whole test.
    _shutdown: tokio_util::sync::DropGuard,
}

/// A client connected over a duplex pipe of `pipe_bytes` per direction, past the hello.
async fn connect(config: WsConfig, pipe_bytes: usize) -> Session {
    let (mesh, inbound) = InMemoryMesh::builder().build();
    let mut auth = MockAuthenticator::new();
    auth.expect_authenticate().returning(|token| {
        Ok(Identity {
            user_id: UserId::new("alice-id"),
            username: "alice".into(),
            token: token.to_owned(),
            expires_at: None,
        })
    });
    let core = CoreConfig { broadcast_topics: vec!["broadcast.#".into()], ..CoreConfig::default() };
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

    let (client_io, server_io) = tokio::io::duplex(pipe_bytes);
    let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
    let server = tokio::spawn(run(
        server_io,
        Admission::Session { _permit: permit },
        Arc::new(config),
        handle.clone(),
        WsStatsHandle::new(),
    ));
    let mut request = "ws://gateway/ws".into_client_request().unwrap();
    request.headers_mut().insert("Authorization", "Bearer tok-alice".parse().unwrap());
    let (client, _response) = tokio_tungstenite::client_async(request, client_io).await.unwrap();
    let mut session =
        Session { client, server, mesh, coordinator: handle, _shutdown: shutdown.drop_guard() };
    let hello = session.json().await;
    assert!(
        matches!(&hello, ServerFrame::Message(ServerMessage::Event { topic, .. }) if topic == "hello"),
        "{hello:?}"
    );
    session
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
    // A second frame over the rate is one bad frame more than `max_protocol_errors`.
    s.send(r#"{"type":"ping"}"#).await;
    assert_eq!(s.json().await, rate_limited);
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
