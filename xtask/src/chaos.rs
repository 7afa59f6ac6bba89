//! `cargo xtask chaos [--short]`: builds the chaos suite and the gateway binary (release for
//! the full form, debug for the short form that `ci` runs), makes sure the shared RabbitMQ
//! runs, gives the run a throw-away vhost and runs `tests/src/bin/chaos.rs` with the vhost's
//! URL and the binary's path in the environment, under a deadline. The suite starts its own
//! RabbitMQ node for the scenarios that stop or kill a broker; the shared one is never
//! stopped. docs/CHAOS.md describes the scenarios and their bounds.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::suite::{self, Suite};

/// Where the suite finds the shared broker's vhost.
const AMQP_URL_ENV: &str = "NUROPB_CHAOS_AMQP_URL";
const SHORT_ENV: &str = "NUROPB_CHAOS_SHORT";
const BUILD_ENV: &str = "NUROPB_CHAOS_BUILD";
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
    let (build, run_timeout) =
        if short { ("debug", SHORT_RUN_TIMEOUT) } else { ("release", FULL_RUN_TIMEOUT) };
    suite::run(
        root,
        &Suite {
            bin: "chaos",
            release: !short,
            amqp_url_env: AMQP_URL_ENV,
            env: &[(SHORT_ENV, if short { "1" } else { "0" }), (BUILD_ENV, build)],
            run_timeout,
            grace: RUN_GRACE,
        },
    )
}
