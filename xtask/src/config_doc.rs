//! `cargo xtask config-doc`: rewrites docs/CONFIGURATION.md from the gateway's options
//! (the hidden `nuropb-gateway config-doc`). A unit test of the gateway fails while the
//! committed file differs, so run this after adding or changing an option and commit it.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::cmd;

pub(crate) fn run(root: &Path) -> Result<()> {
    let mut command = cmd::cargo();
    command.args(["run", "--quiet", "--package", "nuropb-gateway", "--", "config-doc"]);
    eprintln!("$ {}", cmd::display(&command));
    let output = command.output().context("cannot run the gateway's config-doc")?;
    if !output.status.success() {
        bail!(
            "`{}` failed with {}: {}",
            cmd::display(&command),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = root.join("docs/CONFIGURATION.md");
    std::fs::write(&path, &output.stdout)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
