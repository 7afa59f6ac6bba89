//! Black-box tests of amqp-mesh against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).
//!
//! Own harness (`harness = false`): every run creates one throw-away vhost
//! `nuropb-test-<uuid>` with `rabbitmqctl` (the management API is not enabled on the test
//! broker), runs the scenarios one after another in it (isolated by service names), and
//! deletes it at the end, also after failures. One vhost per run instead of per test,
//! because each `rabbitmqctl` call costs half a second of an Erlang VM start.
//!
//! Arguments follow libtest: substrings select scenarios by name, `--skip`, `--exact` and
//! `--list` work, other options are ignored. A broker that does not answer fails the run; nothing is skipped. Set
//! `RUST_LOG` to see the adapter's logs.

mod fake_service;
mod scenarios;
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::{Ctx, TestVhost, require_broker};

/// No scenario may take longer than this.
const SCENARIO_LIMIT: Duration = Duration::from_secs(30);

/// The libtest command line, as far as it applies: positional filters, `--skip`,
/// `--exact`, `--list`, `--ignored` (there are no ignored scenarios); other options are
/// accepted and ignored, with their values (CI passes `--test-threads 4`).
struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    ignored: bool,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Args {
        const WITH_VALUE: &[&str] = &[
            "--test-threads",
            "--skip",
            "--format",
            "--color",
            "--logfile",
            "-Z",
            "--shuffle-seed",
        ];
        let mut parsed = Args {
            filters: Vec::new(),
            skips: Vec::new(),
            exact: false,
            list: false,
            ignored: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--list" => parsed.list = true,
                "--exact" => parsed.exact = true,
                "--ignored" => parsed.ignored = true,
                "--skip" => parsed.skips.extend(args.next()),
                option if WITH_VALUE.contains(&option) => {
                    args.next();
                }
                option if option.starts_with('-') => {}
                filter => parsed.filters.push(filter.to_owned()),
            }
        }
        parsed
    }

    fn selects(&self, name: &str) -> bool {
        let matches = |pattern: &String| {
            if self.exact { name == pattern } else { name.contains(pattern.as_str()) }
        };
        !self.ignored
            && (self.filters.is_empty() || self.filters.iter().any(matches))
            && !self.skips.iter().any(matches)
    }
}

fn main() -> ExitCode {
    let args = Args::parse(std::env::args().skip(1));
    let selected: Vec<_> = scenarios::ALL.iter().filter(|(name, _)| args.selects(name)).collect();
    if args.list {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if selected.is_empty() {
        println!("\nrunning 0 broker scenarios (none selected)\n");
        return ExitCode::SUCCESS;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .init();
    }

    require_broker();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let vhost = TestVhost::create();
    let ctx = Ctx { vhost: vhost.name.clone(), url: vhost.url() };
    println!("\nrunning {} broker scenarios in vhost {}", selected.len(), vhost.name);

    let selected_count = selected.len();
    let run_started = Instant::now();
    let mut failed = Vec::new();
    for (name, scenario) in selected {
        let started = Instant::now();
        let outcome = runtime.block_on(async {
            let task = tokio::spawn(scenario(ctx.clone()));
            tokio::time::timeout(SCENARIO_LIMIT, task).await
        });
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(Ok(())) => println!("test {name} ... ok ({took:.2}s)"),
            Ok(Err(join_error)) => {
                println!("test {name} ... FAILED ({took:.2}s): {join_error}");
                failed.push(*name);
            }
            Err(_) => {
                println!("test {name} ... FAILED: still running after {SCENARIO_LIMIT:?}");
                failed.push(*name);
            }
        }
    }
    // Close every connection before the vhost goes.
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(vhost);

    // The closing line in libtest's format, so tools that read it count these scenarios.
    let total = run_started.elapsed().as_secs_f64();
    let (ran, bad) = (selected_count, failed.len());
    let status = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {status}. {} passed; {bad} failed; 0 ignored; 0 measured; 0 filtered out; finished in {total:.2}s\n",
        ran - bad
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failed scenarios: {failed:?}");
        ExitCode::FAILURE
    }
}
