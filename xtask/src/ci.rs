//! The CI gates. `run` is what `.ci/run` executes on a clean clone.

use std::path::Path;

use anyhow::Result;

use crate::cmd::{cargo, run as run_cmd};

/// Every gate, in order of cost.
pub fn run(root: &Path) -> Result<()> {
    fmt_check()?;
    crate::layering::check()?;
    clippy()?;
    unit_and_e2e_tests()?;
    integration()?;
    // The chaos suite's short form: the gateway binary under broker, service and client
    // faults (docs/CHAOS.md).
    crate::chaos::run(root, &["--short".to_owned()])?;
    crate::interop::run(root)?;
    eprintln!("xtask ci: all gates passed");
    Ok(())
}

pub fn fmt_check() -> Result<()> {
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))
}

pub fn clippy() -> Result<()> {
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))
}

/// Unit, golden and end-to-end tests: everything that needs no broker.
pub fn unit_and_e2e_tests() -> Result<()> {
    run_cmd(cargo().args(["test", "--workspace", "--exclude", "amqp-mesh", "--all-features"]))
}

/// Tests against the real RabbitMQ (the `amqp-mesh` crate's tests), all in one throw-away
/// vhost whose URL they get in [`TEST_AMQP_URL_ENV`].
pub fn integration() -> Result<()> {
    crate::broker::ensure_running()?;
    // One vhost for the whole run: each `rabbitmqctl` call costs half a second. It is
    // deleted when this returns, also when the tests fail.
    let vhost = crate::broker::TempVhost::create("test")?;
    run_cmd(
        cargo()
            .args(["test", "-p", "amqp-mesh", "--", "--test-threads", "4"])
            .env(TEST_AMQP_URL_ENV, vhost.amqp_url()),
    )
}

/// Where the broker tests find their vhost (`nuropb_testkit::broker::URL_ENV`).
pub const TEST_AMQP_URL_ENV: &str = "NUROPB_TEST_AMQP_URL";
