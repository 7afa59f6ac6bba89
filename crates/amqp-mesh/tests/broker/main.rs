//! Black-box tests of amqp-mesh against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).
//!
//! Own harness (`harness = false`): every run creates one throw-away vhost
//! `nuropb-test-<uuid>` with `rabbitmqctl` (the management API is not enabled on the test
//! broker), runs the scenarios one after another in it (isolated by service names), and
//! deletes it at the end, also after failures. One vhost per run instead of per test,
//! because each `rabbitmqctl` call costs half a second of an Erlang VM start.
//!
//! Arguments: substrings select scenarios by name; `--list` lists them; other flags are
//! ignored. A broker that does not answer fails the run; nothing is skipped. Set
//! `RUST_LOG` to see the adapter's logs.

mod fake_service;
mod scenarios;
mod support;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use support::{Ctx, TestVhost, require_broker};

/// No scenario may take longer than this.
const SCENARIO_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&str> = args.iter().filter(|a| !a.starts_with('-')).map(String::as_str).collect();
    let selected: Vec<_> = scenarios::ALL
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f)))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if selected.is_empty() {
        println!("no broker scenario matches {filters:?}");
        return ExitCode::SUCCESS;
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().init();
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

    let total = run_started.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!("\ntest result: ok. broker scenarios passed in {total:.2}s\n");
        ExitCode::SUCCESS
    } else {
        println!("\ntest result: FAILED. {} failed: {failed:?} ({total:.2}s)\n", failed.len());
        ExitCode::FAILURE
    }
}
