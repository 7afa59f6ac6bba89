//! `cargo xtask bench`: WebSocket round-trip benchmarks over loopback, printed as a table.
//! The baseline is a bare tokio-tungstenite echo server driven by the same client code in the
//! same run; the gateway rows are ratios against it, so machine speed cancels out.
//!
//! Loops are bounded in count and in time (each scenario stops at its deadline).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the benchmark prints its table")]

use std::time::{Duration, Instant};

use e2e_tests::{Gateway, Options, token};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SEQUENTIAL: usize = 2_000;
const CLIENTS: usize = 16;
const PER_CLIENT: usize = 1_000;
const DEADLINE: Duration = Duration::from_secs(30);

struct Row {
    name: &'static str,
    p50_us: f64,
    p99_us: f64,
    throughput: f64,
}

async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // Same socket options as the gateway, so the comparison is fair.
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                // Answers with a response-shaped frame so both sides parse similar JSON.
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Text(t) = m {
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str, skip_hello: bool) -> Ws {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {}", token("bench")).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    if skip_hello {
        ws.next().await.unwrap().unwrap();
    }
    ws
}

fn frame(i: usize) -> Message {
    let f = json!({"type": "request", "payload": {"service": "svc", "method": "echo",
        "params": {"i": i, "text": "hello benchmark"}, "trace_id": format!("t{i}")}});
    Message::Text(f.to_string().into())
}

async fn next_text(ws: &mut Ws) {
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(_) => return,
            _ => continue,
        }
    }
}

async fn measure(name: &'static str, url: &str, skip_hello: bool) -> Row {
    // Latency: one client, one request at a time.
    let mut ws = connect(url, skip_hello).await;
    let mut lat = Vec::with_capacity(SEQUENTIAL);
    let start = Instant::now();
    for i in 0..SEQUENTIAL {
        if start.elapsed() > DEADLINE {
            break;
        }
        let t = Instant::now();
        ws.send(frame(i)).await.unwrap();
        next_text(&mut ws).await;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];

    // Throughput: many clients, each sending all its requests without waiting.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let ws = connect(&url, skip_hello).await;
            let (mut tx, mut rx) = ws.split();
            let sender = tokio::spawn(async move {
                for i in 0..PER_CLIENT {
                    if tx.send(frame(i)).await.is_err() {
                        break;
                    }
                }
                tx
            });
            let mut got = 0;
            let began = Instant::now();
            while got < PER_CLIENT && began.elapsed() < DEADLINE {
                match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                    Ok(Some(Ok(Message::Text(_)))) => got += 1,
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            drop(sender.await);
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let throughput = total as f64 / start.elapsed().as_secs_f64();
    Row { name, p50_us: pct(0.5), p99_us: pct(0.99), throughput }
}

#[tokio::main]
async fn main() {
    let baseline_url = echo_server().await;
    let mut options = Options::default();
    // The benchmark measures the request path, not the abuse limits.
    options.ws.rate_per_second = 1_000_000;
    options.ws.rate_burst = 1_000_000;
    options.max_in_flight = PER_CLIENT;
    let gateway = Gateway::start_with(options).await;

    let baseline = measure("baseline: bare tungstenite echo", &baseline_url, false).await;
    let gw = measure("gateway, in-memory mesh (svc.echo)", &gateway.url, true).await;

    println!();
    println!(
        "| scenario | p50 latency | p99 latency | throughput | latency ratio (p50) | throughput ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for r in [&baseline, &gw] {
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} req/s | {:.2}x | {:.2}x |",
            r.name,
            r.p50_us,
            r.p99_us,
            r.throughput,
            r.p50_us / baseline.p50_us,
            r.throughput / baseline.throughput
        );
    }
    println!();
    println!(
        "{SEQUENTIAL} sequential round trips on one connection; {CLIENTS} clients x {PER_CLIENT} requests, all sent without waiting (the gateway serves them concurrently)."
    );
    gateway.stop().await;
}
