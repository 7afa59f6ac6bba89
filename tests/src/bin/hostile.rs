//! `cargo xtask hostile`: the hostile-input suite. One real `nuropb-gateway` binary on
//! RabbitMQ (a throw-away vhost) with small, explicit limits, an echo service behind it,
//! and a table of attacks ([`rows::ROWS`]). Each row asserts, from outside the gateway:
//!
//! (a) the exact client-visible outcome (frame type, error name, close code, HTTP status);
//! (b) that the bystander, one session calling echo every 50 ms throughout, got every
//!     answer, none slower than [`BYSTANDER_MAX_LATENCY`];
//! (c) that the gateway's RSS stayed under a bound derived from the limits
//!     ([`memory_bound`]), sampled every 10 ms during the row;
//! (d) that nothing malformed reached the mesh: a spy queue on the RPC exchange sees every
//!     request the gateway published; each must be a well-formed nuropb request, and only
//!     the bystander's and the row's expected well-formed ones may be there.
//!
//! Every attacker connects from a loopback address of its own (`127.0.0.x`), so per-address
//! limits are the row's alone; the bystander is `127.0.0.1`. Prints the table and exits
//! non-zero naming the failing rows. docs/HOSTILE.md describes the rows.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test suite: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the suite prints its table")]

// A crate root's modules live beside it, not in a directory named after it; `hostile/` keeps
// them out of `src/bin/`, where cargo would take each file for a binary of its own.
#[path = "hostile/bystander.rs"]
mod bystander;
#[path = "hostile/mesh.rs"]
mod mesh;
#[path = "hostile/net.rs"]
mod net;
#[path = "hostile/rows.rs"]
mod rows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use e2e_tests::process::{GatewayProcess, Mesh};
use nuropb_testkit::{FakeService, ServiceOptions};

/// The broker URL with its throw-away vhost; set by `cargo xtask hostile`.
const AMQP_URL_ENV: &str = "NUROPB_HOSTILE_AMQP_URL";
/// The echo service behind the gateway.
pub const SERVICE: &str = "hostile-echo";
const GATEWAY_SERVICE: &str = "hostile-gw";
/// Where the gateway's log goes at the end (default `target/hostile/gateway.log`).
const LOG_ENV: &str = "NUROPB_HOSTILE_LOG";
/// No bystander call may take longer than this during any row.
const BYSTANDER_MAX_LATENCY: Duration = Duration::from_millis(500);
/// A row's attack must end within this.
const ROW_LIMIT: Duration = Duration::from_secs(25);
/// Every row spans at least this, so the bystander makes a few calls during it.
const ROW_MIN: Duration = Duration::from_millis(200);

/// The limits the gateway runs with, small so that every bound is reached quickly.
pub mod limits {
    pub const MAX_MESSAGE_BYTES: usize = 64 << 10;
    pub const MAX_DECODED_VALUES: usize = 20_000;
    pub const MAX_DECODED_BYTES: usize = 2 << 20;
    pub const MAX_IN_FLIGHT_BYTES: usize = 4 << 20;
    pub const MAX_IN_FLIGHT_BYTES_TOTAL: usize = 16 << 20;
    pub const MAX_OUTBOUND_MESSAGE_BYTES: usize = 128 << 10;
    pub const OUTBOUND_QUEUE_BYTES: usize = 256 << 10;
    pub const RATE_PER_SECOND: u32 = 25;
    pub const RATE_BURST: u32 = 40;
    pub const MAX_CONNECTIONS_PER_IP: usize = 8;
    pub const CONNECT_RATE_PER_IP: u32 = 5;
    pub const CONNECT_BURST_PER_IP: u32 = 10;
    pub const MAX_HANDSHAKES_IN_FLIGHT: usize = 16;
    pub const MAX_SESSIONS_PER_USER: usize = 4;
    pub const JWT_MAX_LIFETIME_SECS: u64 = 3600;
    pub const ALLOWED_ORIGINS: &str = "example.com";
    pub const CALLABLE: &str = "hostile-echo.echo,hostile-echo.slow,hostile-echo.nuropb_describe";
}

fn gateway_args(ops: SocketAddr) -> Vec<String> {
    use limits::*;
    let pairs: Vec<(&str, String)> = vec![
        ("--ops-listen", ops.to_string()),
        // Targeted events for the slow-reader row.
        ("--event-bindings", "hostile.#".to_owned()),
        ("--max-message-bytes", MAX_MESSAGE_BYTES.to_string()),
        ("--max-decoded-values", MAX_DECODED_VALUES.to_string()),
        ("--max-decoded-bytes", MAX_DECODED_BYTES.to_string()),
        ("--max-in-flight-bytes", MAX_IN_FLIGHT_BYTES.to_string()),
        ("--max-in-flight-bytes-total", MAX_IN_FLIGHT_BYTES_TOTAL.to_string()),
        ("--max-outbound-message-bytes", MAX_OUTBOUND_MESSAGE_BYTES.to_string()),
        ("--outbound-queue-bytes", OUTBOUND_QUEUE_BYTES.to_string()),
        ("--rate-per-second", RATE_PER_SECOND.to_string()),
        ("--rate-burst", RATE_BURST.to_string()),
        ("--max-connections-per-ip", MAX_CONNECTIONS_PER_IP.to_string()),
        ("--connect-rate-per-ip", CONNECT_RATE_PER_IP.to_string()),
        ("--connect-burst-per-ip", CONNECT_BURST_PER_IP.to_string()),
        ("--max-handshakes-in-flight", MAX_HANDSHAKES_IN_FLIGHT.to_string()),
        ("--max-sessions-per-user", MAX_SESSIONS_PER_USER.to_string()),
        ("--jwt-max-lifetime-secs", JWT_MAX_LIFETIME_SECS.to_string()),
        ("--allowed-origins", ALLOWED_ORIGINS.to_owned()),
        ("--callable", CALLABLE.to_owned()),
        ("--client-describe", "false".to_owned()),
        // No describe calls of the gateway's own on the spied routing key.
        ("--encryption", "off".to_owned()),
        ("--request-timeout-ms", "5000".to_owned()),
        ("--log", "info,lapin=off".to_owned()),
    ];
    pairs.into_iter().flat_map(|(k, v)| [k.to_owned(), v]).collect()
}

/// What the gateway may hold on top of its baseline while one row runs: PROTOCOL.md's worst
/// case per connection (the frame being read, the frame being decoded, the decoded params in
/// flight, the outbound queue) for the four connections a row drives hard at most, plus
/// 16 MiB for the allocator's retained arenas (a debug build, glibc malloc: one arena per
/// worker thread keeps freed memory).
fn memory_bound(baseline: u64) -> u64 {
    use limits::*;
    let per_connection =
        MAX_MESSAGE_BYTES + MAX_DECODED_BYTES + MAX_IN_FLIGHT_BYTES + OUTBOUND_QUEUE_BYTES;
    baseline + 4 * per_connection as u64 + (16 << 20)
}

/// What a row's attack saw.
pub struct Outcome {
    pub observed: String,
    /// Whether `observed` is the expected outcome.
    pub ok: bool,
    /// How many well-formed requests of the row's own may have reached the mesh.
    pub to_mesh: std::ops::RangeInclusive<usize>,
}

impl Outcome {
    /// An outcome that sends nothing to the mesh.
    pub fn new(ok: bool, observed: impl Into<String>) -> Outcome {
        Outcome { observed: observed.into(), ok, to_mesh: 0..=0 }
    }
    pub fn to_mesh(mut self, range: std::ops::RangeInclusive<usize>) -> Outcome {
        self.to_mesh = range;
        self
    }
}

/// What a row's attack gets.
#[derive(Clone)]
pub struct Ctx {
    pub url: String,
    pub addr: SocketAddr,
    /// The gateway's ops endpoint (`/metrics`).
    pub ops: SocketAddr,
    pub amqp_url: String,
    /// The last octet of the row's first attacker address; `ip(k)` for `k < 3` are its own.
    first_ip: u8,
    pub gateway: Arc<GatewayProcess>,
}

impl Ctx {
    /// The row's `k`-th attacker address (`k < 3`).
    pub fn ip(&self, k: u8) -> std::net::IpAddr {
        assert!(k < 3, "three addresses per row");
        net::loopback(self.first_ip + k)
    }
}

pub type Attack = std::pin::Pin<Box<dyn Future<Output = Outcome> + Send>>;

pub struct Row {
    pub name: &'static str,
    pub expected: &'static str,
    pub attack: fn(Ctx) -> Attack,
}

/// The highest RSS seen since the last reset, sampled every 10 ms.
struct PeakRss {
    peak: AtomicU64,
    stop: AtomicBool,
}

struct Result_ {
    name: &'static str,
    expected: &'static str,
    observed: String,
    outcome_ok: bool,
    bystander: String,
    bystander_ok: bool,
    rss: String,
    rss_ok: bool,
    mesh: String,
    mesh_ok: bool,
}

#[tokio::main]
async fn main() {
    let Some(amqp_url) = std::env::var(AMQP_URL_ENV).ok().filter(|u| !u.is_empty()) else {
        panic!(
            "{AMQP_URL_ENV} is not set: run `cargo xtask hostile`, which starts RabbitMQ and sets it"
        );
    };
    let suite_started = Instant::now();
    let options = ServiceOptions { key_pem: None, prefetch: 256, record: false };
    let service = FakeService::start_opts(&amqp_url, SERVICE, options).await;
    let spy = mesh::Spy::bind(&amqp_url, &[SERVICE]).await;
    // A free port for the ops endpoint (the gateway binds it a moment later).
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let args = gateway_args(ops);
    let gateway = Arc::new(GatewayProcess::start_capturing(
        Mesh::Amqp { url: &amqp_url, service_name: GATEWAY_SERVICE },
        &args,
    ));
    let addr: SocketAddr = gateway.addr.parse().expect("listen address");

    // The bystander, from 127.0.0.1.
    let record = bystander::Record::default();
    let stop = CancellationToken::new();
    let client = net::session_from(net::loopback(1), &gateway.url, addr, &rows::token("bystander"))
        .await
        .expect("the bystander connects");
    let by_task =
        tokio::spawn(bystander::run(client, SERVICE.to_owned(), record.clone(), stop.clone()));

    // RSS sampler.
    let peak = Arc::new(PeakRss { peak: AtomicU64::new(0), stop: AtomicBool::new(false) });
    let sampler = {
        let (peak, pid) = (Arc::clone(&peak), gateway.pid);
        std::thread::spawn(move || {
            // Bounded: the suite ends long before 100 000 × 10 ms.
            for _ in 0..100_000 {
                if peak.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(rss) = e2e_tests::sys::rss_bytes(pid) {
                    peak.peak.fetch_max(rss, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // Warm up (the first calls allocate the gateway's buffers), then take the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = spy.take().await;
    let baseline = gateway.rss_bytes().expect("gateway RSS");
    let bound = memory_bound(baseline);

    println!("# Hostile-input suite");
    println!();
    println!("gateway: {} (pid {}), flags: {}", gateway.url, gateway.pid, args.join(" "));
    println!(
        "bounds: bystander max latency {BYSTANDER_MAX_LATENCY:?}; gateway RSS ≤ {:.1} MiB (baseline {:.1} MiB + 4 × (max message + max decoded bytes + in-flight bytes + outbound queue bytes) + 16 MiB allocator slack)",
        mib(bound),
        mib(baseline)
    );
    println!();

    let mut results = Vec::new();
    for (i, row) in rows::ROWS.iter().enumerate() {
        let ctx = Ctx {
            url: gateway.url.clone(),
            addr,
            ops,
            amqp_url: amqp_url.clone(),
            first_ip: u8::try_from(10 + 3 * i).expect("few rows"),
            gateway: Arc::clone(&gateway),
        };
        let rss_before = gateway.rss_bytes().unwrap_or(0);
        peak.peak.store(rss_before, Ordering::SeqCst);
        let started = Instant::now();
        let mut attack = tokio::spawn((row.attack)(ctx));
        let outcome = match tokio::time::timeout(ROW_LIMIT, &mut attack).await {
            Err(_) => {
                // Dropping the attack's future drops its connections and its share of the
                // gateway handle.
                attack.abort();
                let _ = tokio::time::timeout(Duration::from_secs(5), attack).await;
                Outcome::new(false, format!("attack did not end within {ROW_LIMIT:?}"))
            }
            Ok(Err(e)) => Outcome::new(false, format!("attack panicked: {}", panic_text(e))),
            Ok(Ok(outcome)) => outcome,
        };
        tokio::time::sleep_until(started + ROW_MIN).await;
        let ended = Instant::now();
        // The bystander answered after the row too (bounded wait).
        for _ in 0..60 {
            if record.answered_after(ended) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let what the row sent reach the spy queue.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let arrived = spy.take().await;
        let rss_after = gateway.rss_bytes();
        let rss_peak = peak.peak.load(Ordering::SeqCst);

        let calls = record.between(started, ended);
        let answered = calls.iter().filter(|c| c.latency.is_some()).count();
        let max = calls.iter().filter_map(|c| c.latency).max().unwrap_or_default();
        let bystander_ok = !calls.is_empty()
            && answered == calls.len()
            && max <= BYSTANDER_MAX_LATENCY
            && record.answered_after(ended);
        let rss_ok = rss_after.is_some() && rss_peak <= bound;
        let mesh_ok =
            arrived.malformed.is_empty() && outcome.to_mesh.contains(&arrived.others.len());
        let mut mesh_text = format!(
            "{} bystander, {} row (expected {}..={}), {} malformed",
            arrived.bystander,
            arrived.others.len(),
            outcome.to_mesh.start(),
            outcome.to_mesh.end(),
            arrived.malformed.len()
        );
        if let Some(first) = arrived.malformed.first() {
            mesh_text.push_str(&format!(": {first}"));
        }
        results.push(Result_ {
            name: row.name,
            expected: row.expected,
            observed: outcome.observed,
            outcome_ok: outcome.ok,
            bystander: format!("{answered}/{} answered, max {} ms", calls.len(), max.as_millis()),
            bystander_ok,
            rss: format!(
                "{:.1} → peak {:.1} → {} MiB",
                mib(rss_before),
                mib(rss_peak),
                rss_after.map_or("gone".to_owned(), |r| format!("{:.1}", mib(r)))
            ),
            rss_ok,
            mesh: mesh_text,
            mesh_ok,
        });
        let r = results.last().expect("just pushed");
        eprintln!(
            "hostile: {} {}: {}",
            if r.outcome_ok && r.bystander_ok && r.rss_ok && r.mesh_ok { "ok  " } else { "FAIL" },
            r.name,
            r.observed
        );
    }

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), by_task).await;
    peak.stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let (log_lines, _) = gateway.stderr_lines();
    let log_path = std::env::var(LOG_ENV).unwrap_or_else(|_| {
        format!("{}/../target/hostile/gateway.log", env!("CARGO_MANIFEST_DIR"))
    });
    let log_path = std::path::PathBuf::from(log_path);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).expect("the log folder");
    }
    std::fs::write(&log_path, log_lines.join("\n")).expect("the gateway log");

    println!("| row | expected | observed | bystander | gateway RSS | mesh | result |");
    println!("|---|---|---|---|---|---|---|");
    let mark = |ok: bool| if ok { "" } else { " ✗" };
    let mut failed = Vec::new();
    for r in &results {
        let ok = r.outcome_ok && r.bystander_ok && r.rss_ok && r.mesh_ok;
        if !ok {
            failed.push(r.name);
        }
        println!(
            "| {} | {} | {}{} | {}{} | {}{} | {}{} | {} |",
            r.name,
            r.expected,
            cell(&r.observed),
            mark(r.outcome_ok),
            r.bystander,
            mark(r.bystander_ok),
            r.rss,
            mark(r.rss_ok),
            r.mesh,
            mark(r.mesh_ok),
            if ok { "ok" } else { "FAIL" },
        );
    }
    println!();
    println!(
        "{} rows in {:.1} s; gateway log ({} lines): {}",
        results.len(),
        suite_started.elapsed().as_secs_f64(),
        log_lines.len(),
        log_path.display()
    );
    spy.stop().await;
    service.stop().await;
    match Arc::try_unwrap(gateway) {
        Ok(gateway) => gateway.stop(),
        Err(gateway) => {
            // Only an aborted attack that did not unwind could still hold it; `exit` below
            // runs no destructors, so the process is stopped here by its PID.
            eprintln!("hostile: the gateway is still shared; killing pid {}", gateway.pid);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &gateway.pid.to_string()])
                .status();
        }
    }
    if !failed.is_empty() {
        eprintln!("hostile: {} failing row(s): {}", failed.len(), failed.join(", "));
        std::process::exit(1);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// A table cell: one line, no pipes, at most 160 characters.
fn cell(s: &str) -> String {
    let s: String = s.replace(['\n', '\r'], " ").replace('|', "/");
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(e) => e.to_string(),
    }
}
