//! The `ServiceMesh` port: what the core needs from a service mesh, and the messages that flow
//! through it. Adapters (`amqp-mesh`, the in-memory mesh) implement it; inbound traffic
//! (events, calls to the gateway's own methods) reaches the core through the
//! [`MeshInbound`] channel the adapter returns when it is built, never through a callback.

use std::time::Duration;

use async_trait::async_trait;
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::ids::{TraceId, UserId};

/// A call to a mesh service: a request (answered) or a command (not answered).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshCall {
    /// The target service's name (the routing key on the mesh).
    pub service: String,
    /// The method to call on it.
    pub method: String,
    /// The keyword arguments, as the client sent them.
    pub params: JsonObject,
    /// Built by the gateway (`user_id`, `Authorization`, `trace_id`); never by a client.
    pub context: JsonObject,
    /// The call's trace id: the client's, or one the gateway generated (32 hex).
    pub trace_id: TraceId,
}

/// A service's answer to a request: nuropb's `result`/`error` pair (§5.4).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshResponse {
    /// The method's return value; `null` when `error` is set.
    pub result: Value,
    /// The error the service reported, passed to the client unchanged.
    pub error: Option<ErrorObject>,
}

/// An event to publish on, or received from, the mesh (§5.3).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshEvent {
    /// The topic, in AMQP topic syntax (words separated by `.`).
    pub topic: String,
    /// The payload, any JSON value.
    pub event: Value,
    /// User ids the event is meant for; `None` means "everyone subscribed to the topic".
    pub target: Option<Vec<UserId>>,
    /// The publisher's context; not sent to clients.
    pub context: JsonObject,
    /// The trace id of the call that caused the event, if any (for logs).
    pub trace_id: Option<TraceId>,
}

/// Why a mesh operation failed before a service answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// No queue is bound for the service (AMQP `basic.return`, §6.2).
    #[error("service {service} not available. unable to call method {method}")]
    NotDelivered {
        /// The service that has no queue.
        service: String,
        /// The method that was called.
        method: String,
    },
    /// No response arrived before the gateway's deadline.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The mesh connection is down, or was lost while the call was pending.
    #[error("mesh unavailable: {0}")]
    Unavailable(String),
    /// The message was refused before publishing (it would be unsafe for services).
    #[error("message rejected: {0}")]
    Rejected(String),
    /// Encrypting the request or decrypting the response failed.
    #[error("encryption failed: {0}")]
    Encryption(String),
    /// The service's response is larger than the gateway forwards.
    #[error("response of {bytes} bytes exceeds the limit of {limit} bytes")]
    ResponseTooLarge {
        /// The response's size in bytes (at least this much, when only the excess is known).
        bytes: usize,
        /// The largest response forwarded, in bytes.
        limit: usize,
    },
}

impl MeshError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            MeshError::NotDelivered { .. } | MeshError::Timeout(_) | MeshError::Unavailable(_) => {
                true
            }
            MeshError::Rejected(_)
            | MeshError::Encryption(_)
            | MeshError::ResponseTooLarge { .. } => false,
        }
    }
}

/// The port every mesh adapter implements. Methods are cancellation safe: dropping a
/// `request` future forgets the pending call (a late response is then dropped and counted).
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait ServiceMesh: Send + Sync + 'static {
    /// Sends a request and waits for the first response, at most `timeout`.
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError>;

    /// Publishes a command (no response is ever sent by nuropb services).
    async fn command(&self, call: MeshCall) -> Result<(), MeshError>;

    /// Publishes an event.
    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError>;

    /// Whether the mesh is connected right now (for stats and health).
    fn is_connected(&self) -> bool;
}

/// A call from a mesh peer to the gateway's own service methods (the gateway is a NuroPb
/// service). Fan-out operations arrive on every gateway instance.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayControl {
    /// Send `event` under `topic` to every session of these users on this instance.
    PushToUsers {
        /// The users whose sessions get the event; unknown users are skipped.
        user_ids: Vec<UserId>,
        /// The topic the clients see the event under.
        topic: String,
        /// The payload, any JSON value.
        event: Value,
    },
    /// Send `event` under `topic` to every session on this instance.
    PushToAll {
        /// The topic the clients see the event under.
        topic: String,
        /// The payload, any JSON value.
        event: Value,
    },
    /// Close every session of these users on this instance.
    DisconnectUsers {
        /// The users whose sessions are closed (with 4001).
        user_ids: Vec<UserId>,
        /// The close frame's reason text.
        reason: String,
    },
}

/// The outcome of a [`GatewayControl`] on this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlOutcome {
    /// Sessions the operation reached.
    pub sessions: usize,
}

/// Live figures the gateway reports to mesh peers (`stats` method).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GatewayStats {
    /// Open sessions on this instance now.
    pub sessions: usize,
    /// The most sessions open at once since start.
    pub sessions_high_water: usize,
    /// Distinct users with at least one open session.
    pub users: usize,
    /// Client requests sent to the mesh and not answered yet.
    pub requests_in_flight: usize,
    /// Client requests and commands accepted since start.
    pub requests_total: u64,
    /// Requests answered with `NuropbTimeoutError` since start.
    pub requests_timed_out: u64,
    /// Event frames queued to sessions since start (one per session reached).
    pub events_delivered: u64,
    /// Frames not queued because a session's outbound queue was full, since start.
    pub frames_dropped: u64,
    /// Whether the mesh adapter is connected ([`ServiceMesh::is_connected`]).
    pub mesh_connected: bool,
}

/// Inbound traffic from the mesh, delivered to the core on the channel the adapter returns.
#[derive(Debug)]
pub enum MeshInbound {
    /// A mesh event matching this instance's topic bindings.
    Event(MeshEvent),
    /// A control operation; `reply` (when present) receives this instance's outcome.
    Control {
        /// What to do.
        op: GatewayControl,
        /// Where to report how many sessions were reached; `None` when nobody waits.
        reply: Option<oneshot::Sender<ControlOutcome>>,
    },
    /// A request for live stats.
    Stats {
        /// Where the core sends this instance's figures.
        reply: oneshot::Sender<GatewayStats>,
    },
}
