//! `cargo xtask cluster`: the gateway on a real 3-node RabbitMQ cluster on loopback, one
//! markdown table per scenario (as the chaos suite prints them); exits non-zero naming every
//! failed assertion. docs/OPERATIONS.md (`## RabbitMQ cluster`) says what it proves.
//!
//! The suite starts the cluster itself ([`RabbitNode::start_cluster`]: three nodes with
//! their own names and ports, one cookie, booted in parallel, removed on the way out, also
//! on panic) and a fresh vhost on it whose default queue type is quorum, as the operations
//! guide tells cluster operators to make theirs. Then:
//! 1. two gateway binaries, each given the URL list starting at a different node, a user on
//!    each; a targeted event and a `push_to_user` through the gateways' shared service
//!    queue reach both users;
//! 2. the echo service (the testkit's fake nuropb service roaming over the same list) and
//!    100 sessions × 8 in flight across both gateways; the node that one gateway and the
//!    service are on is stopped under that load: every request ends with exactly one
//!    response or error, nothing hangs, no client is disconnected, the service is back
//!    on another node and answering within 10 s, and events and pushes still reach both
//!    users afterwards;
//! 3. a gateway started while no node of its list is up: it serves, `/readyz` is 503,
//!    requests are answered at once with `NuropbTransportError`, and it becomes ready when
//!    a node of its list starts; no password reaches its log.
//!
//! Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test suite: a failure aborts it")]
#![allow(clippy::print_stdout, reason = "the suite prints its tables")]

// The chaos suite's load, ledger, ops reader and tables, shared as files.
#[path = "chaos/client.rs"]
#[allow(dead_code, reason = "shared with the chaos suite, which uses all of it")]
mod client;
#[path = "chaos/ops.rs"]
#[allow(dead_code, reason = "shared with the chaos suite, which uses all of it")]
mod ops;
#[path = "chaos/report.rs"]
#[allow(dead_code, reason = "shared with the chaos suite, which uses all of it")]
mod report;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lapin::BasicProperties;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};
use tokio_tungstenite::tungstenite::Message;

use client::{Load, LoadSpec, Ws};
use e2e_tests::process::{GatewayProcess, Mesh};
use nuropb_testkit::ServiceOptions;
use nuropb_testkit::broker::{Peer, nuropb_headers};
use nuropb_testkit::node::RabbitNode;
use nuropb_testkit::roaming::RoamingService;
use report::{Table, secs};

/// The gateways' NuroPb name (one deployment: both share its service queue).
const GATEWAY_SERVICE: &str = "cluster-gw";
/// The echo service on the mesh.
const SERVICE: &str = "cluster-echo";
/// The gateway's request timeout in the suite.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A request is hung when it has no answer within the request timeout plus this.
const MARGIN: Duration = Duration::from_secs(2);
/// Reconnect attempts at most this far apart.
const RECONNECT_MAX_MS: u64 = 1000;
/// How long a started gateway may take to be ready.
const READY_WAIT: Duration = Duration::from_secs(20);
/// The service must answer again within this of its node being stopped.
const SERVICE_BACK_BOUND: Duration = Duration::from_secs(10);
/// Once a node of its list accepts AMQP, an unconnected gateway must be ready within this
/// (reconnect rounds at most 1 s apart, a declaration round trip, slack for 2 cores).
const READY_AFTER_NODE_BOUND: Duration = Duration::from_secs(5);
/// Longest wait for a stopped node to close its client connections.
const NODE_STOP_BOUND: Duration = Duration::from_secs(45);
/// Every wait for one frame.
const FRAME_WAIT: Duration = Duration::from_secs(5);
/// Sessions of the load, requests per second each, most in flight each.
const SESSIONS: usize = 100;
const RATE: u32 = 10;
const IN_FLIGHT: usize = 8;
/// Load before the fault, and after the service is back.
const WARM: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(4);
/// Bound of the whole run, a backstop to the per-step bounds.
const RUN_BOUND: Duration = Duration::from_secs(270);

fn deadline() -> Duration {
    REQUEST_TIMEOUT + MARGIN
}

/// The node URLs on `vhost`, starting at node `first` and wrapping around.
fn urls_from(nodes: &[RabbitNode], vhost: &str, first: usize) -> Vec<String> {
    (0..nodes.len()).map(|i| nodes[(first + i) % nodes.len()].amqp_url_for(vhost)).collect()
}

/// The suite's gateway: abuse limits out of the way, a 3 s request timeout, reconnects at
/// most 1 s apart, the ops endpoint on a free port, `cluster.#` events bound; `urls` joined
/// into one `--amqp-url`.
#[rustfmt::skip]
fn gateway(urls: &[String], capture: bool) -> GatewayProcess {
    let timeout = REQUEST_TIMEOUT.as_millis().to_string();
    let reconnect = RECONNECT_MAX_MS.to_string();
    let log = if capture { "warn,lapin=off" } else { "error,lapin=off" };
    let args: Vec<String> = [
        "--rate-per-second", "1000000", "--rate-burst", "1000000",
        "--max-connections", "5000", "--max-sessions-per-user", "20000",
        "--max-connections-per-ip", "20000",
        "--connect-rate-per-ip", "1000000", "--connect-burst-per-ip", "1000000",
        "--request-timeout-ms", &timeout, "--reconnect-max-ms", &reconnect,
        "--ops-listen", "127.0.0.1:0", "--log", log,
        "--event-bindings", "cluster.#",
        "--idle-timeout-secs", "600", "--ping-interval-secs", "300",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let url = urls.join(",");
    let mesh = Mesh::Amqp { url: &url, service_name: GATEWAY_SERVICE };
    if capture {
        GatewayProcess::start_capturing(mesh, &args)
    } else {
        GatewayProcess::start_with(mesh, &args)
    }
}

/// The next event frame on `ws` within [`FRAME_WAIT`] (other frames skipped).
async fn next_event(ws: &mut Ws) -> Option<Value> {
    let wait = async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(text) = frame {
                let v: Value = serde_json::from_str(&text).ok()?;
                if v["type"] == "event" {
                    return Some(v["payload"].clone());
                }
            }
        }
        None
    };
    tokio::time::timeout(FRAME_WAIT, wait).await.ok().flatten()
}

/// Publishes a nuropb event for `target` users on `topic`.
async fn targeted_event(peer: &Peer, topic: &str, event: &Value, target: &[&str]) {
    let body = json!({
        "tag": "event", "topic": topic, "event": event, "context": {},
        "trace_id": null, "correlation_id": null, "target": target,
    });
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(nuropb_headers("event", None, false));
    let bytes = nuropb_wire::pyjson::to_python_json(&body).expect("encode");
    peer.publish("nuropb-events-exchange", topic, props, &bytes).await;
}

/// A targeted event for both users and a push to each (through the gateways' shared
/// service queue): whether each reached its user, recorded in `t` under `when`.
async fn events_reach_both(
    t: &mut Table,
    when: &str,
    peer: &mut Peer,
    alice: &mut Ws,
    bob: &mut Ws,
) {
    let event = json!({"when": when});
    targeted_event(peer, "cluster.targeted", &event, &["alice", "bob"]).await;
    for (name, ws) in [("alice (gateway A)", &mut *alice), ("bob (gateway B)", &mut *bob)] {
        let got = next_event(ws).await;
        let ok =
            got.as_ref().is_some_and(|p| p["topic"] == "cluster.targeted" && p["event"] == event);
        t.check(format!("{when}: a targeted event reaches {name}"), shown(got.as_ref()), ok);
    }
    for (user, name, ws) in
        [("alice", "alice (gateway A)", &mut *alice), ("bob", "bob (gateway B)", &mut *bob)]
    {
        let params = json!({"user_id": user, "topic": "cluster.pushed", "event": event});
        let answer = tokio::time::timeout(
            FRAME_WAIT * 2,
            peer.call(GATEWAY_SERVICE, "push_to_user", params),
        )
        .await;
        let result = answer.as_ref().ok().map(|v| &v["result"]);
        let accepted = result == Some(&json!({"accepted": true}));
        t.check(format!("{when}: push_to_user {user} accepted"), shown(result), accepted);
        let got = next_event(ws).await;
        let ok =
            got.as_ref().is_some_and(|p| p["topic"] == "cluster.pushed" && p["event"] == event);
        t.check(format!("{when}: the push reaches {name}"), shown(got.as_ref()), ok);
    }
}

/// A frame's payload for a table cell, `nothing` when none came.
fn shown(payload: Option<&Value>) -> String {
    payload.map_or("nothing".to_owned(), |p| format!("`{p}`"))
}

/// Declares `queue` durable and classic (explicitly, whatever the vhost's default) on the
/// node at `url`: what a queue of a nuropb service is on a vhost without the quorum default.
async fn declare_classic(url: &str, queue: &str) -> Result<(), String> {
    let connect = lapin::Connection::connect(url, lapin::ConnectionProperties::default());
    let connection = tokio::time::timeout(FRAME_WAIT, connect)
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString(lapin::types::LongString::from("classic")),
    );
    let options = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), options, args).await;
    // Best effort: the answer to the declaration is what counts.
    let _ = connection.close(200, "OK".into()).await;
    declared.map(|_| ()).map_err(|e| e.to_string())
}

/// One request on `ws`: the response payload within [`FRAME_WAIT`], and how long it took.
async fn one_request(ws: &mut Ws, trace: &str) -> (Option<Value>, Duration) {
    let started = Instant::now();
    let frame = json!({"type": "request", "payload": {"service": SERVICE, "method": "echo",
        "params": {"n": 1}, "trace_id": trace}});
    if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
        return (None, started.elapsed());
    }
    let wait = async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(text) = frame {
                let v: Value = serde_json::from_str(&text).ok()?;
                if v["type"] == "response" && v["payload"]["trace_id"] == trace {
                    return Some(v["payload"].clone());
                }
            }
        }
        None
    };
    let answer = tokio::time::timeout(FRAME_WAIT, wait).await.ok().flatten();
    (answer, started.elapsed())
}

#[tokio::main]
async fn main() {
    // SIGINT (`cargo xtask` at its deadline, or Ctrl-C) drops the run, and with it the
    // gateways and the nodes, which are killed by PID in their Drop.
    let started = Instant::now();
    let outcome = tokio::select! {
        tables = tokio::time::timeout(RUN_BOUND, run()) => tables.ok(),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("cluster: interrupted; the processes were stopped");
            std::process::exit(130);
        }
    };
    let Some(tables) = outcome else {
        eprintln!("cluster: the run took longer than {RUN_BOUND:?}");
        std::process::exit(1);
    };
    for t in &tables {
        t.print();
    }
    println!();
    println!("{} scenarios in {:.0} s.", tables.len(), started.elapsed().as_secs_f64());
    let failed: Vec<String> = tables
        .iter()
        .flat_map(|t| {
            t.checks
                .iter()
                .filter(|c| !c.ok)
                .map(move |c| format!("{}: {} (measured {})", t.name, c.claim, c.measured))
        })
        .collect();
    if !failed.is_empty() {
        eprintln!("cluster: {} assertion(s) failed:", failed.len());
        for f in &failed {
            eprintln!("  - {f}");
        }
        std::process::exit(1);
    }
    println!();
    println!("cluster: every assertion held");
}

async fn run() -> Vec<Table> {
    println!(
        "## Cluster suite (3 RabbitMQ nodes on loopback, {} cores)",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!();
    println!(
        "Request timeout {REQUEST_TIMEOUT:?}; a request is hung without an answer within \
         {:?} (timeout + margin), lost without one by the end.",
        deadline()
    );
    let started = Instant::now();
    let mut nodes = tokio::task::block_in_place(|| RabbitNode::start_cluster("cluster", 3));
    let booted = started.elapsed();
    let vhost = format!("nuropb-cluster-{}", std::process::id());
    for args in [
        vec!["add_vhost", vhost.as_str(), "--default-queue-type", "quorum"],
        vec!["set_permissions", "-p", vhost.as_str(), "guest", ".*", ".*", ".*"],
    ] {
        if let Err(why) = tokio::task::block_in_place(|| nodes[0].ctl_checked(&args)) {
            panic!("rabbitmqctl {args:?}: {why}");
        }
    }

    // Gateway A starts at node 0, gateway B and the service at node 1: stopping node 1
    // takes one gateway's connection, the service's connection and (the service declared
    // it first, on its own node) the leader of the service's quorum queue.
    let service_urls = urls_from(&nodes, &vhost, 1);
    let service = RoamingService::start(service_urls, SERVICE, ServiceOptions::bench());
    let gw_a = gateway(&urls_from(&nodes, &vhost, 0), false);
    let gw_b = gateway(&urls_from(&nodes, &vhost, 1), false);
    let (ops_a, ops_b) = (gw_a.ops_addr.clone().unwrap(), gw_b.ops_addr.clone().unwrap());

    let mut t1 = Table::new(
        "1. two gateways on different nodes: targeted events and pushes reach both",
        format!(
            "3 nodes booted in parallel and joined in {:.1} s; vhost {vhost} (default queue \
             type quorum); gateway A's list starts at node 0, B's at node 1.",
            booted.as_secs_f64()
        ),
    );
    for (name, ops_addr) in [("A", &ops_a), ("B", &ops_b)] {
        let ready = ops::wait_ready(ops_addr, 200, READY_WAIT).await;
        t1.check(format!("gateway {name} ready"), secs(ready), ready.is_some());
    }
    let on = service.connected(READY_WAIT).await;
    t1.check(
        "the echo service is on node 1 (the first of its list)",
        format!("node {on:?} of its list"),
        on == Some(0),
    );
    let mut alice = client::connect(&gw_a.url, "alice", None).await.expect("alice on A");
    let mut bob = client::connect(&gw_b.url, "bob", None).await.expect("bob on B");
    let mut peer = Peer::new(&nodes[0].amqp_url_for(&vhost)).await;
    events_reach_both(&mut t1, "before the fault", &mut peer, &mut alice, &mut bob).await;

    // 2. The load, and node 1 stopped under it.
    let mut t2 = Table::new(
        "2. node stopped under load (gateway B's and the service's node)",
        format!(
            "{SESSIONS} sessions (half on each gateway) × {RATE} req/s each, at most \
             {IN_FLIGHT} in flight each; `rabbitmqctl stop` of node 1 after {WARM:?}; \
             {AFTER:?} of load after the service is back."
        ),
    );
    // The reason the vhost defaults to quorum: a durable classic queue lives on one node.
    const CANARY: &str = "cluster-classic-canary";
    let canary = declare_classic(&nodes[1].amqp_url_for(&vhost), CANARY).await;
    t2.check("a durable classic queue declared on node 1", format!("{canary:?}"), canary.is_ok());
    let mut sessions = client::connect_many(&gw_a.url, SESSIONS / 2, 16).await;
    sessions.extend(client::connect_many(&gw_b.url, SESSIONS - SESSIONS / 2, 16).await);
    let spec = LoadSpec {
        service: SERVICE.to_owned(),
        method: "echo".to_owned(),
        params: json!({"text": "cluster"}),
        rate: RATE,
        max_in_flight: IN_FLIGHT,
    };
    let load = Load::start(sessions, &spec, deadline());
    sleep(WARM).await;
    t2.rss_before = gw_b.rss_bytes();
    let connections_before = service.connections.lock().unwrap().len();
    let fault = Instant::now();
    let mut node1 = nodes.remove(1);
    let node1 = tokio::task::spawn_blocking(move || {
        node1.stop();
        node1
    });
    // Polled from the moment of the fault, while the node goes down.
    // A node under load may take half a minute to stop; it closes its client connections
    // late in that.
    let unready_b = ops::wait_ready(&ops_b, 503, NODE_STOP_BOUND).await;
    let ready_b = ops::wait_ready(&ops_b, 200, Duration::from_secs(20)).await;
    let back_on = {
        let deadline = Instant::now() + NODE_STOP_BOUND;
        loop {
            let now = service.connections.lock().unwrap().get(connections_before).copied();
            if now.is_some() || Instant::now() >= deadline {
                break now;
            }
            sleep(Duration::from_millis(50)).await;
        }
    };
    let node1 = node1.await.expect("the stop");
    let stop_took = fault.elapsed();
    sleep(AFTER).await;
    let ledger = load.finish().await;
    t2.counts = ledger.counts(deadline());
    t2.check_answers(ledger.untraced_errors, ledger.unknown_answers);
    t2.rss_after = gw_b.rss_bytes();
    t2.check(
        "gateway B's /readyz 503 after its node stopped",
        secs(unready_b),
        unready_b.is_some(),
    );
    t2.check(
        "gateway B ready again on another node (after its 503)",
        secs(ready_b),
        unready_b.is_some() && ready_b.is_some(),
    );
    let ready_a = ops::ready(&ops_a).await;
    t2.check("gateway A stayed ready", format!("{ready_a:?}"), ready_a == Some(200));
    // Measured from the moment the service saw its connection go (the node closes client
    // connections late in its shutdown, which itself takes 5-20 s under load).
    let lost = service.losses.lock().unwrap().first().copied().map(Instant::from_std);
    let reconnected = back_on.map(|(at, node)| (Instant::from_std(at), node));
    t2.check(
        "the service reconnected to another node",
        format!(
            "{:?} after its connection was lost, on node {:?} of its list (0 = node 1)",
            reconnected.zip(lost).map(|((at, _), lost)| at - lost),
            reconnected.map(|(_, node)| node)
        ),
        reconnected.is_some_and(|(_, node)| node != 0),
    );
    // The first success to a request sent after the service reconnected.
    let back = lost
        .zip(reconnected)
        .and_then(|(lost, (at, _))| ledger.first_success_after(at).map(|d| at + d - lost));
    t2.recovery = back;
    t2.check(
        format!("the service answers again within {SERVICE_BACK_BOUND:?} of losing its node"),
        secs(back),
        back.is_some_and(|d| d <= SERVICE_BACK_BOUND),
    );
    let first_success = ledger.first_success_after(fault + Duration::from_millis(1));
    t2.check(
        "no client disconnected",
        format!(
            "{} ended early, close codes {:?}",
            ledger.sessions_ended_early, ledger.close_codes
        ),
        ledger.sessions_ended_early == 0,
    );
    t2.note("first success after the fault", secs(first_success));
    let canary = declare_classic(&nodes[0].amqp_url_for(&vhost), CANARY).await;
    t2.check(
        "with node 1 down, node 0 refuses to declare that classic queue (home node down)",
        format!("{canary:?}"),
        canary.as_ref().is_err_and(|e| e.contains("NOT_FOUND") || e.contains("NOT-FOUND")),
    );
    t2.note("`rabbitmqctl stop` of node 1 took", secs(Some(stop_took)));
    t2.note("the service lost its connection after the stop began", secs(lost.map(|l| l - fault)));
    events_reach_both(&mut t2, "after the fault", &mut peer, &mut alice, &mut bob).await;

    // 3. A gateway whose list has no node up: node 1 (stopped) and a port nobody listens on.
    let mut t3 = Table::new(
        "3. a gateway started while no node of its list is up",
        "Its list: the stopped node 1 and a loopback port nobody listens on; node 1 is \
         started again after 2 s."
            .to_owned(),
    );
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let lone_urls =
        vec![node1.amqp_url_for(&vhost), format!("amqp://guest:guest@127.0.0.1:{dead}/{vhost}")];
    let mut gw_c = gateway(&lone_urls, true);
    let ops_c = gw_c.ops_addr.clone().unwrap();
    sleep(Duration::from_secs(2)).await;
    let unready = ops::ready(&ops_c).await;
    t3.check("/readyz 503 while no node is up", format!("{unready:?}"), unready == Some(503));
    t3.check("the gateway runs", format!("running: {}", gw_c.is_running()), gw_c.is_running());
    let carol = client::connect(&gw_c.url, "carol", None).await;
    t3.check("upgrades accepted meanwhile", format!("{:?}", carol.as_ref().err()), carol.is_ok());
    if let Ok(mut carol) = carol {
        let (answer, took) = one_request(&mut carol, "unconnected").await;
        let name = answer.as_ref().map(|p| p["error"]["error"].clone());
        t3.check(
            "a request is answered at once with NuropbTransportError",
            format!("{name:?} in {took:.2?}"),
            name == Some(json!("NuropbTransportError")) && took < Duration::from_secs(1),
        );
        let mut node1 = node1;
        tokio::task::block_in_place(|| node1.restart());
        let ready = ops::wait_ready(&ops_c, 200, READY_AFTER_NODE_BOUND * 2).await;
        t3.recovery = ready;
        t3.check(
            format!("ready within {READY_AFTER_NODE_BOUND:?} of node 1 accepting again"),
            secs(ready),
            ready.is_some_and(|d| d <= READY_AFTER_NODE_BOUND),
        );
        let (answer, _) = one_request(&mut carol, "connected").await;
        let ok = answer.as_ref().is_some_and(|p| p["result"] == json!({"n": 1}));
        t3.check("then the same session's request is answered", format!("{answer:?}"), ok);
        drop(node1);
    }
    let (lines, _) = gw_c.stderr_lines();
    let leaked = lines.iter().filter(|l| l.contains(":guest@")).count();
    let redacted = lines.iter().filter(|l| l.contains(":***@")).count();
    t3.check(
        "no password in the log; the nodes are named redacted",
        format!("{leaked} lines with a password, {redacted} with a redacted URL"),
        leaked == 0 && redacted > 0,
    );

    service.stop().await;
    gw_c.stop();
    gw_a.stop();
    gw_b.stop();
    vec![t1, t2, t3]
}
