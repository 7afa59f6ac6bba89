//! The AMQP scenarios, both against the same echo service (the testkit's [`FakeService`]
//! with [`ServiceOptions::bench`]) on the local RabbitMQ:
//! - B: lapin requesters publishing nuropb requests straight to the service's queue and
//!   awaiting the responses on their own reply queues (direct AMQP RPC, no gateway);
//! - G: WebSocket clients → gateway (core + ws-adapter + `AmqpMesh`) → RabbitMQ → service.
//!
//! B does on the wire what the gateway's requester does, so that G/B is the cost of the
//! gateway and not of a different use of the broker: one channel per connection in
//! publisher-confirm mode, mandatory publishes with an expiration, the confirmation awaited
//! before the response, the same nuropb headers and a context of the same shape (user id,
//! bearer token, trace id). Each B client has its own connection, as separate processes
//! would; the gateway serves all its WebSocket clients over one.
//!
//! Both are driven the same way: [`WARMUP`] unrecorded calls (the gateway's first one also
//! fetches the service's description), one sequential client for latency, then
//! [`CLIENTS`] clients, all connected before the clock starts, each keeping [`WINDOW`]
//! requests outstanding for throughput.

use std::sync::Arc;
use std::time::Duration;

use amqp_mesh::{AmqpMesh, AmqpMeshConfig};
use futures_util::{SinkExt, Stream, StreamExt};
use handler_core::coordinator::CoreConfig;
use handler_core::mesh_manager::MeshManagerConfig;
use handler_core::{Coordinator, JwtAuthenticator, JwtConfig, auth::JwtKey};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};
use nuropb_wire::JsonObject;
use nuropb_wire::mesh::{MessageType, RequestBody, ResponseBody};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{DEADLINE, Row, SEQUENTIAL, Ws, connect, percentile};
use e2e_tests::{Options, SECRET, token};
use nuropb_testkit::broker::nuropb_headers;
use nuropb_testkit::{FakeService, ServiceOptions};

const RPC_EXCHANGE: &str = "nuropb-rpc-exchange";
/// The echo service's prefetch (and so the answers it works on at once).
pub const SERVICE_PREFETCH: u16 = ServiceOptions::bench().prefetch;

/// The echo service's name: its queue is `nuropb-bench-echo-sq`.
pub const SERVICE: &str = "bench-echo";
pub const WARMUP: usize = 200;
pub const CLIENTS: usize = 8;
pub const PER_CLIENT: usize = 1_000;
/// Requests each throughput client keeps outstanding.
pub const WINDOW: usize = 32;
/// The gateway's request timeout and the AMQP expiration of every request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any single response; past it a client gives up (and the row says so).
const RESPONSE_WAIT: Duration = Duration::from_secs(5);

/// Starts the echo service, measures B then G, and stops everything again.
pub async fn run(amqp_url: &str) -> (Row, Row) {
    let service = FakeService::start_opts(amqp_url, SERVICE, ServiceOptions::bench()).await;
    let direct = measure_direct(amqp_url).await;
    let gateway = AmqpGateway::start(amqp_url).await;
    let through_gateway = measure_gateway(&gateway.url).await;
    gateway.stop().await;
    service.stop().await;
    (direct, through_gateway)
}

// --- B: direct AMQP RPC ---------------------------------------------------------------------

/// One requester: its own connection, a confirm-mode channel and an exclusive reply queue.
struct DirectClient {
    publisher: DirectPublisher,
    replies: Consumer,
}

/// The publishing half of a [`DirectClient`].
struct DirectPublisher {
    id: usize,
    _connection: Connection,
    channel: Channel,
    reply_queue: ShortString,
    /// The bearer token that goes into every request's context, as the gateway's does.
    authorization: String,
}

impl DirectClient {
    async fn connect(url: &str, id: usize) -> DirectClient {
        let connection =
            Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        let exclusive =
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue =
            channel.queue_declare("".into(), exclusive, FieldTable::default()).await.expect("rq");
        let reply_queue = queue.name().clone();
        let no_ack = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let replies = channel
            .basic_consume(reply_queue.clone(), "".into(), no_ack, FieldTable::default())
            .await
            .expect("consume replies");
        let authorization = format!("Bearer {}", token("bench"));
        let publisher =
            DirectPublisher { id, _connection: connection, channel, reply_queue, authorization };
        DirectClient { publisher, replies }
    }

    /// One request, its confirmation, then its response.
    async fn round_trip(&mut self, i: usize) {
        let (correlation_id, confirm) = self.publisher.publish(i).await;
        assert!(routed(confirm.await), "request {i} was not routed to the echo service");
        loop {
            let delivery = tokio::time::timeout(RESPONSE_WAIT, self.replies.next())
                .await
                .expect("a response in time")
                .expect("reply queue open")
                .expect("reply delivery");
            let properties = &delivery.properties;
            if properties.correlation_id().as_ref().map(ShortString::as_str)
                == Some(correlation_id.as_str())
            {
                assert!(direct_response_ok(&delivery.data), "echo failed on request {i}");
                return;
            }
        }
    }

    /// Sends [`PER_CLIENT`] requests keeping [`WINDOW`] outstanding; counts the responses.
    async fn pipelined(self, deadline: Instant) -> Tally {
        let DirectClient { publisher, replies } = self;
        let window = Semaphore::new(WINDOW);
        // Confirmations arrive in publish order, so awaiting them in order holds nothing up.
        let (confirms_tx, mut confirms_rx) = mpsc::channel::<PublisherConfirm>(WINDOW);
        let sender = async {
            for i in 0..PER_CLIENT {
                let Ok(permit) = window.acquire().await else { break };
                permit.forget();
                let (_, confirm) = publisher.publish(i).await;
                if confirms_tx.send(confirm).await.is_err() {
                    break;
                }
            }
            drop(confirms_tx);
        };
        let confirmer = async {
            let mut unrouted = 0;
            while let Some(confirm) = confirms_rx.recv().await {
                if !routed(confirm.await) {
                    unrouted += 1;
                }
            }
            unrouted
        };
        let responses = replies.map(|d| d.is_ok_and(|d| direct_response_ok(&d.data)));
        let receiver = count_responses(&window, deadline, responses);
        let ((), unrouted, mut tally) = tokio::join!(sender, confirmer, receiver);
        tally.errors += unrouted;
        tally
    }
}

impl DirectPublisher {
    /// Publishes request `i` and returns its correlation id and the broker's confirmation.
    async fn publish(&self, i: usize) -> (String, PublisherConfirm) {
        let correlation_id = format!("bench-{:02}-{i:06}", self.id);
        let trace_id = format!("t{i}");
        // The same params as the WebSocket frames, and the context the gateway builds.
        let params = JsonObject::from_iter([
            ("i".to_owned(), json!(i)),
            ("text".to_owned(), json!("hello benchmark")),
        ]);
        let context = JsonObject::from_iter([
            ("user_id".to_owned(), json!("bench")),
            ("Authorization".to_owned(), json!(self.authorization)),
            ("trace_id".to_owned(), json!(trace_id)),
        ]);
        let body = RequestBody {
            tag: MessageType::Request,
            service: SERVICE.to_owned(),
            method: "echo".to_owned(),
            params,
            correlation_id: correlation_id.clone(),
            context,
            trace_id: Some(trace_id.clone()),
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(nuropb_headers(MessageType::Request.as_str(), Some(&trace_id), false))
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(self.reply_queue.clone())
            .with_expiration(REQUEST_TIMEOUT.as_millis().to_string().as_str().into());
        let body = to_python_json(&body).expect("a request encodes");
        let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self
            .channel
            .basic_publish(RPC_EXCHANGE.into(), SERVICE.into(), mandatory, &body, props)
            .await
            .expect("publish");
        (correlation_id, confirm)
    }
}

fn routed(confirmation: lapin::Result<Confirmation>) -> bool {
    matches!(confirmation, Ok(Confirmation::Ack(None)))
}

fn direct_response_ok(body: &[u8]) -> bool {
    from_python_json::<ResponseBody>(body).is_ok_and(|r| r.error.is_none())
}

async fn measure_direct(url: &str) -> Row {
    let mut client = DirectClient::connect(url, 0).await;
    super::sequential(WARMUP, async |i| client.round_trip(i).await).await;
    let latencies = super::sequential(SEQUENTIAL, async |i| client.round_trip(i).await).await;

    let mut clients = Vec::with_capacity(CLIENTS);
    for id in 1..=CLIENTS {
        clients.push(DirectClient::connect(url, id).await);
    }
    let start = Instant::now();
    let deadline = start + DEADLINE;
    let tasks: Vec<_> = clients.into_iter().map(|c| tokio::spawn(c.pipelined(deadline))).collect();
    let tally = Tally::sum(tasks).await;
    row("B: direct AMQP RPC (lapin → RabbitMQ → echo)", &latencies, tally, start)
}

// --- G: through the gateway -----------------------------------------------------------------

/// Core + WebSocket adapter + `AmqpMesh` on a loopback port, wired like `gateway-bin`.
struct AmqpGateway {
    url: String,
    shutdown: CancellationToken,
    mesh: AmqpMesh,
    routing: JoinHandle<()>,
    server: JoinHandle<()>,
}

impl AmqpGateway {
    async fn start(amqp_url: &str) -> AmqpGateway {
        let shutdown = CancellationToken::new();
        // Defaults otherwise (encryption `Auto`: the describe lookup is cached after warm-up).
        let config =
            AmqpMeshConfig { request_ttl: REQUEST_TIMEOUT, ..AmqpMeshConfig::new(amqp_url) };
        let (mesh, inbound) =
            AmqpMesh::start(config, shutdown.clone()).await.expect("the mesh connects");
        let key = JwtKey::Hs256Secret(SECRET.as_bytes().to_vec());
        let auth = JwtAuthenticator::new(JwtConfig::new(key)).expect("jwt config");
        let core = CoreConfig {
            mesh: MeshManagerConfig {
                request_timeout: REQUEST_TIMEOUT,
                max_in_flight_per_session: WINDOW,
                ..MeshManagerConfig::default()
            },
            ..CoreConfig::default()
        };
        let (coordinator, handle) = Coordinator::new(
            core,
            Arc::new(auth),
            Arc::new(mesh.clone()),
            inbound,
            TaskTracker::new(),
            shutdown.clone(),
        );
        let mut ws = Options::default().ws;
        // The benchmark measures the request path, not the abuse limits.
        ws.rate_per_second = 1_000_000;
        ws.rate_burst = 1_000_000;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("local address"));
        let routing = tokio::spawn(coordinator.run(Duration::from_secs(5)));
        let server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let stats = ws_adapter::WsStatsHandle::new();
                ws_adapter::serve(listener, ws, handle, shutdown, TaskTracker::new(), stats)
                    .await
                    .expect("serve");
            }
        });
        AmqpGateway { url, shutdown, mesh, routing, server }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), async {
            self.routing.await.expect("routing task");
            self.server.await.expect("server task");
            self.mesh.closed().await;
        })
        .await
        .expect("the gateway stops in time");
    }
}

fn request_frame(i: usize) -> Message {
    let f = json!({"type": "request", "payload": {"service": SERVICE, "method": "echo",
        "params": {"i": i, "text": "hello benchmark"}, "trace_id": format!("t{i}")}});
    Message::Text(f.to_string().into())
}

/// Whether a frame is a response without error (anything else, e.g. an event, is not).
fn gateway_response_ok(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v["type"] == "response" && v["payload"]["error"].is_null())
}

async fn gateway_round_trip(ws: &mut Ws, i: usize) {
    ws.send(request_frame(i)).await.expect("send");
    loop {
        let frame = tokio::time::timeout(RESPONSE_WAIT, ws.next())
            .await
            .expect("a response in time")
            .expect("connection open")
            .expect("frame");
        if let Message::Text(text) = frame {
            assert!(gateway_response_ok(&text), "gateway answered request {i} with {text}");
            return;
        }
    }
}

async fn gateway_pipelined(ws: Ws, deadline: Instant) -> Tally {
    let (mut tx, rx) = ws.split();
    let window = Semaphore::new(WINDOW);
    let sender = async {
        for i in 0..PER_CLIENT {
            let Ok(permit) = window.acquire().await else { break };
            permit.forget();
            if tx.send(request_frame(i)).await.is_err() {
                break;
            }
        }
    };
    let responses = rx.filter_map(|m| {
        std::future::ready(match m {
            Ok(Message::Text(text)) => Some(gateway_response_ok(&text)),
            Ok(_) => None,
            Err(_) => Some(false),
        })
    });
    let receiver = count_responses(&window, deadline, Box::pin(responses));
    let ((), tally) = tokio::join!(sender, receiver);
    tally
}

async fn measure_gateway(url: &str) -> Row {
    let mut ws = connect(url, true).await;
    super::sequential(WARMUP, async |i| gateway_round_trip(&mut ws, i).await).await;
    let latencies =
        super::sequential(SEQUENTIAL, async |i| gateway_round_trip(&mut ws, i).await).await;

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(connect(url, true).await);
    }
    let start = Instant::now();
    let deadline = start + DEADLINE;
    let tasks: Vec<_> =
        clients.into_iter().map(|ws| tokio::spawn(gateway_pipelined(ws, deadline))).collect();
    let tally = Tally::sum(tasks).await;
    row("G: WebSocket → gateway → AmqpMesh → RabbitMQ → echo", &latencies, tally, start)
}

// --- shared -------------------------------------------------------------------------------

/// Responses one throughput client received.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: usize,
    errors: usize,
}

impl Tally {
    async fn sum(tasks: Vec<JoinHandle<Tally>>) -> Tally {
        let mut total = Tally::default();
        for task in tasks {
            let t = task.await.expect("client task");
            total.ok += t.ok;
            total.errors += t.errors;
        }
        total
    }
}

/// Counts responses until [`PER_CLIENT`] arrived, the deadline passed, or none came for
/// [`RESPONSE_WAIT`]. Each response reopens one slot of the window; closing the window at
/// the end stops the sender.
async fn count_responses(
    window: &Semaphore,
    deadline: Instant,
    mut responses: impl Stream<Item = bool> + Unpin,
) -> Tally {
    let mut tally = Tally::default();
    while tally.ok + tally.errors < PER_CLIENT {
        let wait = deadline.min(Instant::now() + RESPONSE_WAIT);
        match tokio::time::timeout_at(wait, responses.next()).await {
            Ok(Some(true)) => tally.ok += 1,
            Ok(Some(false)) => tally.errors += 1,
            Ok(None) | Err(_) => break,
        }
        window.add_permits(1);
    }
    window.close();
    tally
}

fn row(name: &str, latencies: &[f64], tally: Tally, start: Instant) -> Row {
    Row {
        name: name.to_owned(),
        p50_us: percentile(latencies, 0.5),
        p99_us: percentile(latencies, 0.99),
        throughput: tally.ok as f64 / start.elapsed().as_secs_f64(),
        sequential: latencies.len(),
        completed: tally.ok,
        errors: tally.errors,
        expected: CLIENTS * PER_CLIENT,
    }
}
