//! `idle_memory`: what an idle authenticated connection costs the gateway in memory, and
//! nothing timed: the gateway (the real binary, in-memory mesh, the benchmark's limits) gets
//! idle authenticated connections in steps (the benchmark's idle scenario without its latency
//! probe), and its RSS per connection is printed at each step. With `NUROPB_GATEWAY_BIN`
//! naming a wrapper that `exec`s the gateway under `valgrind --tool=dhat`, the heap profile
//! says where the bytes go (docs/BENCHMARKS.md, "Where an idle connection's bytes go").
//!
//! `cargo run --release -p e2e-tests --bin idle_memory -- 1000 5000 10000` (connections per
//! step, held to the end; at most 19 000: the benchmark's `--max-connections` and the hard
//! file-descriptor limit here).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring tool: a failure aborts it"
)]
#![allow(clippy::print_stdout, reason = "the tool prints its table")]

// The benchmark's client code; this tool uses its connecting part only.
#[allow(dead_code, reason = "the benchmark's load functions are not used here")]
#[path = "bench/load.rs"]
mod load;

use std::time::Duration;

use e2e_tests::process::{GatewayProcess, Mesh, bench_args};
use e2e_tests::sys;

/// Most connections a step may ask for (`--max-connections` of [`bench_args`] is 19 500).
const MAX_CONNECTIONS: usize = 19_000;
/// Time the gateway gets to settle after a step before its RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Time the gateway gets to exit after SIGTERM (long: under valgrind it is slow).
const EXIT_WAIT: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() {
    let mut levels: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("each argument is a number of connections"))
        .collect();
    if levels.is_empty() {
        levels = vec![1_000, 5_000, 10_000];
    }
    assert!(
        levels.windows(2).all(|w| w[0] < w[1]) && levels.iter().all(|&l| l <= MAX_CONNECTIONS),
        "levels rise and stay within {MAX_CONNECTIONS}"
    );
    let gateway = GatewayProcess::start_with(Mesh::InMemory, &bench_args());
    // One connection first, so what every connection shares (the runtime, the registry's
    // first allocations) is in the baseline.
    let mut held = load::connect_many(&gateway.url, 1, true, 1).await;
    tokio::time::sleep(SETTLE).await;
    let before = sys::rss_bytes(gateway.pid).expect("the gateway's RSS");
    println!("| connections | gateway RSS | RSS per connection |");
    println!("|---|---|---|");
    println!("| 1 | {:.1} MiB | – |", before as f64 / f64::from(1 << 20));
    for &level in &levels {
        let more = load::connect_many(&gateway.url, level + 1 - held.len(), true, 64).await;
        held.extend(more);
        tokio::time::sleep(SETTLE).await;
        let rss = sys::rss_bytes(gateway.pid).expect("the gateway's RSS");
        let per = rss.saturating_sub(before) as f64 / level as f64;
        println!(
            "| {level} | {:.1} MiB | {:.2} KiB |",
            rss as f64 / f64::from(1 << 20),
            per / 1024.0
        );
    }
    // Closed before the gateway stops, so its drain has nothing to wait for and a heap
    // profiler sees a clean exit.
    drop(held);
    tokio::time::sleep(SETTLE).await;
    let status = gateway.terminate(EXIT_WAIT);
    println!("gateway exited: {status:?}");
}
