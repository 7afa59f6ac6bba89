//! Fan-out: `connections` sessions on the gateway, each receiving every broadcast event
//! published to `bench.tick` on the events exchange at `rate` events per second. Each
//! event carries the time it was published (µs since the benchmark started, one clock for
//! publisher and clients, both in this process), so a client measures publish-to-client
//! latency.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use nuropb_wire::mesh::{EventBody, MessageType};
use nuropb_wire::pyjson::to_python_json;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::load::{Outcome, Ws};
use nuropb_testkit::broker::nuropb_headers;

const EVENTS_EXCHANGE: &str = "nuropb-events-exchange";
/// After the last event, how long clients wait for stragglers.
const SETTLE: Duration = Duration::from_secs(3);

pub struct FanoutOutcome {
    pub published: u64,
    /// Events received, over all sessions.
    pub deliveries: u64,
    /// The publishing window in seconds.
    pub seconds: f64,
    /// Publish-to-client latencies in µs (sorted) and the count.
    pub latency: Outcome,
}

/// Publishes `rate` events/s for `duration` while `clients` read; `epoch` is the shared
/// clock.
pub async fn run(
    amqp_url: &str,
    clients: Vec<Ws>,
    rate: u32,
    duration: Duration,
    epoch: Instant,
) -> FanoutOutcome {
    let stop_at = Instant::now() + duration + SETTLE;
    let readers: Vec<_> =
        clients.into_iter().map(|ws| tokio::spawn(read_events(ws, epoch, stop_at))).collect();

    let connection =
        Connection::connect(amqp_url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let start = Instant::now();
    let mut published = 0_u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    while start.elapsed() < duration {
        tick.tick().await;
        let sent_us = epoch.elapsed().as_micros() as u64;
        let body = EventBody {
            tag: MessageType::Event,
            topic: "bench.tick".to_owned(),
            event: json!({"seq": published, "sent_us": sent_us}),
            context: Default::default(),
            trace_id: None,
            correlation_id: None,
            target: None,
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(nuropb_headers("event", None, false));
        let body = to_python_json(&body).expect("an event encodes");
        channel
            .basic_publish(
                EVENTS_EXCHANGE.into(),
                "bench.tick".into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        published += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut outcomes = Vec::with_capacity(readers.len());
    for r in readers {
        outcomes.push(r.await.expect("a reader task"));
    }
    let latency = Outcome::merge(outcomes);
    let _ = connection.close(200, "done".into()).await;
    FanoutOutcome { published, deliveries: latency.ok, seconds, latency }
}

/// Reads events until `stop_at`; the latency of each is now − its `sent_us`. Only the
/// number is parsed, not the whole frame: at 500k deliveries/s this process is a client
/// of the gateway, and must stay cheaper than it.
async fn read_events(mut ws: Ws, epoch: Instant, stop_at: Instant) -> Outcome {
    let mut outcome = Outcome::default();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(stop_at, ws.next()).await {
        let Message::Text(text) = frame else { continue };
        let Some(at) = text.find("\"sent_us\":") else { continue };
        let digits: String = text[at + 10..].chars().take_while(char::is_ascii_digit).collect();
        let Ok(sent_us) = digits.parse::<u64>() else { continue };
        let now_us = epoch.elapsed().as_micros() as u64;
        outcome.ok += 1;
        outcome.latencies_us.push(now_us.saturating_sub(sent_us) as f64);
    }
    outcome
}
