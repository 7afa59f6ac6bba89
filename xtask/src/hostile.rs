//! `cargo xtask hostile`: the hostile-input suite (`tests/src/bin/hostile.rs`, described in
//! docs/HOSTILE.md). Builds the suite and the gateway binary (debug, as the other tests),
//! makes sure RabbitMQ runs, gives the run a throw-away vhost and runs the suite with the
//! vhost's URL in [`AMQP_URL_ENV`] and the binary's path in [`suite::GATEWAY_BIN_ENV`], bounded in
//! time. The vhost is deleted afterwards, also when the run fails or is killed at its
//! deadline. Part of `ci`.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::suite::{self, Suite};

/// Where the suite finds the broker.
const AMQP_URL_ENV: &str = "NUROPB_HOSTILE_AMQP_URL";
/// The whole run; it takes well under a minute, every row has its own 25 s deadline.
const RUN_TIMEOUT: Duration = Duration::from_secs(4 * 60);
/// After `RUN_TIMEOUT`, how long the suite gets to exit after SIGINT before SIGKILL.
const RUN_GRACE: Duration = Duration::from_secs(5);

pub fn run(root: &Path) -> Result<()> {
    suite::run(
        root,
        &Suite {
            bin: "hostile",
            release: false,
            amqp_url_env: AMQP_URL_ENV,
            env: &[],
            run_timeout: RUN_TIMEOUT,
            grace: RUN_GRACE,
        },
    )
}
