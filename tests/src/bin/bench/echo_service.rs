//! The benchmark's echo service: a minimal NuroPb service written directly against lapin.
//! On the wire it behaves like a nuropb 0.1.8 service (spec §2.3, §5.4, §6.1): it declares
//! the mesh exchanges and its durable `nuropb-<name>-sq` (dead-lettered, bound to the rpc
//! exchange under its name), consumes it with manual acks, acks each request before
//! answering, and publishes the response to `reply_to` on the default exchange with the
//! request's `correlation_id` and the five nuropb headers.
//!
//! Methods: `echo` (the params back as the result) and `nuropb_describe` (no encrypted
//! methods, so the gateway's describe lookup caches "plaintext"). Anything else gets
//! nuropb's unknown-method error; commands are acked and not answered.
//!
//! Unlike nuropb (prefetch 1, one message at a time) it takes [`PREFETCH`] deliveries and
//! answers them concurrently, so that the service is not what the benchmark measures.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use nuropb_wire::ErrorObject;
use nuropb_wire::mesh::{
    DESCRIBE_METHOD, LIBRARY_VERSION, MessageType, PROTOCOL_VERSION, RequestBody, ResponseBody,
    header,
};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Unacknowledged deliveries the broker may push, and requests answered at once. Above
/// everything the benchmark keeps in flight, so requests never wait in the service queue.
pub const PREFETCH: u16 = 2048;

pub const RPC_EXCHANGE: &str = "nuropb-rpc-exchange";

/// A running echo service; [`EchoService::stop`] ends it.
pub struct EchoService {
    stop: CancellationToken,
    task: JoinHandle<()>,
    _connection: Connection,
}

impl EchoService {
    /// Declares the topology and starts consuming `nuropb-<name>-sq`.
    pub async fn start(url: &str, name: &str) -> EchoService {
        let connection =
            Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        // What nuropb's `configure_mesh` declares (§2.2); idempotent.
        for (exchange, kind) in [
            (RPC_EXCHANGE, ExchangeKind::Direct),
            ("nuropb-events-exchange", ExchangeKind::Topic),
            ("nuropb-dl-exchange", ExchangeKind::Fanout),
        ] {
            let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
            channel
                .exchange_declare(exchange.into(), kind, durable, FieldTable::default())
                .await
                .expect("declare exchange");
        }
        let queue = format!("nuropb-{name}-sq");
        let mut dead_letter = FieldTable::default();
        dead_letter.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("nuropb-dl-exchange")),
        );
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(queue.as_str().into(), durable, dead_letter).await.expect("queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                RPC_EXCHANGE.into(),
                name.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");

        let stop = CancellationToken::new();
        let service_name = name.to_owned();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                // One task answers everything; at most PREFETCH answers are in progress.
                let mut answering = FuturesUnordered::new();
                loop {
                    // Cancellation safety: a delivery not yet taken from lapin's buffer
                    // stays there; answers in progress are dropped only on stop.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        Some(()) = answering.next(), if !answering.is_empty() => {}
                        delivery = consumer.next(), if answering.len() < usize::from(PREFETCH) => {
                            let Some(Ok(delivery)) = delivery else { break };
                            answering.push(answer(&channel, &service_name, delivery));
                        }
                    }
                }
            }
        });
        EchoService { stop, task, _connection: connection }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        // The task only ends by itself when the connection is gone: nothing to report.
        let _ = self.task.await;
    }
}

/// Handles one delivery the way nuropb does: ack first, then answer (§6.1 step 4).
async fn answer(channel: &Channel, service_name: &str, delivery: Delivery) {
    if delivery.ack(BasicAckOptions::default()).await.is_err() {
        return; // The channel is gone; nobody to answer.
    }
    let request: RequestBody = match from_python_json(&delivery.data) {
        Ok(request) => request,
        Err(e) => {
            // Only the benchmark's own clients publish here, so this is a bug worth seeing.
            eprintln!("echo service: undecodable request: {e}");
            return;
        }
    };
    let props = &delivery.properties;
    let Some(reply_to) = props.reply_to().clone().filter(|r| !r.as_str().is_empty()) else {
        return;
    };
    if request.tag != MessageType::Request {
        return; // Commands are never answered.
    }
    let (result, error) = match request.method.as_str() {
        "echo" => (Value::Object(request.params), None),
        DESCRIBE_METHOD => (describe(service_name), None),
        other => (
            Value::Null,
            Some(ErrorObject::new("NuropbHandlingError", format!("Unknown method {other}"))),
        ),
    };
    let response = ResponseBody {
        tag: MessageType::Response,
        result,
        error,
        correlation_id: props.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
        trace_id: request.trace_id,
        context: request.context,
        warning: None,
        reply_to: Some(reply_to.as_str().to_owned()),
    };
    let body = to_python_json(&response).expect("a response encodes");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(nuropb_headers(MessageType::Response, response.trace_id.as_deref()))
        .with_correlation_id(props.correlation_id().clone().unwrap_or_else(|| "".into()))
        .with_reply_to("".into());
    // Fails only when the connection is gone (the benchmark is ending); the channel is not in
    // confirm mode, so the returned future resolves at once.
    if let Ok(confirm) = channel
        .basic_publish("".into(), reply_to, BasicPublishOptions::default(), &body, props)
        .await
    {
        let _ = confirm.await;
    }
}

/// A `nuropb_describe` result without public key or encrypted methods.
fn describe(service_name: &str) -> Value {
    json!({
        "service_name": service_name, "service_version": "0.0.0", "description": "benchmark echo",
        "warnings": [], "encrypted_methods": false, "public_key": null,
        "methods": {"echo": {"description": "returns its params", "requires_encryption": false,
            "parameters": {"type": "object", "properties": [], "required": []}}},
    })
}

/// The five nuropb headers as pika writes them (all long strings; no trace id is void).
pub fn nuropb_headers(message_type: MessageType, trace_id: Option<&str>) -> FieldTable {
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut t = FieldTable::default();
    t.insert(header::PROTOCOL.into(), long(PROTOCOL_VERSION));
    t.insert(header::VERSION.into(), long(LIBRARY_VERSION));
    t.insert(header::TYPE.into(), long(message_type.as_str()));
    t.insert(header::TRACE_ID.into(), trace_id.map_or(AMQPValue::Void, long));
    t.insert(header::ENCRYPTED.into(), long(""));
    t
}
