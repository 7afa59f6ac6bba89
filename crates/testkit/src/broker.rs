//! Broker test plumbing: the run's throw-away vhost (created by `cargo xtask integration`
//! and passed in [`URL_ENV`]), `rabbitmqctl`, a raw AMQP peer (a mesh participant written
//! directly against lapin), spies on exchanges, a half-open TCP proxy and bounded waits.

use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The test broker's address; tests only ever use loopback.
pub const BROKER: &str = "127.0.0.1:5672";
/// Bound of every wait in these tests; nothing may hang.
pub const WAIT: Duration = Duration::from_secs(5);
/// No scenario may take longer than this.
pub const SCENARIO_LIMIT: Duration = Duration::from_secs(30);

/// The broker URL with the run's vhost. `cargo xtask integration` creates one vhost per run
/// (each `rabbitmqctl` call costs half a second of an Erlang VM start) and deletes it after.
pub const URL_ENV: &str = "NUROPB_TEST_AMQP_URL";

/// The run's vhost, shared by every broker test of the run. Tests stay apart by using
/// service names of their own.
#[derive(Debug, Clone)]
pub struct TestVhost {
    /// The vhost's name, for `rabbitmqctl -p`.
    pub vhost: String,
    /// `amqp://guest:guest@127.0.0.1:5672/<vhost>`.
    pub url: String,
}

impl TestVhost {
    /// The vhost from [`URL_ENV`]. Fails the test, never skips it, when the variable is
    /// missing or the broker does not answer.
    pub fn from_env() -> TestVhost {
        let Ok(url) = std::env::var(URL_ENV) else {
            panic!(
                "{URL_ENV} is not set. The broker tests run in a throw-away vhost on the local \
                 RabbitMQ that `cargo xtask integration` creates, passes in {URL_ENV} and deletes \
                 afterwards: run `cargo xtask integration`."
            )
        };
        require_broker();
        init_logging();
        let vhost = vhost_of(&url);
        TestVhost { vhost, url }
    }
}

/// The vhost of an `amqp://user:pass@host:port/<vhost>` URL, percent-decoded.
fn vhost_of(url: &str) -> String {
    let path = url.rsplit_once('/').map_or("", |(_, p)| p);
    let mut out = Vec::new();
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        let hex = |b: Option<u8>| b.and_then(|b| char::from(b).to_digit(16));
        if b == b'%' {
            let (hi, lo) = (hex(bytes.next()), hex(bytes.next()));
            let (Some(hi), Some(lo)) = (hi, lo) else { panic!("bad escape in {URL_ENV}: {url}") };
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| panic!("vhost of {url} is not UTF-8"))
}

/// With `RUST_LOG` set, the code under test logs to the test's output.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        // Another test of the process installed it already: that one serves all.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Tests of one run share the vhost and run in parallel. A test that disturbs the whole
/// vhost (closes all its connections, revokes permissions) holds this exclusively; every
/// other test holds it shared.
static VHOST_USE: RwLock<()> = RwLock::const_new(());

/// Held for the whole of a test that shares the vhost with others.
pub type SharedUse = RwLockReadGuard<'static, ()>;
/// Held for the whole of a test that disturbs every connection in the vhost.
pub type ExclusiveUse = RwLockWriteGuard<'static, ()>;

/// Takes the shared use of the run's vhost (many tests at once).
pub async fn shared_use() -> SharedUse {
    VHOST_USE.read().await
}

/// Takes the exclusive use of the run's vhost: waits until no other test holds it.
pub async fn exclusive_use() -> ExclusiveUse {
    VHOST_USE.write().await
}

/// Runs one scenario against the run's vhost, failing it after [`SCENARIO_LIMIT`].
pub async fn scenario<Fut: Future<Output = ()>>(run: impl FnOnce(TestVhost) -> Fut) {
    let vhost = TestVhost::from_env();
    if tokio::time::timeout(SCENARIO_LIMIT, run(vhost)).await.is_err() {
        panic!("the scenario was still running after {SCENARIO_LIMIT:?}");
    }
}

/// Panics (fails the test) with a clear message when the broker does not answer. Checked
/// once per process.
pub fn require_broker() {
    static ANSWERED: OnceLock<Result<(), String>> = OnceLock::new();
    let answered = ANSWERED.get_or_init(|| {
        let addr: SocketAddr = BROKER.parse().map_err(|e| format!("{e}"))?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    if let Err(e) = answered {
        panic!(
            "RabbitMQ does not answer on {BROKER} ({e}). These tests need the local broker \
             (guest/guest) and `rabbitmqctl` on PATH; they never skip. `cargo xtask integration` \
             starts it."
        );
    }
}

/// Bound on one `rabbitmqctl` call (each boots an Erlang VM, about half a second).
const CTL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a listing that met a vanishing process is tried in all.
const LIST_TRIES: usize = 5;

/// Runs `rabbitmqctl` and returns its stdout; panics with its output on failure or when it
/// takes longer than 30 s (`CTL_TIMEOUT`).
///
/// A listing (`list_*`) asks every queue or connection process of the vhost in turn; when
/// one of them exits meanwhile (an auto-delete queue or a connection of a test running
/// beside this one), the broker answers `badrpc` and the whole listing fails. Such a
/// listing is read-only, so it is tried again, at most 5 times in all (`LIST_TRIES`); any
/// other failure, and the last one, panics.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let listing = args.first().is_some_and(|a| a.starts_with("list_"));
    let mut attempt = 1;
    loop {
        match run_bounded(args) {
            Ok(out) if out.status.success() => {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            Ok(out) => {
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if listing && attempt < LIST_TRIES && said.contains("badrpc") {
                    std::thread::sleep(Duration::from_millis(200));
                    attempt += 1;
                    continue;
                }
                panic!("rabbitmqctl {args:?} failed (try {attempt}): {said}");
            }
            Err(why) => panic!("rabbitmqctl {args:?}: {why}"),
        }
    }
}

fn run_bounded(args: &[&str]) -> Result<Output, String> {
    let mut child = Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let deadline = Instant::now() + CTL_TIMEOUT;
    // Its output is a few kilobytes at most, far below a pipe's buffer, so polling for the
    // exit before reading cannot deadlock.
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| e.to_string()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                // Best effort: it is being abandoned either way.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {CTL_TIMEOUT:?}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// `rabbitmqctl` off the async runtime's worker threads. The arguments are copied at
/// once, so the future borrows nothing.
pub fn rabbitmqctl_async(args: &[&str]) -> impl Future<Output = String> + Send + 'static {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    async move {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rabbitmqctl(&args)
        })
        .await
        .expect("rabbitmqctl task")
    }
}

/// Waits until `check` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` at most [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A lapin connection to `url`; panics (the test fails) when it cannot connect.
pub async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default()).await.expect("test connection")
}

/// The five nuropb headers as pika writes them.
pub fn nuropb_headers(message_type: &str, trace_id: Option<&str>, encrypted: bool) -> FieldTable {
    let mut t = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    t.insert("nuropb_protocol".into(), long("0.1.1"));
    t.insert("nuropb_version".into(), long("0.1.8"));
    t.insert("nuropb_type".into(), long(message_type));
    t.insert("trace_id".into(), trace_id.map_or(AMQPValue::Void, long));
    t.insert("encrypted".into(), long(if encrypted { "yes" } else { "" }));
    t
}

/// A mesh participant written straight against lapin: publishes whatever a test wants
/// and reads responses from its own (server-named, exclusive) reply queue.
pub struct Peer {
    /// The connection, held so that the channel stays open.
    pub _connection: Connection,
    /// The channel the peer publishes and consumes on.
    pub channel: Channel,
    /// The peer's exclusive, server-named reply queue.
    pub reply_queue: String,
    replies: Consumer,
}

impl Peer {
    /// Connects to `url`, declares the reply queue and starts consuming it.
    pub async fn new(url: &str) -> Peer {
        let connection = connect(url).await;
        let channel = connection.create_channel().await.expect("channel");
        let reply_queue = temp_queue(&channel).await;
        let replies = consume_no_ack(&channel, &reply_queue).await;
        Peer { _connection: connection, channel, reply_queue, replies }
    }

    /// Publishes `body` as given and waits until it is written; panics on failure.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("publish written");
    }

    /// Sends a nuropb request to `service` and returns the response body.
    pub async fn call(&mut self, service: &str, method: &str, params: Value) -> Value {
        let correlation_id = uuid::Uuid::new_v4().simple().to_string();
        let body = serde_json::json!({
            "tag": "request", "service": service, "method": method, "params": params,
            "correlation_id": correlation_id, "context": {"peer": true}, "trace_id": "peer-trace",
        });
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(nuropb_headers("request", Some("peer-trace"), false))
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_expiration("10000".into());
        let bytes = nuropb_wire::pyjson::to_python_json(&body).expect("encode");
        self.publish("nuropb-rpc-exchange", service, props, &bytes).await;
        loop {
            let delivery = within("a response to the peer", self.replies.next())
                .await
                .expect("reply stream open")
                .expect("reply delivery");
            if delivery.properties.correlation_id().as_ref().map(|c| c.as_str())
                == Some(correlation_id.as_str())
            {
                return serde_json::from_slice(&delivery.data).expect("response is JSON");
            }
        }
    }
}

/// A server-named queue that lives as long as the test's connection.
async fn temp_queue(channel: &Channel) -> String {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("temporary queue");
    queue.name().as_str().to_owned()
}

/// Consumes `queue` with auto-ack.
async fn consume_no_ack(channel: &Channel, queue: &str) -> Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

/// Declares a consumer-less queue bound as given: whatever is published there waits in it,
/// so a test can count what was published.
pub async fn silent_spy(channel: &Channel, bindings: &[(&str, &str)]) -> String {
    let name = temp_queue(channel).await;
    for (exchange, key) in bindings {
        channel
            .queue_bind(
                name.as_str().into(),
                (*exchange).into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }
    name
}

/// Declares a queue that copies everything published to `exchange` under `routing_key`.
pub async fn spy(channel: &Channel, exchange: &str, routing_key: &str) -> (String, Consumer) {
    let name = silent_spy(channel, &[(exchange, routing_key)]).await;
    let consumer = consume_no_ack(channel, &name).await;
    (name, consumer)
}

/// Messages waiting in `queue` right now (passive declare).
pub async fn message_count(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
}

/// A TCP proxy in front of the broker that can make the gateway's connections half-open:
/// [`HalfOpenProxy::sever`] closes the gateway's side of every connection made so far but
/// keeps the broker's side open and silent, so only the gateway notices the loss; the
/// broker keeps the old connection (and its exclusive queues and consumers) until its
/// heartbeat timeout. New connections pass through as before.
pub struct HalfOpenProxy {
    /// The loopback port the proxy listens on.
    pub port: u16,
    sever: tokio::sync::watch::Sender<u64>,
    hole: tokio::sync::watch::Sender<u64>,
    held: std::sync::Arc<std::sync::Mutex<Vec<tokio::net::TcpStream>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl HalfOpenProxy {
    /// Starts the proxy on a free loopback port, forwarding to [`BROKER`].
    pub async fn start() -> HalfOpenProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let (sever, severed) = tokio::sync::watch::channel(0u64);
        let (hole, holed) = tokio::sync::watch::channel(0u64);
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = std::sync::Arc::clone(&held);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut upstream =
                    tokio::net::TcpStream::connect(BROKER).await.expect("proxy upstream");
                let mut severed = severed.clone();
                let mut holed = holed.clone();
                // Only severs coming after this connection was made count.
                severed.borrow_and_update();
                holed.borrow_and_update();
                let keep = std::sync::Arc::clone(&keep);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = severed.changed() => {
                            // The client side goes now; the broker side stays open, unread.
                            drop(client);
                            keep.lock().expect("lock").push(upstream);
                        }
                        _ = holed.changed() => {
                            // Both sides stay open and nothing passes: no FIN, no RST.
                            let mut keep = keep.lock().expect("lock");
                            keep.push(client);
                            keep.push(upstream);
                        }
                    }
                });
            }
        });
        HalfOpenProxy { port, sever, hole, held, accept }
    }

    /// `url` with the broker's address replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        url.replace(BROKER, &format!("127.0.0.1:{}", self.port))
    }

    /// Closes the client side of every connection made so far.
    pub fn sever(&self) {
        self.sever.send_modify(|n| *n += 1);
    }

    /// Black-holes every connection made so far: both sides stay open and silent (no FIN,
    /// no RST), as when a network path dies; only heartbeats can tell.
    pub fn black_hole(&self) {
        self.hole.send_modify(|n| *n += 1);
    }

    /// Sockets kept open after a sever (the broker's side) or a black hole (both sides).
    pub fn held(&self) -> usize {
        self.held.lock().expect("lock").len()
    }
}

impl Drop for HalfOpenProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Closing the held sockets lets the broker drop the old connections now.
        self.held.lock().map(|mut h| h.clear()).unwrap_or_default();
    }
}
