//! `cargo xtask bench`: builds the benchmark and the gateway binary (release), makes sure
//! RabbitMQ runs, gives the run a throw-away vhost and runs `tests/src/bin/bench.rs` with
//! the vhost's URL in [`AMQP_URL_ENV`] and the binary's path in [`GATEWAY_BIN_ENV`]. The
//! vhost is deleted afterwards, also when the run fails or is killed at its deadline. Not
//! part of `ci`: timings on a shared machine are not a gate. docs/BENCHMARKS.md says how to
//! read the tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::broker::{self, TempVhost};

/// Where the benchmark binary finds the broker.
const AMQP_URL_ENV: &str = "NUROPB_BENCH_AMQP_URL";
/// Where it finds the gateway binary it measures.
const GATEWAY_BIN_ENV: &str = "NUROPB_GATEWAY_BIN";
/// Building the benchmark and its dependencies in release mode from scratch on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The whole run; every scenario stops at its own 30 s deadlines, so this is only a backstop.
const RUN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// After `RUN_TIMEOUT`, how long the benchmark gets to exit after SIGINT before SIGKILL.
const RUN_GRACE: Duration = Duration::from_secs(5);

const BENCH: [&str; 6] = ["--release", "--quiet", "-p", "e2e-tests", "--bin", "bench"];
const GATEWAY: [&str; 6] =
    ["--release", "--quiet", "-p", "nuropb-gateway", "--bin", "nuropb-gateway"];

pub fn run(root: &Path) -> Result<()> {
    broker::ensure_running()?;
    // Built first, so that the run's deadline does not include compiling.
    for what in [BENCH, GATEWAY] {
        let status = broker::status_bounded(
            crate::cmd::cargo().arg("build").args(what),
            BUILD_TIMEOUT,
            None,
        )?;
        if !status.success() {
            bail!("building {} failed with {status}", what[5]);
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let gateway_bin = target.join("release").join("nuropb-gateway");
    let vhost = TempVhost::create("bench")?;
    // `cargo run` execs the binary on Unix, so a signal at the deadline reaches the benchmark.
    let status = broker::status_bounded(
        crate::cmd::cargo()
            .arg("run")
            .args(BENCH)
            .env(AMQP_URL_ENV, vhost.amqp_url())
            .env(GATEWAY_BIN_ENV, &gateway_bin),
        RUN_TIMEOUT,
        Some(RUN_GRACE),
    )?;
    if !status.success() {
        bail!("the benchmark failed with {status}");
    }
    Ok(())
}
