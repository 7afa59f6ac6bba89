//! [`AmqpMesh`]: the façade that implements the `ServiceMesh` port over RabbitMQ. It
//! builds the roles from the config, makes the first connection (or leaves it to the
//! supervisor, `AmqpMesh::start_unconnected`), and hands the rest to the supervisor.
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
use crate::link::{Connector, Link};
use crate::link_state::LinkWatch;
use crate::pending::PendingTable;
use crate::requester::Requester;
use crate::responses::ResponseConsumer;
use crate::service::GatewayService;
use crate::stats::{AmqpStats, Counters};
use crate::subscriber::Subscriber;
use crate::supervisor::{self, Supervisor};

/// The RabbitMQ service mesh. Cheap to clone; all clones share one connection.
#[derive(Debug, Clone)]
pub struct AmqpMesh {
    requester: Arc<Requester>,
    /// `true` once the supervisor's first round is over (see [`AmqpMesh::first_round`]).
    first_round_done: watch::Receiver<bool>,
    link: LinkWatch,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
    tracker: TaskTracker,
}

impl AmqpMesh {
    /// Validates `config`, connects, declares the topology and starts consuming. Fails if
    /// this first connection cannot be made (bad URL, broker down, refused credentials,
    /// conflicting topology) to any node of [`AmqpMeshConfig::node_urls`], each tried once
    /// in order (the error is the first node's); afterwards a supervisor keeps the
    /// connection up until `shutdown` fires.
    ///
    /// Returns the mesh and the receiving end of the bounded channel on which it delivers
    /// events, control operations and stats requests to the core.
    pub async fn start(
        config: AmqpMeshConfig,
        shutdown: CancellationToken,
    ) -> Result<(AmqpMesh, mpsc::Receiver<MeshInbound>), AmqpMeshError> {
        let parts = Parts::build(config, shutdown)?;
        // Cancellation safety: dropping a half-made connection closes it.
        let mut first_error = None;
        for node in 0..parts.connector.config.node_urls().len() {
            let attempt = tokio::select! {
                link = parts.connector.establish(1, node).instrument(parts.span.clone()) => link,
                () = parts.shutdown.cancelled() => return Err(AmqpMeshError::Shutdown),
            };
            match attempt {
                Ok(first) => return Ok(parts.run(Some(first))),
                Err(error) => {
                    tracing::warn!(parent: &parts.span, error = %error, node, "mesh connect failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        Err(first_error.unwrap_or(AmqpMeshError::Shutdown))
    }

    /// Validates `config` and returns at once, unconnected: the supervisor makes the first
    /// connection in the background, trying the nodes in order and backing off between
    /// rounds as after a lost connection, until one succeeds or `shutdown` fires.
    /// Meanwhile [`ServiceMesh::is_connected`] is false and every call fails at once with
    /// `MeshError::Unavailable("not connected to the broker")`, exactly as during a
    /// reconnect; [`AmqpMesh::connected`] waits for the connection. A broker that refuses
    /// the credentials is retried too (logged at `warn` each time), since its
    /// configuration may be fixed while the gateway runs.
    pub fn start_unconnected(
        config: AmqpMeshConfig,
        shutdown: CancellationToken,
    ) -> Result<(AmqpMesh, mpsc::Receiver<MeshInbound>), AmqpMeshError> {
        Ok(Parts::build(config, shutdown)?.run(None))
    }

    /// Waits until the first round of connection attempts is over: connected, or every
    /// node of [`AmqpMeshConfig::node_urls`] tried once and failed (or shut down). Returns
    /// whether it is connected. After [`AmqpMesh::start`] it returns at once. Lets a
    /// program started with [`AmqpMesh::start_unconnected`] begin serving once the broker
    /// had its chance, without waiting for a broker that is down: a refused connection
    /// fails at once, a silent node after `connect_timeout`.
    pub async fn first_round(&self) -> bool {
        let mut done = self.first_round_done.clone();
        // An error means the supervisor is gone, so its round is over too.
        let _ = done.wait_for(|done| *done).await;
        self.is_connected()
    }

    /// A snapshot of the adapter's counters.
    pub fn stats(&self) -> AmqpStats {
        self.counters.snapshot(self.is_connected(), self.pending.len())
    }

    /// Requests waiting for a response right now.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Waits until the mesh is connected (returns at once if it is), or until shutdown.
    /// Returns whether it is connected.
    pub async fn connected(&self) -> bool {
        self.link.connected().await
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
        self.tracker.wait().await;
    }

    /// The response queue of the current connection, e.g. for diagnostics; `None` while
    /// disconnected. Each connection has its own (see
    /// [`AmqpMeshConfig::response_queue`]).
    pub fn response_queue(&self) -> Option<String> {
        self.link.response_queue()
    }
}

/// Everything [`AmqpMesh`] is built from, before the supervisor runs.
struct Parts {
    config: Arc<AmqpMeshConfig>,
    inbound_rx: mpsc::Receiver<MeshInbound>,
    tracker: TaskTracker,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
    link: LinkWatch,
    requester: Arc<Requester>,
    connector: Connector,
    span: tracing::Span,
    shutdown: CancellationToken,
}

impl Parts {
    fn build(config: AmqpMeshConfig, shutdown: CancellationToken) -> Result<Parts, AmqpMeshError> {
        config.validate()?;
        if shutdown.is_cancelled() {
            return Err(AmqpMeshError::Shutdown);
        }
        let config = Arc::new(config);
        let (inbound, inbound_rx) = mpsc::channel(config.inbound_capacity);
        let tracker = TaskTracker::new();
        let counters = Arc::<Counters>::default();
        let pending = Arc::<PendingTable>::default();
        let link = LinkWatch::new(shutdown.clone());
        let describe = DescribeCache::new(
            config.describe_cache_capacity,
            config.describe_ttl,
            config.describe_negative_ttl,
            tracker.clone(),
        );
        let requester = Arc::new(Requester::new(
            &config,
            Arc::clone(&counters),
            Arc::clone(&pending),
            describe,
            link.clone(),
        ));
        let connector = Connector {
            responses: Arc::new(ResponseConsumer {
                pending: Arc::clone(&pending),
                counters: Arc::clone(&counters),
                max_inbound_body_bytes: config.max_inbound_body_bytes,
            }),
            subscriber: Arc::new(Subscriber {
                control_topic: config.control_topic(),
                max_inbound_body_bytes: config.max_inbound_body_bytes,
                counters: Arc::clone(&counters),
                inbound: inbound.clone(),
            }),
            service: Arc::new(GatewayService::new(&config, Arc::clone(&counters), inbound)),
            counters: Arc::clone(&counters),
            pending: Arc::clone(&pending),
            config: Arc::clone(&config),
        };
        let span = tracing::info_span!(
            "amqp.mesh",
            service = %config.service_name,
            instance = %config.instance_id,
        );
        Ok(Parts {
            config,
            inbound_rx,
            tracker,
            counters,
            pending,
            link,
            requester,
            connector,
            span,
            shutdown,
        })
    }

    /// Starts the supervisor with the first connection, if one was made.
    fn run(self, first: Option<Link>) -> (AmqpMesh, mpsc::Receiver<MeshInbound>) {
        let Parts {
            config,
            inbound_rx,
            tracker,
            counters,
            pending,
            link,
            requester,
            connector,
            span,
            shutdown,
        } = self;
        if let Some(first) = &first {
            link.set(Some(first.handle.clone()));
        }
        let first_round_done = Arc::new(watch::Sender::new(first.is_some()));
        let first_round = first_round_done.subscribe();
        let supervisor = Supervisor {
            connector,
            link: link.clone(),
            pending: Arc::clone(&pending),
            reconnect_min: config.reconnect_min,
            reconnect_max: config.reconnect_max,
            drain_timeout: config.drain_timeout,
            shutdown,
            first_round_done,
        };
        tracker.spawn(supervisor::run(supervisor, first).instrument(span));
        // Closed now so that `closed` finishes once the supervisor and any describe refresh
        // (the only other tasks spawned here) are done. A refresh spawned after shutdown
        // finds no connection (`LinkWatch::current`) and ends at once.
        tracker.close();
        let mesh =
            AmqpMesh { requester, first_round_done: first_round, link, counters, pending, tracker };
        (mesh, inbound_rx)
    }
}

#[async_trait]
impl ServiceMesh for AmqpMesh {
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError> {
        // The gateway's own deadline: nuropb requesters have none, and services never
        // report an expired request (§11). The pending entry goes with the future.
        self.requester.request(call, timeout).await
    }

    async fn command(&self, call: MeshCall) -> Result<(), MeshError> {
        self.requester.command(call).await
    }

    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.requester.publish_event(event).await
    }

    fn is_connected(&self) -> bool {
        self.link.is_connected()
    }
}
