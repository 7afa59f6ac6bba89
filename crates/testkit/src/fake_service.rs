//! A fake nuropb 0.1.8 service written directly against lapin: it declares and consumes
//! its service queue the way `RMQTransport` does (§2.3) and answers like nuropb,
//! including its quirks (the duplicate second response after an error, §6.1).
//!
//! Methods: `nuropb_describe`, `echo`, `fail` (error + duplicate), `slow` (`ms`), `never`
//! (acked, never answered), `secret` (requires encryption; answered encrypted),
//! `garbage_then_echo` (three malformed envelopes first, then the real answer), `bad_body`
//! (a well-enveloped response whose body is not JSON), `note` (for commands). Every
//! delivery is recorded for inspection. Clearing `answer_describe` makes it ack describe
//! calls without answering, like a nuropb service too busy to answer in time. A body it
//! cannot decrypt (encrypted for another key) is counted in `undecryptable`, rejected and
//! never answered: a nuropb service would drop off the mesh there (§7.5).
//!
//! The same service is the benchmark's echo service ([`ServiceOptions::bench`]): with a
//! large prefetch and nothing recorded, so that the service is not what the benchmark
//! measures. Unlike nuropb (prefetch 1, one message at a time) it answers deliveries
//! concurrently, one task each.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use mesh_crypto::{ServicePrivateKey, SessionKey};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{connect, nuropb_headers};

/// The throw-away key of the capture run (spec vectors), 2048-bit.
pub const PRIVATE_KEY_PEM: &str = include_str!("../fixtures/service_private_key.pem");
/// Another throw-away 2048-bit key: the same service after a restart with a new key.
pub const OTHER_PRIVATE_KEY_PEM: &str = include_str!("../fixtures/service_private_key_2.pem");

/// One delivery as the service received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The AMQP properties as received.
    pub properties: BasicProperties,
    /// The body as received (encrypted when the call was).
    pub body: Vec<u8>,
    /// The body after decryption (equal to `body` for plaintext).
    pub plaintext: Vec<u8>,
}

/// How a [`FakeService`] runs.
#[derive(Debug, Clone, Copy)]
pub struct ServiceOptions<'a> {
    /// The service's private key (PEM), making it an encrypted service; none for plaintext.
    pub key_pem: Option<&'a str>,
    /// Unacknowledged deliveries the broker may push (and so requests answered at once).
    pub prefetch: u16,
    /// Whether every delivery is kept for [`FakeService::received`].
    pub record: bool,
}

impl Default for ServiceOptions<'_> {
    /// Plaintext, recording, prefetch 32: more than nuropb's 1, so that slow calls do not
    /// serialise the tests.
    fn default() -> Self {
        ServiceOptions { key_pem: None, prefetch: 32, record: true }
    }
}

impl ServiceOptions<'_> {
    /// The benchmark's echo service: prefetch above everything the benchmark keeps in
    /// flight (requests never wait in the service queue), and no memory of what it got.
    pub const fn bench() -> Self {
        ServiceOptions { key_pem: None, prefetch: 512, record: false }
    }
}

/// A Rust NuroPb service on the broker that answers as nuropb 0.1.8 does: `echo` returns
/// its params, `slow`, `fail`, `secret` and the other test methods behave as their names
/// say, `nuropb_describe` returns its description (with its public key when encrypted).
/// It counts and, when recording, keeps what it received.
pub struct FakeService {
    /// Every delivery received, in order, when recording.
    pub received: Arc<Mutex<Vec<Received>>>,
    /// How many `nuropb_describe` calls it received.
    pub describes: Arc<AtomicUsize>,
    /// Clear to leave `nuropb_describe` unanswered (a busy service).
    pub answer_describe: Arc<AtomicBool>,
    /// How many encrypted bodies it could not decrypt (nuropb would die on the second).
    pub undecryptable: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: TaskTracker,
    connection: Connection,
}

struct Inner {
    name: String,
    channel: Channel,
    key: Option<ServicePrivateKey>,
    record: bool,
    received: Arc<Mutex<Vec<Received>>>,
    describes: Arc<AtomicUsize>,
    answer_describe: Arc<AtomicBool>,
    undecryptable: Arc<AtomicUsize>,
}

impl FakeService {
    /// Encrypted services use the capture run's key ([`PRIVATE_KEY_PEM`]).
    pub async fn start(url: &str, name: &str, encrypted: bool) -> FakeService {
        FakeService::start_with(url, name, encrypted.then_some(PRIVATE_KEY_PEM)).await
    }

    /// A service with the given private key (PEM), or none.
    pub async fn start_with(url: &str, name: &str, key_pem: Option<&str>) -> FakeService {
        FakeService::start_opts(url, name, ServiceOptions { key_pem, ..Default::default() }).await
    }

    /// A service run as `options` say; panics when it cannot start.
    pub async fn start_opts(url: &str, name: &str, options: ServiceOptions<'_>) -> FakeService {
        let connection = connect(url).await;
        FakeService::start_on(connection, name, options).await.expect("the fake service starts")
    }

    /// As [`FakeService::start_opts`], but an error (broker down, a declaration refused)
    /// is returned instead of panicking; the connection attempt is bounded by 5 s.
    pub async fn try_start_opts(
        url: &str,
        name: &str,
        options: ServiceOptions<'_>,
    ) -> Result<FakeService, String> {
        let connect = Connection::connect(url, ConnectionProperties::default());
        let connection = match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect: timed out after 5 s".to_owned()),
        };
        FakeService::start_on(connection, name, options).await
    }

    /// Whether its connection is still up.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    async fn start_on(
        connection: Connection,
        name: &str,
        options: ServiceOptions<'_>,
    ) -> Result<FakeService, String> {
        let ServiceOptions { key_pem, prefetch, record } = options;
        let channel = connection.create_channel().await.map_err(|e| format!("channel: {e}"))?;
        // What `configure_mesh` declares out of band (§2.2); idempotent.
        for (exchange, kind) in [
            ("nuropb-rpc-exchange", ExchangeKind::Direct),
            ("nuropb-events-exchange", ExchangeKind::Topic),
            ("nuropb-dl-exchange", ExchangeKind::Fanout),
        ] {
            channel
                .exchange_declare(
                    exchange.into(),
                    kind,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("exchange: {e}"))?;
        }
        let queue = format!("nuropb-{name}-sq");
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("nuropb-dl-exchange")),
        );
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                args,
            )
            .await
            .map_err(|e| format!("service queue: {e}"))?;
        channel
            .queue_bind(
                queue.as_str().into(),
                "nuropb-rpc-exchange".into(),
                name.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("bind: {e}"))?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("qos: {e}"))?;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consume: {e}"))?;
        let key = key_pem.map(|pem| ServicePrivateKey::from_pem(pem).expect("fixture key"));
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            channel,
            key,
            record,
            received: Arc::default(),
            describes: Arc::default(),
            answer_describe: Arc::new(AtomicBool::new(true)),
            undecryptable: Arc::default(),
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let service = FakeService {
            received: Arc::clone(&inner.received),
            describes: Arc::clone(&inner.describes),
            answer_describe: Arc::clone(&inner.answer_describe),
            undecryptable: Arc::clone(&inner.undecryptable),
            stop: stop.clone(),
            tasks: tasks.clone(),
            connection,
        };
        let spawner = tasks.clone();
        tasks.spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = stop.cancelled() => break,
                    d = consumer.next() => d,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let inner = Arc::clone(&inner);
                spawner.spawn(async move { inner.handle(delivery).await });
            }
        });
        Ok(service)
    }

    /// A copy of what it has received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Stops consuming and closes the connection, so that the broker hands the queue's
    /// messages to whoever consumes it next (a restarted service).
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        // Best effort: the test may have cut the connection already.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.connection.close(200, "OK".into()))
                .await;
    }
}

impl Inner {
    async fn handle(&self, delivery: Delivery) {
        let props = delivery.properties.clone();
        let headers = props.headers().clone().unwrap_or_default();
        let encrypted = matches!(headers.inner().get("encrypted"), Some(AMQPValue::LongString(s)) if s.as_bytes() == b"yes");
        let (plaintext, session) = if encrypted {
            let key = self.key.as_ref().expect("encrypted call to a service without a key");
            let Ok((plain, session)) = mesh_crypto::decrypt_request(key, &delivery.data) else {
                self.undecryptable.fetch_add(1, Ordering::SeqCst);
                // Best effort; the test looks at the counter.
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                return;
            };
            (plain, Some(session))
        } else {
            (delivery.data.clone(), None)
        };
        if self.record {
            self.received.lock().expect("lock").push(Received {
                properties: props.clone(),
                body: delivery.data.clone(),
                plaintext: plaintext.clone(),
            });
        }
        // nuropb acks first, then answers (§6.1 step 4).
        // The connection may be cut under us (fault test); then there is nobody to answer.
        if delivery.ack(BasicAckOptions::default()).await.is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&plaintext).expect("request body is JSON");
        let is_request = body["tag"] == "request";
        let method = body["method"].as_str().unwrap_or_default().to_owned();
        let params = body["params"].clone();
        let context = body["context"].clone();
        let reply = |result: Value, error: Value| {
            json!({
                "tag": "response", "result": result, "error": error,
                "correlation_id": props.correlation_id().as_ref().map(|c| c.as_str()),
                "trace_id": body["trace_id"], "context": context, "warning": null,
                "reply_to": props.reply_to().as_ref().map(|c| c.as_str()),
            })
        };
        if !is_request {
            return;
        }
        match method.as_str() {
            "nuropb_describe" => {
                self.describes.fetch_add(1, Ordering::SeqCst);
                if !self.answer_describe.load(Ordering::SeqCst) {
                    return;
                }
                let public_key = self.key.as_ref().map(|k| k.public_key_pem().expect("pem"));
                let result = json!({
                    "service_name": self.name, "service_version": "1.2.3", "description": "fake",
                    "warnings": [], "encrypted_methods": public_key.is_some(), "public_key": public_key,
                    "methods": {
                        "echo": {"description": "echo", "requires_encryption": false, "parameters": {"type": "object", "properties": [], "required": []}},
                        "secret": {"description": "secret", "requires_encryption": true, "parameters": {"type": "object", "properties": [["name", {"type": "str", "description": "", "default": ""}]], "required": ["name"]}},
                    },
                });
                self.respond(&props, reply(result, Value::Null), None).await;
            }
            "echo" | "note" => self.respond(&props, reply(params, Value::Null), None).await,
            "slow" => {
                let ms = params["ms"].as_u64().unwrap_or(100);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.respond(&props, reply(params, Value::Null), None).await;
            }
            "fail" => {
                let error = json!({"error": "NuropbException", "description": format!("Runtime exception calling {}.fail:RuntimeError: boom", self.name)});
                self.respond(&props, reply(Value::Null, error), None).await;
                self.respond(&props, reply(json!("boom"), Value::Null), None).await;
            }
            "never" => {}
            "secret" => {
                let name = params["name"].as_str().unwrap_or_default();
                self.respond(
                    &props,
                    reply(json!(format!("secret for {name}")), Value::Null),
                    session.as_ref(),
                )
                .await;
            }
            "garbage_then_echo" => {
                // Envelopes a requester must drop (§7.5 / §8), then the real answer.
                let mut bad = nuropb_headers("response", Some("x"), false);
                bad.insert("nuropb_protocol".into(), AMQPValue::LongString("9.9.9".into()));
                self.publish_reply(
                    &props,
                    Some(bad),
                    b"{\"tag\": \"response\", \"result\": \"garbage\"}".to_vec(),
                )
                .await;
                self.publish_reply(
                    &props,
                    None,
                    b"{\"tag\": \"response\", \"result\": \"garbage\"}".to_vec(),
                )
                .await;
                self.publish_reply(
                    &props,
                    Some(nuropb_headers("event", Some("x"), false)),
                    b"{}".to_vec(),
                )
                .await;
                self.respond(&props, reply(params, Value::Null), None).await;
            }
            "bad_body" => {
                self.publish_reply(
                    &props,
                    Some(nuropb_headers("response", Some("x"), false)),
                    b"not json".to_vec(),
                )
                .await;
            }
            other => {
                let error = json!({"error": "NuropbHandlingError", "description": format!("Unknown method {other}")});
                self.respond(&props, reply(Value::Null, error), None).await;
            }
        }
    }

    /// Publishes a response (§5.4), encrypted with the request's key when it had one.
    async fn respond(&self, request: &BasicProperties, body: Value, session: Option<&SessionKey>) {
        let json = nuropb_wire::pyjson::to_python_json(&body).expect("encode");
        let trace = body["trace_id"].as_str().map(str::to_owned);
        let (payload, encrypted) = match (session, &self.key) {
            (Some(session), Some(key)) => (
                mesh_crypto::encrypt_response(session, &key.public_key(), &json).expect("encrypt"),
                true,
            ),
            _ => (json, false),
        };
        self.publish_reply(
            request,
            Some(nuropb_headers("response", trace.as_deref(), encrypted)),
            payload,
        )
        .await;
    }

    async fn publish_reply(
        &self,
        request: &BasicProperties,
        headers: Option<FieldTable>,
        payload: Vec<u8>,
    ) {
        let Some(reply_to) = request.reply_to().clone() else { return };
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(headers) = headers {
            props = props.with_headers(headers);
        }
        let props = props
            .with_correlation_id(request.correlation_id().clone().unwrap_or_else(|| "".into()))
            .with_reply_to("".into());
        // Fails only when the connection was cut under us (fault test).
        if let Ok(confirm) = self
            .channel
            .basic_publish("".into(), reply_to, BasicPublishOptions::default(), &payload, props)
            .await
        {
            let _ = confirm.await;
        }
    }
}
