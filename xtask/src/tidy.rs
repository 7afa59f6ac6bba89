//! House rules as tests (rust-analyzer's `tidy.rs`): checks on the repository's files that
//! `cargo xtask ci` runs with the other unit tests.

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use std::path::PathBuf;
use std::process::Command;

/// Every file of the checkout that git would commit: tracked, plus untracked but not
/// ignored (so a new file is checked before it is added).
fn repository_files() -> Vec<PathBuf> {
    let root = crate::cmd::project_root();
    let out = Command::new("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(&root)
        .output()
        .expect("git ls-files runs");
    assert!(out.status.success(), "git ls-files failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| root.join(String::from_utf8_lossy(name).as_ref()))
        .filter(|path| path.is_file())
        .collect()
}

/// A clone holds everything its tests and docs need: nothing may read or point at the
/// reference folder that sat beside the first checkouts (`<parent>/shared`), which a
/// clone from a forge does not have.
#[test]
fn no_file_refers_outside_the_repository() {
    // Spelled in pieces so this file does not match itself.
    let needles = [concat!("..", "/shared"), concat!("shared", "/spec")];
    let mut offenders = Vec::new();
    let files = repository_files();
    assert!(files.len() > 50, "git listed only {} files", files.len());
    for path in files {
        let Ok(text) = std::fs::read(&path) else { continue };
        let text = String::from_utf8_lossy(&text);
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle)) {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "files refer outside the repository:\n{}", offenders.join("\n"));
}

/// The captured vectors the golden and crypto tests read are part of the repository.
#[test]
fn the_spec_and_its_vectors_are_in_the_repository() {
    let root = crate::cmd::project_root();
    for file in [
        "docs/NUROPB-WIRE.md",
        "spec/vectors/vectors.json",
        "spec/vectors/ws_transcript.jsonl",
        "spec/vectors/service_private_key.pem",
    ] {
        assert!(root.join(file).is_file(), "{file} is missing");
    }
}
