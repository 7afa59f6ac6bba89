//! The bystander: one well-behaved session from 127.0.0.1 that makes an echo call every
//! [`PERIOD`] for the whole suite and records when each was sent and how long its answer
//! took. A row reads the calls sent during its window.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use e2e_tests::Client;

pub const PERIOD: Duration = Duration::from_millis(50);
/// One call's answer may take this long before it counts as lost.
const ANSWER_WAIT: Duration = Duration::from_secs(3);
/// The loop's bound in count: far more than the suite's two minutes need.
const MAX_CALLS: u64 = 10_000;

/// One call: when it was sent and its latency (`None`: no or a wrong answer).
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub sent: Instant,
    pub latency: Option<Duration>,
}

#[derive(Clone, Default)]
pub struct Record(Arc<Mutex<Vec<Call>>>);

impl Record {
    /// The calls sent in `[from, to]`.
    pub fn between(&self, from: Instant, to: Instant) -> Vec<Call> {
        let calls = self.0.lock().expect("lock");
        calls.iter().filter(|c| c.sent >= from && c.sent <= to).copied().collect()
    }

    /// Whether a call sent after `t` has been answered.
    pub fn answered_after(&self, t: Instant) -> bool {
        self.0.lock().expect("lock").iter().any(|c| c.sent > t && c.latency.is_some())
    }
}

/// Calls `service.echo` every [`PERIOD`] until `stop`; each answer must carry the call's
/// trace id and its params.
pub async fn run(mut client: Client, service: String, record: Record, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..MAX_CALLS {
        tokio::select! {
            // Cancel-safe: `tick` loses nothing, and the call below runs outside the select.
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let trace = format!("by-{n}");
        let sent = Instant::now();
        client.request(&service, "echo", json!({"n": n}), &trace).await;
        let answer = tokio::time::timeout(ANSWER_WAIT, client.ws_next_json()).await;
        let latency = match answer {
            Ok(Some(v))
                if v["payload"]["trace_id"] == trace.as_str()
                    && v["payload"]["result"] == json!({"n": n}) =>
            {
                Some(sent.elapsed())
            }
            _ => None,
        };
        record.0.lock().expect("lock").push(Call { sent, latency });
        if latency.is_none() {
            // A lost session stays lost: record the failure and stop calling.
            return;
        }
    }
}

/// The next text frame as JSON without panicking (`None`: closed, or not JSON).
trait NextJson {
    async fn ws_next_json(&mut self) -> Option<serde_json::Value>;
}

impl NextJson for Client {
    async fn ws_next_json(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        // Bounded by the caller's timeout; pings and pongs skipped.
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                _ => return None,
            }
        }
    }
}
