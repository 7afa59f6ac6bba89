//! The ceiling: a plain lapin client that multiplexes many logical callers over ONE AMQP
//! connection and channel to the same echo service, with its own exclusive reply queue
//! (consumed without acks) and no publisher confirms: the cheapest way to do nuropb RPC
//! from one process, and what the gateway's figures are ratios to.
//!
//! Each request is what the gateway publishes: a nuropb request body (Python JSON) with a
//! context of the same shape (user id, bearer token, trace id), the five nuropb headers,
//! `reply_to`, `correlation_id`, an expiration, and `mandatory`.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use nuropb_wire::JsonObject;
use nuropb_wire::mesh::{MessageType, RequestBody, ResponseBody};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::load::{FRAME_WAIT, Outcome, Window};
use e2e_tests::token;
use nuropb_testkit::broker::nuropb_headers;

const RPC_EXCHANGE: &str = "nuropb-rpc-exchange";
/// The AMQP expiration of every request (the gateway's request timeout in the same run).
const EXPIRATION: Duration = Duration::from_secs(10);

/// Waiting callers by correlation id; the reply consumer settles them.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<bool>>>>;

pub struct Ceiling {
    _connection: Connection,
    channel: Channel,
    reply_queue: ShortString,
    pending: Pending,
    authorization: String,
    service: String,
}

impl Ceiling {
    pub async fn connect(url: &str, service: &str) -> Arc<Ceiling> {
        let connection =
            Connection::connect(url, ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let exclusive =
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue =
            channel.queue_declare("".into(), exclusive, FieldTable::default()).await.expect("rq");
        let reply_queue = queue.name().clone();
        let no_ack = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
        let mut replies = channel
            .basic_consume(reply_queue.clone(), "".into(), no_ack, FieldTable::default())
            .await
            .expect("consume replies");
        let pending: Pending = Arc::default();
        tokio::spawn({
            let pending = pending.clone();
            async move {
                while let Some(Ok(delivery)) = replies.next().await {
                    let Some(id) = delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .and_then(|c| c.as_str().parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let waiter = pending.lock().expect("pending lock").remove(&id);
                    if let Some(waiter) = waiter {
                        let ok = from_python_json::<ResponseBody>(&delivery.data)
                            .is_ok_and(|r| r.error.is_none());
                        // The caller may have given up; nothing to tell then.
                        let _ = waiter.send(ok);
                    }
                }
            }
        });
        let authorization = format!("Bearer {}", token("bench"));
        Arc::new(Ceiling {
            _connection: connection,
            channel,
            reply_queue,
            pending,
            authorization,
            service: service.to_owned(),
        })
    }

    /// One call: publish, then wait for its response. `false` on an error response or none.
    async fn call(&self, id: u64) -> bool {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let trace_id = id.to_string();
        let params = JsonObject::from_iter([
            ("i".to_owned(), json!(id)),
            ("text".to_owned(), json!("hello benchmark, sixty-four bytes of payload")),
        ]);
        let context = JsonObject::from_iter([
            ("user_id".to_owned(), json!("bench")),
            ("Authorization".to_owned(), json!(self.authorization)),
            ("trace_id".to_owned(), json!(trace_id)),
        ]);
        let body = RequestBody {
            tag: MessageType::Request,
            service: self.service.clone(),
            method: "echo".to_owned(),
            params,
            correlation_id: trace_id.clone(),
            context,
            trace_id: Some(trace_id.clone()),
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(nuropb_headers("request", Some(&trace_id), false))
            .with_correlation_id(trace_id.as_str().into())
            .with_reply_to(self.reply_queue.clone())
            .with_expiration(EXPIRATION.as_millis().to_string().as_str().into());
        let body = to_python_json(&body).expect("a request encodes");
        let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
        let publish = self.channel.basic_publish(
            RPC_EXCHANGE.into(),
            self.service.as_str().into(),
            mandatory,
            &body,
            props,
        );
        // Not waited for until written, as the gateway's direct path does not: lapin queues
        // all frames at the first poll, and waiting would cost a wake-up from its I/O
        // thread per call.
        let mut publish = std::pin::pin!(publish);
        let first = publish.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        if matches!(first, Poll::Ready(Err(_))) {
            self.pending.lock().expect("pending lock").remove(&id);
            return false;
        }
        match tokio::time::timeout(FRAME_WAIT, rx).await {
            Ok(Ok(ok)) => ok,
            _ => {
                self.pending.lock().expect("pending lock").remove(&id);
                false
            }
        }
    }
}

/// `callers` logical callers, each one call at a time, until the window ends.
pub async fn run(ceiling: &Arc<Ceiling>, callers: usize, window: Window) -> Outcome {
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let ceiling = ceiling.clone();
            tokio::spawn(async move {
                let mut outcome = Outcome::default();
                while Instant::now() < window.end {
                    let sent = Instant::now();
                    let ok = ceiling.call(next_id()).await;
                    outcome.record(&window, sent, ok);
                }
                outcome
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.expect("a caller task"));
    }
    Outcome::merge(outcomes)
}

/// Correlation ids unique across callers and runs, so a late reply from an earlier run
/// never settles a call of this one.
fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
