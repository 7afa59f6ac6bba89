//! `cargo xtask js`: the TypeScript client library in `clients/js` — `npm ci` (the locked
//! devDependencies into `clients/js/node_modules`), then `npm test` (`tsc` in strict mode,
//! then the `node --test` unit tests against the fake gateway of `clients/js/test/`), then a
//! check that the committed build `clients/js/dist/nuropb-gateway.js` (which the gateway
//! serves in demo mode, so that it needs no npm) is what the build just wrote; last, the
//! library against the real gateway binary in demo mode (`test/real-gateway.test.mjs`, both
//! auth routes, calls, events, refresh, a refused token), on Node's WHATWG WebSocket.
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
    let built = dir.join(COMMITTED_BUILD);
    let committed = std::fs::read(&built)
        .with_context(|| format!("cannot read the committed build {}", built.display()))?;
    // `npm test` builds first (`npm run build`), over the committed file.
    let status = broker::status_bounded(npm(&dir).arg("test"), TEST_TIMEOUT, Some(GRACE))?;
    if !status.success() {
        bail!("`npm test` in {} failed with {status}", dir.display());
    }
    let fresh =
        std::fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    check_fresh(&committed, &fresh)?;

    let bin = crate::suite::build_gateway(root, false)?;
    let status = broker::status_bounded(
        Command::new("node")
            .args(["--experimental-websocket", "--no-warnings=ExperimentalWarning", "--test"])
            .args(["--test-timeout=30000", "test/real-gateway.test.mjs"])
            .current_dir(&dir)
            .env("NUROPB_GATEWAY_BIN", &bin),
        TEST_TIMEOUT,
        Some(GRACE),
    )?;
    if !status.success() {
        bail!("the client library against {} failed with {status}", bin.display());
    }
    eprintln!(
        "js: the client library builds, its tests pass, the committed build is fresh, and it \
         works against the real gateway"
    );
    Ok(())
}

/// The build the gateway includes (`gateway-bin/src/demo.rs`), relative to `clients/js`.
const COMMITTED_BUILD: &str = "dist/nuropb-gateway.js";

fn check_fresh(committed: &[u8], fresh: &[u8]) -> Result<()> {
    if committed != fresh {
        bail!(
            "clients/js/{COMMITTED_BUILD} differs from a fresh `npm run build`: the gateway \
             would serve a stale library. The fresh build is now in the working tree; commit it."
        );
    }
    Ok(())
}

fn npm(dir: &Path) -> Command {
    let mut cmd = Command::new("npm");
    // Updates checks and funding messages are noise in CI and reach the network.
    cmd.current_dir(dir).env("NPM_CONFIG_UPDATE_NOTIFIER", "false");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_build_fails() {
        assert!(check_fresh(b"export {};\n", b"export {};\n").is_ok());
        let stale = check_fresh(b"export {};\n", b"export const a = 1;\n").unwrap_err();
        assert!(stale.to_string().contains("commit it"), "{stale}");
    }
}
