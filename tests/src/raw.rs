//! Raw TCP for what a WebSocket library will not send: hand-written upgrade requests (to
//! read the HTTP answer to a malformed one) and hand-built frames (to see the close a
//! protocol violation gets). Every read is bounded by [`RAW_WAIT`].

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a raw read of a head or a close frame may take.
pub const RAW_WAIT: Duration = Duration::from_secs(5);
/// The `Sec-WebSocket-Key` of RFC 6455's example.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid upgrade request for `/ws` with `extra` header lines (each ending in `\r\n`).
pub fn upgrade(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// The response head, up to the blank line (at most 64 KiB), read within [`RAW_WAIT`]; a
/// head that does not come in time is what was read so far ("" if the server closed).
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 64 << 10 {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(RAW_WAIT, read).await;
    String::from_utf8_lossy(&head).into_owned()
}

/// The status code of a response head.
pub fn status(head: &str) -> Option<u16> {
    head.split(' ').nth(1)?.parse().ok()
}

/// A masked client frame with mask 0 (the payload goes as is).
pub fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut f = vec![first_byte, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until a close frame and returns its code (`None`: TCP closed, or
/// nothing within [`RAW_WAIT`]).
pub async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            stream.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    stream.read_exact(&mut l).await.ok()?;
                    usize::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    stream.read_exact(&mut l).await.ok()?;
                    usize::try_from(u64::from_be_bytes(l)).ok()?
                }
                n => usize::from(n),
            };
            let mut payload = vec![0u8; len];
            stream.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
            }
        }
    };
    tokio::time::timeout(RAW_WAIT, read).await.ok().flatten()
}
