//! The request scenarios: a broker node stopped and started, and killed with `kill -9`,
//! under load (on a node of the suite's own); a black-holed broker link; a service killed
//! mid-load; SIGTERM with slow requests in flight; connection churn; a short soak.

use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, sleep};

use super::client::{self, Entry, Ledger, Load, LoadSpec};
use super::report::{Table, mib, secs};
use super::{Settings, deadline, gateway, ops, relay};
use nuropb_testkit::broker::HalfOpenProxy;
use nuropb_testkit::node::RabbitNode;
use nuropb_testkit::{FakeService, ServiceOptions};

/// The shared broker, as the vhost URLs name it.
const SHARED_BROKER: &str = "127.0.0.1:5672";
/// How long a started gateway may take to be ready.
const READY_WAIT: Duration = Duration::from_secs(20);
/// A link that closes (broker stopped or killed: the kernel sends FIN or RST) must show as
/// unready within this.
const CLOSED_LINK_BOUND: Duration = Duration::from_secs(2);
/// After the broker accepts again, the gateway must be ready and answering within this:
/// reconnect attempts are at most 1 s apart, a reconnect declares its queues (< 1 s), the
/// rest is slack for a loaded 2-core machine.
const RECONNECT_BOUND: Duration = Duration::from_secs(5);
/// Slack on the dead-link bound (2.5 heartbeats) for the 50 ms readiness poll and a
/// loaded machine.
const DEAD_LINK_SLACK: Duration = Duration::from_millis(1500);
/// A restarted service consumes at once; the first success after its restart must come
/// within this.
const SERVICE_RECOVERY_BOUND: Duration = Duration::from_secs(3);
/// How long each slow request of the SIGTERM scenario takes at the service.
const SLOW_MS: u64 = 1500;
/// After SIGTERM the gateway must exit within the slowest request or the lame-duck window
/// (whichever is longer) plus this.
const EXIT_SLACK: Duration = Duration::from_secs(3);
/// The SIGTERM scenario's lame-duck window: its sessions are closed over this (the
/// default, the whole drain timeout, would make the scenario wait 10 s for nothing).
const LAME_DUCK_SECS: u64 = 3;
/// RSS after churn may exceed RSS before by at most this (allocator slack, not per-session
/// state: thousands of sessions came and went).
const CHURN_RSS_BOUND: u64 = 16 << 20;
/// RSS drift over the soak's measured part.
const SOAK_DRIFT_BOUND: u64 = 8 << 20;

fn echo(service: &str, s: &Settings) -> LoadSpec {
    LoadSpec {
        service: service.to_owned(),
        method: "echo".to_owned(),
        params: json!({"text": "chaos"}),
        rate: s.rate,
        max_in_flight: 32,
    }
}

fn service_options() -> ServiceOptions<'static> {
    ServiceOptions { prefetch: 512, ..ServiceOptions::bench() }
}

fn setup(s: &Settings, what: &str) -> String {
    format!("{} sessions × {} req/s each; {what}.", s.sessions, s.rate)
}

/// Fills a table's counts from a ledger and makes the standard claims.
fn judge(t: &mut Table, ledger: &Ledger) {
    t.counts = ledger.counts(deadline());
    t.check_answers(ledger.untraced_errors, ledger.unknown_answers);
}

/// Scenarios 1 and 2 on one node of our own (its boot is the costliest step): stop/start,
/// then `kill -9` and start, each under load.
pub async fn own_node(s: &Settings, stop: bool, kill: bool) -> Vec<Table> {
    let mut node = tokio::task::block_in_place(|| RabbitNode::start("chaos"));
    let mut tables = Vec::new();
    if stop {
        tables.push(node_fault(s, &mut node, false).await);
    }
    if kill {
        tables.push(node_fault(s, &mut node, true).await);
    }
    tables
}

async fn node_fault(s: &Settings, node: &mut RabbitNode, kill: bool) -> Table {
    const SVC: &str = "chaos-node-svc";
    let (name, what) = if kill {
        ("2. broker node killed (kill -9) under load", "kill -9 of the node's Erlang VM")
    } else {
        ("1. broker node stopped and started under load", "rabbitmqctl stop")
    };
    let mut t = Table::new(
        name,
        setup(
            s,
            &format!(
                "{what}, {:?} down, then started again; the service reconnects after it",
                s.outage
            ),
        ),
    );
    let url = node.amqp_url();
    let service = FakeService::start_opts(&url, SVC, service_options()).await;
    let gw = gateway(&url, "chaos-gw-node", &[]);
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready before the fault", secs(ready), ready.is_some());
    let sessions = client::connect_many(&gw.url, s.sessions, 32).await;
    let load = Load::start(sessions, &echo(SVC, s), deadline());
    sleep(s.warm).await;
    t.rss_before = gw.rss_bytes();

    // Polled from the moment of the fault, while the node goes down.
    let watch = {
        let ops_addr = ops_addr.clone();
        tokio::spawn(async move { ops::wait_ready(&ops_addr, 503, Duration::from_secs(40)).await })
    };
    let fault = Instant::now();
    tokio::task::block_in_place(|| if kill { node.kill9() } else { node.stop() });
    let down_took = fault.elapsed();
    // The old service's connection died with the node; stopping it only ends its tasks.
    tokio::spawn(service.stop());
    let unready = watch.await.expect("the readiness watch");
    let bound = down_took + CLOSED_LINK_BOUND;
    t.check(
        format!("/readyz 503 within the node's way down + {CLOSED_LINK_BOUND:?} = {bound:.1?}"),
        secs(unready),
        unready.is_some_and(|d| d <= bound),
    );
    let outage_left = s.outage.saturating_sub(fault.elapsed());
    sleep(outage_left).await;

    tokio::task::block_in_place(|| node.restart());
    let healed = Instant::now();
    let service = FakeService::start_opts(&url, SVC, service_options()).await;
    let ready_again = ops::wait_ready(&ops_addr, 200, RECONNECT_BOUND * 3).await;
    t.check(
        format!("/readyz 200 within {RECONNECT_BOUND:?} of the node accepting again"),
        secs(ready_again),
        ready_again.is_some_and(|d| d <= RECONNECT_BOUND),
    );
    sleep(s.after).await;
    let ledger = load.finish().await;
    t.rss_after = gw.rss_bytes();
    judge(&mut t, &ledger);
    t.recovery = ledger.first_success_after(healed);
    t.check(
        format!("first success within {RECONNECT_BOUND:?} of the node accepting again"),
        secs(t.recovery),
        t.recovery.is_some_and(|d| d <= RECONNECT_BOUND),
    );
    t.check(
        "no WebSocket session closed by the broker's loss",
        format!("{} (close codes {:?})", ledger.sessions_ended_early, ledger.close_codes),
        ledger.sessions_ended_early == 0,
    );
    t.note("the node's way down (stop or kill until its port is closed)", secs(Some(down_took)));
    t.note("successes after the restart", ledger.successes_after(healed).to_string());
    service.stop().await;
    gw.stop();
    t
}

/// Scenario 3: the gateway's broker link black-holed (no FIN, no RST, nothing passes).
pub async fn black_hole(s: &Settings, url: &str) -> Table {
    const SVC: &str = "chaos-bh-svc";
    let hb = s.heartbeat_secs();
    let bound = Duration::from_millis(hb * 2500) + DEAD_LINK_SLACK;
    let mut t = Table::new(
        "3. black-holed broker link (TCP proxy) under load",
        setup(
            s,
            &format!(
                "the gateway's AMQP connection runs through a proxy that black-holes it; \
                 heartbeat {hb} s{}; the proxy passes new connections (the heal)",
                if s.heartbeat.is_some() { " (?heartbeat= in the URL)" } else { " (default)" }
            ),
        ),
    );
    let proxy = HalfOpenProxy::start().await;
    let mut gw_url = proxy.url(url);
    if let Some(hb) = s.heartbeat {
        gw_url.push_str(&format!("?heartbeat={hb}"));
    }
    let service = FakeService::start_opts(url, SVC, service_options()).await;
    let gw = gateway(&gw_url, "chaos-gw-bh", &[]);
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready before the fault", secs(ready), ready.is_some());
    let sessions = client::connect_many(&gw.url, s.sessions, 32).await;
    let load = Load::start(sessions, &echo(SVC, s), deadline());
    sleep(s.warm).await;
    t.rss_before = gw.rss_bytes();

    proxy.black_hole();
    let holed = Instant::now();
    let unready = ops::wait_ready(&ops_addr, 503, bound + Duration::from_secs(10)).await;
    t.check(
        format!("/readyz 503 within 2.5 × heartbeat + {DEAD_LINK_SLACK:?} = {bound:?}"),
        secs(unready),
        unready.is_some_and(|d| d <= bound),
    );
    let back = ops::wait_ready(&ops_addr, 200, RECONNECT_BOUND * 3).await;
    t.check(
        format!("/readyz 200 again within {RECONNECT_BOUND:?} of being unready"),
        secs(back),
        back.is_some_and(|d| d <= RECONNECT_BOUND),
    );
    let healed = Instant::now();
    sleep(s.after).await;
    let ledger = load.finish().await;
    t.rss_after = gw.rss_bytes();
    judge(&mut t, &ledger);
    // Recovery here: from the black hole to ready again (detection + reconnect).
    t.recovery = Some(healed - holed);
    let after = ledger.successes_after(healed);
    t.check("successes after the reconnect", after.to_string(), after > 0);
    t.check(
        "no WebSocket session closed by the broker's loss",
        format!("{} (close codes {:?})", ledger.sessions_ended_early, ledger.close_codes),
        ledger.sessions_ended_early == 0,
    );
    t.note("connections held open by the black hole", proxy.held().to_string());
    service.stop().await;
    gw.stop();
    t
}

/// Scenario 4: the service's connection dropped mid-load (as when its process is killed),
/// the service started again after the outage.
pub async fn service_killed(s: &Settings, url: &str) -> Table {
    const SVC: &str = "chaos-kill-svc";
    let mut t = Table::new(
        "4. service killed mid-load",
        setup(
            s,
            &format!(
                "`slow` (100 ms) calls; the service's AMQP connection is cut (both sides \
                 closed, as a killed process's), {:?} later a new service instance starts",
                s.outage
            ),
        ),
    );
    let relay = relay::Relay::start(SHARED_BROKER).await;
    let svc_url = url.replace(SHARED_BROKER, &format!("127.0.0.1:{}", relay.port));
    let service = FakeService::start_opts(&svc_url, SVC, service_options()).await;
    let gw = gateway(url, "chaos-gw-kill", &[]);
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready before the fault", secs(ready), ready.is_some());
    let sessions = client::connect_many(&gw.url, s.sessions, 32).await;
    let spec = LoadSpec { method: "slow".to_owned(), params: json!({"ms": 100}), ..echo(SVC, s) };
    let load = Load::start(sessions, &spec, deadline());
    sleep(s.warm).await;
    t.rss_before = gw.rss_bytes();

    relay.cut();
    // Its tasks fail on the dead connection; stopping it only ends them.
    tokio::spawn(service.stop());
    sleep(s.outage).await;
    let restarted = Instant::now();
    let service = FakeService::start_opts(url, SVC, service_options()).await;
    sleep(s.after).await;
    let ledger = load.finish().await;
    t.rss_after = gw.rss_bytes();
    judge(&mut t, &ledger);
    t.recovery = ledger.first_success_after(restarted);
    t.check(
        format!("first success within {SERVICE_RECOVERY_BOUND:?} of the service's restart"),
        secs(t.recovery),
        t.recovery.is_some_and(|d| d <= SERVICE_RECOVERY_BOUND),
    );
    t.check(
        "no WebSocket session closed",
        format!("{} (close codes {:?})", ledger.sessions_ended_early, ledger.close_codes),
        ledger.sessions_ended_early == 0,
    );
    let strays = ops::metric(&ops_addr, "nuropb_gateway_amqp_strays_dropped_total").await;
    t.note("late answers dropped by the gateway (strays)", format!("{strays:?}"));
    service.stop().await;
    gw.stop();
    t
}

/// Scenario 5: SIGTERM while slow requests are in flight.
pub async fn sigterm(s: &Settings, url: &str) -> Table {
    const SVC: &str = "chaos-term-svc";
    const PER_SESSION: usize = 4;
    let drain_secs = 10;
    let mut t = Table::new(
        "5. SIGTERM with slow requests in flight",
        format!(
            "{} sessions × {PER_SESSION} `slow` ({SLOW_MS} ms) requests in flight, then SIGTERM \
             (`--drain-timeout-secs {drain_secs} --lame-duck-secs {LAME_DUCK_SECS}`).",
            s.sessions
        ),
    );
    let service = FakeService::start_opts(url, SVC, service_options()).await;
    let drain = drain_secs.to_string();
    let lame_duck = LAME_DUCK_SECS.to_string();
    let gw = gateway(
        url,
        "chaos-gw-term",
        &["--drain-timeout-secs", &drain, "--lame-duck-secs", &lame_duck],
    );
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready before the fault", secs(ready), ready.is_some());
    let sessions = client::connect_many(&gw.url, s.sessions, 32).await;
    let spec = LoadSpec {
        service: SVC.to_owned(),
        method: "slow".to_owned(),
        params: json!({"ms": SLOW_MS}),
        rate: 100,
        max_in_flight: PER_SESSION,
    };
    let load = Load::start(sessions, &spec, deadline());
    // 100/s: the fourth request of each session is out after ~40 ms.
    sleep(Duration::from_millis(300)).await;
    load.stop_sending();
    let in_flight = ops::metric(&ops_addr, "nuropb_gateway_requests_in_flight").await;
    t.rss_before = gw.rss_bytes();
    let term = Instant::now();
    let status = tokio::task::spawn_blocking(move || gw.terminate(Duration::from_secs(30)))
        .await
        .expect("terminate");
    let exit_took = term.elapsed();
    let ledger = load.finish().await;
    judge(&mut t, &ledger);
    let c = t.counts;
    t.check(
        "every in-flight request answered with its response (not an error) before exit",
        format!("{} of {} responses", c.answered, c.offered),
        c.answered == c.offered && c.offered == s.sessions * PER_SESSION,
    );
    let code = status.map_or("none: killed after 30 s".to_owned(), |s| s.to_string());
    t.check("exit status 0", code, status.is_some_and(|s| s.success()));
    // The sessions are closed over the lame-duck window, each once its requests are
    // answered: the drain takes the longer of the two.
    let bound =
        Duration::from_millis(SLOW_MS).max(Duration::from_secs(LAME_DUCK_SECS)) + EXIT_SLACK;
    t.check(
        format!(
            "exit within the slowest request or the lame-duck window + {EXIT_SLACK:?} = {bound:?}"
        ),
        secs(Some(exit_took)),
        exit_took <= bound,
    );
    t.recovery = None;
    t.note("requests in flight at SIGTERM (gateway metric)", format!("{in_flight:?}"));
    service.stop().await;
    t
}

/// Scenario 7: connection churn; RSS before and after, sessions back to 0.
pub async fn churn(s: &Settings, url: &str) -> Table {
    const SVC: &str = "chaos-churn-svc";
    let mut t = Table::new(
        "7. connection churn",
        format!(
            "{} connections, {} at a time: connect, one request, close; RSS compared after a \
             warm-up round of {} connections.",
            s.churn_total,
            s.churn_parallel,
            s.churn_parallel * 5
        ),
    );
    let service = FakeService::start_opts(url, SVC, service_options()).await;
    let gw = gateway(url, "chaos-gw-churn", &[]);
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready", secs(ready), ready.is_some());
    // A warm-up round, so that the allocator's steady state is what "before" measures.
    let _ = churn_round(&gw.url, SVC, s.churn_parallel * 5, s.churn_parallel).await;
    let _ = ops::wait_metric(&ops_addr, "nuropb_gateway_sessions", Duration::from_secs(5), |v| {
        v == 0.0
    })
    .await;
    t.rss_before = gw.rss_bytes();
    let started = Instant::now();
    let ledger = churn_round(&gw.url, SVC, s.churn_total, s.churn_parallel).await;
    let took = started.elapsed();
    let zero =
        ops::wait_metric(&ops_addr, "nuropb_gateway_sessions", Duration::from_secs(5), |v| {
            v == 0.0
        })
        .await;
    t.rss_after = gw.rss_bytes();
    judge(&mut t, &ledger);
    t.check("sessions back to 0 within 5 s", secs(zero), zero.is_some());
    let grown = t.rss_after.unwrap_or(u64::MAX).saturating_sub(t.rss_before.unwrap_or(0));
    t.check(
        format!("RSS after − before ≤ {}", mib(Some(CHURN_RSS_BOUND))),
        mib(Some(grown)),
        grown <= CHURN_RSS_BOUND,
    );
    t.check(
        "every connection got its hello",
        format!("{} failed", ledger.sessions_ended_early),
        ledger.sessions_ended_early == 0,
    );
    t.note("connections per second", format!("{:.0}", s.churn_total as f64 / took.as_secs_f64()));
    service.stop().await;
    gw.stop();
    t
}

/// `total` connections, `parallel` at a time, each: connect, one echo, close. A failed
/// connect counts in `sessions_ended_early`.
async fn churn_round(url: &str, service: &str, total: usize, parallel: usize) -> Ledger {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let runs = futures_util::stream::iter(0..total)
        .map(|i| {
            let (url, service) = (url.to_owned(), service.to_owned());
            async move {
                let mut log = client::SessionLog::default();
                let Ok(mut ws) = client::connect(&url, &format!("churn-{}", i % 50), None).await
                else {
                    log.ended_early = true;
                    return log;
                };
                let trace = format!("churn-{i}");
                let frame = json!({"type": "request", "payload": {"service": service,
                    "method": "echo", "params": {"i": i}, "trace_id": trace}});
                let sent = Instant::now();
                log.entries.insert(trace.clone(), Entry { sent, answer: None, extra_answers: 0 });
                if ws.send(Message::Text(frame.to_string().into())).await.is_ok() {
                    let until = sent + deadline();
                    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
                        let Message::Text(text) = m else { continue };
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        if v["payload"]["trace_id"] == trace.as_str() {
                            let ok = v["payload"]["error"].is_null();
                            log.entries.get_mut(&trace).expect("sent").answer =
                                Some((Instant::now(), ok));
                            break;
                        }
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                log
            }
        })
        .buffer_unordered(parallel.max(1));
    Ledger::merge(runs.collect().await)
}

/// Scenario 8: a steady load for a while; RSS must not drift.
pub async fn soak(s: &Settings, url: &str) -> Table {
    const SVC: &str = "chaos-soak-svc";
    let mut t = Table::new(
        "8. short soak",
        setup(s, &format!("echo for {:?}; RSS sampled every second", s.soak)),
    );
    let service = FakeService::start_opts(url, SVC, service_options()).await;
    let gw = gateway(url, "chaos-gw-soak", &[]);
    let ops_addr = gw.ops_addr.clone().expect("ops endpoint");
    let ready = ops::wait_ready(&ops_addr, 200, READY_WAIT).await;
    t.check("gateway ready", secs(ready), ready.is_some());
    let sessions = client::connect_many(&gw.url, s.sessions, 32).await;
    let load = Load::start(sessions, &echo(SVC, s), deadline());
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < s.soak {
        sleep(Duration::from_secs(1)).await;
        samples.push(gw.rss_bytes().unwrap_or(0));
    }
    let ledger = load.finish().await;
    judge(&mut t, &ledger);
    // The first quarter is warm-up (buffers, allocator arenas); drift is measured after it.
    let warm = samples.len() / 4;
    t.rss_before = samples.get(warm).copied();
    t.rss_after = samples.last().copied();
    let peak = samples[warm..].iter().copied().max();
    let drift = t.rss_after.unwrap_or(u64::MAX).saturating_sub(t.rss_before.unwrap_or(0));
    t.check(
        format!("RSS drift after the first quarter ≤ {}", mib(Some(SOAK_DRIFT_BOUND))),
        mib(Some(drift)),
        drift <= SOAK_DRIFT_BOUND,
    );
    t.note("RSS peak after warm-up", mib(peak));
    let lat = ledger.latencies_ms();
    let p99 = lat.get(((lat.len().max(1) - 1) as f64 * 0.99) as usize).copied();
    t.note("request p99", p99.map_or("–".to_owned(), |p| format!("{p:.1} ms")));
    let rate = t.counts.answered as f64 / s.soak.as_secs_f64();
    t.note("answered per second", format!("{rate:.0}"));
    service.stop().await;
    gw.stop();
    t
}
