//! `cargo xtask`: the project's automation. `ci` runs every gate CI runs (format, lints, the
//! layering rules, all tests including integration and interop); `integration`, `interop`
//! and `bench` run one part; `fuzz` runs the fuzz targets for a bounded time.

mod bench;
mod broker;
mod ci;
mod fuzz;
mod interop;
mod layering;
#[cfg(test)]
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root).context("cannot enter the project root")?;
    match args.first().map(String::as_str) {
        Some("ci") => ci::run(&root),
        Some("fmt") => ci::fmt_check(),
        Some("clippy") => ci::clippy(),
        Some("layering") => layering::check(),
        Some("test") => ci::unit_and_e2e_tests(),
        Some("integration") => ci::integration(),
        Some("interop") => interop::run(&root),
        Some("bench") => bench::run(&root),
        Some("fuzz") => fuzz::run(&root, &args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            print_help();
            Ok(())
        }
        Some(other) => {
            print_help();
            bail!("unknown xtask command {other:?}")
        }
    }
}

fn print_help() {
    println!(
        "cargo xtask <command>\n\n\
         ci           every gate: fmt, clippy, layering, unit + e2e tests, integration, interop\n\
         fmt          cargo fmt --check\n\
         clippy       cargo clippy -D warnings\n\
         layering     check the crate graph rules (docs/ARCHITECTURE.md)\n\
         test         unit, golden and end-to-end tests (no broker needed)\n\
         integration  tests against RabbitMQ on 127.0.0.1:5672 (started if absent)\n\
         interop      real Python nuropb 0.1.8 services against the gateway binary\n\
         bench        benchmarks with a printed table\n\
         fuzz         cargo-fuzz targets, bounded: [--seconds N (default 10)] [target ...]"
    );
}

/// The workspace root (the parent of `xtask/`).
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, echoing it, and fails if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}
