//! `cargo xtask interop`: real Python nuropb 0.1.8 services against the gateway binary.
//! Implementation pending.

use std::path::Path;

use anyhow::Result;

pub fn run(_root: &Path) -> Result<()> {
    crate::broker::ensure_running()
}
