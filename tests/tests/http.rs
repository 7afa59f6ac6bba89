//! End-to-end: plain HTTP on the WebSocket port, over loopback. The adapter (`/healthz`, 404,
//! an embedder's routes, limits) next to WebSocket upgrades on the same port, and the real
//! binary's demo routes (the page, the client library, `/demo/token`).
//!
//! The binary tests run `target/debug/nuropb-gateway` unless `NUROPB_GATEWAY_BIN` names
//! another: `cargo test --workspace` builds it; with `-p e2e-tests` alone, run
//! `cargo build -p nuropb-gateway` first.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::sync::Arc;
use std::time::Duration;

use e2e_tests::process::{GatewayProcess, Mesh};
use e2e_tests::{Client, Gateway, Options, token};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ws_adapter::{HttpRequest, HttpResponse, HttpRoutes};

/// An answer as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn field(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// Sends `request` and reads until the server closes (one request per connection), within
/// 5 s.
async fn send(addr: &str, request: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("answered and closed in time")
        .unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
    let head = String::from_utf8(all[..end].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer { status, head, body: all[end..].to_vec() }
}

async fn get(addr: &str, path: &str) -> Answer {
    send(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await
}

#[derive(Debug)]
struct Hello;

impl HttpRoutes for Hello {
    fn respond(&self, request: &HttpRequest<'_>) -> Option<HttpResponse> {
        (request.path() == "/hello")
            .then(|| HttpResponse::ok("text/plain; charset=utf-8", &b"hello\n"[..]))
    }
}

fn with_routes() -> Options {
    let mut options = Options::default();
    options.ws.http_routes = Some(Arc::new(Hello));
    options
}

#[tokio::test]
async fn healthz_routes_and_404_next_to_upgrades_on_any_path() {
    let gw = Gateway::start_with(with_routes()).await;
    let addr = gw.addr.to_string();
    let health = get(&addr, "/healthz").await;
    assert_eq!((health.status, health.text()), (200, "ok\n"), "{health:?}");
    assert_eq!(health.field("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(health.field("cache-control"), Some("no-store"));
    assert_eq!(health.field("x-content-type-options"), Some("nosniff"));
    let head = send(&addr, "HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!((head.status, head.body.len()), (200, 0), "{head:?}");
    assert_eq!(head.field("content-length"), Some("3"));
    let hello = get(&addr, "/hello").await;
    assert_eq!((hello.status, hello.text()), (200, "hello\n"), "{hello:?}");
    for path in ["/", "/ws", "/nuropb-gateway.js", "/demo/token"] {
        assert_eq!(get(&addr, path).await.status, 404, "{path}");
    }
    let post = send(&addr, "POST /hello HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(post.status, 405, "{post:?}");
    let body = send(&addr, "GET /hello HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\n\r\nabc").await;
    assert_eq!(body.status, 413, "{body:?}");
    // Plain HTTP is not a bad handshake.
    assert_eq!(gw.ws_stats.stats().bad_handshakes, 0);

    // Upgrades on any path, the same port, as before.
    let bearer = format!("Bearer {}", token("alice"));
    for path in ["/", "/ws", "/hello", "/healthz", "/any/path?x=1"] {
        let url = format!("ws://{addr}{path}");
        let mut client = Client::connect(&url, &[("Authorization", &bearer)]).await.unwrap();
        let hello = client.recv_json().await;
        assert_eq!(hello["payload"]["topic"], "hello", "{path}: {hello}");
    }
    // A broken handshake is still told what is wrong (not 404).
    let broken = send(&addr, "GET /hello HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\r\n").await;
    assert_eq!(broken.status, 400, "{broken:?}");
    assert_eq!(gw.ws_stats.stats().bad_handshakes, 1);
    gw.stop().await;
}

#[tokio::test]
async fn plain_http_has_the_head_limits_of_an_upgrade() {
    let mut options = with_routes();
    options.ws.handshake_timeout = Duration::from_secs(1);
    let gw = Gateway::start_with(options).await;
    let addr = gw.addr.to_string();
    let big = format!("GET /hello HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n", "a".repeat(20 << 10));
    assert_eq!(send(&addr, &big).await.status, 431);
    let many = format!("GET /hello HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(80));
    assert_eq!(send(&addr, &many).await.status, 431);

    // A head that never ends is closed unanswered after `handshake_timeout`.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n").await.unwrap();
    let started = std::time::Instant::now();
    e2e_tests::expect_tcp_closed(&mut slow, Duration::from_secs(3)).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_request_being_read_holds_a_handshake_slot() {
    let mut options = with_routes();
    options.ws.max_handshakes_in_flight = 1;
    let gw = Gateway::start_with(options).await;
    let addr = gw.addr.to_string();
    let mut pending = TcpStream::connect(&addr).await.unwrap();
    pending.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    // Accepted in order: the first holds the only slot while its head is incomplete.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = get(&addr, "/hello").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(gw.ws_stats.stats().handshakes_refused, 1);
    // The first completes and is answered; then the slot is free again.
    pending.write_all(b"Host: gw\r\n\r\n").await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), pending.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    assert!(all.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&all));
    assert_eq!(get(&addr, "/hello").await.status, 200);
    gw.stop().await;
}

/// The library as committed (what the binary includes).
const LIBRARY_JS: &str = include_str!("../../clients/js/dist/nuropb-gateway.js");

#[tokio::test]
async fn demo_mode_serves_the_page_the_library_and_tokens_the_gateway_accepts() {
    let gateway = GatewayProcess::start_with(Mesh::InMemory, &[]);
    let addr = gateway.addr.clone();
    let health = get(&addr, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?} (a stale binary? `cargo build -p nuropb-gateway`)");

    let page = get(&addr, "/").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.field("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.field("x-content-type-options"), Some("nosniff"));
    let csp = page.field("content-security-policy").unwrap();
    assert!(csp.starts_with("default-src 'none'; script-src 'self';"), "{csp}");
    assert!(page.text().contains(r#"<script type="module" src="/demo.js">"#));
    for id in ["state", "add-result", "echo-result", "ticks", "error", "add", "echo", "refresh"] {
        assert!(page.text().contains(&format!(r#"id="{id}""#)), "#{id}");
    }
    let script = get(&addr, "/demo.js").await;
    assert_eq!(script.field("content-type"), Some("text/javascript; charset=utf-8"));
    assert!(script.text().contains(r#"import { connect } from "/nuropb-gateway.js";"#));

    let library = get(&addr, "/nuropb-gateway.js").await;
    assert_eq!(library.status, 200);
    assert_eq!(library.field("content-type"), Some("text/javascript; charset=utf-8"));
    assert_eq!(library.text(), LIBRARY_JS);

    let mut tokens = Vec::new();
    for _ in 0..2 {
        let answer = get(&addr, "/demo/token").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.field("content-type"), Some("application/json"));
        assert_eq!(answer.field("cache-control"), Some("no-store"));
        let body: Value = serde_json::from_slice(&answer.body).unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let expires_at = body["expires_at"].as_u64().unwrap();
        assert!((now + 60..=now + 3600).contains(&expires_at), "{body}");
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    assert_ne!(tokens[0], tokens[1], "a fresh token each call");

    // The gateway accepts its own demo token on an upgrade, and the demo service answers.
    let bearer = format!("Bearer {}", tokens[1]);
    let mut client = Client::connect(&gateway.url, &[("Authorization", &bearer)]).await.unwrap();
    let hello = client.recv_json().await;
    assert_eq!(hello["payload"]["event"]["user_id"], "demo-user", "{hello}");
    client.request("demo", "add", serde_json::json!({"a": 2, "b": 40}), "t1").await;
    let response = client.recv_json().await;
    assert_eq!(response["payload"]["result"], 42, "{response}");
    gateway.stop();
}
