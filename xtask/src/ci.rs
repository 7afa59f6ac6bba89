//! The CI gates. `run` is what `.ci/run` executes on a clean clone.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, run as run_cmd};

/// Every gate, in order of cost.
pub fn run(root: &Path) -> Result<()> {
    fmt_check()?;
    crate::layering::check()?;
    clippy()?;
    doc()?;
    unit_and_e2e_tests()?;
    crate::js::run(root)?;
    crate::browser::run(root)?;
    integration()?;
    crate::hostile::run(root)?;
    // The chaos suite's short form: the gateway binary under broker, service and client
    // faults (docs/CHAOS.md).
    crate::chaos::run(root, &["--short".to_owned()])?;
    // The gateway on a 3-node RabbitMQ cluster: failover under load, start without a
    // broker (docs/OPERATIONS.md, `## RabbitMQ cluster`).
    crate::cluster::run(root)?;
    crate::examples::run()?;
    package(root)?;
    crate::install::run(root)?;
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

/// `cargo doc --workspace --no-deps`, with rustdoc warnings (broken or private intra-doc
/// links, bad HTML, bad code blocks) as errors. `missing_docs` is a compiler lint, which
/// clippy's `-D warnings` denies. Doc tests run with the unit and integration tests.
pub fn doc() -> Result<()> {
    run_cmd(
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
}

/// The library crates, each packaged as `cargo publish` would upload it.
pub const LIBRARY_CRATES: [&str; 7] = [
    "nuropb-wire",
    "handler-core",
    "ws-adapter",
    "amqp-mesh",
    "mesh-crypto",
    "ops-http",
    "nuropb-testkit",
];

/// `cargo package` for every library crate: the manifest metadata is complete, the files
/// are in the package, and each package builds on its own from its `.crate` file, against
/// the other library crates packaged alongside (cargo's local-registry overlay) and every
/// third-party dependency from crates.io. The publish dry run, without the upload.
///
/// The crates say `publish = false` until the project decides to publish, and with that
/// cargo (1.95) leaves them out of the overlay: `handler-core` then looks for
/// `nuropb-wire` on crates.io and packaging fails (so does `cargo publish --dry-run`,
/// which refuses such crates outright). So the check packages a copy of the tree (tracked
/// and untracked-but-not-ignored files) in which only those `publish` lines say `true`.
pub fn package(root: &Path) -> Result<()> {
    let copy = root.join("target").join("package-check");
    if copy.exists() {
        std::fs::remove_dir_all(&copy)
            .with_context(|| format!("cannot clear {}", copy.display()))?;
    }
    let listed = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(root)
        .output()
        .context("cannot run git ls-files")?;
    if !listed.status.success() {
        bail!("git ls-files failed: {}", String::from_utf8_lossy(&listed.stderr));
    }
    for name in listed.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(name).context("a file name that is not UTF-8")?;
        let from = root.join(name);
        // Listed but deleted in the working tree: not part of what is packaged.
        if !from.is_file() {
            continue;
        }
        let to = copy.join(name);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::copy(&from, &to).with_context(|| format!("cannot copy {name}"))?;
    }
    for manifest in ["Cargo.toml", "crates/testkit/Cargo.toml"] {
        let path = copy.join(manifest);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {manifest}"))?;
        if text.matches("\npublish = false\n").count() != 1 {
            bail!("{manifest}: expected one `publish = false` line to lift for packaging");
        }
        std::fs::write(&path, text.replace("\npublish = false\n", "\npublish = true\n"))
            .with_context(|| format!("cannot write {manifest}"))?;
    }
    let mut cmd = cargo();
    // `--locked`: the packages resolve to the versions of the committed Cargo.lock.
    // `--allow-dirty`: the copy lies in the checkout's ignored `target/`, so to git every
    // file of it is untracked.
    cmd.args(["package", "--locked", "--allow-dirty"]).current_dir(&copy);
    // A build cache of its own, new each run: cargo takes registry packages for immutable,
    // so a packaged `nuropb-wire 0.1.0` verified earlier would be reused although its source
    // changed since (handler-core then fails against yesterday's wire crate).
    cmd.env("CARGO_TARGET_DIR", copy.join("target"));
    for name in LIBRARY_CRATES {
        cmd.args(["-p", name]);
    }
    run_cmd(&mut cmd)
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
