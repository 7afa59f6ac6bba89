//! The CI gates. `run` is what `.ci/run` executes on a clean clone.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, run as run_cmd};

/// Every gate, in order of cost.
pub fn run(root: &Path) -> Result<()> {
    fmt_check()?;
    layering()?;
    clippy()?;
    unit_and_e2e_tests()?;
    integration()?;
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

/// Tests against the real RabbitMQ (the `amqp-mesh` crate's tests).
pub fn integration() -> Result<()> {
    crate::broker::ensure_running()?;
    run_cmd(cargo().args(["test", "-p", "amqp-mesh", "--", "--test-threads", "4"]))
}

/// The crate graph rules of docs/ARCHITECTURE.md: (crate, dependency it must never have).
const FORBIDDEN: &[(&str, &str)] = &[
    ("nuropb-wire", "tokio"),
    ("nuropb-wire", "lapin"),
    ("nuropb-wire", "tokio-tungstenite"),
    ("nuropb-wire", "handler-core"),
    ("mesh-crypto", "tokio"),
    ("mesh-crypto", "lapin"),
    ("handler-core", "lapin"),
    ("handler-core", "tokio-tungstenite"),
    ("handler-core", "tungstenite"),
    ("handler-core", "amqp-mesh"),
    ("handler-core", "ws-adapter"),
    ("ws-adapter", "lapin"),
    ("ws-adapter", "amqp-mesh"),
    ("amqp-mesh", "tokio-tungstenite"),
    ("amqp-mesh", "tungstenite"),
    ("amqp-mesh", "ws-adapter"),
    ("ops-http", "lapin"),
    ("ops-http", "tokio-tungstenite"),
    ("ops-http", "tungstenite"),
    ("ops-http", "amqp-mesh"),
    ("ops-http", "handler-core"),
    ("ops-http", "ws-adapter"),
];

/// Checks that no crate depends (normally, transitively) on what it must not.
pub fn layering() -> Result<()> {
    let mut violations = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(["tree", "-p", krate, "-e", "normal", "-i", forbidden, "--offline"])
            .output()
            .context("cannot run cargo tree")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // `cargo tree -i X` prints nothing useful about absence through its exit code alone:
        // when X is not in the graph it says "did not match any packages" (or prints an
        // empty tree). Anything else listing X means the rule is broken.
        let absent = stderr.contains("did not match any packages")
            || stderr.contains("nothing to print")
            || (out.status.success() && stdout.trim().is_empty());
        if !absent {
            if !out.status.success() {
                bail!("cargo tree failed for {krate} / {forbidden}: {stderr}");
            }
            violations.push(format!("{krate} depends on {forbidden}:\n{stdout}"));
        }
    }
    if !violations.is_empty() {
        bail!("layering violations:\n{}", violations.join("\n"));
    }
    eprintln!("layering: {} rules hold", FORBIDDEN.len());
    Ok(())
}
