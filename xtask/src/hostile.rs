//! `cargo xtask hostile`: the hostile-input suite (`tests/src/bin/hostile.rs`, described in
//! docs/HOSTILE.md). Builds the suite and the gateway binary (debug, as the other tests),
//! makes sure RabbitMQ runs, gives the run a throw-away vhost and runs the suite with the
//! vhost's URL in [`AMQP_URL_ENV`] and the binary's path in [`GATEWAY_BIN_ENV`], bounded in
//! time. The vhost is deleted afterwards, also when the run fails or is killed at its
//! deadline. Part of `ci`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::broker::{self, TempVhost};

/// Where the suite finds the broker.
const AMQP_URL_ENV: &str = "NUROPB_HOSTILE_AMQP_URL";
/// Where it finds the gateway binary it attacks.
const GATEWAY_BIN_ENV: &str = "NUROPB_GATEWAY_BIN";
/// Building the suite and the gateway (debug) from scratch on 2 cores.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The whole run; it takes well under a minute, every row has its own 25 s deadline.
const RUN_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// After `RUN_TIMEOUT`, how long the suite gets to exit after SIGINT before SIGKILL.
const RUN_GRACE: Duration = Duration::from_secs(5);

const SUITE: [&str; 5] = ["--quiet", "-p", "e2e-tests", "--bin", "hostile"];
const GATEWAY: [&str; 5] = ["--quiet", "-p", "nuropb-gateway", "--bin", "nuropb-gateway"];

pub fn run(root: &Path) -> Result<()> {
    broker::ensure_running()?;
    // Built first, so that the run's deadline does not include compiling.
    for what in [SUITE, GATEWAY] {
        let status = broker::status_bounded(
            crate::cmd::cargo().arg("build").args(what),
            BUILD_TIMEOUT,
            None,
        )?;
        if !status.success() {
            bail!("building {} failed with {status}", what[4]);
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let gateway_bin = target.join("debug").join("nuropb-gateway");
    let vhost = TempVhost::create("hostile")?;
    // `cargo run` execs the binary on Unix, so a signal at the deadline reaches the suite.
    let status = broker::status_bounded(
        crate::cmd::cargo()
            .arg("run")
            .args(SUITE)
            .env(AMQP_URL_ENV, vhost.amqp_url())
            .env(GATEWAY_BIN_ENV, &gateway_bin),
        RUN_TIMEOUT,
        Some(RUN_GRACE),
    )?;
    if !status.success() {
        bail!("the hostile-input suite failed with {status}");
    }
    Ok(())
}
