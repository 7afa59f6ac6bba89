//! `cargo xtask install`: the binary installs with `cargo install --path gateway-bin` (into a
//! throw-away root under `target/`), and the systemd unit in `packaging/systemd` is valid
//! (`systemd-analyze verify`) with an exposure score no worse than [`MAX_EXPOSURE`]
//! (`systemd-analyze security --offline`), both pointed at the binary just installed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd::{cargo, display, run as run_cmd};

/// `systemd-analyze security` scores 0 (locked down) to 10 (exposed); below 2 is "OK".
const MAX_EXPOSURE: f64 = 2.0;
const UNIT: &str = "packaging/systemd/nuropb-gateway.service";
const INSTALLED_PATH: &str = "/usr/local/bin/nuropb-gateway";

pub(crate) fn run(root: &Path) -> Result<()> {
    let install_root = root.join("target").join("install-check");
    let _ = std::fs::remove_dir_all(&install_root);
    // `--debug` and the project's target dir: this checks that the package installs, not
    // the release build, and reuses what the other gates built.
    run_cmd(cargo().args(["install", "--locked", "--debug", "--path", "gateway-bin"]).args([
        "--root".as_ref(),
        install_root.as_os_str(),
        "--target-dir".as_ref(),
        root.join("target").as_os_str(),
    ]))?;
    let binary = install_root.join("bin").join("nuropb-gateway");
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.starts_with("nuropb-gateway ") {
        bail!("the installed binary's --version printed {version:?} ({})", out.status);
    }
    eprintln!("installed: {}", version.trim());
    check_unit(root, &binary)
}

fn check_unit(root: &Path, binary: &Path) -> Result<()> {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        bail!("systemd-analyze not found: install Debian's `systemd` package to check {UNIT}");
    }
    let text =
        std::fs::read_to_string(root.join(UNIT)).with_context(|| format!("cannot read {UNIT}"))?;
    if !text.contains(INSTALLED_PATH) {
        bail!("{UNIT}: ExecStart no longer runs {INSTALLED_PATH}; update this check");
    }
    // `verify` checks that ExecStart's program exists, so the copy runs the installed one.
    let dir = root.join("target").join("unit-check");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let unit = dir.join("nuropb-gateway.service");
    let binary = binary.to_str().context("the install path is not UTF-8")?;
    std::fs::write(&unit, text.replace(INSTALLED_PATH, binary))
        .with_context(|| format!("cannot write {}", unit.display()))?;
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify").arg(&unit);
    let out = verify.output().with_context(|| format!("cannot run {}", display(&verify)))?;
    let complaints = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on some warnings; any line it prints about the unit is a finding.
    if !out.status.success() || !complaints.trim().is_empty() {
        bail!("`{}` found problems:\n{complaints}", display(&verify));
    }
    let mut security = Command::new("systemd-analyze");
    // systemd-analyze's own `--offline=true` (read the unit file, ask no running systemd,
    // which a container or CI machine lacks); no cargo command in xtask runs offline.
    security.args(["security", "--offline=true", "--no-pager"]).arg(&unit);
    let out = security.output().with_context(|| format!("cannot run {}", display(&security)))?;
    let report = String::from_utf8_lossy(&out.stdout);
    let score = exposure(&report)
        .with_context(|| format!("no exposure level in `{}`:\n{report}", display(&security)))?;
    if score > MAX_EXPOSURE {
        bail!("{UNIT}: exposure {score} is above {MAX_EXPOSURE}:\n{report}");
    }
    eprintln!("{UNIT}: verified, exposure {score} (at most {MAX_EXPOSURE})");
    Ok(())
}

/// The number in "→ Overall exposure level for x.service: 1.2 OK".
fn exposure(report: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.contains("Overall exposure level"))?;
    let after = line.rsplit_once(": ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::exposure;

    #[test]
    fn reads_the_exposure_level() {
        let report = "✓ UMask= ...\n\n→ Overall exposure level for a.service: 1.2 OK 🙂\n";
        assert_eq!(exposure(report), Some(1.2));
        assert_eq!(exposure("→ Overall exposure level for a.service: 9.6 UNSAFE 😨"), Some(9.6));
        assert_eq!(exposure("no such line"), None);
    }
}
