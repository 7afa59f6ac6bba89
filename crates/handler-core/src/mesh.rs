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
    pub service: String,
    pub method: String,
    pub params: JsonObject,
    /// Built by the gateway (`user_id`, `Authorization`, `trace_id`); never by a client.
    pub context: JsonObject,
    pub trace_id: TraceId,
}

/// A service's answer to a request: nuropb's `result`/`error` pair (§5.4).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshResponse {
    pub result: Value,
    pub error: Option<ErrorObject>,
}

/// An event to publish on, or received from, the mesh (§5.3).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshEvent {
    pub topic: String,
    pub event: Value,
    /// User ids the event is meant for; `None` means "everyone subscribed to the topic".
    pub target: Option<Vec<UserId>>,
    pub context: JsonObject,
    pub trace_id: Option<TraceId>,
}

/// Why a mesh operation failed before a service answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// No queue is bound for the service (AMQP `basic.return`, §6.2).
    #[error("service {service} not available. unable to call method {method}")]
    NotDelivered { service: String, method: String },
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
    ResponseTooLarge { bytes: usize, limit: usize },
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
    PushToUsers { user_ids: Vec<UserId>, topic: String, event: Value },
    /// Send `event` under `topic` to every session on this instance.
    PushToAll { topic: String, event: Value },
    /// Close every session of these users on this instance.
    DisconnectUsers { user_ids: Vec<UserId>, reason: String },
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
    pub sessions: usize,
    pub sessions_high_water: usize,
    pub users: usize,
    pub requests_in_flight: usize,
    pub requests_total: u64,
    pub requests_timed_out: u64,
    pub events_delivered: u64,
    pub frames_dropped: u64,
    pub mesh_connected: bool,
}

/// Inbound traffic from the mesh, delivered to the core on the channel the adapter returns.
#[derive(Debug)]
pub enum MeshInbound {
    /// A mesh event matching this instance's topic bindings.
    Event(MeshEvent),
    /// A control operation; `reply` (when present) receives this instance's outcome.
    Control { op: GatewayControl, reply: Option<oneshot::Sender<ControlOutcome>> },
    /// A request for live stats.
    Stats { reply: oneshot::Sender<GatewayStats> },
}
