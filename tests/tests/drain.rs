//! The lame-duck drain of the real binary, seen by real WebSocket clients over loopback:
//! on SIGTERM, 200 sessions with slow requests in flight each get exactly one answer per
//! request, new upgrades and `/healthz` get 503 meanwhile, the sessions are closed with
//! 1001 spread over the window, and the process exits 0 by the drain deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use e2e_tests::process::{GatewayProcess, Mesh};
use e2e_tests::{Client, raw, token};

const SESSIONS: usize = 200;
const GRACE: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_secs(6);
const DRAIN: Duration = Duration::from_secs(10);
/// The slow request each session has in flight at SIGTERM (shorter than the grace).
const SLOW_SECS: f64 = 1.5;

/// What one session saw.
#[derive(Debug, Default)]
struct Seen {
    /// Answers per trace id.
    answers: HashMap<String, usize>,
    /// Errors among them, by trace id.
    errors: HashMap<String, String>,
    /// The close code and when it came.
    close: Option<(u16, Instant)>,
}

/// Runs one session: a slow request just before SIGTERM, another just after it (refused,
/// but answered), then reads until the close.
async fn session(mut client: Client, i: usize, term_at: Instant) -> Seen {
    let mut seen = Seen::default();
    tokio::time::sleep_until(term_at - Duration::from_millis(400)).await;
    client.request("demo", "sleep", json!({"seconds": SLOW_SECS}), &format!("slow-{i}")).await;
    let late = tokio::time::sleep_until(term_at + Duration::from_millis(500));
    tokio::pin!(late);
    let mut sent_late = false;
    let give_up = term_at + DRAIN + Duration::from_secs(10);
    loop {
        let next = tokio::select! {
            // Both cancel-safe: a sleep, and `next` loses no frame when not chosen.
            () = &mut late, if !sent_late => {
                sent_late = true;
                client.request("demo", "echo", json!({"late": i}), &format!("late-{i}")).await;
                continue;
            }
            next = tokio::time::timeout_at(give_up, client.ws.next()) => next,
        };
        match next {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "response" {
                    let trace = v["payload"]["trace_id"].as_str().unwrap_or_default().to_owned();
                    if !v["payload"]["error"].is_null() {
                        seen.errors.insert(trace.clone(), v["payload"]["error"].to_string());
                    }
                    *seen.answers.entry(trace).or_default() += 1;
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                seen.close = Some((frame.map_or(1005, |f| u16::from(f.code)), Instant::now()));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
        }
    }
    seen
}

/// `GET path` on `addr`: the status of the answer.
async fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    raw::status(&raw::read_head(&mut stream).await)
}

/// A raw upgrade with a valid token: the response head.
async fn upgrade_head(addr: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect during the drain");
    let auth = format!("Authorization: Bearer {}\r\n", token("late-comer"));
    stream.write_all(raw::upgrade(&auth).as_bytes()).await.unwrap();
    raw::read_head(&mut stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_a_lame_duck_window_without_a_reconnect_storm() {
    let args: Vec<String> = [
        "--drain-timeout-secs",
        "10",
        "--lame-duck-secs",
        "6",
        "--lame-duck-grace-secs",
        "2",
        "--ops-listen",
        "127.0.0.1:0",
        "--demo-tick-secs",
        "0",
        "--log",
        "warn",
        "--max-sessions-per-user",
        "1000",
        "--max-connections-per-ip",
        "1000",
        "--connect-rate-per-ip",
        "100000",
        "--connect-burst-per-ip",
        "100000",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let gw = GatewayProcess::start_with(Mesh::InMemory, &args);
    let (addr, ops) = (gw.addr.clone(), gw.ops_addr.clone().expect("ops endpoint"));
    let mut clients = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let bearer = format!("Bearer {}", token(&format!("user-{i}")));
        let mut client = Client::connect(&gw.url, &[("Authorization", &bearer)]).await.unwrap();
        assert_eq!(client.recv_json().await["payload"]["topic"], "hello");
        clients.push(client);
    }
    assert_eq!(http_status(&ops, "/readyz").await, Some(200));
    assert_eq!(http_status(&addr, "/healthz").await, Some(200));

    let term_at = Instant::now() + Duration::from_secs(1);
    let sessions: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(session(c, i, term_at)))
        .collect();
    tokio::time::sleep_until(term_at).await;
    let exit = tokio::task::spawn_blocking(move || {
        let status = gw.terminate(DRAIN + Duration::from_secs(10));
        (status, Instant::now())
    });

    // In the grace and in the window: not ready, /healthz 503, upgrades 503 (not refused).
    tokio::time::sleep_until(term_at + Duration::from_millis(300)).await;
    assert_eq!(http_status(&ops, "/readyz").await, Some(503), "readiness at once");
    for at in [Duration::from_millis(700), GRACE + WINDOW / 2] {
        tokio::time::sleep_until(term_at + at).await;
        let head = upgrade_head(&addr).await;
        assert_eq!(raw::status(&head), Some(503), "an upgrade {at:?} after SIGTERM: {head}");
        assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
        assert_eq!(http_status(&addr, "/healthz").await, Some(503), "/healthz {at:?} in");
    }

    let mut seen = Vec::with_capacity(SESSIONS);
    for s in sessions {
        seen.push(s.await.unwrap());
    }
    let (status, exited_at) = exit.await.unwrap();
    let status = status.expect("the gateway exited before it had to be killed");
    assert!(status.success(), "exit status {status}");
    let took = exited_at - term_at;
    assert!(took <= DRAIN + Duration::from_secs(4), "exit {took:?} after SIGTERM");

    // Every request got exactly one answer: the slow one its response, the late one an
    // error (no new calls once the drain began).
    for (i, s) in seen.iter().enumerate() {
        let (slow, late) = (format!("slow-{i}"), format!("late-{i}"));
        assert_eq!(s.answers.get(&slow), Some(&1), "session {i}: {s:?}");
        assert_eq!(s.answers.get(&late), Some(&1), "session {i}: {s:?}");
        assert_eq!(s.answers.len(), 2, "session {i}: {s:?}");
        assert!(!s.errors.contains_key(&slow), "session {i}: {s:?}");
        assert!(s.errors[&late].contains("shutting down"), "session {i}: {s:?}");
    }
    // Every session closed with 1001, spread over the window after the grace.
    let mut closes: Vec<Duration> = seen
        .iter()
        .map(|s| {
            let (code, at) = s.close.expect("every session gets a close frame");
            assert_eq!(code, 1001);
            at - term_at
        })
        .collect();
    closes.sort();
    let (first, last) = (closes[0], closes[SESSIONS - 1]);
    assert!(first >= GRACE - Duration::from_millis(100), "first close {first:?}: in the grace");
    assert!(last - first >= WINDOW.mul_f64(0.7), "closes from {first:?} to {last:?}");
    assert!(last <= GRACE + WINDOW + Duration::from_secs(1), "last close {last:?}");
    let slice = WINDOW / 10;
    for k in 0..10 {
        let from = GRACE + slice * k;
        let n = closes.iter().filter(|&&c| c >= from && c < from + slice).count();
        assert!(n <= SESSIONS / 5, "{n} of {SESSIONS} closes within {from:?} + {slice:?}");
    }
}
