//! One connection to the broker: connecting, declaring the topology, and starting the
//! per-connection tasks. Everything lapin-specific about connections lives here.
//!
//! Topology (declared on every connect, all idempotent). `<conn>` is a fresh random token
//! per connection: a reconnect after a loss that only this side noticed (a half-open TCP
//! connection) would otherwise be refused (`RESOURCE_LOCKED`, `ACCESS_REFUSED`) until the
//! broker drops the old connection, up to two heartbeats later, because the old queues
//! are exclusive or consumed exclusively.
//! - exchanges exactly as `configure_nuropb_rmq` makes them (§2.2): rpc direct, events
//!   topic, dead-letter fanout; durable, not auto-delete, not internal, no arguments;
//! - `nuropb-<svc>-<instance>-<conn>-rq`: the response queue (§2.3), non-durable,
//!   auto-delete, consumed with auto-ack by an exclusive consumer. Responses that arrive
//!   late at an old connection's queue go down with it (the requests waiting for them
//!   were failed when it was lost), or are dropped by the broker once it is deleted;
//! - `nuropb-<svc>-sq`: the gateway's service queue, durable with `x-dead-letter-exchange`
//!   like every nuropb service's, bound to the rpc exchange under the service name,
//!   consumed with manual ack;
//! - `nuropb-<svc>-<instance>-<conn>-eq`: this instance's events queue (exclusive,
//!   auto-delete, `x-max-length`, the broker drops the oldest beyond it), bound to each
//!   `event_bindings` pattern, so every instance receives every event (§13.9), consumed
//!   with manual ack; what it drops is dead-lettered (through the default exchange) to
//! - `nuropb-<svc>-<instance>-<conn>-dq`: the drop queue (exclusive, auto-delete,
//!   `x-max-length` 1000), consumed with auto-ack only to count what the broker dropped
//!   (`AmqpStats::events_dropped_by_broker`). No nuropb peer sees either queue;
//! - `nuropb-<svc>-<instance>-<conn>-cq`: this instance's control queue (exclusive,
//!   auto-delete, `x-max-length` with `x-overflow: reject-publish`, so the broker refuses
//!   new operations rather than dropping accepted ones), bound to the control topic only,
//!   consumed with manual ack.
//!
//! One channel carries everything, as in nuropb (§2.5); it runs in confirm mode (see
//! `publisher`). A channel error therefore ends the whole connection, which the
//! supervisor rebuilds: simpler than recovering channels one by one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connect, Connection, ConnectionProperties, Consumer, ExchangeKind};
use nuropb_wire::mesh::PROTOCOL_VERSION;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::config::AmqpMeshConfig;
use crate::error::{AmqpMeshError, BoxError};
use crate::link_state::LinkHandle;
use crate::pending::PendingTable;
use crate::responses::ResponseConsumer;
use crate::service::GatewayService;
use crate::stats::{Counters, bump};
use crate::subscriber::{Inbound, Subscriber};
use crate::{publisher, responses, service, subscriber};

/// How long closing a connection may take before we stop waiting for the broker.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the connection's tasks may take to stop once cancelled.
const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A live connection and its tasks.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) handle: LinkHandle,
    /// Which node of `AmqpMeshConfig::node_urls` this connection went to.
    pub(crate) node: usize,
    /// Cancelled when anything on this connection fails, or when it is closed.
    pub(crate) token: CancellationToken,
    connection: Connection,
    tasks: TaskTracker,
}

impl Link {
    /// Stops the tasks and closes the connection (the broker requeues unacked messages).
    pub(crate) async fn close(self) {
        self.token.cancel();
        // Errors are expected here: the connection is often already gone.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "OK".into())).await;
        if tokio::time::timeout(TASKS_STOP_TIMEOUT, self.tasks.wait()).await.is_err() {
            warn!(generation = self.handle.generation, "connection tasks did not stop in time");
        }
    }
}

/// A fresh token for one connection's queue names (8 lowercase hex): unique enough next
/// to the instance id, short enough to leave room for long service names.
fn connection_token() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// What every connection is made of: the config it is declared from, and the roles its
/// tasks run (each built once, shared by every connection).
#[derive(Debug)]
pub(crate) struct Connector {
    pub(crate) config: Arc<AmqpMeshConfig>,
    pub(crate) counters: Arc<Counters>,
    /// Handed to each connection's publisher, for returns that reach waiting requests.
    pub(crate) pending: Arc<PendingTable>,
    pub(crate) responses: Arc<ResponseConsumer>,
    pub(crate) subscriber: Arc<Subscriber>,
    pub(crate) service: Arc<GatewayService>,
}

impl Connector {
    /// Connects to node `node` (an index into `AmqpMeshConfig::node_urls`) and sets up
    /// connection `generation` there.
    pub(crate) async fn establish(
        &self,
        generation: u64,
        node: usize,
    ) -> Result<Link, AmqpMeshError> {
        let config = &self.config;
        let url = config.redacted_node_url(node);
        let uri = config.parse_node_uri(node)?;
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{}/{}", config.service_name, config.instance_id).into())
            .with_client_property("product".into(), "nuropb-gateway".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into())
            .with_client_property("protocol".into(), PROTOCOL_VERSION.into())
            .with_client_property("name".into(), config.service_name.as_str().into())
            .with_client_property("instance_id".into(), config.instance_id.as_str().into());
        let timeout = config.connect_timeout;
        // What `Connection::connect_uri` does, with our TLS settings (empty for amqp://).
        let runtime =
            lapin::runtime::default_runtime().map_err(|e| connect_error(url.clone(), e))?;
        let connect = uri.connect_with_config(properties, config.tls.to_lapin(), runtime);
        let connection = match tokio::time::timeout(timeout, connect).await {
            Err(_) => return Err(AmqpMeshError::ConnectTimeout { url, timeout }),
            Ok(Err(error)) => return Err(connect_error(url, error)),
            Ok(Ok(connection)) => connection,
        };
        // Listen before anything can fail, so no connection error goes unseen.
        let events = Box::pin(connection.events_listener());
        let setup = tokio::time::timeout(timeout, setup(config, &connection, generation)).await;
        let (handle, token, tasks) = match setup {
            Ok(Ok(ready)) => ready.start(self, events),
            Ok(Err(error)) => {
                // Best effort: the broker may already have closed it.
                let _ = connection.close(200, "OK".into()).await;
                return Err(error);
            }
            Err(_) => {
                let _ = connection.close(200, "OK".into()).await;
                return Err(AmqpMeshError::ConnectTimeout { url, timeout });
            }
        };
        debug!(generation, url = %url, "topology declared");
        Ok(Link { handle, node, token, connection, tasks })
    }
}

/// A connection with its topology declared and its consumers registered.
struct Ready {
    generation: u64,
    response_queue: String,
    channel: Channel,
    /// Without confirms: requests to routable services (see `publisher`).
    direct: Channel,
    responses: Consumer,
    events: Consumer,
    controls: Consumer,
    calls: Consumer,
    dropped: Consumer,
}

async fn setup(
    config: &AmqpMeshConfig,
    connection: &Connection,
    generation: u64,
) -> Result<Ready, AmqpMeshError> {
    let control_topic = config.control_topic();
    let channel = connection.create_channel().await.map_err(topology("open a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(topology("enable publisher confirms"))?;
    let direct = connection.create_channel().await.map_err(topology("open the direct channel"))?;

    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    for (name, kind) in [
        (&config.rpc_exchange, ExchangeKind::Direct),
        (&config.events_exchange, ExchangeKind::Topic),
        (&config.dl_exchange, ExchangeKind::Fanout),
    ] {
        channel
            .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
            .map_err(topology(&format!("declare exchange {name}")))?;
    }

    // Declaration order of nuropb (§2.3): response queue, service queue, bindings, qos,
    // consumers.
    let token = connection_token();
    let response_queue = config.response_queue(&token);
    channel
        .queue_declare(
            response_queue.as_str().into(),
            QueueDeclareOptions { auto_delete: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(topology(&format!("declare queue {response_queue}")))?;

    let service_queue = config.service_queue();
    let mut dead_letter = FieldTable::default();
    dead_letter.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(config.dl_exchange.as_str())),
    );
    channel
        .queue_declare(
            service_queue.as_str().into(),
            QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
            dead_letter,
        )
        .await
        .map_err(topology(&format!("declare queue {service_queue}")))?;

    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    // Declared before the events queue that dead-letters into it. Bounded too: while the
    // consumer keeps up it stays near empty; beyond 1000 the broker drops the oldest
    // uncounted (the counter then says "at least").
    let drop_queue = config.events_drop_queue(&token);
    let mut drop_bound = FieldTable::default();
    drop_bound.insert("x-max-length".into(), AMQPValue::LongLongInt(1000));
    channel
        .queue_declare(drop_queue.as_str().into(), private, drop_bound)
        .await
        .map_err(topology(&format!("declare queue {drop_queue}")))?;

    let events_queue = config.events_queue(&token);
    let mut drop_oldest = FieldTable::default();
    drop_oldest.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(config.events_queue_max_length)),
    );
    // `drop-head` (the default overflow) dead-letters what it drops when the queue has a
    // dead-letter exchange: the default exchange routes it to the drop queue by name.
    drop_oldest.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    drop_oldest.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(drop_queue.as_str())),
    );
    channel
        .queue_declare(events_queue.as_str().into(), private, drop_oldest)
        .await
        .map_err(topology(&format!("declare queue {events_queue}")))?;

    let control_queue = config.control_queue(&token);
    let mut refuse_newest = FieldTable::default();
    refuse_newest.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::from(config.control_queue_max_length)),
    );
    refuse_newest
        .insert("x-overflow".into(), AMQPValue::LongString(LongString::from("reject-publish")));
    channel
        .queue_declare(control_queue.as_str().into(), private, refuse_newest)
        .await
        .map_err(topology(&format!("declare queue {control_queue}")))?;

    channel
        .queue_bind(
            service_queue.as_str().into(),
            config.rpc_exchange.as_str().into(),
            config.service_name.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(topology(&format!("bind {service_queue}")))?;
    let bindings = config
        .event_bindings
        .iter()
        .map(|pattern| (&events_queue, pattern))
        .chain(std::iter::once((&control_queue, &control_topic)));
    for (queue, pattern) in bindings {
        channel
            .queue_bind(
                queue.as_str().into(),
                config.events_exchange.as_str().into(),
                pattern.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(topology(&format!("bind {queue} to {pattern}")))?;
    }

    // Per consumer (global = false): bounds each manual-ack consumer separately.
    channel
        .basic_qos(config.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(topology("set prefetch"))?;

    let consume = |queue: String, options: BasicConsumeOptions| {
        let channel = channel.clone();
        async move {
            channel
                .basic_consume(queue.as_str().into(), "".into(), options, FieldTable::default())
                .await
                .map_err(topology(&format!("consume {queue}")))
        }
    };
    let responses = consume(
        response_queue.clone(),
        BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() },
    )
    .await?;
    let calls = consume(service_queue, BasicConsumeOptions::default()).await?;
    let exclusive = BasicConsumeOptions { exclusive: true, ..BasicConsumeOptions::default() };
    let events = consume(events_queue, exclusive).await?;
    let controls = consume(control_queue, exclusive).await?;
    let dropped = consume(
        drop_queue,
        BasicConsumeOptions { no_ack: true, exclusive: true, ..BasicConsumeOptions::default() },
    )
    .await?;
    Ok(Ready {
        generation,
        response_queue,
        channel,
        direct,
        responses,
        events,
        controls,
        calls,
        dropped,
    })
}

impl Ready {
    /// Spawns the connection's tasks.
    fn start(
        self,
        connector: &Connector,
        events: impl futures::Stream<Item = lapin::Event> + Send + Unpin + 'static,
    ) -> (LinkHandle, CancellationToken, TaskTracker) {
        let Ready {
            generation,
            response_queue,
            channel,
            direct,
            responses,
            events: event_deliveries,
            controls,
            calls,
            dropped,
        } = self;
        let token = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (publisher, direct_publisher, publisher_task) = publisher::channel(
            connector.config.publish_queue_capacity,
            Arc::clone(&connector.counters),
            Arc::clone(&connector.pending),
            direct.clone(),
            token.clone(),
        );
        debug!(generation, response_queue = %response_queue, "connection queues declared");
        let routes = Arc::clone(&direct_publisher.routes);
        let handle = LinkHandle {
            generation,
            response_queue: response_queue.into(),
            publisher,
            direct: direct_publisher,
        };

        tasks.spawn(
            publisher_task
                .run(channel, (direct, routes), token.clone())
                .instrument(info_span!("amqp.publisher", generation)),
        );
        tasks.spawn(
            watch_connection(events, token.clone())
                .instrument(info_span!("amqp.connection", generation)),
        );
        tasks.spawn(
            responses::run(Arc::clone(&connector.responses), responses, token.clone())
                .instrument(info_span!("amqp.responses", generation)),
        );
        tasks.spawn(
            subscriber::run(
                Arc::clone(&connector.subscriber),
                event_deliveries,
                Inbound::Events,
                token.clone(),
            )
            .instrument(info_span!("amqp.events", generation)),
        );
        tasks.spawn(
            subscriber::run(
                Arc::clone(&connector.subscriber),
                controls,
                Inbound::Controls,
                token.clone(),
            )
            .instrument(info_span!("amqp.controls", generation)),
        );
        tasks.spawn(
            service::run(
                Arc::clone(&connector.service),
                calls,
                handle.publisher.clone(),
                token.clone(),
            )
            .instrument(info_span!("amqp.service", generation)),
        );
        tasks.spawn(
            count_dropped(dropped, Arc::clone(&connector.counters), token.clone())
                .instrument(info_span!("amqp.dropped", generation)),
        );
        tasks.close();
        (handle, token, tasks)
    }
}

/// Counts the events the broker dead-lettered from the full events queue (auto-ack: the
/// bodies are not looked at).
async fn count_dropped(mut dropped: Consumer, counters: Arc<Counters>, link: CancellationToken) {
    let mut total: u64 = 0;
    loop {
        // Cancellation safety: a delivery not taken stays with the consumer, which goes
        // down with the link.
        let next = tokio::select! {
            () = link.cancelled() => return,
            next = dropped.next() => next,
        };
        match next {
            Some(Ok(_)) => {
                bump(&counters.events_dropped_by_broker);
                total += 1;
                // Logged at powers of two so a flood of drops does not flood the log.
                if total.is_power_of_two() {
                    warn!(total, "events queue full: the broker dropped the oldest events");
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "drop queue consumer failed");
                return;
            }
            None => return,
        }
    }
}

/// Cancels `link` on the first connection error (lapin 4 reports them on an events
/// stream instead of the callbacks of lapin 2).
async fn watch_connection(
    mut events: impl futures::Stream<Item = lapin::Event> + Send + Unpin,
    link: CancellationToken,
) {
    loop {
        // Cancellation safety: `next` on the flume-backed stream loses no event.
        let event = tokio::select! {
            () = link.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            Some(lapin::Event::Error(error)) => {
                warn!(error = %error, "mesh connection error");
                link.cancel();
                return;
            }
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                warn!(reason, "broker blocked publishing (resource alarm)");
            }
            Some(lapin::Event::ConnectionUnblocked) => debug!("broker unblocked publishing"),
            Some(other) => debug!(event = ?other, "connection event"),
            None => {
                link.cancel();
                return;
            }
        }
    }
}

fn topology(what: &str) -> impl FnOnce(lapin::Error) -> AmqpMeshError + '_ {
    move |source| AmqpMeshError::Topology { what: what.to_owned(), source: Box::new(source) }
}

/// Refusals (bad credentials, unknown vhost, no permission) are told apart from network
/// failures, because retrying them without a config change is pointless.
fn connect_error(url: String, error: lapin::Error) -> AmqpMeshError {
    let refused = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(amqp.get_id(), 403 | 530),
        lapin::ErrorKind::AuthProviderError(_) => true,
        _ => false,
    };
    let source: BoxError = Box::new(error);
    if refused {
        AmqpMeshError::Refused { url, source }
    } else {
        AmqpMeshError::Connect { url, source }
    }
}
