//! `cargo xtask`: the project's automation. `ci` runs every gate CI runs (format, lints, the
//! layering rules, all tests including integration and interop); `integration`, `interop`,
//! `bench` and `chaos` run one part; `fuzz` runs the fuzz targets for a bounded time.

mod bench;
mod broker;
mod chaos;
mod ci;
mod cmd;
mod fuzz;
mod interop;
mod layering;
#[cfg(test)]
mod tidy;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = cmd::project_root();
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
        Some("chaos") => chaos::run(&root, &args[1..]),
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
         chaos        faults under load, a table per scenario: [--short] (the CI form, ~2 min)\n\
         fuzz         cargo-fuzz targets, bounded: [--seconds N (default 10)] [target ...]"
    );
}
