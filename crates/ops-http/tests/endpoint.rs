//! The operations endpoint over real loopback TCP, with a raw HTTP client: every path,
//! method and status, the OpenMetrics text format, the head size limit, the head deadline
//! (slowloris), the connection limit, and shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ops_http::{OpsConfig, OpsError, OpsSource};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every wait in these tests is bounded by this.
const PATIENCE: Duration = Duration::from_secs(5);

/// A source whose readiness the test sets.
struct Fake {
    ready: Mutex<Result<(), String>>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        Arc::new(Fake { ready: Mutex::new(Ok(())) })
    }

    fn set_ready(&self, ready: Result<(), String>) {
        *self.ready.lock().unwrap() = ready;
    }
}

impl OpsSource for Fake {
    fn ready(&self) -> Result<(), String> {
        self.ready.lock().unwrap().clone()
    }
}

fn sample_metrics() -> Registry {
    let mut registry = Registry::default();
    let sessions: Gauge = Gauge::default();
    sessions.set(3);
    registry.register("test_sessions", "Open sessions", sessions);
    let requests: Counter = Counter::default();
    requests.inc_by(42);
    registry.register("test_requests", "Requests handled", requests);
    let ratio: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    ratio.set(0.5);
    registry.register("test_ratio", "A fraction", ratio);
    registry
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), OpsError>>,
}

impl Server {
    async fn start(config: OpsConfig, source: Arc<Fake>) -> Server {
        Server::with_registry(config, source, Registry::default()).await
    }

    async fn with_registry(config: OpsConfig, source: Arc<Fake>, registry: Registry) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ops_http::serve(
            listener,
            config,
            source,
            Arc::new(registry),
            shutdown.clone(),
        ));
        Server { addr, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(PATIENCE, self.task).await.expect("serve returns");
        result.unwrap().unwrap();
    }
}

/// A parsed response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn parse(raw: &[u8]) -> Reply {
        let text = String::from_utf8(raw.to_vec()).unwrap();
        let (head, body) =
            text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        assert!(matches!(parts.next(), Some("HTTP/1.1" | "HTTP/1.0")), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_owned(), v.trim().to_owned())
            })
            .collect();
        Reply { status, headers, body: body.to_owned() }
    }
}

/// Sends `raw` on a new connection and reads until the server closes it.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("the server closes the connection after answering")
        .unwrap();
    Reply::parse(&response)
}

#[tokio::test]
async fn answers_each_path_and_method_then_closes() {
    let server = Server::with_registry(OpsConfig::default(), Fake::new(), sample_metrics()).await;
    let check = async |raw: &str, status: u16, body: Option<&str>| {
        let reply = exchange(server.addr, raw.as_bytes()).await;
        assert_eq!(reply.status, status, "{raw:?}: {reply:?}");
        assert_eq!(reply.header("connection"), Some("close"), "{raw:?}");
        if let Some(body) = body {
            assert_eq!(reply.body, body, "{raw:?}");
        }
        if !raw.starts_with("HEAD ") {
            let length: usize = reply.header("content-length").unwrap().parse().unwrap();
            assert_eq!(length, reply.body.len(), "{raw:?}");
        }
        reply
    };
    check("GET /healthz HTTP/1.1\r\nHost: ops\r\n\r\n", 200, Some("ok")).await;
    check("GET /healthz?probe=1 HTTP/1.0\r\n\r\n", 200, Some("ok")).await;
    check("GET /readyz HTTP/1.1\r\nHost: ops\r\n\r\n", 200, Some("ok")).await;
    let metrics = check("GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n", 200, None).await;
    assert!(metrics.body.contains("test_requests_total 42\n"), "{}", metrics.body);
    check("GET / HTTP/1.1\r\n\r\n", 404, Some("not found")).await;
    check("GET /healthz/ HTTP/1.1\r\n\r\n", 404, None).await;
    check("GET /nope HTTP/1.1\r\n\r\n", 404, None).await;
    let post = check("POST /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405, None).await;
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    check("DELETE /metrics HTTP/1.1\r\n\r\n", 405, Some("method not allowed")).await;
    check("get /healthz HTTP/1.1\r\n\r\n", 405, None).await;
    let head = check("HEAD /healthz HTTP/1.1\r\n\r\n", 200, Some("")).await;
    assert_eq!(head.header("content-length"), Some("2"));
    check("hello\r\n\r\n", 400, None).await;
    check("GET /healthz HTTP/1.1\r\nNo colon here\r\n\r\n", 400, None).await;
    check("GET http://ops/healthz HTTP/1.1\r\n\r\n", 400, None).await;
    check("\0\u{1}\u{2}garbage\n\n", 400, None).await;
    // hyper refuses other versions with 400 (the hand-written server said 505).
    check("GET /healthz HTTP/2.0\r\n\r\n", 400, None).await;
    server.stop().await;
}

#[tokio::test]
async fn a_half_sent_head_and_a_silent_connection_are_closed_unanswered() {
    let server = Server::start(OpsConfig::default(), Fake::new()).await;

    // The hand-written server answered 400 here; hyper closes without an answer (the peer
    // has closed its side). What matters is the same: the connection ends at once.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: ops\r\n").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    assert!(response.is_empty(), "{response:?}");

    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    assert!(response.is_empty(), "{response:?}");
    server.stop().await;
}

#[tokio::test]
async fn readyz_answers_503_with_the_reason_until_ready() {
    let source = Fake::new();
    let server = Server::start(OpsConfig::default(), Arc::clone(&source)).await;
    source.set_ready(Err("mesh not connected".to_owned()));
    let reply = exchange(server.addr, b"GET /readyz HTTP/1.1\r\n\r\n").await;
    assert_eq!((reply.status, reply.body.as_str()), (503, "not ready: mesh not connected"));
    // Liveness does not depend on readiness.
    assert_eq!(exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await.status, 200);
    source.set_ready(Ok(()));
    assert_eq!(exchange(server.addr, b"GET /readyz HTTP/1.1\r\n\r\n").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_openmetrics_text() {
    let server = Server::with_registry(OpsConfig::default(), Fake::new(), sample_metrics()).await;
    let reply = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n").await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    // Counters are declared without `_total` and sampled with it (OpenMetrics): the sample
    // names Prometheus stores are those of the text format 0.0.4.
    assert_eq!(
        reply.body,
        "# HELP test_sessions Open sessions.\n\
         # TYPE test_sessions gauge\n\
         test_sessions 3\n\
         # HELP test_requests Requests handled.\n\
         # TYPE test_requests counter\n\
         test_requests_total 42\n\
         # HELP test_ratio A fraction.\n\
         # TYPE test_ratio gauge\n\
         test_ratio 0.5\n\
         # EOF\n"
    );
    // The grammar, line by line: HELP, TYPE, then one sample of that name; `# EOF` last.
    let lines: Vec<&str> = reply.body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"));
    let lines = &lines[..lines.len() - 1];
    assert_eq!(lines.len() % 3, 0);
    for group in lines.chunks(3) {
        let name = group[0].strip_prefix("# HELP ").unwrap().split(' ').next().unwrap();
        let kind = group[1].strip_prefix(&format!("# TYPE {name} ")).unwrap();
        let sample = if kind == "counter" { format!("{name}_total ") } else { format!("{name} ") };
        assert!(kind == "gauge" || kind == "counter", "{group:?}");
        let value = group[2].strip_prefix(&sample).unwrap();
        value.parse::<f64>().unwrap();
    }
    // HEAD announces the same length without the body.
    let head = exchange(server.addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(head.header("content-length"), Some(reply.body.len().to_string().as_str()));
    assert!(head.body.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let config = OpsConfig::default();
    let limit = config.max_head_bytes;
    let server = Server::start(config, Fake::new()).await;
    let big = format!("GET /healthz HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(2 * limit));
    let reply = exchange(server.addr, big.as_bytes()).await;
    assert_eq!(reply.status, 431, "{reply:?}");
    // Just under the limit is fine.
    let prefix = "GET /healthz HTTP/1.1\r\nX-Big: ";
    let fits = format!("{prefix}{}\r\n\r\n", "a".repeat(limit - prefix.len() - 4));
    assert_eq!(fits.len(), limit);
    assert_eq!(exchange(server.addr, fits.as_bytes()).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_head_that_never_ends_is_cut_off_at_the_read_timeout() {
    let read_timeout = Duration::from_millis(300);
    let config = OpsConfig { read_timeout, ..OpsConfig::default() };
    let server = Server::start(config, Fake::new()).await;
    let started = Instant::now();
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // Slowloris: a header byte every 50 ms, which would keep a per-read timeout happy.
    let dripper = tokio::spawn(async move {
        if writer.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await.is_err() {
            return;
        }
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let mut response = Vec::new();
    let read = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut response))
        .await
        .expect("the server closes a slow connection");
    let elapsed = started.elapsed();
    // Closed (cleanly or by reset) without an answer.
    assert!(read.is_err() || response.is_empty(), "{:?}", String::from_utf8_lossy(&response));
    assert!(elapsed >= read_timeout - Duration::from_millis(50), "closed after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "closed after {elapsed:?}");
    dripper.abort();
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let config = OpsConfig {
        max_connections: 2,
        read_timeout: Duration::from_secs(30),
        ..OpsConfig::default()
    };
    let server = Server::start(config, Fake::new()).await;
    // Two connections that start a head and never finish it hold both slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        holders.push(s);
    }
    // The kernel completes the third connection, but the server does not take it yet.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered while both slots were held: {early:?}");
    // One holder leaves: its slot goes to the waiting connection.
    drop(holders.pop());
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, third.read_to_end(&mut response)).await.unwrap().unwrap();
    assert_eq!(Reply::parse(&response).status, 200);
    // Closing frees the slot at once (an open client holds it for `linger_timeout`).
    drop(third);

    // Many at once with one slot left: all are answered, in turn.
    let clients: Vec<_> = (0..10)
        .map(|_| tokio::spawn(exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n")))
        .collect();
    for client in clients {
        let reply = tokio::time::timeout(PATIENCE, client).await.unwrap().unwrap();
        assert_eq!(reply.status, 200);
    }
    drop(holders);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_connections_and_the_listener() {
    let server = Server::start(OpsConfig::default(), Fake::new()).await;
    let addr = server.addr;
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // Make sure the server has taken the connection before shutting down.
    assert_eq!(exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await.status, 200);
    server.stop().await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, open.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
}

#[tokio::test]
async fn invalid_config_is_refused_naming_the_field() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = OpsConfig { max_connections: 0, ..OpsConfig::default() };
    let registry = Arc::new(Registry::default());
    let err = ops_http::serve(listener, config, Fake::new(), registry, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::Config { field: "max_connections", .. }), "{err:?}");
    assert!(err.to_string().contains("max_connections"), "{err}");
}
