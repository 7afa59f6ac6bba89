//! `cargo xtask bench`: what the gateway costs, as ratios to the strongest baselines run in
//! the same invocation, printed as tables and written as JSON (docs/BENCHMARKS.md).
//!
//! - Requests: connections × requests in flight (1 × 1, 10 × 8, 100 × 8, 1000 × 1) through
//!   the real `nuropb-gateway` binary on RabbitMQ to a Rust echo service, against the
//!   ceiling: one lapin connection multiplexing as many logical callers to the same service
//!   (`bench/ceiling.rs`). CPU per request of the gateway, the broker, the echo service (a
//!   process of its own, `bench/echo.rs`) and this process (the load: the WebSocket clients,
//!   or the ceiling's callers and its connection) from `/proc`. The WebSocket floor (a bare
//!   tokio-tungstenite echo) and the gateway on its in-memory mesh at 100 × 8, as a pair.
//! - Idle connections (1k, 10k, 19k): the gateway's RSS per connection and a probe's
//!   latency while they are held.
//! - Fan-out: 1k and 10k sessions receiving every broadcast event, deliveries per second,
//!   publish-to-client latency and gateway CPU per delivery.
//!
//! `cargo xtask bench` builds the binaries (release), makes sure RabbitMQ runs, and passes a
//! throw-away vhost's URL in [`AMQP_URL_ENV`]. Loops are bounded in count and in time.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the benchmark prints its tables")]

// A crate root's modules live beside it, not in a directory named after it; `bench/` keeps
// them out of `src/bin/`, where cargo would take each file for a binary of its own.
#[path = "bench/ceiling.rs"]
mod ceiling;
#[path = "bench/echo.rs"]
mod echo;
#[path = "bench/fanout.rs"]
mod fanout;
#[path = "bench/idle.rs"]
mod idle;
#[path = "bench/load.rs"]
mod load;

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use e2e_tests::process::{GatewayProcess, Mesh};
use e2e_tests::sys;
use load::{Outcome, Window};

/// The broker URL (with its throw-away vhost); set by `cargo xtask bench`.
const AMQP_URL_ENV: &str = "NUROPB_BENCH_AMQP_URL";
/// Where the JSON results go (default `target/bench/results.json`).
const JSON_ENV: &str = "NUROPB_BENCH_JSON";
/// `1`: shorter windows and fewer connections, to check the benchmark itself runs.
const QUICK_ENV: &str = "NUROPB_BENCH_QUICK";
/// A comma list of the parts to run, among `requests`, `floor`, `idle`, `fanout` (default:
/// all), e.g. to profile one part with `perf record -p` on the gateway it starts.
const ONLY_ENV: &str = "NUROPB_BENCH_ONLY";
/// A comma list of the request scenarios to run, as `CxW` (e.g. `100x8`; default: all four).
const SCENARIOS_ENV: &str = "NUROPB_BENCH_SCENARIOS";
/// A comma list of the fan-out levels as `SESSIONS@RATE` (default `1000@50,10000@50,10000@20`).
const FANOUT_ENV: &str = "NUROPB_BENCH_FANOUT";
/// How many times a request scenario alternates ceiling and gateway (default 3, quick 1).
const ROUNDS_ENV: &str = "NUROPB_BENCH_ROUNDS";
/// The measured window in seconds (default 5, or 1 when quick), e.g. longer for a profile.
const SECS_ENV: &str = "NUROPB_BENCH_SECS";
const SERVICE: &str = "bench-echo";
const SCENARIOS: [(usize, usize); 4] = [(1, 1), (10, 8), (100, 8), (1000, 1)];
const PARTS: [&str; 4] = ["requests", "floor", "idle", "fanout"];

struct Settings {
    parts: Vec<String>,
    /// Request scenarios alternate ceiling and gateway this many times, each for
    /// `measure / rounds`, so that a slow spell of the machine falls on both rows.
    rounds: u32,
    scenarios: Vec<(usize, usize)>,
    warmup: Duration,
    measure: Duration,
    idle_levels: Vec<usize>,
    /// Sessions and broadcast events per second.
    fanout_levels: Vec<(usize, u32)>,
    fanout_time: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let mut settings = Settings::sizes();
        if let Ok(only) = std::env::var(ONLY_ENV) {
            settings.parts = only.split(',').map(|p| p.trim().to_owned()).collect();
            for p in &settings.parts {
                assert!(
                    PARTS.contains(&p.as_str()),
                    "{ONLY_ENV}: unknown part {p:?}; parts: {PARTS:?}"
                );
            }
        }
        if let Ok(list) = std::env::var(SCENARIOS_ENV) {
            settings.scenarios = list
                .split(',')
                .map(|s| {
                    let (c, w) = s.trim().split_once('x').unwrap_or_else(|| {
                        panic!("{SCENARIOS_ENV}: {s:?} is not CxW (e.g. 100x8)")
                    });
                    (c.parse().expect("connections"), w.parse().expect("in flight"))
                })
                .collect();
        }
        if let Ok(list) = std::env::var(FANOUT_ENV) {
            settings.fanout_levels = list
                .split(',')
                .map(|level| {
                    let (n, rate) = level.trim().split_once('@').unwrap_or((level.trim(), "50"));
                    let n = n.parse().expect("NUROPB_BENCH_FANOUT: SESSIONS@RATE");
                    (n, rate.parse().expect("NUROPB_BENCH_FANOUT: SESSIONS@RATE"))
                })
                .collect();
        }
        if let Ok(rounds) = std::env::var(ROUNDS_ENV) {
            settings.rounds =
                rounds.parse::<u32>().expect("NUROPB_BENCH_ROUNDS: a count").clamp(1, 20);
        }
        if let Ok(secs) = std::env::var(SECS_ENV) {
            let secs: u64 = secs.parse().expect("NUROPB_BENCH_SECS: whole seconds");
            settings.measure = Duration::from_secs(secs.clamp(1, 600));
            settings.fanout_time = settings.measure;
        }
        settings
    }

    /// The warm-up and measured window of one row.
    fn window(&self) -> (Duration, Duration) {
        (self.warmup, self.measure)
    }

    /// The warm-up and measured window of one round of a request scenario.
    fn round_window(&self) -> (Duration, Duration) {
        (self.warmup, self.measure / self.rounds.max(1))
    }

    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }

    fn sizes() -> Settings {
        let parts = PARTS.iter().map(|p| (*p).to_owned()).collect();
        let scenarios = SCENARIOS.to_vec();
        if std::env::var(QUICK_ENV).is_ok_and(|v| v == "1") {
            Settings {
                parts,
                scenarios,
                rounds: 1,
                warmup: Duration::from_millis(300),
                measure: Duration::from_secs(1),
                idle_levels: vec![100, 1_000],
                fanout_levels: vec![(100, 20), (1_000, 20)],
                fanout_time: Duration::from_secs(1),
            }
        } else {
            Settings {
                parts,
                scenarios,
                rounds: 3,
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(5),
                idle_levels: vec![1_000, 10_000, 19_000],
                // The last: the same sessions at 2/5 of the rate, below what the 2 cores
                // can carry for the gateway, the broker and the 10k clients together.
                fanout_levels: vec![(1_000, 50), (10_000, 50), (10_000, 20)],
                fanout_time: Duration::from_secs(5),
            }
        }
    }
}

/// One request/response measurement with the CPU it cost.
struct Row {
    name: String,
    connections: usize,
    in_flight: usize,
    outcome: Outcome,
    seconds: f64,
    /// CPU seconds during the window: gateway, broker, echo service, this process (the load).
    cpu: [Option<f64>; 4],
}

impl Row {
    /// Rounds of one scenario as one row: their requests, latencies, seconds and CPU summed.
    fn merge(rounds: Vec<Row>) -> Row {
        let mut rounds = rounds.into_iter();
        let first = rounds.next().expect("at least one round");
        let (mut outcomes, mut seconds, mut cpu) = (vec![first.outcome], first.seconds, first.cpu);
        for r in rounds {
            outcomes.push(r.outcome);
            seconds += r.seconds;
            for (sum, add) in cpu.iter_mut().zip(r.cpu) {
                *sum = sum.zip(add).map(|(a, b)| a + b);
            }
        }
        Row { outcome: Outcome::merge(outcomes), seconds, cpu, ..first }
    }

    fn throughput(&self) -> f64 {
        self.outcome.ok as f64 / self.seconds
    }
    fn cpu_us_per_request(&self, i: usize) -> Option<f64> {
        Some(self.cpu[i]? * 1e6 / self.outcome.ok.max(1) as f64)
    }
    fn json(&self) -> Value {
        json!({
            "name": self.name, "connections": self.connections, "in_flight": self.in_flight,
            "ok": self.outcome.ok, "errors": self.outcome.errors,
            "throughput_per_s": self.throughput(),
            "p50_us": self.outcome.percentile(0.5), "p99_us": self.outcome.percentile(0.99),
            "gateway_cpu_us_per_request": self.cpu_us_per_request(0),
            "broker_cpu_us_per_request": self.cpu_us_per_request(1),
            "echo_cpu_us_per_request": self.cpu_us_per_request(2),
            "load_cpu_us_per_request": self.cpu_us_per_request(3),
        })
    }
}

/// Runs `load` inside a window, measuring the CPU of the gateway and the echo service
/// (`(gateway, echo)`, where they take part), the broker and this process over exactly the
/// window.
async fn measured<F: Future<Output = Outcome> + Send + 'static>(
    name: &str,
    (connections, in_flight): (usize, usize),
    (gateway_pid, echo_pid): (Option<u32>, Option<u32>),
    (warmup, measure): (Duration, Duration),
    load: impl FnOnce(Window) -> F,
) -> Row {
    let window = Window::after(warmup, measure);
    let pids = [gateway_pid, sys::broker_pid(), echo_pid, Some(std::process::id())];
    let run = tokio::spawn(load(window));
    tokio::time::sleep_until(window.start).await;
    let meter = sys::CpuMeter::start(&pids);
    tokio::time::sleep_until(window.end).await;
    let used = meter.stop();
    let outcome = run.await.expect("the load task");
    Row {
        name: name.to_owned(),
        connections,
        in_flight,
        outcome,
        seconds: window.seconds(),
        cpu: [used[0], used[1], used[2], used[3]],
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some(echo::ARG) {
        let (url, service) = (args.next().expect("a broker URL"), args.next().expect("a name"));
        return echo::serve(&url, &service).await;
    }
    let settings = Settings::from_env();
    let Some(amqp_url) = std::env::var(AMQP_URL_ENV).ok().filter(|u| !u.is_empty()) else {
        panic!(
            "{AMQP_URL_ENV} is not set: run `cargo xtask bench`, which starts RabbitMQ and sets it"
        );
    };
    let epoch = Instant::now();
    let service = echo::EchoProcess::start(&amqp_url, SERVICE);
    let mut report = serde_json::Map::new();

    // --- Requests: ceiling and gateway at each scenario -------------------------------------
    let mut pairs = Vec::new();
    if settings.runs("requests") {
        let ceiling = ceiling::Ceiling::connect(&amqp_url, SERVICE).await;
        let gw = GatewayProcess::start(Mesh::Amqp { url: &amqp_url, service_name: "bench-gw" });
        for &(c, w) in &settings.scenarios {
            let (mut bases, mut rows) = (Vec::new(), Vec::new());
            for _ in 0..settings.rounds {
                let base = measured(
                    "ceiling: lapin, 1 connection",
                    (c, w),
                    (None, Some(service.pid)),
                    settings.round_window(),
                    |win| {
                        let ceiling = ceiling.clone();
                        async move { ceiling::run(&ceiling, c * w, win).await }
                    },
                )
                .await;
                let clients = load::connect_many(&gw.url, c, true, 64).await;
                let row = measured(
                    "gateway on RabbitMQ",
                    (c, w),
                    (Some(gw.pid), Some(service.pid)),
                    settings.round_window(),
                    |win| load::run(clients, SERVICE, w, win),
                )
                .await;
                bases.push(base);
                rows.push(row);
            }
            pairs.push((Row::merge(bases), Row::merge(rows)));
        }
        gw.stop();
    }

    // --- The WebSocket floor and the gateway on its in-memory mesh ---------------------------
    let mut floor_pair = None;
    let mut floor_single = None;
    let mut floor_single_gateway = None;
    if settings.runs("floor") {
        let floor_url = load::echo_server().await;
        // One WebSocket round trip on loopback, one caller: what the gateway's 1 × 1 row
        // adds to the ceiling's at least (the ceiling's callers make no such hop).
        let clients = load::connect_many(&floor_url, 1, false, 64).await;
        floor_single = Some(
            measured(
                "floor: bare tokio-tungstenite echo",
                (1, 1),
                (None, None),
                settings.window(),
                |win| load::run(clients, SERVICE, 1, win),
            )
            .await,
        );
        let (c, w) = (100, 8);
        let clients = load::connect_many(&floor_url, c, false, 64).await;
        let floor = measured(
            "floor: bare tokio-tungstenite echo",
            (c, w),
            (None, None),
            settings.window(),
            |win| load::run(clients, SERVICE, w, win),
        )
        .await;
        let gw = GatewayProcess::start(Mesh::InMemory);
        let clients = load::connect_many(&gw.url, c, true, 64).await;
        let in_memory = measured(
            "gateway, in-memory mesh",
            (c, w),
            (Some(gw.pid), None),
            settings.window(),
            |win| load::run(clients, "demo", w, win),
        )
        .await;
        let clients = load::connect_many(&gw.url, 1, true, 64).await;
        floor_single_gateway = Some(
            measured(
                "gateway, in-memory mesh",
                (1, 1),
                (Some(gw.pid), None),
                settings.window(),
                |win| load::run(clients, "demo", 1, win),
            )
            .await,
        );
        gw.stop();
        floor_pair = Some((floor, in_memory));
    }

    // --- Idle connections ------------------------------------------------------------------
    let mut idle_part = None;
    if settings.runs("idle") {
        let gw =
            GatewayProcess::start(Mesh::Amqp { url: &amqp_url, service_name: "bench-gw-idle" });
        idle_part = Some(
            idle::run(
                &gw,
                SERVICE,
                &settings.idle_levels,
                settings.measure.min(Duration::from_secs(3)),
            )
            .await,
        );
        gw.stop();
    }

    // --- Fan-out ---------------------------------------------------------------------------
    let mut fanouts = Vec::new();
    let fanout_levels =
        if settings.runs("fanout") { settings.fanout_levels.clone() } else { vec![] };
    for &(n, rate) in &fanout_levels {
        let gw =
            GatewayProcess::start(Mesh::Amqp { url: &amqp_url, service_name: "bench-gw-fanout" });
        let clients = load::connect_many(&gw.url, n, true, 64).await;
        let meter = sys::CpuMeter::start(&[Some(gw.pid), Some(std::process::id())]);
        let outcome = fanout::run(&amqp_url, clients, rate, settings.fanout_time, epoch).await;
        let cpu = meter.stop();
        gw.stop();
        fanouts.push((n, rate, outcome, cpu));
    }
    drop(service);

    // --- Report ----------------------------------------------------------------------------
    println!();
    println!("## Requests through the gateway, as ratios to the ceiling in the same run");
    println!();
    println!(
        "| connections × in flight | row | req/s | p50 | p99 | req/s ratio | p50 − ceiling | gateway CPU/req | broker CPU/req | echo service CPU/req | load CPU/req | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows_json = Vec::new();
    for (base, row) in &pairs {
        print_row(base, base);
        print_row(row, base);
        rows_json.push(base.json());
        rows_json.push(row.json());
    }
    if let (Some(floor), Some(gateway)) = (&floor_single, &floor_single_gateway) {
        print_row(floor, floor);
        print_row(gateway, floor);
        rows_json.push(floor.json());
        rows_json.push(gateway.json());
    }
    if let Some((floor, in_memory)) = &floor_pair {
        print_row(floor, floor);
        print_row(in_memory, floor);
        rows_json.push(floor.json());
        rows_json.push(in_memory.json());
    }
    report.insert("requests".into(), Value::Array(rows_json));

    if let Some((unloaded_probe, idle_levels)) = &idle_part {
        println!();
        println!("## Idle authenticated connections (gateway on RabbitMQ)");
        println!();
        println!(
            "| connections | gateway RSS | RSS per connection | probe 10 × 1 p50 | probe p99 | probe p99 ratio to no idle connections |"
        );
        println!("|---|---|---|---|---|---|");
        println!(
            "| 0 | – | – | {} | {} | 1.00x |",
            us(unloaded_probe.percentile(0.5)),
            us(unloaded_probe.percentile(0.99))
        );
        let mut idle_json = Vec::new();
        for l in idle_levels {
            println!(
                "| {} | {:.1} MiB | {:.1} KiB | {} | {} | {:.2}x |",
                l.connections,
                l.rss_bytes as f64 / 1048576.0,
                l.rss_per_connection / 1024.0,
                us(l.probe.percentile(0.5)),
                us(l.probe.percentile(0.99)),
                l.probe.percentile(0.99) / unloaded_probe.percentile(0.99),
            );
            idle_json.push(json!({
                "connections": l.connections, "rss_bytes": l.rss_bytes,
                "rss_per_connection_bytes": l.rss_per_connection,
                "probe_p50_us": l.probe.percentile(0.5), "probe_p99_us": l.probe.percentile(0.99),
                "probe_requests": l.probe.ok, "probe_seconds": l.probe_seconds,
            }));
        }
        report.insert(
            "idle".into(),
            json!({"unloaded_probe_p99_us": unloaded_probe.percentile(0.99), "levels": idle_json}),
        );
    }
    let mut fan_json = Vec::new();
    if !fanouts.is_empty() {
        println!();
        println!("## Fan-out: every session receives every broadcast event");
        println!();
        println!(
            "| sessions | events/s | published | deliveries | expected | deliveries/s | p50 | p99 | gateway CPU/delivery | bench CPU/delivery |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");

        for (n, rate, o, cpu) in &fanouts {
            let per = |i: usize| cpu[i].map(|c| c * 1e6 / o.deliveries.max(1) as f64);
            let (per_delivery, bench_per_delivery) = (per(0), per(1));
            println!(
                "| {n} | {rate} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
                o.published,
                o.deliveries,
                o.published * *n as u64,
                o.deliveries as f64 / o.seconds,
                us(o.latency.percentile(0.5)),
                us(o.latency.percentile(0.99)),
                per_delivery.map_or("–".to_owned(), |c| format!("{c:.1} µs")),
                bench_per_delivery.map_or("–".to_owned(), |c| format!("{c:.1} µs")),
            );
            fan_json.push(json!({
                "sessions": n, "rate": rate, "published": o.published,
                "deliveries": o.deliveries, "deliveries_per_s": o.deliveries as f64 / o.seconds,
                "p50_us": o.latency.percentile(0.5), "p99_us": o.latency.percentile(0.99),
                "gateway_cpu_us_per_delivery": per_delivery,
                "bench_cpu_us_per_delivery": bench_per_delivery,
            }));
        }
    }
    report.insert("fanout".into(), Value::Array(fan_json));
    println!();
    println!(
        "{} cores; RabbitMQ, the echo service (a process of its own), this process (the load: \
         WebSocket clients, or the ceiling's callers and connection) and the gateway share them. \
         Windows: {:?} warm-up, {:?} measured; a request scenario's rows alternate in {} rounds \
         of {:?} each. CPU from /proc (utime + stime).",
        std::thread::available_parallelism().map_or(0, usize::from),
        settings.warmup,
        settings.measure,
        settings.rounds,
        settings.round_window().1,
    );

    let path = std::env::var(JSON_ENV)
        .unwrap_or_else(|_| format!("{}/../target/bench/results.json", env!("CARGO_MANIFEST_DIR")));
    let path = std::path::PathBuf::from(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("the results folder");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&Value::Object(report)).expect("json"))
        .expect("the results file");
    println!("results: {}", path.display());
}

fn us(v: f64) -> String {
    if v.is_nan() { "–".to_owned() } else { format!("{v:.0} µs") }
}

fn print_row(r: &Row, base: &Row) {
    let cpu = |i| r.cpu_us_per_request(i).map_or("–".to_owned(), |c| format!("{c:.1} µs"));
    println!(
        "| {} × {} | {} | {:.0} | {} | {} | {:.2}x | {:+.0} µs | {} | {} | {} | {} | {} |",
        r.connections,
        r.in_flight,
        r.name,
        r.throughput(),
        us(r.outcome.percentile(0.5)),
        us(r.outcome.percentile(0.99)),
        r.throughput() / base.throughput(),
        r.outcome.percentile(0.5) - base.outcome.percentile(0.5),
        cpu(0),
        cpu(1),
        cpu(2),
        cpu(3),
        r.outcome.errors,
    );
}
