//! The gateway inside your own tokio program: the coordinator (handler-core) with the
//! in-memory mesh, a custom `Authenticator` (a static API-key table instead of JWTs), and
//! the WebSocket adapter on a port you choose. A client then connects and calls a method.
//!
//! ```text
//! cargo run -p nuropb-gateway-examples --example embed            # any free port
//! cargo run -p nuropb-gateway-examples --example embed -- 8080    # port 8080
//! ```
//!
//! It exits 0 when the client got the expected answers and non-zero otherwise, within 30 s.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{BoxError, Client, bounded};
use handler_core::auth::AuthError;
use handler_core::in_memory::InMemoryMesh;
use handler_core::{Authenticator, Coordinator, CoreConfig, Identity, UserId};
use nuropb_wire::ErrorObject;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ws_adapter::{WsConfig, WsStatsHandle};

/// An `Authenticator` of your own: API keys looked up in a fixed table. The key is the
/// bearer token the client sends (`Authorization: Bearer <key>`).
struct StaticKeys {
    // API key → (user id, username).
    keys: HashMap<String, (String, String)>,
}

#[async_trait::async_trait]
impl Authenticator for StaticKeys {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        // Called on the upgrade path: a map lookup, no I/O.
        let (user_id, username) = self.keys.get(token).ok_or(AuthError::BadSignature)?;
        Ok(Identity {
            user_id: UserId::new(user_id.clone()),
            username: username.clone(),
            // Forwarded to services in the call context, as a JWT would be.
            token: token.to_owned(),
            // API keys do not expire while a connection is open.
            expires_at: None,
            token_expires_at: None,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let port: u16 = match std::env::args().nth(1) {
        Some(port) => port.parse().map_err(|_| format!("not a port number: {port}"))?,
        None => 0,
    };
    bounded(Duration::from_secs(30), run(port)).await?;
    println!("embed: ok");
    Ok(())
}

async fn run(port: u16) -> Result<(), BoxError> {
    // 1. The mesh: services are Rust closures here; swap in `amqp_mesh::AmqpMesh` (or your
    //    own `ServiceMesh`, see the `your_own_mesh` example) without touching the rest.
    let (mesh, inbound) = InMemoryMesh::builder()
        .sync_method("greeter", "hello", |call| {
            let name = call.params.get("name").and_then(Value::as_str).ok_or_else(|| {
                ErrorObject::new("NuropbValidationError", "parameter `name` must be a string")
            })?;
            // The gateway builds the context; `user_id` is the caller's.
            Ok(json!({"greeting": format!("hello, {name}"), "caller": call.context["user_id"]}))
        })
        .build();

    // 2. The core. One shutdown token for the whole gateway; call tasks on a tracker.
    let shutdown = CancellationToken::new();
    let calls = TaskTracker::new();
    let connections = TaskTracker::new();
    let authenticator = StaticKeys {
        keys: HashMap::from([("key-alice".to_owned(), ("alice".to_owned(), "Alice".to_owned()))]),
    };
    let (coordinator, handle) = Coordinator::new(
        CoreConfig::default(),
        Arc::new(authenticator),
        Arc::new(mesh),
        inbound,
        calls,
        shutdown.clone(),
    );
    let routing = tokio::spawn(coordinator.run(Duration::from_secs(5)));

    // 3. The WebSocket adapter on your port (0: any free one), loopback only.
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(ws_adapter::serve(
        listener,
        WsConfig::default(),
        handle,
        shutdown.clone(),
        connections.clone(),
        WsStatsHandle::new(),
    ));
    println!("embed: gateway listening on ws://{addr}/ws");

    // 4. A client: connects with its API key and calls `greeter.hello`.
    let url = format!("ws://{addr}/ws");
    let (mut client, hello) = Client::connect(&url, "key-alice").await?;
    assert_eq!(hello["user_id"], "alice", "hello: {hello}");
    assert_eq!(hello["username"], "Alice", "hello: {hello}");

    let answer = client.call("greeter", "hello", json!({"name": "world"}), "t-1").await?;
    assert_eq!(answer["error"], Value::Null, "answer: {answer}");
    assert_eq!(answer["result"], json!({"greeting": "hello, world", "caller": "alice"}));

    // A method's own error reaches the client unchanged.
    let answer = client.call("greeter", "hello", json!({}), "t-2").await?;
    assert_eq!(answer["error"]["error"], "NuropbValidationError", "answer: {answer}");

    // An unknown key is refused at the upgrade (HTTP 401), before any WebSocket exists.
    let refused = Client::connect(&url, "key-mallory").await;
    let refusal = refused.err().ok_or("an unknown API key was accepted")?.to_string();
    assert!(refusal.contains("401"), "refusal: {refusal}");
    println!("embed: greeter.hello answered; an unknown key was refused");

    // 5. Shutdown: stop accepting, drain the core, let connections send their close frames.
    client.close().await?;
    shutdown.cancel();
    server.await??;
    routing.await?;
    connections.close();
    tokio::time::timeout(Duration::from_secs(5), connections.wait()).await?;
    Ok(())
}
