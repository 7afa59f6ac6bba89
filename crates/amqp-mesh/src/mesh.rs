//! [`AmqpMesh`]: the `ServiceMesh` port implemented over RabbitMQ, and the state its
//! clones and background tasks share.
//!
//! Task layout (all tracked, each with its own span): one supervisor for the life of the
//! adapter; per connection a publisher, a connection watcher, and one consumer each for
//! the response, events, control and service queues. Any of them failing cancels the connection's
//! token; the supervisor then fails pending requests, closes the connection and
//! reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use handler_core::{MeshCall, MeshError, MeshEvent, MeshInbound, MeshResponse, ServiceMesh};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::AmqpMeshConfig;
use crate::describe::DescribeCache;
use crate::error::AmqpMeshError;
use crate::guard::Limits;
use crate::pending::PendingTable;
use crate::publisher::Publisher;
use crate::stats::{AmqpStats, Counters};
use crate::{link, supervisor};

/// What requests need of the live connection.
#[derive(Debug, Clone)]
pub(crate) struct LinkHandle {
    /// Counts connections; pending requests are failed per generation.
    pub(crate) generation: u64,
    /// This connection's response queue (its name changes with every connection, see
    /// `AmqpMeshConfig::response_queue`): the `reply_to` of requests published on it.
    pub(crate) response_queue: Arc<str>,
    pub(crate) publisher: Publisher,
}

/// State shared by every clone of [`AmqpMesh`] and by the background tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: AmqpMeshConfig,
    pub(crate) control_topic: String,
    pub(crate) limits: Limits,
    pub(crate) counters: Arc<Counters>,
    pub(crate) pending: Arc<PendingTable>,
    pub(crate) describe: DescribeCache,
    /// The live connection, `None` while disconnected. Written only by the supervisor.
    pub(crate) state: watch::Sender<Option<LinkHandle>>,
    pub(crate) inbound: mpsc::Sender<MeshInbound>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

impl Shared {
    /// The live connection, or an immediate `Unavailable`: calls never wait for a
    /// reconnect.
    pub(crate) fn link(&self) -> Result<LinkHandle, MeshError> {
        if self.shutdown.is_cancelled() {
            return Err(MeshError::Unavailable("shutting down".into()));
        }
        self.state
            .borrow()
            .clone()
            .ok_or_else(|| MeshError::Unavailable("not connected to the broker".into()))
    }
}

/// The RabbitMQ service mesh. Cheap to clone; all clones share one connection.
#[derive(Debug, Clone)]
pub struct AmqpMesh {
    shared: Arc<Shared>,
}

impl AmqpMesh {
    /// Validates `config`, connects, declares the topology and starts consuming. Fails if
    /// this first connection cannot be made (bad URL, broker down, refused credentials,
    /// conflicting topology); afterwards a supervisor keeps the connection up until
    /// `shutdown` fires.
    ///
    /// Returns the mesh and the receiving end of the bounded channel on which it delivers
    /// events, control operations and stats requests to the core.
    pub async fn start(
        config: AmqpMeshConfig,
        shutdown: CancellationToken,
    ) -> Result<(AmqpMesh, mpsc::Receiver<MeshInbound>), AmqpMeshError> {
        config.validate()?;
        if shutdown.is_cancelled() {
            return Err(AmqpMeshError::Shutdown);
        }
        let (inbound, inbound_rx) = mpsc::channel(config.inbound_capacity);
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared {
            control_topic: config.control_topic(),
            limits: Limits {
                max_body_bytes: config.max_body_bytes,
                max_trace_id_len: config.max_trace_id_len,
                max_json_depth: config.max_json_depth,
            },
            counters: Arc::default(),
            pending: Arc::default(),
            describe: DescribeCache::new(
                config.describe_cache_capacity,
                config.describe_ttl,
                config.describe_negative_ttl,
                tracker.clone(),
            ),
            state: watch::Sender::new(None),
            inbound,
            shutdown: shutdown.clone(),
            tracker,
            config,
        });
        let span = tracing::info_span!(
            "amqp.mesh",
            service = %shared.config.service_name,
            instance = %shared.config.instance_id,
        );
        // Cancellation safety: dropping a half-made connection closes it.
        let first = tokio::select! {
            link = link::establish(&shared, 1).instrument(span.clone()) => link?,
            () = shutdown.cancelled() => return Err(AmqpMeshError::Shutdown),
        };
        shared.state.send_replace(Some(first.handle.clone()));
        shared.tracker.spawn(supervisor::run(Arc::clone(&shared), first).instrument(span));
        // Closed now so that `closed` finishes once the supervisor and any describe refresh
        // (the only other tasks spawned here) are done. A refresh spawned after shutdown
        // finds no connection (`Shared::link`) and ends at once.
        shared.tracker.close();
        Ok((AmqpMesh { shared }, inbound_rx))
    }

    /// A snapshot of the adapter's counters.
    pub fn stats(&self) -> AmqpStats {
        self.shared.counters.snapshot(self.is_connected(), self.shared.pending.len())
    }

    /// Requests waiting for a response right now.
    pub fn pending_requests(&self) -> usize {
        self.shared.pending.len()
    }

    /// Waits until the mesh is connected (returns at once if it is), or until shutdown.
    /// Returns whether it is connected.
    pub async fn connected(&self) -> bool {
        let mut state = self.shared.state.subscribe();
        // Cancellation safety: `wait_for` and `cancelled` hold no data.
        tokio::select! {
            up = state.wait_for(Option::is_some) => up.is_ok(),
            () = self.shared.shutdown.cancelled() => false,
        }
    }

    /// Waits until the adapter has shut down after the `shutdown` token fired: pending
    /// requests and unconfirmed publishes (commands, events, responses) drained or failed,
    /// the connection closed, every task finished.
    ///
    /// Bounded: the drain ends when nothing is outstanding, when the connection drops, or
    /// after `drain_timeout`. Then the connection's tasks stop at once (once the publisher
    /// is gone, a publish fails immediately), except one handling a peer's `stats` call,
    /// which waits at most `core_reply_timeout` for the core; closing the connection takes
    /// at most 2 s (a broker that does not answer `connection.close`). With nothing
    /// outstanding it resolves within a broker round trip.
    pub async fn closed(&self) {
        self.shared.tracker.wait().await;
    }

    /// The response queue of the current connection, e.g. for diagnostics; `None` while
    /// disconnected. Each connection has its own (see
    /// [`AmqpMeshConfig::response_queue`]).
    pub fn response_queue(&self) -> Option<String> {
        self.shared.state.borrow().as_ref().map(|link| link.response_queue.to_string())
    }
}

#[async_trait]
impl ServiceMesh for AmqpMesh {
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError> {
        // The gateway's own deadline: nuropb requesters have none, and services never
        // report an expired request (§11). The pending entry goes with the future.
        self.shared.request(call, timeout).await
    }

    async fn command(&self, call: MeshCall) -> Result<(), MeshError> {
        self.shared.command(call).await
    }

    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.shared.publish_event(event).await
    }

    fn is_connected(&self) -> bool {
        !self.shared.shutdown.is_cancelled() && self.shared.state.borrow().is_some()
    }
}
