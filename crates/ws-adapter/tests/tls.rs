//! wss:// in process: `serve` with a [`TlsAcceptorHandle`], real rustls clients over
//! loopback, certificates made by the test. The reload swaps the certificate for new
//! connections only; a reload with a broken file changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use handler_core::auth::MockAuthenticator;
use handler_core::in_memory::InMemoryMesh;
use handler_core::{Coordinator, CoreConfig, Identity, UserId};
use nuropb_testkit::tls::{self, TempDir, TestPki};
use ws_adapter::{TlsAcceptorHandle, WsConfig, WsError, WsStatsHandle};

/// Bound on every wait for the gateway.
const WAIT: Duration = Duration::from_secs(10);

type TlsClient = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// The WebSocket server with `tls`, on the real coordinator and an in-memory `demo.add`.
struct Server {
    addr: SocketAddr,
    stats: WsStatsHandle,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(tls: TlsAcceptorHandle) -> Server {
        Server::start_with(WsConfig { tls: Some(tls), ..WsConfig::default() }).await
    }

    async fn start_with(config: WsConfig) -> Server {
        let (mesh, inbound) = InMemoryMesh::builder()
            .sync_method("demo", "add", |call| {
                let sum = call.params["a"].as_i64().unwrap() + call.params["b"].as_i64().unwrap();
                Ok(json!(sum))
            })
            .build();
        let mut auth = MockAuthenticator::new();
        auth.expect_authenticate().returning(|token| {
            Ok(Identity {
                user_id: UserId::new("alice-id"),
                username: "alice".into(),
                token: token.to_owned(),
                expires_at: None,
                token_expires_at: None,
            })
        });
        let shutdown = CancellationToken::new();
        let (coordinator, handle) = Coordinator::new(
            CoreConfig::default(),
            Arc::new(auth),
            Arc::new(mesh),
            inbound,
            TaskTracker::new(),
            shutdown.clone(),
        );
        tokio::spawn(coordinator.run(Duration::from_secs(1)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = WsStatsHandle::new();
        tokio::spawn(ws_adapter::serve(
            listener,
            config,
            handle,
            shutdown.clone(),
            TaskTracker::new(),
            stats.clone(),
        ));
        Server { addr, stats, shutdown }
    }

    /// A WebSocket session over TLS trusting `ca_pem`, past its hello.
    async fn connect(&self, ca_pem: &str) -> Result<TlsClient, std::io::Error> {
        let stream = tls::connect(self.addr, ca_pem).await?;
        let mut request =
            format!("wss://localhost:{}/ws", self.addr.port()).into_client_request().unwrap();
        request.headers_mut().insert("Authorization", "Bearer any".parse().unwrap());
        let (mut client, response) =
            tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
                .await
                .expect("upgrade in time")
                .expect("upgrade");
        assert_eq!(response.status(), 101);
        let hello = recv(&mut client).await;
        assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
        Ok(client)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn recv(client: &mut TlsClient) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, client.next()).await.expect("a frame in time");
        match frame.expect("open").expect("a frame") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// `demo.add` answers on `client`.
async fn assert_answers(client: &mut TlsClient, trace_id: &str) {
    let request = json!({"type": "request", "payload": {
        "service": "demo", "method": "add", "params": {"a": 2, "b": 40}, "trace_id": trace_id}});
    client.send(Message::text(request.to_string())).await.unwrap();
    let response = recv(client).await;
    assert_eq!(response["payload"]["trace_id"], trace_id, "{response}");
    assert_eq!(response["payload"]["result"], 42, "{response}");
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_only() {
    let dir = TempDir::new("ws-tls-reload");
    let old = TestPki::generate("old CA");
    let files = old.write(dir.path(), "server");
    let handle = TlsAcceptorHandle::from_pem_files(&files.cert, &files.key).unwrap();
    let server = Server::start(handle.clone()).await;

    let mut before = server.connect(&old.ca_pem).await.unwrap();
    assert_answers(&mut before, "before").await;

    // New files from a new CA, same paths; nothing changes until `reload`.
    let new = TestPki::generate("new CA");
    new.write(dir.path(), "server");
    let mut still_old = server.connect(&old.ca_pem).await.unwrap();
    assert_answers(&mut still_old, "still-old").await;

    handle.reload().unwrap();
    let mut after = server.connect(&new.ca_pem).await.unwrap();
    assert_answers(&mut after, "after").await;
    let Err(refused) = server.connect(&old.ca_pem).await else {
        panic!("the old CA still fits after the reload");
    };
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    // The sessions that started on the old certificate are untouched.
    assert_answers(&mut before, "before-2").await;
    assert_answers(&mut still_old, "still-old-2").await;

    // A broken key file: the reload fails naming it, and the new certificate stays.
    std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\nnot base64!\n").unwrap();
    let error = handle.reload().unwrap_err();
    assert!(matches!(error, WsError::TlsPem { ref path, .. } if *path == files.key), "{error:?}");
    assert!(error.to_string().contains(&files.key.display().to_string()), "{error}");
    // A key of another certificate: refused naming both files.
    let other = TestPki::generate("other CA");
    std::fs::write(&files.key, &other.key_pem).unwrap();
    let error = handle.reload().unwrap_err();
    assert!(matches!(error, WsError::TlsKeyRejected { .. }), "{error:?}");
    // A missing certificate file.
    std::fs::remove_file(&files.cert).unwrap();
    let error = handle.reload().unwrap_err();
    assert!(matches!(error, WsError::TlsFile { ref path, .. } if *path == files.cert), "{error:?}");

    let mut later = server.connect(&new.ca_pem).await.unwrap();
    assert_answers(&mut later, "later").await;
    assert_answers(&mut after, "after-2").await;
    // Only the one client that trusted the old CA failed its handshake.
    assert_eq!(server.stats.stats().tls_handshake_failures, 1);
}

#[tokio::test]
async fn bad_files_are_refused_at_start_naming_the_file() {
    let dir = TempDir::new("ws-tls-files");
    let pki = TestPki::generate("CA");
    let files = pki.write(dir.path(), "server");
    let missing = dir.path().join("missing.pem");
    let check = |cert: &std::path::Path, key: &std::path::Path, named: &std::path::Path| {
        let error = TlsAcceptorHandle::from_pem_files(cert, key).unwrap_err();
        assert!(error.to_string().contains(&named.display().to_string()), "{error}");
    };
    check(&missing, &files.key, &missing);
    check(&files.cert, &missing, &missing);
    // The key where the certificate belongs, and the other way round.
    check(&files.key, &files.key, &files.key);
    check(&files.cert, &files.cert, &files.cert);
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    check(&empty, &files.key, &empty);
    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, vec![b'a'; (ws_adapter::MAX_TLS_FILE_BYTES + 1) as usize]).unwrap();
    check(&huge, &files.key, &huge);
    assert!(TlsAcceptorHandle::from_pem_files(&files.cert, &files.key).is_ok());
}

#[tokio::test]
async fn a_silent_client_holds_no_session_slot_and_is_cut_off_at_the_handshake_timeout() {
    let dir = TempDir::new("ws-tls-idle");
    let pki = TestPki::generate("CA");
    let files = pki.write(dir.path(), "server");
    let tls = TlsAcceptorHandle::from_pem_files(&files.cert, &files.key).unwrap();
    let handshake_timeout = Duration::from_millis(800);
    let config =
        WsConfig { tls: Some(tls), max_connections: 1, handshake_timeout, ..WsConfig::default() };
    let server = Server::start_with(config).await;
    let since = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // The only session slot is still free for a client that completes its handshakes.
    let mut session = server.connect(&pki.ca_pem).await.unwrap();
    assert_answers(&mut session, "t1").await;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("cut off");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let after = since.elapsed();
    assert!(
        after >= handshake_timeout - Duration::from_millis(50)
            && after < handshake_timeout + Duration::from_secs(2),
        "{after:?}"
    );
    assert_eq!(server.stats.stats().tls_handshake_failures, 1);
    assert_answers(&mut session, "t2").await;
}
