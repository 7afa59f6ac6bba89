//! The WebSocket load: `connections` clients, each keeping `in_flight` requests outstanding
//! (a response sends the next request), measured over a fixed window after a warm-up; and
//! the WebSocket floor, a bare tokio-tungstenite echo server answering response-shaped
//! frames.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use e2e_tests::token;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The longest wait for any one frame before a client gives up (the row then says so).
pub const FRAME_WAIT: Duration = Duration::from_secs(5);
/// ~64 bytes of params, as in the measurements.
const TEXT: &str = "hello benchmark, sixty-four bytes of payload";

/// When the clock runs: requests answered inside `[start, end)` count.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn after(warmup: Duration, measure: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window { start, end: start + measure }
    }
    pub fn seconds(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

/// What one run of a load measured.
#[derive(Default)]
pub struct Outcome {
    /// Responses without error that arrived inside the window.
    pub ok: u64,
    /// Error responses, refusals and unanswered requests (a client that timed out counts its
    /// outstanding requests here).
    pub errors: u64,
    /// Latencies (µs) of the requests both sent and answered inside the window, sorted.
    pub latencies_us: Vec<f64>,
}

impl Outcome {
    pub fn merge(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
        let mut all = Outcome::default();
        for o in outcomes {
            all.ok += o.ok;
            all.errors += o.errors;
            all.latencies_us.extend(o.latencies_us);
        }
        all.latencies_us.sort_by(f64::total_cmp);
        all
    }

    /// The `p` quantile (0..=1), nearest rank below; NaN without samples.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us[((self.latencies_us.len() as f64 - 1.0) * p) as usize]
    }

    /// Records the answer to a request sent at `sent`, arriving now.
    pub fn record(&mut self, window: &Window, sent: Instant, ok: bool) {
        let now = Instant::now();
        if now < window.start || now >= window.end {
            return;
        }
        if !ok {
            self.errors += 1;
            return;
        }
        self.ok += 1;
        if sent >= window.start {
            self.latencies_us.push((now - sent).as_secs_f64() * 1e6);
        }
    }
}

/// A small client: the benchmark holds up to 19k of these, so no 128 KiB buffers each.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Connects with the benchmark's token; with `skip_hello`, reads the gateway's hello first.
pub async fn connect(url: &str, skip_hello: bool) -> Ws {
    let mut request = url.into_client_request().expect("a ws:// URL");
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {}", token("bench")).parse().expect("header"));
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(client_config()), true)
            .await
            .expect("the WebSocket connects");
    if skip_hello {
        let hello = tokio::time::timeout(FRAME_WAIT, ws.next()).await;
        assert!(matches!(hello, Ok(Some(Ok(Message::Text(_))))), "no hello: {hello:?}");
    }
    ws
}

/// A request frame for `service.echo` with trace id `n`.
pub fn request(service: &str, n: u64) -> Message {
    let f = json!({"type": "request", "payload": {"service": service, "method": "echo",
        "params": {"i": n, "text": TEXT}, "trace_id": n.to_string()}});
    Message::Text(f.to_string().into())
}

/// The trace id of a response frame and whether it succeeded; `None` for other frames.
fn response(text: &str) -> Option<(u64, bool)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["type"] != "response" && v["type"] != "error" {
        return None;
    }
    let payload = &v["payload"];
    let trace: u64 = payload["trace_id"].as_str()?.parse().ok()?;
    Some((trace, v["type"] == "response" && payload["error"].is_null()))
}

/// Runs the load on already connected clients until the window ends.
pub async fn run(clients: Vec<Ws>, service: &str, in_flight: usize, window: Window) -> Outcome {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(one_client(ws, service.to_owned(), in_flight, window)))
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.expect("a client task"));
    }
    Outcome::merge(outcomes)
}

async fn one_client(mut ws: Ws, service: String, in_flight: usize, window: Window) -> Outcome {
    let mut outcome = Outcome::default();
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(in_flight);
    let mut next = 0_u64;
    for _ in 0..in_flight {
        sent_at.insert(next, Instant::now());
        if ws.send(request(&service, next)).await.is_err() {
            return outcome;
        }
        next += 1;
    }
    while !sent_at.is_empty() {
        let frame = match tokio::time::timeout(FRAME_WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            _ => {
                outcome.errors += sent_at.len() as u64;
                return outcome;
            }
        };
        let Some((trace, ok)) = response(&frame) else { continue };
        let Some(sent) = sent_at.remove(&trace) else { continue };
        outcome.record(&window, sent, ok);
        if Instant::now() < window.end {
            sent_at.insert(next, Instant::now());
            if ws.send(request(&service, next)).await.is_err() {
                outcome.errors += sent_at.len() as u64;
                return outcome;
            }
            next += 1;
        }
    }
    // Polite end; the peer going away first is fine.
    let _ = ws.close(None).await;
    outcome
}

/// Opens `n` clients, `parallel` handshakes at a time.
pub async fn connect_many(url: &str, n: usize, skip_hello: bool, parallel: usize) -> Vec<Ws> {
    let mut clients = Vec::with_capacity(n);
    let mut pending = futures_util::stream::iter(0..n)
        .map(|_| connect(url, skip_hello))
        .buffer_unordered(parallel.max(1));
    while let Some(ws) = pending.next().await {
        clients.push(ws);
    }
    clients
}

/// The WebSocket floor: a bare tokio-tungstenite server answering each request frame with a
/// response-shaped frame (parsed and built with serde_json, as the gateway does).
pub async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/", listener.local_addr().expect("local address"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Same socket option as the gateway, so the comparison is fair.
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m {
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { return };
                        let reply = json!({"type": "response", "payload": {
                            "trace_id": v["payload"]["trace_id"], "result": v["payload"]["params"], "error": null}});
                        if ws.send(Message::Text(reply.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}
