//! `cargo xtask`: the project's automation. `ci` runs every gate CI runs (format, lints, the
//! layering rules, docs, all tests including the JS client and the demo page in Chromium,
//! integration, the hostile-input suite, the chaos suite's short form, the 3-node cluster
//! suite, the examples, the packaging dry run, the install check and interop);
//! `integration`, `hostile`, `chaos`, `cluster`, `interop`, `js`, `browser`, `examples`,
//! `doc`, `package`, `install` and `bench` run one part; `fuzz` runs the fuzz
//! targets for a bounded time.

mod bench;
mod broker;
mod browser;
mod chaos;
mod ci;
mod cluster;
mod cmd;
mod config_doc;
mod examples;
mod fuzz;
mod hostile;
mod install;
mod interop;
mod js;
mod layering;
mod suite;
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
        Some("hostile") => hostile::run(&root),
        Some("interop") => interop::run(&root),
        Some("js") => js::run(&root),
        Some("browser") => browser::run(&root),
        Some("examples") => examples::run(),
        Some("doc") => ci::doc(),
        Some("package") => ci::package(&root),
        Some("config-doc") => config_doc::run(&root),
        Some("install") => install::run(&root),
        Some("bench") => bench::run(&root),
        Some("chaos") => chaos::run(&root, &args[1..]),
        Some("cluster") => cluster::run(&root),
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
         ci           every gate: fmt, layering, clippy, doc, tests, js, browser, integration, hostile, chaos --short, cluster, examples, package, install, interop\n\
         fmt          cargo fmt --check\n\
         clippy       cargo clippy -D warnings\n\
         layering     check the crate graph rules (docs/ARCHITECTURE.md)\n\
         test         unit, golden and end-to-end tests (no broker needed)\n\
         integration  tests against RabbitMQ on 127.0.0.1:5672 (started if absent)\n\
         hostile      the hostile-input suite against the gateway binary on RabbitMQ (docs/HOSTILE.md)\n\
         interop      real Python nuropb 0.1.8 services against the gateway binary\n\
         js           the TypeScript client (clients/js): npm ci, tsc, node --test\n\
         browser      the demo page in headless Chromium (clients/browser-tests; installs chromium)\n\
         examples     build and run the worked examples (examples/; RabbitMQ for mesh_peer)\n\
         doc          cargo doc --workspace with RUSTDOCFLAGS=-D warnings\n\
         package      cargo package every library crate (the publish dry run)\n\
         config-doc   regenerate docs/CONFIGURATION.md from the gateway's options\n\
         install      cargo install the binary; systemd-analyze verify/security on packaging/systemd\n\
         bench        benchmarks with a printed table\n\
         chaos        faults under load, a table per scenario: [--short] (the CI form, ~2 min)
         cluster      the gateway on a 3-node RabbitMQ cluster of its own: failover under load (~2 min)\n\
         fuzz         cargo-fuzz targets, bounded: [--seconds N (default 10)] [--runs N] [target ...]"
    );
}
