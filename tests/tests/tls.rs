//! End-to-end: the real binary with `--tls-cert-file`/`--tls-key-file` (in-memory mode),
//! certificates made by the test, real rustls clients over loopback. A session trusting
//! the CA upgrades with a token from `/demo/token` (fetched over TLS too) and gets
//! answers; clients speaking plain TCP or trusting another CA fail cleanly while that
//! session keeps working; `/healthz` answers over TLS; a TCP client that sends nothing is
//! cut off at the handshake timeout; SIGHUP serves a renewed certificate to new connections
//! and refuses a broken one. And the binary on a RabbitMQ node of the test's own
//! over `amqps://` with `--amqp-ca-file`. Needs a built binary (see `tests/http.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e_tests::process::{GatewayProcess, Mesh};
use e2e_tests::{Client, token};
use futures_util::{SinkExt, StreamExt};
use nuropb_testkit::FakeService;
use nuropb_testkit::node::{NodeTls, RabbitNode};
use nuropb_testkit::tls::{self, TempDir, TestPki};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(10);
/// The binary's `handshake_timeout` (`WsConfig`'s default; it has no flag).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Session = WebSocketStream<TlsStream<TcpStream>>;

/// Writes `request`, then reads until the server closes or errs (rustls reports a close
/// without `close_notify` as an error; what was read before it counts), within [`WAIT`].
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Vec<u8> {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("closed in time");
    all
}

/// A plain HTTP GET over TLS: (status, body).
async fn get_tls(addr: SocketAddr, ca_pem: &str, path: &str) -> (u16, String) {
    let stream = tls::connect(addr, ca_pem).await.unwrap();
    let all = exchange(stream, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")).await;
    let text = String::from_utf8(all).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_owned())
}

/// A metric's value from the ops endpoint (plain HTTP).
async fn metric(ops: &str, name: &str) -> f64 {
    let stream = TcpStream::connect(ops).await.unwrap();
    let all = exchange(stream, "GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n").await;
    let text = String::from_utf8(all).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).expect(name);
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn session(addr: SocketAddr, ca_pem: &str, token: &str) -> Session {
    let stream = tls::connect(addr, ca_pem).await.unwrap();
    let mut request = format!("wss://localhost:{}/ws", addr.port()).into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("upgraded in time")
            .expect("upgraded");
    assert_eq!(response.status(), 101);
    let hello = recv(&mut ws).await;
    assert_eq!(hello["payload"]["event"]["user_id"], "demo-user", "{hello}");
    ws
}

async fn recv(ws: &mut Session) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time");
        match frame.expect("open").expect("a frame") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn assert_adds(ws: &mut Session, trace_id: &str) {
    let request = json!({"type": "request", "payload": {
        "service": "demo", "method": "add", "params": {"a": 2, "b": 40}, "trace_id": trace_id}});
    ws.send(Message::text(request.to_string())).await.unwrap();
    let response = recv(ws).await;
    assert_eq!(response["payload"]["trace_id"], trace_id, "{response}");
    assert_eq!(response["payload"]["result"], 42, "{response}");
}

#[tokio::test]
async fn wss_serves_sessions_and_http_and_fails_bad_clients_cleanly() {
    let dir = TempDir::new("e2e-tls");
    let pki = TestPki::generate("gateway CA");
    let files = pki.write(dir.path(), "gateway");
    let args: Vec<String> = [
        "--tls-cert-file",
        files.cert.to_str().unwrap(),
        "--tls-key-file",
        files.key.to_str().unwrap(),
        "--ops-listen",
        "127.0.0.1:0",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let gateway = GatewayProcess::start_with(Mesh::InMemory, &args);
    assert!(gateway.url.starts_with("wss://"), "{}", gateway.url);
    let addr: SocketAddr = gateway.addr.parse().unwrap();
    let ops = gateway.ops_addr.clone().unwrap();

    // Sends nothing at all: no TLS handshake, no head. Timed from here.
    let idle_since = Instant::now();
    let mut idle = TcpStream::connect(addr).await.unwrap();

    let (status, body) = get_tls(addr, &pki.ca_pem, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_tls(addr, &pki.ca_pem, "/demo/token").await;
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();

    let mut bystander = session(addr, &pki.ca_pem, &token).await;
    assert_adds(&mut bystander, "t1").await;

    // A plain-TCP client on the TLS port: no HTTP answer, the connection just ends.
    let plain = TcpStream::connect(addr).await.unwrap();
    let upgrade = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answer = exchange(plain, upgrade).await;
    assert!(!answer.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&answer));

    // A client that does not trust the gateway's CA.
    let other = TestPki::generate("other CA");
    let Err(error) = tls::connect(addr, &other.ca_pem).await else {
        panic!("a client that does not trust the CA got in");
    };
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");

    // The bystander is untouched, and a new trusting client gets in.
    assert_adds(&mut bystander, "t2").await;
    let mut second = session(addr, &pki.ca_pem, &token).await;
    assert_adds(&mut second, "t3").await;
    let failures = "nuropb_gateway_ws_tls_handshake_failures_total";
    assert_eq!(metric(&ops, failures).await, 2.0);

    // The idle client is cut off at the handshake timeout, and counted.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT + WAIT, idle.read(&mut buf)).await;
    let cut_after = idle_since.elapsed();
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");
    assert!(
        cut_after >= HANDSHAKE_TIMEOUT - Duration::from_millis(200)
            && cut_after < HANDSHAKE_TIMEOUT + Duration::from_secs(3),
        "cut off after {cut_after:?}"
    );
    assert_eq!(metric(&ops, failures).await, 3.0);
    assert_adds(&mut bystander, "t4").await;
    gateway.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reaches_the_broker_over_amqps_with_a_ca_file() {
    let dir = TempDir::new("e2e-amqps");
    let pki = TestPki::generate("broker CA");
    let files = pki.write(dir.path(), "broker");
    let ca = files.ca.to_str().unwrap().to_owned();
    let node = RabbitNode::start_with_tls(
        "e2e-amqps",
        NodeTls { files: files.clone(), require_client_cert: false },
    );
    let service = FakeService::start(&node.amqp_url(), "svc-amqps", false).await;
    let url = node.amqps_url().unwrap();
    let args = vec!["--amqp-ca-file".to_owned(), ca];
    let gateway =
        GatewayProcess::start_with(Mesh::Amqp { url: &url, service_name: "gw-amqps" }, &args);
    let bearer = format!("Bearer {}", token("alice"));
    let mut client = Client::connect(&gateway.url, &[("Authorization", &bearer)]).await.unwrap();
    let hello = client.recv_json().await;
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    client.request("svc-amqps", "echo", json!({"over": "amqps"}), "a1").await;
    let response = client.recv_json().await;
    assert_eq!(response["payload"]["result"], json!({"over": "amqps"}), "{response}");
    gateway.stop();
    service.stop().await;
}

/// SIGHUP re-reads the certificate files: a renewed certificate (of another CA) written
/// over them is served to new connections while the session opened before it goes on; a
/// broken key written over them is refused and the certificate in force stays.
#[tokio::test]
async fn sighup_serves_a_renewed_certificate_to_new_connections_only() {
    let dir = TempDir::new("e2e-tls-reload");
    let old = TestPki::generate("old CA");
    let files = old.write(dir.path(), "gateway");
    let args: Vec<String> = [
        "--tls-cert-file",
        files.cert.to_str().unwrap(),
        "--tls-key-file",
        files.key.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let gateway = GatewayProcess::start_capturing(Mesh::InMemory, &args);
    let addr: SocketAddr = gateway.addr.parse().unwrap();
    let (status, body) = get_tls(addr, &old.ca_pem, "/demo/token").await;
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    let mut before = session(addr, &old.ca_pem, &token).await;
    assert_adds(&mut before, "r1").await;

    // Renewed: another CA's certificate and key written over the same two files.
    let new = TestPki::generate("new CA");
    std::fs::write(&files.cert, &new.cert_pem).unwrap();
    std::fs::write(&files.key, &new.key_pem).unwrap();
    gateway.hangup();
    let deadline = Instant::now() + WAIT;
    loop {
        match tls::connect(addr, &new.ca_pem).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "the renewed certificate never served: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let Err(error) = tls::connect(addr, &old.ca_pem).await else {
        panic!("the old certificate is still served after the reload");
    };
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
    let mut after = session(addr, &new.ca_pem, &token).await;
    assert_adds(&mut after, "r2").await;
    assert_adds(&mut before, "r3").await;

    // A broken key: the reload is refused as a whole, the renewed certificate stays.
    std::fs::write(&files.key, "not a key\n").unwrap();
    gateway.hangup();
    let deadline = Instant::now() + WAIT;
    loop {
        let (lines, _) = gateway.stderr_lines();
        if lines.iter().any(|l| l.contains("reload refused") && l.contains("--tls-key-file")) {
            break;
        }
        assert!(Instant::now() < deadline, "no refused reload logged: {lines:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tls::connect(addr, &new.ca_pem).await.expect("the renewed certificate is still served");
    assert_adds(&mut before, "r4").await;
    assert_adds(&mut after, "r5").await;
    gateway.stop();
}
