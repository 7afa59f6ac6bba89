//! What the suites that drive the real gateway binary share: building it, and running a
//! suite binary of the `e2e-tests` crate (`bench`, `hostile`, `chaos`) against it on a
//! throw-away RabbitMQ vhost. Both are built before the run starts, so that the run's
//! deadline does not include compiling; the run is bounded in time (SIGINT at the deadline,
//! SIGKILL after a grace period); the vhost is deleted afterwards, also when the run fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::broker::{self, TempVhost};

/// Where every suite finds the gateway binary (`e2e_tests::process::GATEWAY_BIN_ENV`).
pub const GATEWAY_BIN_ENV: &str = "NUROPB_GATEWAY_BIN";
/// Building the gateway (or a suite) from scratch on 2 cores, release included.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// A suite binary (`tests/src/bin/<bin>.rs`) and how to run it.
pub struct Suite<'a> {
    /// The binary's name in `e2e-tests`.
    pub bin: &'a str,
    /// Release builds (of the suite and the gateway) instead of debug.
    pub release: bool,
    /// The variable the suite reads its vhost's AMQP URL from.
    pub amqp_url_env: &'a str,
    /// More of the suite's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// The whole run, after which it gets SIGINT, and `grace` later SIGKILL.
    pub run_timeout: Duration,
    pub grace: Duration,
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the root) or `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Builds `nuropb-gateway` (bounded) and returns the binary's path.
pub fn build_gateway(root: &Path, release: bool) -> Result<PathBuf> {
    build(&["-p", "nuropb-gateway", "--bin", "nuropb-gateway"], release)?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir(root).join(profile).join("nuropb-gateway"))
}

/// Builds the suite and the gateway, then runs the suite; fails when it does.
pub fn run(root: &Path, suite: &Suite<'_>) -> Result<()> {
    broker::ensure_running()?;
    let gateway = build_both(root, suite)?;
    let vhost = TempVhost::create(suite.bin)?;
    run_built(suite, &gateway, Some(vhost.amqp_url()))
}

/// As [`run`] for a suite that starts RabbitMQ nodes of its own and uses no vhost of the
/// shared broker (`amqp_url_env` is not set).
pub fn run_on_own_nodes(root: &Path, suite: &Suite<'_>) -> Result<()> {
    let gateway = build_both(root, suite)?;
    run_built(suite, &gateway, None)
}

/// Builds the suite and the gateway; the gateway's path.
fn build_both(root: &Path, suite: &Suite<'_>) -> Result<PathBuf> {
    build(&["-p", "e2e-tests", "--bin", suite.bin], suite.release)?;
    build_gateway(root, suite.release)
}

fn run_built(suite: &Suite<'_>, gateway: &Path, amqp_url: Option<String>) -> Result<()> {
    let mut cmd = crate::cmd::cargo();
    // `cargo run` execs the binary on Unix, so a signal at the deadline reaches the suite.
    cmd.args(["run", "--quiet", "-p", "e2e-tests", "--bin", suite.bin]);
    if suite.release {
        cmd.arg("--release");
    }
    if let Some(url) = amqp_url {
        cmd.env(suite.amqp_url_env, url);
    }
    cmd.env(GATEWAY_BIN_ENV, gateway);
    cmd.envs(suite.env.iter().copied());
    let status = broker::status_bounded(&mut cmd, suite.run_timeout, Some(suite.grace))?;
    if !status.success() {
        bail!("the {} suite failed with {status}", suite.bin);
    }
    Ok(())
}

fn build(what: &[&str], release: bool) -> Result<()> {
    let mut cmd = crate::cmd::cargo();
    cmd.args(["build", "--quiet"]).args(what);
    if release {
        cmd.arg("--release");
    }
    let status = broker::status_bounded(&mut cmd, BUILD_TIMEOUT, None)?;
    if !status.success() {
        bail!("`{}` failed with {status}", crate::cmd::display(&cmd));
    }
    Ok(())
}
