//! `cargo xtask examples`: builds and runs the worked examples of the
//! `nuropb-gateway-examples` package (examples/). Each example asserts its own result and
//! exits non-zero on failure, within its own 30 s bound; `mesh_peer` gets a throw-away
//! RabbitMQ vhost, as the integration tests do.

use anyhow::Result;

use crate::cmd::{cargo, run as run_cmd};

/// The package and its examples, in the order they are run.
pub const PACKAGE: &str = "nuropb-gateway-examples";
const EXAMPLES: [&str; 3] = ["embed", "your_own_mesh", "mesh_peer"];

/// Where `mesh_peer` finds its vhost (the example's `URL_ENV`).
const AMQP_URL_ENV: &str = "NUROPB_EXAMPLE_AMQP_URL";

/// Builds all examples once, then runs each.
pub fn run() -> Result<()> {
    run_cmd(cargo().args(["build", "-p", PACKAGE, "--examples"]))?;
    crate::broker::ensure_running()?;
    // Deleted when this returns, also when an example fails.
    let vhost = crate::broker::TempVhost::create("examples")?;
    for example in EXAMPLES {
        run_cmd(
            cargo()
                .args(["run", "--quiet", "-p", PACKAGE, "--example", example])
                .env(AMQP_URL_ENV, vhost.amqp_url()),
        )?;
    }
    Ok(())
}
