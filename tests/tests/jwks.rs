//! End-to-end: JWKS key rotation under load, against the real gateway binary. The test
//! serves the JWKS over loopback HTTP (a small server that counts its fetches) and changes
//! it while sessions signed with the old key make requests without pause.
//!
//! Runs `target/debug/nuropb-gateway` unless `NUROPB_GATEWAY_BIN` names another (see
//! `http.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a failure is a failed test")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use e2e_tests::Client;
use e2e_tests::process::{GatewayProcess, Mesh};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite;

const SECRET_A: &[u8] = b"jwks-key-a-0123456789abcdef-0123";
const SECRET_B: &[u8] = b"jwks-key-b-0123456789abcdef-0123";
const SESSIONS: usize = 8;

/// The JWKS served now, and how many times it was fetched.
#[derive(Default)]
struct JwksServer {
    body: Mutex<String>,
    fetches: AtomicUsize,
}

impl JwksServer {
    fn set(&self, keys: &[(&str, &[u8])]) {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, secret)| {
                let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
                json!({"kty": "oct", "kid": kid, "alg": "HS256", "use": "sig", "k": k})
            })
            .collect();
        *self.body.lock().unwrap() = json!({ "keys": keys }).to_string();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Serves `server`'s JWKS over HTTP/1.1 on loopback, one request per connection.
async fn serve(server: Arc<JwksServer>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Ends with the test's runtime.
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
                    {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                server.fetches.fetch_add(1, Ordering::SeqCst);
                let body = server.body.lock().unwrap().clone();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

fn token(user: &str, kid: &str, secret: &[u8]) -> String {
    let header = Header { kid: Some(kid.to_owned()), ..Header::default() };
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    jsonwebtoken::encode(
        &header,
        &json!({"sub": user, "exp": exp}),
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

async fn connect(url: &str, token: &str) -> Result<Client, tungstenite::Error> {
    let bearer = format!("Bearer {token}");
    let mut client = Client::connect(url, &[("Authorization", &bearer)]).await?;
    let hello = client.recv_json().await;
    assert_eq!(hello["type"], "event", "{hello}");
    Ok(client)
}

fn status(refused: Result<Client, tungstenite::Error>) -> u16 {
    match refused {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("not an HTTP refusal: {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_load_drops_no_session_and_new_keys_work_at_once() {
    let server = Arc::new(JwksServer::default());
    server.set(&[("A", SECRET_A)]);
    let jwks_url = serve(Arc::clone(&server)).await;
    let args: Vec<String> = [
        "--jwks-url",
        &jwks_url,
        "--jwks-refresh-secs",
        "3",
        "--jwks-min-refresh-secs",
        "1",
        "--max-sessions-per-user",
        "100",
        "--rate-per-second",
        "100000",
        "--rate-burst",
        "100000",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let gateway = GatewayProcess::start_with(Mesh::InMemory, &args);
    let url = gateway.url.clone();
    assert_eq!(server.fetches(), 1, "the first fetch is made at start");

    // Sessions signed with key A, each making requests back to back until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..SESSIONS {
        let mut client = connect(&url, &token(&format!("user-{i}"), "A", SECRET_A)).await.unwrap();
        let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
        load.push(tokio::spawn(async move {
            // Bounded: the test stops it after the rotation (and each wait is bounded).
            for n in 0..1_000_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let trace = format!("t{n}");
                client.request("demo", "echo", json!({"n": n}), &trace).await;
                let answer = client.recv_json().await;
                assert_eq!(answer["type"], "response", "session {i}: {answer}");
                assert_eq!(answer["payload"]["trace_id"], trace.as_str(), "{answer}");
                assert!(answer["payload"]["error"].is_null(), "session {i}: {answer}");
                answered.fetch_add(1, Ordering::SeqCst);
                // Paced, so that the load does not starve the other helpers' builds.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            client
        }));
    }
    // Past the minimum gap since the start-up fetch, so the next unknown kid fetches at once.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // Key B published: a token signed with it is accepted at once (its unknown kid fetches).
    server.set(&[("A", SECRET_A), ("B", SECRET_B)]);
    let before = server.fetches();
    let b = connect(&url, &token("user-b", "B", SECRET_B)).await.expect("kid B accepted at once");
    assert_eq!(server.fetches(), before + 1, "one fetch for the unknown kid");

    // Key A withdrawn: once the gateway has the new set, A's tokens are refused at the upgrade
    // while A's sessions go on.
    server.set(&[("B", SECRET_B)]);
    let withdrawn = server.fetches();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.fetches() == withdrawn {
        assert!(tokio::time::Instant::now() < deadline, "no periodic refresh within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(connect(&url, &token("user-x", "A", SECRET_A)).await), 401, "kid A refused");

    // Unknown kids, many at once: refused, and they share the fetches (at most one per
    // --jwks-min-refresh-secs).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let before = server.fetches();
    let mut tries = Vec::new();
    for i in 0..20 {
        let url = url.clone();
        tries.push(tokio::spawn(async move {
            status(connect(&url, &token(&format!("z{i}"), "Z", SECRET_B)).await)
        }));
    }
    for t in tries {
        assert_eq!(t.await.unwrap(), 401, "an unknown kid is refused");
    }
    let during = server.fetches() - before;
    assert!((1..=2).contains(&during), "20 unknown-kid tokens made {during} fetches");

    // The load ran through all of it: every request answered, every session still open.
    let answered_before_stop = answered.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let mut clients = Vec::new();
    for task in load {
        clients.push(task.await.expect("a session's requests all succeeded"));
    }
    assert!(answered_before_stop >= SESSIONS * 10, "only {answered_before_stop} requests answered");
    clients.push(b);
    for client in &mut clients {
        client.send_json(&json!({"type": "ping"})).await;
        assert_eq!(client.recv_json().await["type"], "pong", "the session is still open");
    }
    gateway.stop();
}
