//! `cargo xtask chaos [--short]`: the gateway under attack, one markdown table per scenario
//! (offered, answered, errored, hung, lost, recovery time, RSS before and after, and each
//! asserted bound with what was measured); exits non-zero naming every failed assertion.
//! docs/CHAOS.md says what each scenario does and why its bounds are what they are.
//!
//! The real `nuropb-gateway` binary ([`GatewayProcess`]) on RabbitMQ, real WebSocket
//! clients, the testkit's fake nuropb service. The broker stop/start and `kill -9`
//! scenarios run on a RabbitMQ node of their own ([`nuropb_testkit::node::RabbitNode`]); the others use a
//! throw-away vhost on the shared broker (passed in [`AMQP_URL_ENV`] by `cargo xtask
//! chaos`), which is never stopped. Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test suite: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the suite prints its tables")]

// A crate root's modules live beside it, as for `bench.rs`.
#[path = "chaos/broadcast.rs"]
mod broadcast;
#[path = "chaos/client.rs"]
mod client;
#[path = "chaos/ops.rs"]
mod ops;
#[path = "chaos/relay.rs"]
mod relay;
#[path = "chaos/report.rs"]
mod report;
#[path = "chaos/scenarios.rs"]
mod scenarios;

use std::time::Duration;

use e2e_tests::process::{GatewayProcess, Mesh};

/// The shared broker's throw-away vhost; set by `cargo xtask chaos`.
const AMQP_URL_ENV: &str = "NUROPB_CHAOS_AMQP_URL";
/// `1`: the short form (CI): fewer sessions, seconds per scenario.
const SHORT_ENV: &str = "NUROPB_CHAOS_SHORT";
/// Which build of the gateway runs (`debug`/`release`), for the header.
const BUILD_ENV: &str = "NUROPB_CHAOS_BUILD";
/// Only these scenarios (comma-separated numbers), for working on one.
const ONLY_ENV: &str = "NUROPB_CHAOS_ONLY";

/// The gateway's request timeout in the suite.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A request is hung when it has no answer within the request timeout plus this.
pub const MARGIN: Duration = Duration::from_secs(2);
/// How long the gateway may take to reconnect at most between attempts.
pub const RECONNECT_MAX_MS: u64 = 1000;

pub fn deadline() -> Duration {
    REQUEST_TIMEOUT + MARGIN
}

/// Sizes and durations of one run.
pub struct Settings {
    pub short: bool,
    /// Sessions of the request load, and requests per second each.
    pub sessions: usize,
    pub rate: u32,
    pub warm: Duration,
    /// How long a fault lasts before it is healed.
    pub outage: Duration,
    /// Load after the heal.
    pub after: Duration,
    /// `?heartbeat=` for the black-holed link (`None`: the gateway's default, 5 s).
    pub heartbeat: Option<u64>,
    pub broadcast_sessions: usize,
    pub broadcast_rate: u32,
    pub broadcast_time: Duration,
    pub churn_total: usize,
    pub churn_parallel: usize,
    pub soak: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        if std::env::var(SHORT_ENV).is_ok_and(|v| v == "1") {
            Settings {
                short: true,
                sessions: 20,
                rate: 20,
                warm: Duration::from_secs(1),
                outage: Duration::from_secs(2),
                after: Duration::from_secs(2),
                heartbeat: Some(2),
                broadcast_sessions: 200,
                broadcast_rate: 50,
                broadcast_time: Duration::from_secs(6),
                churn_total: 400,
                churn_parallel: 20,
                soak: Duration::from_secs(12),
            }
        } else {
            Settings {
                short: false,
                sessions: 100,
                rate: 20,
                warm: Duration::from_secs(3),
                outage: Duration::from_secs(5),
                after: Duration::from_secs(5),
                heartbeat: None,
                broadcast_sessions: 1000,
                broadcast_rate: 50,
                broadcast_time: Duration::from_secs(6),
                churn_total: 5000,
                churn_parallel: 50,
                soak: Duration::from_secs(120),
            }
        }
    }

    /// The heartbeat the gateway uses on the black-holed link, in seconds.
    pub fn heartbeat_secs(&self) -> u64 {
        self.heartbeat.unwrap_or(5)
    }
}

/// The suite's gateway flags: abuse limits out of the way (every client is one address and
/// few users), a 3 s request timeout, reconnects at most 1 s apart, the ops endpoint on a
/// free port, broadcasts under `chaos.#`; then `extra`.
#[rustfmt::skip]
pub fn gateway(amqp_url: &str, service_name: &str, extra: &[&str]) -> GatewayProcess {
    let timeout = REQUEST_TIMEOUT.as_millis().to_string();
    let reconnect = RECONNECT_MAX_MS.to_string();
    let mut args: Vec<String> = [
        "--rate-per-second", "1000000", "--rate-burst", "1000000",
        "--max-connections", "5000", "--max-sessions-per-user", "20000",
        "--max-connections-per-ip", "20000",
        "--connect-rate-per-ip", "1000000", "--connect-burst-per-ip", "1000000",
        "--request-timeout-ms", &timeout, "--reconnect-max-ms", &reconnect,
        "--ops-listen", "127.0.0.1:0", "--log", "error,lapin=off",
        "--broadcast-topics", "chaos.#", "--event-bindings", "chaos.#",
        "--idle-timeout-secs", "600", "--ping-interval-secs", "300",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    GatewayProcess::start_with(Mesh::Amqp { url: amqp_url, service_name }, &args)
}

#[tokio::main]
async fn main() {
    // SIGINT (`cargo xtask` at its deadline, or Ctrl-C) drops the running scenario, and with
    // it its gateway and RabbitMQ node, which are killed by PID in their Drop.
    let interrupted = tokio::select! {
        () = run() => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    // Here the scenario's future is dropped, its processes stopped.
    if interrupted {
        eprintln!("chaos: interrupted; the running scenario's processes were stopped");
        std::process::exit(130);
    }
}

async fn run() {
    let settings = Settings::from_env();
    let Some(url) = std::env::var(AMQP_URL_ENV).ok().filter(|u| !u.is_empty()) else {
        panic!(
            "{AMQP_URL_ENV} is not set: run `cargo xtask chaos`, which makes a vhost and sets it"
        )
    };
    let only: Option<Vec<usize>> = std::env::var(ONLY_ENV)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let wanted = |n: usize| only.as_ref().is_none_or(|o| o.contains(&n));
    let build = std::env::var(BUILD_ENV).unwrap_or_else(|_| "unknown".to_owned());
    println!(
        "## Chaos suite ({} form, {build} build of the gateway, {} cores)",
        if settings.short { "short" } else { "full" },
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!();
    println!(
        "Request timeout {:?}; a request is hung without an answer within {:?} (timeout + \
         margin), lost without one by the end.",
        REQUEST_TIMEOUT,
        deadline()
    );
    let started = std::time::Instant::now();
    let mut tables = Vec::new();
    if wanted(1) || wanted(2) {
        tables.extend(scenarios::own_node(&settings, wanted(1), wanted(2)).await);
    }
    if wanted(3) {
        tables.push(scenarios::black_hole(&settings, &url).await);
    }
    if wanted(4) {
        tables.push(scenarios::service_killed(&settings, &url).await);
    }
    if wanted(5) {
        tables.push(scenarios::sigterm(&settings, &url).await);
    }
    if wanted(6) {
        tables.push(broadcast::dead_readers(&settings, &url).await);
    }
    if wanted(7) {
        tables.push(scenarios::churn(&settings, &url).await);
    }
    if wanted(8) {
        tables.push(scenarios::soak(&settings, &url).await);
    }
    for t in &tables {
        t.print();
    }
    println!();
    println!("{} scenarios in {:.0} s.", tables.len(), started.elapsed().as_secs_f64());
    let failed: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.checks
                .iter()
                .filter(|c| !c.ok)
                .map(move |c| format!("{}: {} (measured {})", t.name, c.claim, c.measured))
        })
        .collect();
    if !failed.is_empty() {
        eprintln!("chaos: {} assertion(s) failed:", failed.len());
        for f in &failed {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
    assert!(tables.iter().all(report::Table::passed));
    println!("chaos: every assertion held");
}
