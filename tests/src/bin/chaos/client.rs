//! The chaos suite's load: sessions sending paced requests (a fixed rate each, at most
//! `max_in_flight` outstanding) and keeping a ledger of every request by trace id: when it
//! was sent, when and how it was answered, and any second answer. The ledger is what the
//! scenarios judge: every request must get exactly one answer carrying its trace id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Longest wait for a handshake or the hello frame.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// What each session sends.
#[derive(Clone)]
pub struct LoadSpec {
    pub service: String,
    pub method: String,
    pub params: Value,
    /// Requests per second per session.
    pub rate: u32,
    pub max_in_flight: usize,
}

/// One request in the ledger.
#[derive(Clone, Copy)]
pub struct Entry {
    pub sent: Instant,
    /// When the first answer came, and whether it was a success.
    pub answer: Option<(Instant, bool)>,
    /// Answers after the first (must stay 0).
    pub extra_answers: u32,
}

/// Everything one session saw.
#[derive(Default)]
pub struct SessionLog {
    pub entries: HashMap<String, Entry>,
    /// Top-level error frames (no trace id to match).
    pub untraced_errors: u64,
    /// Answers to trace ids this session never sent.
    pub unknown_answers: u64,
    /// The close code the gateway sent, if it closed the session.
    pub close_code: Option<u16>,
    /// The socket ended (close frame, EOF or error) before the session was done.
    pub ended_early: bool,
}

/// The ledger of a whole load, merged.
#[derive(Default)]
pub struct Ledger {
    pub entries: Vec<Entry>,
    pub untraced_errors: u64,
    pub unknown_answers: u64,
    pub sessions_ended_early: usize,
    pub close_codes: Vec<u16>,
}

/// The figures of a table row, from a ledger.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub offered: usize,
    pub answered: usize,
    pub errored: usize,
    /// Without an answer within the request deadline + margin (late or never).
    pub hung: usize,
    /// Never answered by the end.
    pub lost: usize,
    /// Second answers to one request.
    pub duplicates: u32,
}

impl Ledger {
    pub fn merge(logs: Vec<SessionLog>) -> Ledger {
        let mut l = Ledger::default();
        for log in logs {
            l.entries.extend(log.entries.into_values());
            l.untraced_errors += log.untraced_errors;
            l.unknown_answers += log.unknown_answers;
            l.sessions_ended_early += usize::from(log.ended_early);
            l.close_codes.extend(log.close_code);
        }
        l
    }

    pub fn counts(&self, deadline: Duration) -> Counts {
        let mut c = Counts { offered: self.entries.len(), ..Counts::default() };
        for e in &self.entries {
            c.duplicates += e.extra_answers;
            match e.answer {
                Some((at, ok)) => {
                    if ok {
                        c.answered += 1;
                    } else {
                        c.errored += 1;
                    }
                    if at - e.sent > deadline {
                        c.hung += 1;
                    }
                }
                None => {
                    c.lost += 1;
                    c.hung += 1;
                }
            }
        }
        c
    }

    /// The first success to a request sent at or after `since`, as time after `since`.
    pub fn first_success_after(&self, since: Instant) -> Option<Duration> {
        self.entries
            .iter()
            .filter(|e| e.sent >= since)
            .filter_map(|e| match e.answer {
                Some((at, true)) => Some(at - since),
                _ => None,
            })
            .min()
    }

    /// Successes to requests sent at or after `since`.
    pub fn successes_after(&self, since: Instant) -> usize {
        self.entries
            .iter()
            .filter(|e| e.sent >= since && matches!(e.answer, Some((_, true))))
            .count()
    }

    /// Sorted latencies (ms) of successes.
    pub fn latencies_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .entries
            .iter()
            .filter_map(|e| match e.answer {
                Some((at, true)) => Some((at - e.sent).as_secs_f64() * 1e3),
                _ => None,
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// A client small enough to hold a thousand of.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

/// Connects with a token of `user` and reads the hello frame; `rcvbuf` sets a small
/// receive buffer (a dead reader's kernel buffer then fills fast).
pub async fn connect(url: &str, user: &str, rcvbuf: Option<u32>) -> Result<Ws, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {}", e2e_tests::token(user));
    request.headers_mut().insert("Authorization", bearer.parse().map_err(|_| "header")?);
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .ok_or("a ws://ip:port/ URL")?;
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(bytes) = rcvbuf {
            socket.set_recv_buffer_size(bytes).map_err(|e| e.to_string())?;
        }
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(client_config()))
                .await
                .map_err(|e| e.to_string())?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("hello") => Ok(ws),
            other => Err(format!("no hello: {other:?}")),
        }
    };
    tokio::time::timeout(CONNECT_WAIT, attempt).await.map_err(|_| "connect timed out")?
}

/// Opens `n` sessions, `parallel` handshakes at a time; panics naming the first failure.
pub async fn connect_many(url: &str, n: usize, parallel: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    let mut pending = futures_util::stream::iter(0..n)
        .map(|i| {
            let url = url.to_owned();
            async move { connect(&url, &format!("chaos-{}", i % 50), None).await }
        })
        .buffer_unordered(parallel.max(1));
    while let Some(ws) = pending.next().await {
        out.push(ws.unwrap_or_else(|e| panic!("a session could not connect: {e}")));
    }
    out
}

/// The trace id and outcome of an answer frame, `Err(())` for an untraced error frame,
/// `Ok(None)` for other frames.
fn answer(text: &str) -> Result<Option<(String, bool)>, ()> {
    let Ok(v) = serde_json::from_str::<Value>(text) else { return Ok(None) };
    if v.get("type").is_none() && v.get("error").is_some() {
        return Err(());
    }
    if v["type"] != "response" {
        return Ok(None);
    }
    let payload = &v["payload"];
    let Some(trace) = payload["trace_id"].as_str() else { return Err(()) };
    Ok(Some((trace.to_owned(), payload["error"].is_null())))
}

/// A running load: sessions sending until [`Load::finish`].
pub struct Load {
    sending: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<SessionLog>>,
}

impl Load {
    /// Starts sending on `sessions`; every session answers for itself.
    pub fn start(sessions: Vec<Ws>, spec: &LoadSpec, drain: Duration) -> Load {
        let sending = Arc::new(AtomicBool::new(true));
        let tasks = sessions
            .into_iter()
            .enumerate()
            .map(|(i, ws)| {
                let (spec, sending) = (spec.clone(), Arc::clone(&sending));
                tokio::spawn(session(ws, i, spec, sending, drain))
            })
            .collect();
        Load { sending, tasks }
    }

    /// Stops sending new requests; the sessions keep reading answers.
    pub fn stop_sending(&self) {
        self.sending.store(false, Ordering::SeqCst);
    }

    /// Stops sending, waits (at most `drain` per session) for the answers still due, and
    /// returns the merged ledger.
    pub async fn finish(self) -> Ledger {
        self.sending.store(false, Ordering::SeqCst);
        let mut logs = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            logs.push(t.await.expect("a session task"));
        }
        Ledger::merge(logs)
    }
}

async fn session(
    mut ws: Ws,
    index: usize,
    spec: LoadSpec,
    sending: Arc<AtomicBool>,
    drain: Duration,
) -> SessionLog {
    let mut log = SessionLog::default();
    let mut outstanding = 0_usize;
    let mut n = 0_u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / spec.rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set when sending stops: from then on only answers are awaited, until this deadline.
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_none() && !sending.load(Ordering::SeqCst) {
            drain_until = Some(Instant::now() + drain);
        }
        if let Some(until) = drain_until
            && (outstanding == 0 || Instant::now() >= until)
        {
            break;
        }
        let wake = drain_until.unwrap_or_else(|| Instant::now() + Duration::from_millis(100));
        // Cancellation: a tick or a read that loses the race is simply taken next round;
        // tungstenite's `next` keeps partial frames in its buffer.
        tokio::select! {
            _ = tick.tick(), if drain_until.is_none() => {
                if outstanding >= spec.max_in_flight {
                    continue;
                }
                let trace = format!("s{index}-{n}");
                n += 1;
                let frame = json!({"type": "request", "payload": {"service": spec.service,
                    "method": spec.method, "params": spec.params, "trace_id": trace}});
                log.entries.insert(
                    trace,
                    Entry { sent: Instant::now(), answer: None, extra_answers: 0 },
                );
                outstanding += 1;
                if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                    log.ended_early = true;
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => match answer(&text) {
                    Ok(Some((trace, ok))) => match log.entries.get_mut(&trace) {
                        Some(e) if e.answer.is_none() => {
                            e.answer = Some((Instant::now(), ok));
                            outstanding -= 1;
                        }
                        Some(e) => e.extra_answers += 1,
                        None => log.unknown_answers += 1,
                    },
                    Ok(None) => {}
                    Err(()) => log.untraced_errors += 1,
                },
                Some(Ok(Message::Close(frame))) => {
                    log.close_code = frame.map(|f| u16::from(f.code));
                    log.ended_early = true;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    log.ended_early = true;
                    break;
                }
            },
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    // Polite end; the gateway being gone already is fine.
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    log
}
