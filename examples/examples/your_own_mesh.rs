//! Your own mesh: a `ServiceMesh` adapter written outside the project's crates, forwarding
//! client calls to HTTP services instead of NuroPb over RabbitMQ. This is the shape a team
//! with HTTP services would use (Centrifugo's RPC proxy works the same way).
//!
//! The contract with the backend, all of it in [`HttpMesh`]:
//! - a request `service.method(params)` is `POST /<service>/<method>` with the params as the
//!   JSON body, the caller in `x-nuropb-user-id`, its token in `authorization` and the trace
//!   id in `x-nuropb-trace-id`; a command is the same with `x-nuropb-command: 1`;
//! - 2xx: the body is the result; 404: no such service (`MeshError::NotDelivered`, as an
//!   unroutable NuroPb request); another status with a NuroPb error object
//!   `{"error", "description"}` as its body: the service's error, passed to the client
//!   unchanged; no answer within the request timeout: `MeshError::Timeout`; the backend
//!   unreachable: `MeshError::Unavailable`; a body over the limit:
//!   `MeshError::ResponseTooLarge`. These are the mappings amqp-mesh makes.
//! - events reach the gateway through the same port as with any adapter: the
//!   `MeshInbound` channel handed to the coordinator. [`EventSink`] is the sending side; in
//!   a real deployment a webhook endpoint or a queue consumer would hold it. Here the
//!   backend pushes `orders.placed` to the caller after `orders.place`.
//!
//! ```text
//! cargo run -p nuropb-gateway-examples --example your_own_mesh
//! ```
//!
//! It exits 0 when every mapping above was observed by a WebSocket client, within 30 s.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::{BoxError, Client, bounded};
use handler_core::auth::AuthError;
use handler_core::mesh_manager::MeshManagerConfig;
use handler_core::{
    Authenticator, Coordinator, CoreConfig, Identity, MeshCall, MeshError, MeshEvent, MeshInbound,
    MeshResponse, ServiceMesh, UserId,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nuropb_wire::ErrorObject;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ws_adapter::{WsConfig, WsStatsHandle};

// ---------------------------------------------------------------------------------------
// The adapter: what you would put in a crate of your own.

/// Where the backend is and how long to wait for it.
#[derive(Debug, Clone)]
struct HttpMeshConfig {
    /// `http://host:port`, no trailing slash.
    base_url: String,
    /// How long a command (which gets no response body) may take (default 5 s); a
    /// request's timeout comes from the core with each call.
    command_timeout: Duration,
    /// Largest response body accepted, in bytes (default 1 MiB).
    max_response_bytes: usize,
    /// Capacity of the inbound channel to the core (default 1024).
    inbound_capacity: usize,
}

impl HttpMeshConfig {
    fn new(base_url: impl Into<String>) -> Self {
        HttpMeshConfig {
            base_url: base_url.into(),
            command_timeout: Duration::from_secs(5),
            max_response_bytes: 1 << 20,
            inbound_capacity: 1024,
        }
    }
}

/// A `ServiceMesh` over HTTP. Cheap to clone.
#[derive(Clone)]
struct HttpMesh {
    config: Arc<HttpMeshConfig>,
    client: HttpClient<HttpConnector, Full<Bytes>>,
    events: EventSink,
}

/// Pushes events into the gateway through the `MeshInbound` channel. Cheap to clone.
#[derive(Clone)]
struct EventSink {
    inbound: mpsc::Sender<MeshInbound>,
}

impl EventSink {
    /// Delivers `event` on `topic` to the sessions of `target` (or, with `None`, to the
    /// sessions subscribed to the topic). Waits while the channel is full; fails once the
    /// core has stopped.
    async fn push(
        &self,
        topic: &str,
        event: Value,
        target: Option<Vec<UserId>>,
    ) -> Result<(), MeshError> {
        let event = MeshEvent {
            topic: topic.to_owned(),
            event,
            target,
            context: Default::default(),
            trace_id: None,
        };
        self.inbound
            .send(MeshInbound::Event(event))
            .await
            .map_err(|_| MeshError::Unavailable("core stopped".into()))
    }
}

impl HttpMesh {
    /// The adapter, the channel to hand to `Coordinator::new`, and the sink that feeds it.
    fn new(config: HttpMeshConfig) -> (HttpMesh, mpsc::Receiver<MeshInbound>, EventSink) {
        let (inbound, rx) = mpsc::channel(config.inbound_capacity);
        let events = EventSink { inbound };
        let client = HttpClient::builder(TokioExecutor::new()).build_http();
        let mesh = HttpMesh { config: Arc::new(config), client, events: events.clone() };
        (mesh, rx, events)
    }

    /// `POST /<service>/<method>`; the status and the body (at most `max_response_bytes`).
    async fn post(&self, call: &MeshCall, command: bool) -> Result<(StatusCode, Bytes), MeshError> {
        // Names go into a URL path: refuse what would need escaping, before sending anything
        // (as amqp-mesh's guard refuses before publishing).
        let plain = |s: &str| {
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        };
        if !plain(&call.service) || !plain(&call.method) {
            return Err(MeshError::Rejected("service and method must be [A-Za-z0-9_.-]+".into()));
        }
        let uri = format!("{}/{}/{}", self.config.base_url, call.service, call.method);
        let body = serde_json::to_vec(&call.params)
            .map_err(|e| MeshError::Rejected(format!("params cannot be encoded: {e}")))?;
        let text = |key: &str| call.context.get(key).and_then(Value::as_str).unwrap_or("");
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .header("x-nuropb-user-id", text("user_id"))
            .header("authorization", text("Authorization"))
            .header("x-nuropb-trace-id", call.trace_id.as_str())
            .header("x-nuropb-command", if command { "1" } else { "0" })
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| MeshError::Rejected(format!("invalid request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| MeshError::Unavailable(format!("backend unreachable: {e}")))?;
        let status = response.status();
        let declared = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let limit = self.config.max_response_bytes;
        let body = Limited::new(response.into_body(), limit).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                // The length is known only when the backend declared it.
                MeshError::ResponseTooLarge { bytes: declared.unwrap_or(limit + 1), limit }
            } else {
                MeshError::Unavailable(format!("connection lost: {e}"))
            }
        })?;
        Ok((status, body.to_bytes()))
    }
}

#[async_trait]
impl ServiceMesh for HttpMesh {
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError> {
        let (status, body) = match tokio::time::timeout(timeout, self.post(&call, false)).await {
            Ok(answer) => answer?,
            Err(_) => return Err(MeshError::Timeout(timeout)),
        };
        if status == StatusCode::NOT_FOUND {
            return Err(MeshError::NotDelivered { service: call.service, method: call.method });
        }
        if status.is_success() {
            let result = serde_json::from_slice(&body).map_err(|_| {
                MeshError::Unavailable("backend answered with a body that is not JSON".into())
            })?;
            return Ok(MeshResponse { result, error: None });
        }
        // The service's own error: passed through, as NuroPb error objects are.
        let error = serde_json::from_slice::<ErrorObject>(&body).unwrap_or_else(|_| {
            ErrorObject::new("NuropbException", format!("backend answered HTTP {status}"))
        });
        Ok(MeshResponse { result: Value::Null, error: Some(error) })
    }

    async fn command(&self, call: MeshCall) -> Result<(), MeshError> {
        let timeout = self.config.command_timeout;
        let (status, _) = match tokio::time::timeout(timeout, self.post(&call, true)).await {
            Ok(answer) => answer?,
            Err(_) => return Err(MeshError::Timeout(timeout)),
        };
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => {
                Err(MeshError::NotDelivered { service: call.service, method: call.method })
            }
            s => Err(MeshError::Unavailable(format!("the backend refused the command: HTTP {s}"))),
        }
    }

    /// Events published through the mesh loop back to this gateway's sessions (an HTTP
    /// backend has no event bus to publish to).
    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.events
            .inbound
            .send(MeshInbound::Event(event))
            .await
            .map_err(|_| MeshError::Unavailable("core stopped".into()))
    }

    fn is_connected(&self) -> bool {
        // HTTP has no connection to watch; a failed call says more than this could.
        !self.events.inbound.is_closed()
    }
}

// ---------------------------------------------------------------------------------------
// The backend: a tiny HTTP service (hyper 1), standing in for your real ones.

/// Serves `orders.place` (pushes `orders.placed` to the caller), `orders.fail` (a service
/// error), `orders.slow` (answers after 2 s) until `shutdown`.
async fn backend(
    listener: TcpListener,
    events: EventSink,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            // Both cancel-safe: a token, and an accept that loses nothing when not chosen.
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A toy backend stops at the first accept error; the gateway then maps
                // the refused connections to `MeshError::Unavailable`, and the run fails.
                Err(_) => return,
            },
        };
        let events = events.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |r| answer(r, events.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // Cancel-safe: dropping the connection future closes the socket.
                _ = shutdown.cancelled() => {}
                // A connection error ends only this connection; the client sees it.
                _ = connection => {}
            }
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    events: EventSink,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Value| {
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        Ok(response)
    };
    let user = request
        .headers()
        .get("x-nuropb-user-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = request.uri().path().to_owned();
    let params: Value = match request.into_body().collect().await {
        Ok(body) => serde_json::from_slice(&body.to_bytes()).unwrap_or(Value::Null),
        Err(_) => return reply(StatusCode::BAD_REQUEST, json!({"error": "bad body"})),
    };
    match path.as_str() {
        "/orders/place" => {
            let id = 7;
            let item = params["item"].clone();
            // Pushed before the answer: the event may reach the client before the response
            // or after it (they travel different paths through the core).
            if events
                .push(
                    "orders.placed",
                    json!({"id": id, "item": item}),
                    Some(vec![UserId::new(user)]),
                )
                .await
                .is_err()
            {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "NuropbTransportError", "description": "gateway gone"}),
                );
            }
            reply(StatusCode::OK, json!({"order_id": id}))
        }
        "/orders/fail" => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": "NuropbValidationError", "description": "item out of stock"}),
        ),
        "/orders/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reply(StatusCode::OK, json!("late"))
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "no such method"})),
    }
}

// ---------------------------------------------------------------------------------------
// The gateway with the HTTP mesh, and a client that checks every mapping.

/// One API key, as in the `embed` example.
struct OneKey;

#[async_trait::async_trait]
impl Authenticator for OneKey {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token != "key-alice" {
            return Err(AuthError::BadSignature);
        }
        Ok(Identity {
            user_id: UserId::new("alice"),
            username: "Alice".to_owned(),
            token: token.to_owned(),
            expires_at: None,
            token_expires_at: None,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    bounded(Duration::from_secs(30), run()).await?;
    println!("your_own_mesh: ok");
    Ok(())
}

async fn run() -> Result<(), BoxError> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    // The backend, on a loopback port of its own.
    let backend_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let backend_url = format!("http://{}", backend_listener.local_addr()?);
    let (mesh, inbound, events) = HttpMesh::new(HttpMeshConfig::new(backend_url));
    tasks.spawn(backend(backend_listener, events, shutdown.clone(), tasks.clone()));

    // The gateway: as in `embed`, with the HTTP mesh in place of the in-memory one.
    let config = CoreConfig {
        mesh: MeshManagerConfig {
            request_timeout: Duration::from_millis(500),
            ..MeshManagerConfig::default()
        },
        ..CoreConfig::default()
    };
    let calls = TaskTracker::new();
    let connections = TaskTracker::new();
    let authenticator = Arc::new(OneKey);
    let (coordinator, handle) =
        Coordinator::new(config, authenticator, Arc::new(mesh), inbound, calls, shutdown.clone());
    let routing = tokio::spawn(coordinator.run(Duration::from_secs(5)));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let url = format!("ws://{}/ws", listener.local_addr()?);
    let server = tokio::spawn(ws_adapter::serve(
        listener,
        WsConfig::default(),
        handle,
        shutdown.clone(),
        connections.clone(),
        WsStatsHandle::new(),
    ));

    let (mut client, _hello) = Client::connect(&url, "key-alice").await?;

    // A call and the event it pushes.
    let placed = client.call("orders", "place", json!({"item": "tea"}), "t-place").await?;
    assert_eq!(placed, json!({"trace_id": "t-place", "result": {"order_id": 7}, "error": null}));
    let event = client.next_frame().await?;
    assert_eq!(
        event,
        json!({"type": "event", "payload": {"topic": "orders.placed", "event": {"id": 7, "item": "tea"}}})
    );

    // The mappings, as the client sees them.
    let mut errors = BTreeMap::new();
    for (method, service) in [("fail", "orders"), ("slow", "orders"), ("place", "nobody")] {
        let answer =
            client.call(service, method, json!({}), &format!("t-{service}-{method}")).await?;
        errors.insert(format!("{service}.{method}"), answer["error"]["error"].clone());
    }
    let expected = BTreeMap::from([
        ("orders.fail".to_owned(), json!("NuropbValidationError")),
        ("orders.slow".to_owned(), json!("NuropbTimeoutError")),
        ("nobody.place".to_owned(), json!("NuropbNotDeliveredError")),
    ]);
    assert_eq!(errors, expected);
    println!("your_own_mesh: result, event and error mappings as expected: {expected:?}");

    client.close().await?;
    shutdown.cancel();
    server.await??;
    routing.await?;
    connections.close();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(5), async {
        connections.wait().await;
        tasks.wait().await;
    })
    .await?;
    Ok(())
}
