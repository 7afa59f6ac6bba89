//! `cargo xtask js`: the TypeScript client library in `clients/js` — `npm ci` (the locked
//! devDependencies into `clients/js/node_modules`), then `npm test` (`tsc` in strict mode,
//! then the `node --test` unit tests against the fake gateway of `clients/js/test/`).
//!
//! Each step is bounded in time. Needs `node` (20 or later) and `npm` on the `PATH`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::broker;

/// `npm ci` with a cold cache downloads a few MB (typescript, ws, the type packages).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Build plus tests (they take well under 20 s when the client behaves).
const TEST_TIMEOUT: Duration = Duration::from_secs(3 * 60);
/// After a deadline, how long npm gets to stop its children after SIGINT.
const GRACE: Duration = Duration::from_secs(10);

pub fn run(root: &Path) -> Result<()> {
    let dir = root.join("clients").join("js");
    if !dir.join("package-lock.json").is_file() {
        bail!("{} has no package-lock.json", dir.display());
    }
    for tool in ["node", "npm"] {
        let found =
            broker::output_bounded(Command::new(tool).arg("--version"), Duration::from_secs(30))
                .with_context(|| {
                    format!(
                        "`{tool}` is needed for the JavaScript client tests and was not found \
                     (install Node.js 20 or later, e.g. `apt-get install nodejs npm`)"
                    )
                })?;
        if !found.status.success() {
            bail!("`{tool} --version` failed with {}", found.status);
        }
        eprintln!("js: {tool} {}", String::from_utf8_lossy(&found.stdout).trim());
    }

    let status = broker::status_bounded(
        npm(&dir).args(["ci", "--no-audit", "--no-fund", "--loglevel=error"]),
        INSTALL_TIMEOUT,
        Some(GRACE),
    )?;
    if !status.success() {
        bail!("`npm ci` in {} failed with {status}", dir.display());
    }
    let status = broker::status_bounded(npm(&dir).arg("test"), TEST_TIMEOUT, Some(GRACE))?;
    if !status.success() {
        bail!("`npm test` in {} failed with {status}", dir.display());
    }
    eprintln!("js: the client library builds and its tests pass");
    Ok(())
}

fn npm(dir: &Path) -> Command {
    let mut cmd = Command::new("npm");
    // Updates checks and funding messages are noise in CI and reach the network.
    cmd.current_dir(dir).env("NPM_CONFIG_UPDATE_NOTIFIER", "false");
    cmd
}
