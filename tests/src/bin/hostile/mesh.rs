//! What reached the mesh: a consumer-less spy queue bound to the RPC exchange under the
//! echo service's name gets a copy of every request and command the gateway publishes
//! there. After each row it is drained; every body must be a well-formed nuropb request
//! (the strict [`RequestBody`], with the context the gateway builds), and the ones that
//! are not the bystander's are counted for the row. The gateway publishes requests with
//! an expiration (its request timeout), so the spy queue is drained continuously, every
//! [`DRAIN_EVERY`], not only at the end of a row (a 10 s row would lose messages).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::{Channel, Connection};
use nuropb_wire::mesh::{MessageType, RequestBody};
use tokio_util::sync::CancellationToken;

/// The bystander's trace ids start with this.
const BYSTANDER_PREFIX: &str = "by-";
/// At most this many messages are read per drain (a bound, far above a row's traffic).
const MAX_DRAIN: usize = 20_000;
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// The spy queue, drained by a task of its own into `arrived` until `stop`.
pub struct Spy {
    _connection: Connection,
    arrived: Arc<Mutex<Arrived>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

struct Queue {
    channel: Channel,
    name: String,
}

/// What one drain found.
#[derive(Debug, Default)]
pub struct Arrived {
    pub bystander: usize,
    /// Trace ids of the well-formed requests that were not the bystander's.
    pub others: Vec<String>,
    /// Why each malformed body is malformed.
    pub malformed: Vec<String>,
}

impl Spy {
    pub async fn bind(url: &str, services: &[&str]) -> Spy {
        let connection = nuropb_testkit::broker::connect(url).await;
        let channel = connection.create_channel().await.expect("channel");
        let bindings: Vec<(&str, &str)> =
            services.iter().map(|s| ("nuropb-rpc-exchange", *s)).collect();
        let name = nuropb_testkit::broker::silent_spy(&channel, &bindings).await;
        let queue = Queue { channel, name };
        let arrived = Arc::new(Mutex::new(Arrived::default()));
        let stop = CancellationToken::new();
        let task = {
            let (arrived, stop) = (Arc::clone(&arrived), stop.clone());
            tokio::spawn(async move {
                loop {
                    queue.drain_into(&arrived).await;
                    tokio::select! {
                        // Cancel-safe: a sleep and a cancellation lose nothing.
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(DRAIN_EVERY) => {}
                    }
                }
            })
        };
        Spy { _connection: connection, arrived, stop, task }
    }

    /// What arrived since the last call. Waits two drain periods first, so that what was
    /// published before the call is in.
    pub async fn take(&self) -> Arrived {
        tokio::time::sleep(2 * DRAIN_EVERY + Duration::from_millis(50)).await;
        std::mem::take(&mut *self.arrived.lock().expect("lock"))
    }

    pub async fn stop(self) {
        self.stop.cancel();
        // The task ends at its next select; its result says nothing more.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

impl Queue {
    /// Moves everything waiting in the spy queue into `arrived`.
    async fn drain_into(&self, arrived: &Mutex<Arrived>) {
        for _ in 0..MAX_DRAIN {
            let got = self
                .channel
                .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            let Some(message) = got else { break };
            let checked = check(&message.delivery.data);
            let mut arrived = arrived.lock().expect("lock");
            match checked {
                Ok(trace) if trace.starts_with(BYSTANDER_PREFIX) => arrived.bystander += 1,
                Ok(trace) => arrived.others.push(trace),
                Err(why) => arrived.malformed.push(why),
            }
        }
    }
}

/// The trace id of a well-formed request body, or why it is not one.
fn check(body: &[u8]) -> Result<String, String> {
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    let request: RequestBody =
        serde_json::from_slice(body).map_err(|e| format!("{e}: {}", snippet()))?;
    if !matches!(request.tag, MessageType::Request | MessageType::Command) {
        return Err(format!("tag {:?}: {}", request.tag, snippet()));
    }
    let name_ok = |s: &str| !s.is_empty() && s.len() <= 255 && !s.chars().any(char::is_control);
    if !name_ok(&request.service) || !name_ok(&request.method) {
        return Err(format!("bad service or method: {}", snippet()));
    }
    if request.correlation_id.is_empty() {
        return Err(format!("no correlation id: {}", snippet()));
    }
    let trace = request.trace_id.clone().unwrap_or_default();
    let context_ok = request.context.get("user_id").is_some_and(|u| u.is_string())
        && request
            .context
            .get("Authorization")
            .and_then(|a| a.as_str())
            .is_some_and(|a| a.starts_with("Bearer "))
        && request.context.get("trace_id").and_then(|t| t.as_str()) == Some(trace.as_str());
    if trace.is_empty() || !context_ok {
        return Err(format!("context or trace id not the gateway's: {}", snippet()));
    }
    Ok(trace)
}
