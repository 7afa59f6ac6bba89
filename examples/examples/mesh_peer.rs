//! A mesh peer in Rust: a program on the NuroPb mesh that pushes a message to a connected
//! user and disconnects another, by calling the gateway's own NuroPb service
//! (`push_to_user`, `disconnect_user`; docs/PROTOCOL.md, docs/NUROPB-WIRE.md) over RabbitMQ
//! exactly as a Python nuropb service would: a request published on `nuropb-rpc-exchange`
//! with the service's name as routing key, the five nuropb headers, `reply_to` and
//! `correlation_id`, and a JSON body written like Python's `json.dumps`.
//!
//! The gateway is embedded (amqp-mesh + the coordinator + the WebSocket adapter), with
//! `alice` and `bob` connected as WebSocket clients; in production it is the
//! `nuropb-gateway` binary and only the peer half (`Peer`) is yours.
//!
//! Needs RabbitMQ. Give it a vhost of its own (never the default one):
//!
//! ```text
//! NUROPB_EXAMPLE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2Fexample \
//!     cargo run -p nuropb-gateway-examples --example mesh_peer
//! ```
//!
//! `cargo xtask examples` creates a throw-away vhost and passes it in. The example exits 0
//! when alice got the event and bob's connection was closed with 4001, within 30 s.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amqp_mesh::{AmqpMesh, AmqpMeshConfig};
use common::{BoxError, Client, Closed, STEP, bounded};
use futures_util::StreamExt;
use handler_core::auth::AuthError;
use handler_core::{Authenticator, Coordinator, CoreConfig, Identity, UserId};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use nuropb_wire::mesh::{LIBRARY_VERSION, PROTOCOL_VERSION};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ws_adapter::{WsConfig, WsStatsHandle};

/// Where the example finds its RabbitMQ vhost.
const URL_ENV: &str = "NUROPB_EXAMPLE_AMQP_URL";

// ---------------------------------------------------------------------------------------
// The peer: what a Rust service on the mesh would have.

/// A NuroPb requester: one connection, one channel, an exclusive reply queue.
struct Peer {
    // Held: the channel lives as long as its connection.
    _connection: Connection,
    channel: Channel,
    reply_queue: String,
    replies: Consumer,
}

impl Peer {
    async fn connect(url: &str) -> Result<Peer, BoxError> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        // Server-named, exclusive, gone with the connection: as nuropb's response queue.
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let reply_queue = queue.name().as_str().to_owned();
        let replies = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        Ok(Peer { _connection: connection, channel, reply_queue, replies })
    }

    /// Calls `service.method(**params)` and returns the response's `result`, or the NuroPb
    /// error object as an error.
    async fn call(
        &mut self,
        service: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, BoxError> {
        let correlation_id = uuid::Uuid::new_v4().simple().to_string();
        let trace_id = format!("peer-{correlation_id}");
        let body = json!({
            "tag": "request", "service": service, "method": method, "params": params,
            "correlation_id": correlation_id, "context": {}, "trace_id": trace_id,
        });
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(nuropb_headers(&trace_id))
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            // The request expires as nuropb's would if nobody takes it (milliseconds).
            .with_expiration("10000".into());
        let bytes = nuropb_wire::pyjson::to_python_json(&body)?;
        self.channel
            .basic_publish(
                "nuropb-rpc-exchange".into(),
                ShortString::from(service),
                BasicPublishOptions::default(),
                &bytes,
                props,
            )
            .await?
            .await?;
        // Bounded: responses to other calls are skipped, at most 16.
        for _ in 0..16 {
            let delivery = tokio::time::timeout(STEP, self.replies.next())
                .await?
                .ok_or("reply queue closed")??;
            if delivery.properties.correlation_id().as_ref().map(|c| c.as_str())
                != Some(correlation_id.as_str())
            {
                continue;
            }
            let response: Value = serde_json::from_slice(&delivery.data)?;
            if !response["error"].is_null() {
                return Err(format!("{service}.{method} failed: {}", response["error"]).into());
            }
            return Ok(response["result"].clone());
        }
        Err(format!("no response from {service}.{method}").into())
    }
}

/// The five nuropb headers, as pika writes them (long strings; `trace_id` may be void).
fn nuropb_headers(trace_id: &str) -> FieldTable {
    let mut t = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    t.insert("nuropb_protocol".into(), long(PROTOCOL_VERSION));
    t.insert("nuropb_version".into(), long(LIBRARY_VERSION));
    t.insert("nuropb_type".into(), long("request"));
    t.insert("trace_id".into(), long(trace_id));
    t.insert("encrypted".into(), long(""));
    t
}

// ---------------------------------------------------------------------------------------
// The gateway, embedded, and the users it serves.

struct StaticKeys(HashMap<&'static str, &'static str>);

#[async_trait::async_trait]
impl Authenticator for StaticKeys {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let user = self.0.get(token).ok_or(AuthError::BadSignature)?;
        Ok(Identity {
            user_id: UserId::new(*user),
            username: (*user).to_owned(),
            token: token.to_owned(),
            expires_at: None,
            token_expires_at: None,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var(URL_ENV).map_err(|_| {
        format!("{URL_ENV} must name a RabbitMQ vhost of this example's own (see the file's docs)")
    })?;
    bounded(Duration::from_secs(30), run(&url)).await?;
    println!("mesh_peer: ok");
    Ok(())
}

async fn run(url: &str) -> Result<(), BoxError> {
    // The gateway: amqp-mesh under the coordinator, the WebSocket adapter on a free port.
    let shutdown = CancellationToken::new();
    let mesh_shutdown = CancellationToken::new();
    let config = AmqpMeshConfig::new(url);
    let service = config.service_name.clone();
    let (mesh, inbound) = AmqpMesh::start(config, mesh_shutdown.clone()).await?;
    let calls = TaskTracker::new();
    let connections = TaskTracker::new();
    let keys = StaticKeys(HashMap::from([("key-alice", "alice"), ("key-bob", "bob")]));
    let (coordinator, handle) = Coordinator::new(
        CoreConfig::default(),
        Arc::new(keys),
        Arc::new(mesh.clone()),
        inbound,
        calls,
        shutdown.clone(),
    );
    let routing = tokio::spawn(coordinator.run(Duration::from_secs(5)));
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let ws_url = format!("ws://{}/ws", listener.local_addr()?);
    let server = tokio::spawn(ws_adapter::serve(
        listener,
        WsConfig::default(),
        handle,
        shutdown.clone(),
        connections.clone(),
        WsStatsHandle::new(),
    ));
    let (mut alice, _) = Client::connect(&ws_url, "key-alice").await?;
    let (mut bob, _) = Client::connect(&ws_url, "key-bob").await?;

    // The peer's part.
    let mut peer = Peer::connect(url).await?;
    let event = json!({"order": 7, "status": "shipped"});
    let params = json!({"user_id": "alice", "topic": "orders.shipped", "event": event});
    let pushed = peer.call(&service, "push_to_user", params).await?;
    assert_eq!(pushed, json!({"accepted": true}));
    let frame = alice.next_frame().await?;
    assert_eq!(
        frame,
        json!({"type": "event", "payload": {"topic": "orders.shipped", "event": event}})
    );

    let params = json!({"user_id": "bob", "reason": "account suspended"});
    let disconnected = peer.call(&service, "disconnect_user", params).await?;
    assert_eq!(disconnected, json!({"accepted": true}));
    let closed = bob.closed().await?;
    assert_eq!(closed, Closed { code: 4001, reason: "account suspended".to_owned() });
    println!("mesh_peer: alice got {frame}; bob was closed with {closed:?}");

    // Shutdown in the binary's order: clients and core first, then the mesh.
    alice.close().await?;
    shutdown.cancel();
    server.await??;
    routing.await?;
    mesh_shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), mesh.closed()).await?;
    connections.close();
    tokio::time::timeout(Duration::from_secs(5), connections.wait()).await?;
    Ok(())
}
