//! `cargo xtask bench`: builds the benchmark and the gateway binary (release), makes sure
//! RabbitMQ runs, gives the run a throw-away vhost and runs `tests/src/bin/bench.rs` with
//! the vhost's URL in [`AMQP_URL_ENV`] and the binary's path in [`suite::GATEWAY_BIN_ENV`]. The
//! vhost is deleted afterwards, also when the run fails or is killed at its deadline. Not
//! part of `ci`: timings on a shared machine are not a gate. docs/BENCHMARKS.md says how to
//! read the tables.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::suite::{self, Suite};

/// Where the benchmark binary finds the broker.
const AMQP_URL_ENV: &str = "NUROPB_BENCH_AMQP_URL";
/// The whole run; every scenario stops at its own 30 s deadlines, so this is only a backstop.
const RUN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// After `RUN_TIMEOUT`, how long the benchmark gets to exit after SIGINT before SIGKILL.
const RUN_GRACE: Duration = Duration::from_secs(5);

pub fn run(root: &Path) -> Result<()> {
    suite::run(
        root,
        &Suite {
            bin: "bench",
            release: true,
            amqp_url_env: AMQP_URL_ENV,
            env: &[],
            run_timeout: RUN_TIMEOUT,
            grace: RUN_GRACE,
        },
    )
}
