//! The real `nuropb-gateway` binary: start-up banner, the embedded demo end to end over a
//! real WebSocket, the operations endpoint, `--help`, config errors, and SIGTERM shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BIN: &str = env!("CARGO_BIN_EXE_nuropb-gateway");

/// Kills the child if the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free loopback port; returns it, its URL and the demo token.
fn start(extra: &[&str]) -> (Running, String, String) {
    let (running, banner) = launch(extra);
    (running, banner.url, banner.token)
}

/// What the binary printed at start.
struct Banner {
    /// The WebSocket URL, `ws://…/ws`.
    url: String,
    token: String,
    /// The operations endpoint, `http://…/`, when `--ops-listen` is in the arguments.
    ops: Option<String>,
}

/// Starts the binary on a free loopback port and reads its banner (including the ops line
/// when `extra` has `--ops-listen`).
fn launch(extra: &[&str]) -> (Running, Banner) {
    launch_logging(extra, "warn", Stdio::inherit())
}

/// [`launch`] with the log filter `log` and the gateway's stderr going to `stderr`.
fn launch_logging(extra: &[&str], log: &str, stderr: Stdio) -> (Running, Banner) {
    let want_ops = extra.contains(&"--ops-listen");
    // Only the in-memory demo prints a token.
    let want_token = !extra.contains(&"--amqp-url");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--log", log])
        .args(extra)
        .env_remove("NUROPB_AMQP_URL")
        .env_remove("NUROPB_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn nuropb-gateway");
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keeps reading after the test stops listening, so the gateway's stdout stays open.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut url, mut token, mut ops) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while url.is_none() || (want_token && token.is_none()) || (want_ops && ops.is_none()) {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("banner lines within 20 s");
        if let Some(rest) = line.strip_prefix("nuropb-gateway listening on ") {
            url = Some(format!("{}ws", rest.trim()));
        }
        if let Some(rest) = line.strip_prefix("demo token (user demo-user, 24 h): ") {
            token = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix("nuropb-gateway ops on ") {
            ops = Some(rest.trim().to_owned());
        }
    }
    (running, Banner { url: url.unwrap(), token: token.unwrap_or_default(), ops })
}

/// `GET base + path` over a plain loopback socket: the status and the body.
fn http_get(base: &str, path: &str) -> (u16, String) {
    let authority = base.strip_prefix("http://").unwrap().trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n").unwrap();
    // The server closes the connection after every response.
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.to_ascii_lowercase().contains("\r\nconnection: close"), "{head}");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn recv(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let m =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("frame in time");
        match m.expect("open").expect("ok") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn demo_mode_serves_a_websocket_client_and_stops_on_sigterm() {
    let (mut running, url, token) = start(&["--demo-tick-secs", "1"]);
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("connect");
    let hello = recv(&mut ws).await;
    assert_eq!(hello["payload"]["event"]["user_id"], "demo-user");

    let add = json!({"type": "request", "payload": {"service": "demo", "method": "add", "params": {"a": 2, "b": 40}, "trace_id": "t1"}});
    ws.send(Message::Text(add.to_string().into())).await.unwrap();
    assert_eq!(
        recv(&mut ws).await,
        json!({"type": "response", "payload": {"trace_id": "t1", "result": 42, "error": null}})
    );

    ws.send(Message::Text(
        json!({"type": "subscribe", "payload": {"topics": ["demo.*"]}}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let tick = recv(&mut ws).await;
    assert_eq!(tick["payload"]["topic"], "demo.tick", "{tick}");

    // SIGTERM: the gateway closes the session with 1001 and exits 0.
    let status =
        Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("close in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|c| u16::from(c.code)), Some(1001));
    let exit = wait_for_exit(&mut running);
    assert!(exit.success(), "exit status {exit}");
}

/// Waits (at most 10 s) for the gateway to exit after SIGTERM.
fn wait_for_exit(running: &mut Running) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn ops_endpoint_reports_health_readiness_and_metrics() {
    let (mut running, banner) = launch(&["--ops-listen", "127.0.0.1:0", "--demo-tick-secs", "0"]);
    let ops = banner.ops.expect("ops banner line");
    assert!(ops.starts_with("http://127.0.0.1:") && ops.ends_with('/'), "{ops}");
    assert_eq!(http_get(&ops, "/healthz"), (200, "ok".to_owned()));
    assert_eq!(http_get(&ops, "/readyz"), (200, "ok".to_owned()));
    assert_eq!(http_get(&ops, "/nope").0, 404);

    // One WebSocket session shows up in the metrics.
    let mut request = banner.url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {}", banner.token).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("connect");
    assert_eq!(recv(&mut ws).await["payload"]["topic"], "hello");
    let (status, metrics) = http_get(&ops, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "# TYPE nuropb_gateway_sessions gauge\nnuropb_gateway_sessions 1\n",
        "nuropb_gateway_users 1\n",
        "nuropb_gateway_mesh_connected 1\n",
        // OpenMetrics declares a counter without `_total`; its sample keeps the name.
        "# TYPE nuropb_gateway_requests counter\nnuropb_gateway_requests_total ",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
    assert!(!metrics.contains("nuropb_gateway_amqp_"), "no AMQP figures in demo mode");

    // While a slow call drains after SIGTERM, the gateway says it is not ready.
    let sleep = json!({"type": "request", "payload": {"service": "demo", "method": "sleep", "params": {"seconds": 3}, "trace_id": "slow"}});
    ws.send(Message::Text(sleep.to_string().into())).await.unwrap();
    // SIGTERM only once the call is in flight: sent back to back, the signal could win and
    // the call would be refused as "shutting down" instead of drained.
    let mut in_flight = false;
    for _ in 0..100 {
        in_flight = http_get(&ops, "/metrics").1.contains("nuropb_gateway_requests_in_flight 1\n");
        if in_flight {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(in_flight, "the slow call never showed as in flight");
    let status =
        Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut readiness = (0, String::new());
    for _ in 0..40 {
        readiness = http_get(&ops, "/readyz");
        if readiness.0 == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(readiness, (503, "not ready: shutting down".to_owned()));
    let response = recv(&mut ws).await;
    assert_eq!(response["payload"]["result"], "slept 3", "{response}");
    let exit = wait_for_exit(&mut running);
    assert!(exit.success(), "exit status {exit}");
    // The ops listener is gone with the process.
    let authority = ops.strip_prefix("http://").unwrap().trim_end_matches('/');
    assert!(std::net::TcpStream::connect(authority).is_err());
}

/// The `nuropb_gateway_call_duration_seconds_count` series of a scrape: labels → count.
fn call_counts(metrics: &str) -> std::collections::BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("nuropb_gateway_call_duration_seconds_count"))
        .map(|l| {
            let (labels, count) = l.rsplit_once(' ').unwrap();
            (labels.to_owned(), count.parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn metrics_count_known_traffic_with_bounded_labels() {
    let (mut running, banner) = launch(&[
        "--ops-listen",
        "127.0.0.1:0",
        // Ticks that no session subscribed to: events dropped as `no_session`.
        "--demo-tick-secs",
        "1",
        "--metrics-services",
        "demo",
        "--metrics-max-methods",
        "3",
        // 400 calls in a row, well past the default per-connection rate.
        "--rate-per-second",
        "100000",
        "--rate-burst",
        "100000",
    ]);
    let ops = banner.ops.expect("ops banner line");
    let mut request = banner.url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {}", banner.token).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("connect");
    assert_eq!(recv(&mut ws).await["payload"]["topic"], "hello");

    let call = async |ws: &mut _, service: &str, method: &str, params: Value| {
        let frame = json!({"type": "request", "payload": {"service": service, "method": method, "params": params}});
        let ws: &mut tokio_tungstenite::WebSocketStream<_> = ws;
        ws.send(Message::Text(frame.to_string().into())).await.unwrap();
        recv(ws).await
    };
    for _ in 0..3 {
        let answer = call(&mut ws, "demo", "add", json!({"a": 1, "b": 2})).await;
        assert_eq!(answer["payload"]["result"], 3, "{answer}");
    }
    let answer = call(&mut ws, "demo", "echo", json!({})).await;
    assert_eq!(answer["payload"]["error"], Value::Null, "{answer}");
    // A flood of random method names, of this service and of random services: the series
    // count stays within the bound (3 methods of `demo`, then `other`).
    for i in 0..200 {
        let answer = call(&mut ws, "demo", &format!("random{i}"), json!({})).await;
        assert!(answer["payload"]["error"].is_object(), "{answer}");
        let answer = call(&mut ws, &format!("svc{i}"), "m", json!({})).await;
        assert!(answer["payload"]["error"].is_object(), "{answer}");
    }
    // A traceparent that is not W3C is refused before anything reaches the mesh.
    let bad = json!({"type": "request", "payload": {"service": "demo", "method": "add", "params": {}, "trace_id": "tp", "traceparent": "00-xyz"}});
    ws.send(Message::Text(bad.to_string().into())).await.unwrap();
    let refused = recv(&mut ws).await;
    assert_eq!(refused["payload"]["trace_id"], "tp", "{refused}");
    assert_eq!(refused["payload"]["error"]["error"], "NuropbValidationError", "{refused}");
    // An upgrade with a bad token is refused 401.
    let mut bad_upgrade = banner.url.as_str().into_client_request().unwrap();
    bad_upgrade.headers_mut().insert("Authorization", "Bearer nope".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(bad_upgrade).await.is_err());
    // A normal close is answered with 1000.
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    ws.close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}

    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = http_get(&ops, "/metrics").1;
        if metrics.contains("nuropb_gateway_ws_closes_total{code=\"1000\"} 1\n")
            && metrics.contains("nuropb_gateway_events_dropped_total{reason=\"no_session\"}")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let counts = call_counts(&metrics);
    let key = |service: &str, method: &str, outcome: &str| {
        format!(
            "{{service=\"{service}\",method=\"{method}\",kind=\"request\",outcome=\"{outcome}\"}}"
        )
    };
    let expected: std::collections::BTreeMap<String, u64> = [
        (key("demo", "add", "ok"), 3),
        (key("demo", "echo", "ok"), 1),
        // The third method slot went to the first random name; the rest are `other`.
        (key("demo", "random0", "service_error"), 1),
        (key("demo", "other", "service_error"), 199),
        (key("other", "other", "not_delivered"), 200),
    ]
    .into_iter()
    .collect();
    assert_eq!(counts, expected, "{metrics}");
    for line in [
        "# TYPE nuropb_gateway_call_duration_seconds histogram\n",
        "nuropb_gateway_ws_upgrades_refused_total{reason=\"unauthorized\",status=\"401\"} 1\n",
        "nuropb_gateway_ws_closes_total{code=\"1000\"} 1\n",
        "nuropb_gateway_requests_total 404\n",
        "# TYPE nuropb_gateway_ws_outbound_queue_depth histogram\n",
        "# TYPE nuropb_gateway_events_dropped counter\n",
        "# TYPE nuropb_gateway_events_received counter\n",
        "# EOF\n",
    ] {
        assert!(metrics.contains(line), "{line:?} missing from:\n{metrics}");
    }
    let status =
        Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(wait_for_exit(&mut running).success());
}

#[test]
fn help_documents_every_option_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let options: Vec<&str> = help.lines().filter_map(|l| l.trim().strip_prefix("--")).collect();
    assert!(options.len() > 25, "options listed: {}", options.len());
    for env in [
        "NUROPB_LISTEN",
        "NUROPB_AMQP_URL",
        "NUROPB_JWT_SECRET",
        "NUROPB_REQUEST_TIMEOUT_MS",
        "NUROPB_ALLOWED_ORIGINS",
        "NUROPB_EVENT_BINDINGS",
        "NUROPB_OPS_LISTEN",
        "NUROPB_JWT_MAX_LIFETIME_SECS",
        "NUROPB_MAX_HANDSHAKES_IN_FLIGHT",
        "NUROPB_MAX_CONNECTIONS_PER_IP",
        "NUROPB_CONNECT_RATE_PER_IP",
        "NUROPB_CONNECT_BURST_PER_IP",
        "NUROPB_MAX_SESSIONS_PER_USER",
        "NUROPB_LISTEN_BACKLOG",
        "NUROPB_MAX_DECODED_VALUES",
        "NUROPB_MAX_DECODED_BYTES",
        "NUROPB_MAX_IN_FLIGHT_BYTES",
        "NUROPB_MAX_IN_FLIGHT_BYTES_TOTAL",
        "NUROPB_OUTBOUND_QUEUE_BYTES",
        "NUROPB_CALLABLE",
        "NUROPB_CLIENT_DESCRIBE",
    ] {
        assert!(help.contains(env), "--help lacks {env}");
    }
    // Every option (help and version are listed as `-h, --help`, `-V, --version`) names
    // its environment variable.
    let env_count = help.matches("[env: NUROPB_").count();
    assert_eq!(env_count, options.len(), "{help}");
}

#[test]
fn starts_without_a_broker_and_reports_unready() {
    // Two nodes of one "cluster", neither listening: the gateway serves and waits.
    let urls = "amqp://guest:hunter2@127.0.0.1:1/mesh,amqp://guest:hunter2@127.0.0.1:2/mesh";
    let (mut running, banner) = launch_logging(
        &["--amqp-url", urls, "--jwt-secret", "0123456789abcdef", "--ops-listen", "127.0.0.1:0"],
        "warn",
        Stdio::inherit(),
    );
    let ops = banner.ops.expect("ops banner line");
    assert!(banner.url.starts_with("ws://127.0.0.1:"), "{}", banner.url);
    assert_eq!(http_get(&ops, "/healthz"), (200, "ok".to_owned()));
    // Still unready after several rounds over both nodes, and still running.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(http_get(&ops, "/readyz"), (503, "not ready: mesh not connected".to_owned()));
    let metrics = http_get(&ops, "/metrics").1;
    assert!(metrics.contains("nuropb_gateway_mesh_connected 0\n"), "{metrics}");
    assert!(running.0.try_wait().unwrap().is_none(), "the gateway exited");
    let status =
        Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = wait_for_exit(&mut running);
    assert!(exit.success(), "exit status {exit}");
}

#[test]
fn amqp_urls_of_different_vhosts_are_refused() {
    let out = Command::new(BIN)
        .args(["--amqp-url", "amqp://u:hunter2@127.0.0.1:1/a,amqp://u:hunter2@127.0.0.1:2/b"])
        .args(["--jwt-secret", "0123456789abcdef"])
        .env_remove("NUROPB_AMQP_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--amqp-url") && err.contains("vhost"), "{err}");
    assert!(!err.contains("hunter2"), "a password in the error: {err}");
}

#[test]
fn invalid_config_exits_2_naming_the_option() {
    for (args, needle) in [
        (vec!["--request-timeout-ms", "0"], "--request-timeout-ms"),
        (vec!["--amqp-url", "amqp://127.0.0.1:1/x"], "--jwt-secret"),
        (vec!["--jwt-secret", "short"], "--jwt-secret"),
        (vec!["--outbound-queue", "8", "--max-in-flight", "64"], "--outbound-queue"),
        (vec!["--listen", "127.0.0.1:9", "--ops-listen", "127.0.0.1:9"], "--ops-listen"),
        (vec!["--max-decoded-bytes", "10"], "--max-decoded-bytes"),
        (vec!["--max-in-flight-bytes", "1048576"], "--max-in-flight-bytes"),
        (vec!["--outbound-queue-bytes", "1048576"], "--outbound-queue-bytes must be at least"),
        (vec!["--callable", "orders"], "--callable"),
        (vec!["--jwks-url", "http://idp.example.com/jwks"], "--jwks-url"),
        (vec!["--jwks-url", "ftp://127.0.0.1/jwks"], "--jwks-url"),
        (vec!["--auth-service-method", "authorise"], "--auth-service-method"),
        (vec!["--auth-service-method", "auth."], "--auth-service-method"),
        (vec!["--auth-service-all-tokens", "true"], "--auth-service-all-tokens"),
        (vec!["--auth-cache-entries", "0"], "--auth-cache-entries"),
        (vec!["--jwks-timeout-ms", "0"], "--jwks-timeout-ms"),
        (vec!["--jwks-min-refresh-secs", "600"], "--jwks-min-refresh-secs"),
        (
            vec!["--lame-duck-secs", "11"],
            "--lame-duck-secs (11) must not exceed --drain-timeout-secs",
        ),
        (
            vec!["--lame-duck-grace-secs", "5", "--lame-duck-secs", "6"],
            "--lame-duck-grace-secs (5) plus --lame-duck-secs (6)",
        ),
        (vec!["--trusted-proxies", "10.0.0.0/8,lb.local"], "--trusted-proxies: not an IP address"),
        (vec!["--proxy-protocol", "true"], "--proxy-protocol needs --trusted-proxies"),
        (
            vec!["--max-in-flight-bytes", "67108864", "--max-in-flight-bytes-total", "1024"],
            "--max-in-flight-bytes-total",
        ),
    ] {
        let out = Command::new(BIN).args(&args).env_remove("NUROPB_JWT_SECRET").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn tls_files_are_checked_at_start_naming_the_option() {
    let dir = nuropb_testkit::tls::TempDir::new("bin-tls");
    let files = nuropb_testkit::tls::TestPki::generate("CA").write(dir.path(), "gw");
    let (cert, key, ca) =
        (files.cert.to_str().unwrap(), files.key.to_str().unwrap(), files.ca.to_str().unwrap());
    // A key where the certificate belongs (a copy: one path for both would be ambiguous).
    let key_copy = dir.path().join("key-copy.pem");
    std::fs::copy(&files.key, &key_copy).unwrap();
    let key_copy = key_copy.to_str().unwrap();
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let amqps = ["--amqp-url", "amqps://g:g@127.0.0.1:1/x", "--jwt-secret", "0123456789abcdef"];
    let with_amqps = |more: &[&'static str]| -> Vec<String> {
        amqps.iter().chain(more).map(|s| s.to_string()).collect()
    };
    let owned = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    for (args, needle) in [
        (owned(&["--tls-cert-file", cert]), "--tls-cert-file needs --tls-key-file"),
        (owned(&["--tls-key-file", key]), "--tls-key-file needs --tls-cert-file"),
        (
            owned(&["--tls-cert-file", cert, "--tls-key-file", missing]),
            "--tls-key-file: cannot read TLS file",
        ),
        (
            owned(&["--tls-cert-file", key_copy, "--tls-key-file", key]),
            "--tls-cert-file: invalid TLS file",
        ),
        (
            owned(&["--tls-cert-file", cert, "--tls-key-file", cert]),
            "--tls-key-file: invalid TLS file",
        ),
        (owned(&["--tls-cert-file", ca, "--tls-key-file", key]), "refused with certificate"),
        (owned(&["--amqp-ca-file", ca]), "need an amqps:// --amqp-url"),
        (with_amqps(&["--amqp-ca-file", "/nonexistent/ca.pem"]), "--amqp-ca-file: cannot read"),
        (with_amqps(&["--amqp-client-cert-file", "/x.pem"]), "--amqp-client-cert-file needs"),
    ] {
        let out = Command::new(BIN).args(&args).env_remove("NUROPB_JWT_SECRET").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let mut args = with_amqps(&["--amqp-ca-file"]);
    args.push(key.to_owned());
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--amqp-ca-file: invalid amqp mesh configuration: tls.ca_pem"), "{err}");
}

#[test]
fn an_origin_entry_that_cannot_be_parsed_is_refused_by_name() {
    let out = Command::new(BIN)
        .args(["--allowed-origins", "example.com,*.example.org"])
        .env_remove("NUROPB_AMQP_URL")
        .env_remove("NUROPB_JWT_SECRET")
        .env_remove("NUROPB_ALLOWED_ORIGINS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "invalid configuration: --allowed-origins: cannot parse origin entry \"*.example.org\""
        ),
        "{err}"
    );
    assert!(err.contains("no wildcards"), "{err}");
}

/// URL-safe base64 without padding, so the test needs no extra crate.
fn base64url(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Sends a raw upgrade request with `token`; returns the status line.
fn raw_upgrade(authority: &str, token: &str) -> String {
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

#[tokio::test]
async fn a_newline_from_a_client_cannot_start_a_log_line() {
    const SECRET: &str = "log-injection-secret-0123";
    const FORGED: &str = "2025-01-01T00:00:00.000000Z  INFO conn: session opened user.id=admin";
    let (running, banner) =
        launch_logging(&["--jwt-secret", SECRET, "--demo-tick-secs", "0"], "info", Stdio::piped());
    let mut running = running;
    let stderr = running.0.stderr.take().unwrap();
    let authority = banner.url.strip_prefix("ws://").unwrap().trim_end_matches("/ws").to_owned();

    // A token whose header `alg` carries a forged line: refused (401) before verification.
    let header = base64url(format!(r#"{{"alg":"HS256\n{FORGED}","typ":"JWT"}}"#).as_bytes());
    let claims = base64url(br#"{"sub":"x","exp":4000000000}"#);
    let status = raw_upgrade(&authority, &format!("{header}.{claims}.c2ln"));
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");

    // A valid token whose `sub` carries a forged line: the session opens and is logged.
    let claims = json!({"sub": format!("alice\n{FORGED}"), "exp": 4_000_000_000u64});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut request = banner.url.as_str().into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(recv(&mut ws).await["payload"]["topic"], "hello");
    ws.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    drop(running);
    let mut logs = String::new();
    BufReader::new(stderr).read_to_string(&mut logs).unwrap();
    assert!(logs.contains("upgrade refused"), "{logs}");
    assert!(logs.contains(r"user.id=alice\n2025-01-01"), "{logs}");
    for line in logs.lines() {
        // Every line is one of ours: it starts with the timestamp of now, not the forged one.
        assert!(!line.trim_start().starts_with("2025-01-01"), "forged line: {line:?}");
        if line.contains("user.id=admin") {
            assert!(line.contains(r"\n2025-01-01"), "unescaped: {line:?}");
        }
    }
}
