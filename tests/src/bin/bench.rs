//! `cargo xtask bench`: round-trip benchmarks over loopback, printed as one table.
//!
//! Two pairs of rows, each a baseline and the gateway, measured in the same run with the same
//! client code, so the ratios cancel out machine speed:
//! - a bare tokio-tungstenite echo server (the baseline), then the gateway on its in-memory
//!   mesh;
//! - B: direct AMQP RPC to a Rust echo service over RabbitMQ, then G: the gateway on
//!   `AmqpMesh` in front of the same service (see `bench/amqp.rs`).
//!
//! The AMQP pair needs a broker: `cargo xtask bench` makes sure RabbitMQ runs, creates a
//! throw-away vhost and passes its URL in [`AMQP_URL_ENV`]; without it those rows are
//! skipped with a note. Loops are bounded in count and in time (each scenario stops at its
//! deadline).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the benchmark prints its table")]

// A crate root's modules live beside it, not in a directory named after it; `bench/` keeps
// them out of `src/bin/`, where cargo would take each file for a binary of its own.
#[path = "bench/amqp.rs"]
mod amqp;

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
/// The broker URL (with its throw-away vhost) for the AMQP rows; set by `cargo xtask bench`.
const AMQP_URL_ENV: &str = "NUROPB_BENCH_AMQP_URL";

struct Row {
    name: String,
    p50_us: f64,
    p99_us: f64,
    throughput: f64,
    /// Round trips behind the percentiles (fewer than asked when the deadline struck).
    sequential: usize,
    /// Responses behind the throughput, out of `expected`: every text frame for the in-memory
    /// rows, responses without error for the AMQP rows.
    completed: usize,
    expected: usize,
    /// Error responses (and unroutable requests) during the throughput run.
    errors: usize,
}

/// Runs `round_trip` for `0..count` one at a time until the deadline; the latencies in µs,
/// sorted.
async fn sequential(count: usize, mut round_trip: impl AsyncFnMut(usize)) -> Vec<f64> {
    let mut lat = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count {
        if start.elapsed() > DEADLINE {
            break;
        }
        let t = Instant::now();
        round_trip(i).await;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// The `p` quantile (0..=1) of sorted values, nearest rank below.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
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

async fn measure(name: &str, url: &str, skip_hello: bool) -> Row {
    // Latency: one client, one request at a time.
    let mut ws = connect(url, skip_hello).await;
    let lat = sequential(SEQUENTIAL, async |i| {
        ws.send(frame(i)).await.unwrap();
        next_text(&mut ws).await;
    })
    .await;

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
    Row {
        name: name.to_owned(),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        throughput,
        sequential: lat.len(),
        completed: total,
        expected: CLIENTS * PER_CLIENT,
        // Not told apart here: every text frame counts as a response.
        errors: 0,
    }
}

#[tokio::main]
async fn main() {
    let baseline_url = echo_server().await;
    let mut options = Options::default();
    // The benchmark measures the request path, not the abuse limits.
    options.ws.rate_per_second = 1_000_000;
    options.ws.rate_burst = 1_000_000;
    options.max_in_flight = PER_CLIENT;
    // Responses alone must never overflow a session's queue (the binary enforces
    // outbound queue >= in-flight limit too).
    options.ws.outbound_queue = PER_CLIENT + 16;
    let gateway = Gateway::start_with(options).await;

    let baseline = measure("baseline: bare tungstenite echo", &baseline_url, false).await;
    let gw = measure("gateway, in-memory mesh (svc.echo)", &gateway.url, true).await;
    gateway.stop().await;

    let amqp_url = std::env::var(AMQP_URL_ENV).ok().filter(|u| !u.is_empty());
    let amqp_rows = match &amqp_url {
        Some(url) => Some(amqp::run(url).await),
        None => None,
    };

    println!();
    println!(
        "| scenario | p50 latency | p99 latency | throughput | p50 ratio | p99 ratio | throughput ratio | ratios against |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    print_row(&baseline, &baseline, "baseline");
    print_row(&gw, &baseline, "baseline");
    if let Some((direct, through_gateway)) = &amqp_rows {
        print_row(direct, direct, "B");
        print_row(through_gateway, direct, "B");
    }
    println!();
    println!(
        "In-memory rows: {SEQUENTIAL} sequential round trips on one connection; {CLIENTS} clients x {PER_CLIENT} requests, all sent without waiting (the gateway serves them concurrently)."
    );
    if amqp_rows.is_some() {
        println!(
            "B/G rows: {} unrecorded warm-up calls, then {SEQUENTIAL} sequential round trips with one client; {} clients x {} requests with {} outstanding per client, all connected before the clock starts. \
             The echo service is the tests' Rust nuropb look-alike over lapin (manual ack, ack then answer to reply_to with correlation_id and nuropb headers) but with prefetch {} and concurrent answers instead of nuropb's prefetch 1, so it is not the bottleneck. \
             B publishes as the gateway does (confirm mode, mandatory, expiration, confirmation awaited before the response), one connection per client; the gateway uses one connection for all. \
             RabbitMQ, the clients, the gateway and the service share this machine's {} cores.",
            amqp::WARMUP,
            amqp::CLIENTS,
            amqp::PER_CLIENT,
            amqp::WINDOW,
            amqp::SERVICE_PREFETCH,
            std::thread::available_parallelism().map_or(0, usize::from),
        );
    } else {
        println!(
            "B/G rows (AMQP) skipped: {AMQP_URL_ENV} is not set; `cargo xtask bench` starts RabbitMQ and sets it."
        );
    }
    let mut rows = vec![&baseline, &gw];
    rows.extend(amqp_rows.iter().flat_map(|(direct, through_gateway)| [direct, through_gateway]));
    for r in rows {
        if r.completed < r.expected || r.errors > 0 {
            println!(
                "warning: {}: throughput counted {} responses of {} requests, {} errors (clients stop at the {DEADLINE:?} deadline, after 5 s without a frame, or when disconnected)",
                r.name, r.completed, r.expected, r.errors
            );
        }
    }
}

fn print_row(r: &Row, base: &Row, base_name: &str) {
    let sequential = if r.sequential < SEQUENTIAL {
        format!(" (only {} sequential)", r.sequential)
    } else {
        String::new()
    };
    println!(
        "| {}{} | {:.0} µs | {:.0} µs | {:.0} req/s | {:.2}x | {:.2}x | {:.2}x | {} |",
        r.name,
        sequential,
        r.p50_us,
        r.p99_us,
        r.throughput,
        r.p50_us / base.p50_us,
        r.p99_us / base.p99_us,
        r.throughput / base.throughput,
        base_name,
    );
}
