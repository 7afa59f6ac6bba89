//! The real client address behind a proxy, against the real binary over raw loopback TCP:
//! a PROXY v2 header from a trusted peer names the client the per-address limit counts;
//! forwarding fields from an untrusted peer are ignored; a bad PROXY header is closed
//! cleanly and the listener serves on; with `--proxy-protocol` an untrusted peer is
//! refused. Claimed and connecting addresses are all loopback (127.0.0.0/8).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use e2e_tests::process::{GatewayProcess, Mesh};
use e2e_tests::{raw, token};

/// The v2 signature.
const V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY v2 header: PROXY, TCP over IPv4, from `client` to 127.0.0.1:80.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = V2.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x30, 0x39, 0, 80]);
    h
}

fn gateway(extra: &[&str]) -> GatewayProcess {
    let mut args: Vec<String> = ["--max-connections-per-ip", "2", "--demo-tick-secs", "0"]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    GatewayProcess::start_with(Mesh::InMemory, &args)
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: [u8; 4], addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// Sends `prefix` and a valid upgrade with `extra` header lines; the status answered (the
/// stream stays open, holding the connection when it is 101).
async fn upgrade(stream: &mut TcpStream, prefix: &[u8], extra: &str) -> Option<u16> {
    let mut bytes = prefix.to_vec();
    let auth = format!("Authorization: Bearer {}\r\n{extra}", token("proxied"));
    bytes.extend_from_slice(raw::upgrade(&auth).as_bytes());
    stream.write_all(&bytes).await.unwrap();
    raw::status(&raw::read_head(stream).await)
}

/// Whether the server closes `stream` without a byte of answer within the raw wait.
async fn closed_unanswered(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(raw::RAW_WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn a_trusted_proxys_proxy_header_names_the_client_the_limit_counts() {
    let gw = gateway(&["--trusted-proxies", "127.0.0.1", "--proxy-protocol", "true"]);
    let lb = [127, 0, 0, 1];
    // Two sessions for 127.0.0.77, through one proxy address: the limit (2) is 77's.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(lb, &gw.addr).await;
        assert_eq!(upgrade(&mut s, &proxy_v2([127, 0, 0, 77]), "").await, Some(101));
        held.push(s);
    }
    let mut third = connect_from(lb, &gw.addr).await;
    assert_eq!(upgrade(&mut third, &proxy_v2([127, 0, 0, 77]), "").await, Some(429));
    // Another client through the same proxy is not affected: the proxy is not the client.
    for client in [[127, 0, 0, 78], [127, 0, 0, 79]] {
        let mut s = connect_from(lb, &gw.addr).await;
        assert_eq!(upgrade(&mut s, &proxy_v2(client), "").await, Some(101), "{client:?}");
        held.push(s);
    }
    // v1 text too.
    let mut s = connect_from(lb, &gw.addr).await;
    let v1 = b"PROXY TCP4 127.0.0.80 127.0.0.1 5000 80\r\n";
    assert_eq!(upgrade(&mut s, v1, "").await, Some(101));
    held.push(s);

    // A malformed header (addresses shorter than their family), an oversized one, and
    // none at all: closed without an answer; the listener serves on.
    let mut short = V2.to_vec();
    short.extend_from_slice(&[0x21, 0x11, 0, 4, 127, 0, 0, 77]);
    let mut oversized = V2.to_vec();
    oversized.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
    oversized.extend_from_slice(&[0u8; 4096]);
    for (what, bytes) in
        [("malformed", short), ("oversized", oversized), ("missing", raw::upgrade("").into_bytes())]
    {
        let mut s = connect_from(lb, &gw.addr).await;
        // The server may close before taking every byte; a failed write is a close too.
        let _ = s.write_all(&bytes).await;
        assert!(closed_unanswered(&mut s).await, "{what} PROXY header: closed unanswered");
    }
    let mut s = connect_from(lb, &gw.addr).await;
    assert_eq!(upgrade(&mut s, &proxy_v2([127, 0, 0, 81]), "").await, Some(101));

    // With --proxy-protocol, a peer that is not a trusted proxy is refused outright.
    let mut stranger = connect_from([127, 0, 0, 2], &gw.addr).await;
    let _ = stranger.write_all(raw::upgrade("").as_bytes()).await;
    assert!(closed_unanswered(&mut stranger).await, "untrusted peer with --proxy-protocol");
    let mut s = connect_from(lb, &gw.addr).await;
    assert_eq!(upgrade(&mut s, &proxy_v2([127, 0, 0, 82]), "").await, Some(101));
    drop(held);
    gw.stop();
}

#[tokio::test]
async fn forwarding_fields_count_only_from_a_trusted_proxy() {
    let gw = gateway(&["--trusted-proxies", "127.0.0.1"]);
    // From an untrusted peer, X-Forwarded-For and Forwarded are ignored: the limit counts
    // the peer, whatever each connection claims.
    let untrusted = [127, 0, 0, 3];
    let mut held = Vec::new();
    for claim in ["X-Forwarded-For: 127.0.0.91\r\n", "Forwarded: for=127.0.0.92\r\n"] {
        let mut s = connect_from(untrusted, &gw.addr).await;
        assert_eq!(upgrade(&mut s, b"", claim).await, Some(101), "{claim}");
        held.push(s);
    }
    let mut s = connect_from(untrusted, &gw.addr).await;
    assert_eq!(upgrade(&mut s, b"", "X-Forwarded-For: 127.0.0.93\r\n").await, Some(429));

    // From the trusted proxy, the rightmost untrusted hop is the client.
    let lb = [127, 0, 0, 1];
    for claim in [
        "X-Forwarded-For: 127.0.0.200, 127.0.0.50\r\n",
        "Forwarded: for=127.0.0.50;proto=https\r\n",
    ] {
        let mut s = connect_from(lb, &gw.addr).await;
        assert_eq!(upgrade(&mut s, b"", claim).await, Some(101), "{claim}");
        held.push(s);
    }
    let mut s = connect_from(lb, &gw.addr).await;
    let claim = "X-Forwarded-For: 127.0.0.50, 127.0.0.1\r\n";
    assert_eq!(upgrade(&mut s, b"", claim).await, Some(429), "127.0.0.50 holds two already");
    let mut s = connect_from(lb, &gw.addr).await;
    assert_eq!(upgrade(&mut s, b"", "X-Forwarded-For: 127.0.0.51\r\n").await, Some(101));
    held.push(s);
    // Without PROXY protocol, a PROXY header is not HTTP: 400, and the listener serves on.
    let mut s = connect_from(lb, &gw.addr).await;
    s.write_all(b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n").await.unwrap();
    let status = upgrade(&mut s, b"", "").await;
    assert!(matches!(status, Some(400) | None), "{status:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut s = connect_from(lb, &gw.addr).await;
    assert_eq!(upgrade(&mut s, b"", "X-Forwarded-For: 127.0.0.52\r\n").await, Some(101));
    drop(held);
    gw.stop();
}
