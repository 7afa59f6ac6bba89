//! `cargo xtask chaos [--short]`: builds the chaos suite and the gateway binary (release for
//! the full form, debug for the short form that `ci` runs), makes sure the shared RabbitMQ
//! runs, gives the run a throw-away vhost and runs `tests/src/bin/chaos.rs` with the vhost's
//! URL and the binary's path in the environment, under a deadline. The suite starts its own
//! RabbitMQ node for the scenarios that stop or kill a broker; the shared one is never
//! stopped. docs/CHAOS.md describes the scenarios and their bounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::broker::{self, TempVhost};

/// Where the suite finds the shared broker's vhost.
const AMQP_URL_ENV: &str = "NUROPB_CHAOS_AMQP_URL";
/// Where it finds the gateway binary.
const GATEWAY_BIN_ENV: &str = "NUROPB_GATEWAY_BIN";
const SHORT_ENV: &str = "NUROPB_CHAOS_SHORT";
const BUILD_ENV: &str = "NUROPB_CHAOS_BUILD";
/// Building from scratch on 2 cores (release for the full form).
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// The short form takes about two minutes, the full one about six; every scenario has its
/// own bounded waits, so these are backstops.
const SHORT_RUN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const FULL_RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// After the deadline, how long the suite gets to exit after SIGINT before SIGKILL (it
/// kills its gateway and its RabbitMQ node on the way out).
const RUN_GRACE: Duration = Duration::from_secs(10);

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let short = match args {
        [] => false,
        [flag] if flag == "--short" => true,
        other => bail!("usage: cargo xtask chaos [--short] (got {other:?})"),
    };
    broker::ensure_running()?;
    let profile: &[&str] = if short { &[] } else { &["--release"] };
    let build = if short { "debug" } else { "release" };
    let suite = ["--quiet", "-p", "e2e-tests", "--bin", "chaos"];
    let gateway = ["--quiet", "-p", "nuropb-gateway", "--bin", "nuropb-gateway"];
    // Built first, so that the run's deadline does not include compiling.
    for what in [&suite, &gateway] {
        let status = broker::status_bounded(
            crate::cmd::cargo().arg("build").args(profile).args(what),
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
    let gateway_bin = target.join(build).join("nuropb-gateway");
    let vhost = TempVhost::create("chaos")?;
    // `cargo run` execs the binary on Unix, so a signal at the deadline reaches the suite.
    let status = broker::status_bounded(
        crate::cmd::cargo()
            .arg("run")
            .args(profile)
            .args(suite)
            .env(AMQP_URL_ENV, vhost.amqp_url())
            .env(GATEWAY_BIN_ENV, &gateway_bin)
            .env(SHORT_ENV, if short { "1" } else { "0" })
            .env(BUILD_ENV, build),
        if short { SHORT_RUN_TIMEOUT } else { FULL_RUN_TIMEOUT },
        Some(RUN_GRACE),
    )?;
    if !status.success() {
        bail!("the chaos suite failed with {status}");
    }
    Ok(())
}
