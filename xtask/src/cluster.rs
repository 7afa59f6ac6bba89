//! `cargo xtask cluster`: builds the cluster suite and the gateway binary (debug) and runs
//! `tests/src/bin/cluster.rs` under a deadline. The suite starts a 3-node RabbitMQ cluster
//! of its own on loopback (the shared broker is not used, nor stopped) and removes it on
//! the way out; docs/OPERATIONS.md (`## RabbitMQ cluster`) says what it proves.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::suite::{self, Suite};

/// About two minutes on 2 busy cores (three node boots in parallel, a join per node, a
/// node stop and a restart, about 15 s of load); the suite bounds itself at four, so this
/// is a backstop.
const RUN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// After the deadline, how long the suite gets to exit after SIGINT before SIGKILL (it
/// kills its gateways and its nodes on the way out).
const RUN_GRACE: Duration = Duration::from_secs(15);

pub fn run(root: &Path) -> Result<()> {
    suite::run_on_own_nodes(
        root,
        &Suite {
            bin: "cluster",
            release: false,
            // The suite makes its vhost on its own cluster.
            amqp_url_env: "NUROPB_CLUSTER_AMQP_URL",
            env: &[],
            run_timeout: RUN_TIMEOUT,
            grace: RUN_GRACE,
        },
    )
}
