//! `cargo xtask browser`: the demo page in real headless Chromium. Makes sure Debian's
//! `chromium` is installed (`apt-get install` when `/usr/bin/chromium` is missing), `npm ci`
//! in `clients/browser-tests` (`playwright-core` only, pinned, with no browser download),
//! builds the gateway binary, and runs `test/demo-page.test.mjs` with `node --test`: both
//! browser-safe auth routes, calls, events, refresh, a refused token's reason, a gateway
//! restart, a page on another origin. The screenshot lands in `target/browser/demo.png`.
//!
//! Each step is bounded in time. Needs `node` and `npm` (as `cargo xtask js` does) and, on
//! a machine without Chromium, root and apt.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::broker;

/// Where playwright-core is told to find the browser (the Debian package's launcher).
const CHROMIUM: &str = "/usr/bin/chromium";
/// Downloading and unpacking chromium and its libraries (~100 MB) on a slow mirror.
const APT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// `npm ci` with a cold cache: playwright-core is one package of a few MB.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The whole browser suite (about half a minute when the page behaves).
const TEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// After a deadline, how long a child gets to stop its own children after SIGINT.
const GRACE: Duration = Duration::from_secs(10);

pub fn run(root: &Path) -> Result<()> {
    ensure_chromium()?;
    let dir = root.join("clients").join("browser-tests");
    if !dir.join("package-lock.json").is_file() {
        bail!("{} has no package-lock.json", dir.display());
    }
    let status = broker::status_bounded(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .env("NPM_CONFIG_UPDATE_NOTIFIER", "false")
            // The browser is Debian's; playwright-core must not fetch its own.
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"),
        INSTALL_TIMEOUT,
        Some(GRACE),
    )?;
    if !status.success() {
        bail!("`npm ci` in {} failed with {status}", dir.display());
    }

    let target = crate::suite::target_dir(root);
    let bin = crate::suite::build_gateway(root, false)?;
    let artifacts = target.join("browser");
    let status = broker::status_bounded(
        Command::new("node")
            .args(["--test", "--test-timeout=120000", "test/demo-page.test.mjs"])
            .current_dir(&dir)
            .env("NUROPB_GATEWAY_BIN", &bin)
            .env("NUROPB_BROWSER_ARTIFACTS", &artifacts)
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"),
        TEST_TIMEOUT,
        Some(GRACE),
    )?;
    if !status.success() {
        bail!("the demo page in Chromium against {} failed with {status}", bin.display());
    }
    eprintln!(
        "browser: the demo page works in headless Chromium; screenshot {}",
        artifacts.join("demo.png").display()
    );
    Ok(())
}

/// Installs Debian's `chromium` unless `/usr/bin/chromium` is there.
fn ensure_chromium() -> Result<()> {
    if Path::new(CHROMIUM).is_file() {
        return report_version();
    }
    eprintln!("browser: {CHROMIUM} is missing; installing Debian's chromium");
    if !is_root()? {
        bail!(
            "{CHROMIUM} is missing and installing it needs root: run \
             `apt-get install --no-install-recommends chromium` as root, then try again"
        );
    }
    if broker::output_bounded(Command::new("apt-get").arg("--version"), Duration::from_secs(30))
        .is_err()
    {
        bail!(
            "{CHROMIUM} is missing and there is no apt-get to install it: install Chromium there"
        );
    }
    if !apt_install()? {
        // A fresh image often has no package lists yet.
        let status =
            broker::status_bounded(apt().args(["update", "-q"]), APT_TIMEOUT, Some(GRACE))?;
        if !status.success() {
            bail!("`apt-get update` failed with {status}");
        }
        if !apt_install()? {
            bail!("`apt-get install chromium` failed (after `apt-get update`)");
        }
    }
    if !Path::new(CHROMIUM).is_file() {
        bail!("chromium is installed but {CHROMIUM} is still missing");
    }
    report_version()
}

fn apt_install() -> Result<bool> {
    let status = broker::status_bounded(
        apt().args(["install", "-y", "-q", "--no-install-recommends", "chromium"]),
        APT_TIMEOUT,
        Some(GRACE),
    )?;
    Ok(status.success())
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    // No questions (tzdata and friends) on a machine with no terminal.
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn is_root() -> Result<bool> {
    let id = broker::output_bounded(Command::new("id").arg("-u"), Duration::from_secs(30))
        .context("cannot run `id -u`")?;
    Ok(String::from_utf8_lossy(&id.stdout).trim() == "0")
}

fn report_version() -> Result<()> {
    let out =
        broker::output_bounded(Command::new(CHROMIUM).arg("--version"), Duration::from_secs(60))
            .with_context(|| format!("cannot run `{CHROMIUM} --version`"))?;
    if !out.status.success() {
        bail!("`{CHROMIUM} --version` failed with {}", out.status);
    }
    eprintln!("browser: {}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}
