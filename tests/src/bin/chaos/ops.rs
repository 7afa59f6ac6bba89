//! The gateway's operations endpoint as the suite reads it: `/readyz` status codes and
//! single values of `/metrics`, over a plain loopback TCP connection with bounded waits.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(2);

/// `GET path`: the status code and body, `None` when the endpoint does not answer.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(WAIT, run).await.ok().flatten()
}

/// `/readyz`'s status code (200 ready, 503 not), `None` when it does not answer.
pub async fn ready(addr: &str) -> Option<u16> {
    get(addr, "/readyz").await.map(|(code, _)| code)
}

/// Polls `/readyz` every 50 ms until it returns `code`; how long that took, `None` if not
/// within `within`.
pub async fn wait_ready(addr: &str, code: u16, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if ready(addr).await == Some(code) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One metric's value (`name value` line of `/metrics`).
pub async fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = get(addr, "/metrics").await?;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `name` every 100 ms until `pred` holds; how long it took, `None` if not within.
pub async fn wait_metric(
    addr: &str,
    name: &str,
    within: Duration,
    pred: impl Fn(f64) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if metric(addr, name).await.is_some_and(&pred) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
