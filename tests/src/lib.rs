//! Helpers shared by the end-to-end tests: a gateway (core + WebSocket adapter on an
//! in-memory mesh) on a loopback port, tokens, and a WebSocket client with bounded waits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failure is a failed test"
)]

pub mod process;
pub mod raw;
pub mod sys;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use handler_core::auth::JwtKey;
use handler_core::coordinator::CoreConfig;
use handler_core::in_memory::InMemoryMesh;
use handler_core::mesh_manager::MeshManagerConfig;
use handler_core::{
    Coordinator, CoordinatorHandle, JwtAuthenticator, JwtConfig, MeshCall, MeshError, MeshEvent,
    MeshResponse, ServiceMesh,
};
use nuropb_wire::ErrorObject;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ws_adapter::{OriginPolicy, WsConfig, WsStatsHandle};

pub const SECRET: &str = "e2e-secret-0123456789abcdef";
/// Every wait for a frame is bounded by this.
pub const FRAME_WAIT: Duration = Duration::from_secs(5);

/// Counts what reaches the mesh, then delegates to the in-memory mesh.
pub struct CountingMesh {
    inner: InMemoryMesh,
    pub calls: AtomicUsize,
}

#[async_trait]
impl ServiceMesh for CountingMesh {
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.request(call, timeout).await
    }
    async fn command(&self, call: MeshCall) -> Result<(), MeshError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.command(call).await
    }
    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.inner.publish_event(event).await
    }
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}

/// Options for [`Gateway::start`].
#[derive(Clone)]
pub struct Options {
    pub ws: WsConfig,
    pub request_timeout: Duration,
    pub broadcast_topics: Vec<String>,
    pub max_in_flight: usize,
    /// Patterns clients may subscribe to (`{user_id}` = the session's user).
    pub subscribable: Vec<String>,
    /// Services clients may not call.
    pub reserved_services: Vec<String>,
    /// How long shutdown waits for pending calls.
    pub drain: Duration,
    /// Most sessions of one user.
    pub max_sessions_per_user: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ws: WsConfig {
                origins: OriginPolicy::new(&["example.com"]).unwrap().into(),
                ..WsConfig::default()
            },
            request_timeout: Duration::from_secs(2),
            broadcast_topics: vec!["broadcast.#".into()],
            max_in_flight: 64,
            subscribable: vec!["news.#".into(), "users.{user_id}.#".into()],
            reserved_services: vec!["gateway-self".into()],
            drain: Duration::from_secs(5),
            max_sessions_per_user: CoreConfig::default().max_sessions_per_user,
        }
    }
}

/// A running gateway on 127.0.0.1 with the test service `svc`.
pub struct Gateway {
    pub url: String,
    /// The listening address (`url` without scheme and path), for raw TCP clients.
    pub addr: std::net::SocketAddr,
    pub mesh: InMemoryMesh,
    pub counting: Arc<CountingMesh>,
    pub handle: CoordinatorHandle,
    pub shutdown: CancellationToken,
    /// The WebSocket side's counters (refused, shed, oversized frames …).
    pub ws_stats: WsStatsHandle,
    routing: JoinHandle<()>,
    server: JoinHandle<()>,
}

/// The test service: `svc.echo`, `svc.sleep` (params.ms), `svc.fail`, `svc.whoami`
/// (returns the context it got), `svc.never` (never answers), `svc.big` (returns a string
/// of params.bytes bytes, at most 64 MiB: responses larger than any request can be).
pub fn test_mesh() -> (InMemoryMesh, tokio::sync::mpsc::Receiver<handler_core::MeshInbound>) {
    InMemoryMesh::builder()
        .sync_method("svc", "echo", |c| Ok(Value::Object(c.params)))
        .method("svc", "sleep", |c| async move {
            let ms = c.params.get("ms").and_then(Value::as_u64).unwrap_or(0).min(10_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({"slept_ms": ms}))
        })
        .sync_method("svc", "fail", |_| {
            Err(ErrorObject::new(
                "NuropbException",
                "Runtime exception calling svc.fail:ValueError: boom",
            ))
        })
        .sync_method("svc", "whoami", |c| Ok(Value::Object(c.context)))
        .method("svc", "never", |_| std::future::pending())
        .sync_method("svc", "big", |c| {
            let bytes = c.params.get("bytes").and_then(Value::as_u64).unwrap_or(0).min(64 << 20);
            Ok(Value::String("x".repeat(bytes as usize)))
        })
        .build()
}

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Gateway {
        let (mesh, inbound) = test_mesh();
        let counting = Arc::new(CountingMesh { inner: mesh.clone(), calls: AtomicUsize::new(0) });
        let mut jwt = JwtConfig::new(JwtKey::Hs256Secret(SECRET.as_bytes().to_vec()));
        // No clock-skew leeway, so expiry tests take seconds, not half a minute.
        jwt.leeway_secs = 0;
        let auth = JwtAuthenticator::new(jwt).unwrap();
        let shutdown = CancellationToken::new();
        let core = CoreConfig {
            mesh: MeshManagerConfig {
                request_timeout: options.request_timeout,
                max_in_flight_per_session: options.max_in_flight,
                reserved_services: options.reserved_services.clone(),
                ..MeshManagerConfig::default()
            },
            sessions: handler_core::session_registry::SessionRegistryConfig {
                subscribable: options.subscribable.clone(),
                ..Default::default()
            },
            broadcast_topics: options.broadcast_topics.clone(),
            max_sessions_per_user: options.max_sessions_per_user,
            ..CoreConfig::default()
        };
        let (coordinator, handle) = Coordinator::new(
            core,
            Arc::new(auth),
            counting.clone(),
            inbound,
            TaskTracker::new(),
            shutdown.clone(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("ws://{addr}/ws");
        let routing = tokio::spawn(coordinator.run(options.drain));
        let ws_stats = WsStatsHandle::new();
        let server = {
            let (handle, shutdown, stats) = (handle.clone(), shutdown.clone(), ws_stats.clone());
            tokio::spawn(async move {
                ws_adapter::serve(
                    listener,
                    options.ws,
                    handle,
                    shutdown,
                    TaskTracker::new(),
                    stats,
                )
                .await
                .unwrap();
            })
        };
        Gateway { url, addr, mesh, counting, handle, shutdown, ws_stats, routing, server }
    }

    /// Starts shutdown and waits for the routing task (drain) and the server to end.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), async {
            self.routing.await.unwrap();
            self.server.await.unwrap();
        })
        .await
        .expect("gateway did not stop in time");
    }

    pub fn mesh_calls(&self) -> usize {
        self.counting.calls.load(Ordering::SeqCst)
    }

    /// Connects with a bearer token and reads the hello frame.
    pub async fn connect(&self, user: &str) -> (Client, Value) {
        let mut client =
            Client::connect(&self.url, &[("Authorization", &format!("Bearer {}", token(user)))])
                .await
                .expect("connect");
        let hello = client.recv_json().await;
        assert_eq!(hello["payload"]["topic"], "hello", "first frame must be hello: {hello}");
        (client, hello)
    }
}

/// A valid HS256 token for `user` (username `<user>@example.com`).
pub fn token(user: &str) -> String {
    token_with(
        json!({
            "sub": user,
            "username": format!("{user}@example.com"),
            "exp": jsonwebtoken::get_current_timestamp() + 600,
        }),
        SECRET,
    )
}

pub fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A WebSocket client with bounded waits.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects with extra headers; `Err` carries tungstenite's error (HTTP refusals).
    pub async fn connect(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (k, v) in headers {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio::time::timeout(FRAME_WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timed out")?;
        Ok(Client { ws })
    }

    /// Like [`Client::connect`], but every header is appended (a name may repeat, as
    /// `Sec-WebSocket-Protocol` does), and the upgrade's response is returned too.
    pub async fn connect_appending(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Client, http::Response<Option<Vec<u8>>>), tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (k, v) in headers {
            request.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, response) =
            tokio::time::timeout(FRAME_WAIT, tokio_tungstenite::connect_async(request))
                .await
                .expect("connect timed out")?;
        Ok((Client { ws }, response))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// Sends a request and returns its trace id.
    pub async fn request(&mut self, service: &str, method: &str, params: Value, trace_id: &str) {
        self.send_json(&json!({
            "type": "request",
            "payload": {"service": service, "method": method, "params": params, "trace_id": trace_id},
        }))
        .await;
    }

    /// The next data frame (pings and pongs skipped), or `None` on close.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let m = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("no frame within the wait")?;
            match m {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(Message::Close(_)) => return None,
                Ok(m) => return Some(m),
                Err(_) => return None,
            }
        }
    }

    /// The next text frame as JSON.
    pub async fn recv_json(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).expect("server sent invalid JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next binary frame decoded from MessagePack.
    pub async fn recv_msgpack(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Binary(b)) => rmp_serde::from_slice(&b).expect("invalid MessagePack"),
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Waits for the close frame and returns it (frames before it are skipped).
    pub async fn recv_close(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("no close within the wait")
            {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Asserts that no data frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `wait`.
pub async fn eventually(what: &str, wait: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + wait;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "not within {wait:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that the peer closes `stream` (EOF or reset) within `wait`, sending nothing.
pub async fn expect_tcp_closed(stream: &mut TcpStream, wait: Duration) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(wait, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {wait:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected a bare close, got {:?}", String::from_utf8_lossy(&buf[..n])),
    }
}
