//! The HTTP head of an upgrade, read and checked before tungstenite sees it, so that every
//! malformed handshake gets the answer RFC 6455 §4.2 requires (400; 426 with
//! `Sec-WebSocket-Version: 13`; 431 for an oversized head) instead of a bare TCP close:
//! tungstenite fails most of these before its callback runs, with nobody answering. A head
//! that passes is replayed to tungstenite through [`Prefixed`], which parses it again and
//! runs the checks of `upgrade` (capacity, origin, credentials). A head without any field
//! of a WebSocket handshake is plain HTTP ([`classify`]), replayed to hyper instead (`http`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Most header lines in an upgrade request; more → 431. tungstenite itself stops at 124.
pub(crate) const MAX_HEADERS: usize = 64;

/// Room made in the head's buffer before each read of it.
const HEAD_READ_CHUNK: usize = 2048;

/// Bytes read at most while waiting for a refused client to close, so that our close is a
/// FIN the client reads the answer before, not a reset that can discard it.
const LINGER_MAX_BYTES: usize = 64 << 10;

/// Why the head could not be read; only `TooLarge` is answered.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The peer closed (or the socket failed) before the head was complete.
    Closed,
    /// The head grew over `max_head_bytes` without ending.
    TooLarge,
}

/// A refused handshake: the HTTP answer to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadHandshake {
    pub(crate) status: u16,
    /// The body, plain text: what was wrong, in our words (never echoing the request).
    pub(crate) reason: &'static str,
}

impl BadHandshake {
    const fn bad_request(reason: &'static str) -> Self {
        BadHandshake { status: 400, reason }
    }
}

/// Reads until the end of the HTTP head (`\r\n\r\n`). Returns every byte read, which may
/// include bytes after the head (replayed with it). The caller bounds the time.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_head_bytes: usize,
) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::new();
    loop {
        // Straight into the vector's spare room, not through a buffer on the stack: this
        // future is a state of every connection's task, which is as large as its largest
        // state for as long as the connection lives.
        buf.reserve(HEAD_READ_CHUNK);
        // Only the new bytes (and the three before them) can complete the terminator.
        let from = buf.len().saturating_sub(3);
        let n = stream.read_buf(&mut buf).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        if let Some(end) = find_end(&buf[from..]).map(|e| from + e) {
            if end > max_head_bytes {
                return Err(HeadError::TooLarge);
            }
            return Ok(buf);
        }
        if buf.len() > max_head_bytes {
            return Err(HeadError::TooLarge);
        }
    }
}

/// The offset just past the first `\r\n\r\n`.
fn find_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// What a head that parses asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadKind {
    /// A WebSocket upgrade that passed the RFC 6455 checks: replayed to tungstenite.
    Upgrade,
    /// A plain HTTP request (no field of a WebSocket handshake): replayed to hyper.
    Http,
}

/// Parses the head and tells a WebSocket upgrade from a plain HTTP request.
///
/// A head is a WebSocket attempt when it has any field a WebSocket handshake has and a
/// plain request has not: `Upgrade`, `Sec-WebSocket-Key`, `Sec-WebSocket-Version`, or an
/// `upgrade` token in `Connection`. Such a head must pass RFC 6455 §4.2.1 or gets today's
/// answer (400/426/431): a broken handshake is told what is wrong, never a 404. A head
/// without any of them is plain HTTP. A head that does not parse is 400 (431 for too
/// many fields) either way.
///
/// RFC 6455 §4.2.1: a GET over HTTP/1.1 or later with `Upgrade: websocket`,
/// `Connection: Upgrade`, a `Sec-WebSocket-Key` of 16 base64-encoded bytes, and
/// `Sec-WebSocket-Version: 13` (any other or none → 426).
pub(crate) fn classify(head: &[u8]) -> Result<HeadKind, BadHandshake> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // `read_head` returned at the terminator; httparse disagreeing means bad framing.
        Ok(httparse::Status::Partial) => {
            return Err(BadHandshake::bad_request("malformed request"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(BadHandshake { status: 431, reason: "too many header fields" });
        }
        Err(_) => return Err(BadHandshake::bad_request("malformed request")),
    }
    if !is_websocket_attempt(request.headers) {
        return Ok(HeadKind::Http);
    }
    if request.method != Some("GET") {
        return Err(BadHandshake::bad_request("a WebSocket upgrade is a GET"));
    }
    // httparse knows HTTP/1.0 (0) and HTTP/1.1 (1) only.
    if request.version != Some(1) {
        return Err(BadHandshake::bad_request("a WebSocket upgrade needs HTTP/1.1"));
    }
    // The target as tungstenite will parse it (`http::Uri`): httparse takes any visible
    // characters (`+ws`), and a target tungstenite then refuses would get no answer.
    if request.path.is_none_or(|p| http::Uri::try_from(p).is_err()) {
        return Err(BadHandshake::bad_request("invalid request target"));
    }
    // As strict as tungstenite, which answers the upgrade after us: it reads the first field
    // of each name only and, like `HeaderValue::to_str`, visible ASCII only. A head it would
    // refuse must be refused here, where the refusal gets its HTTP answer.
    let all = |name: &'static str| {
        request.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    };
    let first = |name: &'static str| all(name).next().and_then(visible_ascii);
    if !first("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(BadHandshake::bad_request("missing `Upgrade: websocket`"));
    }
    let connection_upgrade =
        |v: &str| v.split([' ', ',']).any(|t| t.eq_ignore_ascii_case("upgrade"));
    if !first("connection").is_some_and(connection_upgrade) {
        return Err(BadHandshake::bad_request("missing `Connection: Upgrade`"));
    }
    let keys: Vec<Option<&str>> = all("sec-websocket-key").map(visible_ascii).collect();
    if !matches!(keys.as_slice(), [Some(key)] if is_websocket_key(key)) {
        return Err(BadHandshake::bad_request("missing or invalid `Sec-WebSocket-Key`"));
    }
    let versions: Vec<&[u8]> = all("sec-websocket-version").collect();
    if versions != [b"13"] {
        return Err(BadHandshake { status: 426, reason: "unsupported WebSocket version" });
    }
    Ok(HeadKind::Upgrade)
}

/// Whether any field of the head belongs to a WebSocket handshake (see [`classify`]).
fn is_websocket_attempt(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        let name = h.name;
        name.eq_ignore_ascii_case("upgrade")
            || name.eq_ignore_ascii_case("sec-websocket-key")
            || name.eq_ignore_ascii_case("sec-websocket-version")
            || (name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|&b| b == b',' || b == b' ' || b == b'\t')
                    .any(|t| t.eq_ignore_ascii_case(b"upgrade")))
    })
}

/// The value as `http::HeaderValue::to_str` reads it: tab and visible ASCII, else `None`.
fn visible_ascii(value: &[u8]) -> Option<&str> {
    let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    if visible { std::str::from_utf8(value).ok() } else { None }
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22].iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
        // The last character before the padding encodes 2 bits: A, Q, g or w.
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
}

/// Sends an HTTP refusal and closes, lingering (within `linger`, at most 64 KiB read) so
/// the client reads it. Best effort: a peer that went away is not an error here.
pub(crate) async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    linger: Duration,
) {
    let (phrase, extra) = match status {
        400 => ("Bad Request", ""),
        426 => ("Upgrade Required", "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n"),
        429 => ("Too Many Requests", "Retry-After: 1\r\n"),
        431 => ("Request Header Fields Too Large", ""),
        503 => ("Service Unavailable", "Retry-After: 1\r\n"),
        _ => ("Error", ""),
    };
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{reason}",
        reason.len()
    );
    let exchange = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // On the heap, and only here: a buffer on the stack would be part of every
        // connection task's state (see `read_head`).
        let mut sink = vec![0u8; 2048];
        let mut read = 0;
        while read < LINGER_MAX_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        io::Result::Ok(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(linger, exchange).await {
        tracing::debug!(error = %e, "refusal not delivered");
    }
}

/// A stream whose first reads return `prefix` (a head already read), then the inner
/// stream's bytes; writes go to the inner stream.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    // Invariant: `offset <= prefix.len()`; the bytes before it were handed out.
    offset: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, offset: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.offset < this.prefix.len() {
            let rest = &this.prefix[this.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.offset += n;
            if this.offset == this.prefix.len() {
                // The head is needed no longer; give its memory back.
                this.prefix = Vec::new();
                this.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(first: &str, headers: &[&str]) -> String {
        let mut r = format!("{first}\r\nHost: gw\r\n");
        for h in headers {
            r.push_str(h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r
    }

    fn good_headers() -> Vec<String> {
        vec![
            "Upgrade: websocket".into(),
            "Connection: keep-alive, Upgrade".into(),
            format!("Sec-WebSocket-Key: {KEY}"),
            "Sec-WebSocket-Version: 13".into(),
        ]
    }

    /// `Ok(())`: an upgrade; `Err(status)`: refused; plain HTTP is checked apart.
    fn check(first: &str, edit: impl FnOnce(&mut Vec<String>), expected: Result<(), u16>) {
        let mut headers = good_headers();
        edit(&mut headers);
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let head = request(first, &headers);
        let expected = expected.map(|()| HeadKind::Upgrade);
        assert_eq!(classify(head.as_bytes()).map_err(|b| b.status), expected, "{head:?}");
    }

    #[test]
    fn a_head_without_websocket_fields_is_plain_http() {
        let http = Ok(HeadKind::Http);
        for (head, expected) in [
            ("GET / HTTP/1.1\r\nHost: gw\r\n\r\n", http),
            ("HEAD /healthz HTTP/1.0\r\n\r\n", http),
            ("POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", http),
            ("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", http),
            // Any one field of a handshake makes it a (broken) handshake: 400/426, not 404.
            ("GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n\r\n", Err(400)),
            ("GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n", Err(400)),
            (&format!("GET / HTTP/1.1\r\nSec-WebSocket-Key: {KEY}\r\n\r\n"), Err(400)),
            ("GET / HTTP/1.1\r\nsec-websocket-version: 13\r\n\r\n", Err(400)),
            ("GET / HTTP/1.1\r\nConnection:\tupgrade\r\n\r\n", Err(400)),
        ] {
            assert_eq!(classify(head.as_bytes()).map_err(|b| b.status), expected, "{head:?}");
        }
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: y\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(classify(head.as_bytes()).map_err(|b| b.status), Err(431));
    }

    #[test]
    fn handshakes_are_checked_as_rfc_6455_says() {
        let get = "GET /ws HTTP/1.1";
        check(get, |_| {}, Ok(()));
        check(get, |h| h[0] = "upgrade: WebSocket".into(), Ok(()));
        check(get, |h| h[1] = "connection: upgrade".into(), Ok(()));
        check("POST /ws HTTP/1.1", |_| {}, Err(400));
        check("GET /ws HTTP/1.0", |_| {}, Err(400));
        check(get, |h| h.truncate(1), Err(400));
        check(get, |h| drop(h.remove(0)), Err(400));
        check(get, |h| h[0] = "Upgrade: h2c".into(), Err(400));
        check(get, |h| drop(h.remove(1)), Err(400));
        check(get, |h| drop(h.remove(2)), Err(400));
        check(get, |h| h[2] = "Sec-WebSocket-Key: short==".into(), Err(400));
        check(get, |h| h[2] = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==".into(), Err(400));
        check(get, |h| h.push(format!("Sec-WebSocket-Key: {KEY}")), Err(400));
        check(get, |h| h[3] = "Sec-WebSocket-Version: 8".into(), Err(426));
        check(get, |h| drop(h.remove(3)), Err(426));
        check(get, |h| h.extend((0..MAX_HEADERS).map(|i| format!("X-{i}: y"))), Err(431));
        check("HELLO", |_| {}, Err(400));
        // Found by the `upgrade` fuzz target: httparse takes it, `http::Uri` does not.
        check("GET +ws?token=t HTTP/1.1", |_| {}, Err(400));
        check("GET http://gw/ws HTTP/1.1", |_| {}, Ok(()));
        // tungstenite reads the first field of a name only, and visible ASCII only.
        check(get, |h| h.insert(0, "Upgrade: h2c".into()), Err(400));
        check(get, |h| h[0] = "Upgrade: websocket, h2c".into(), Err(400));
        check(get, |h| h.insert(0, "Connection: keep-alive".into()), Err(400));
        check(get, |h| h[1] = "Connection: Upgrade, \u{fc}".into(), Err(400));
        check(get, |h| h[1] = "Connection: keep-alive Upgrade".into(), Ok(()));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00\r\n\r\n").map_err(|b| b.status), Err(400));
    }

    #[tokio::test]
    async fn the_head_is_read_within_its_size_and_replayed() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(b"GET / HTTP/1.1\r\nA: b\r\n\r\nextra").await.unwrap();
        let head = read_head(&mut server, 100).await.unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\nA: b\r\n\r\nextra");
        let mut replayed = Prefixed::new(head, server);
        client.write_all(b" more").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        replayed.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nA: b\r\n\r\nextra more");

        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[b'a'; 200]).await.unwrap();
        assert!(matches!(read_head(&mut server, 100).await, Err(HeadError::TooLarge)));
        drop(client);
        let (client, mut server) = tokio::io::duplex(1 << 16);
        drop(client);
        assert!(matches!(read_head(&mut server, 100).await, Err(HeadError::Closed)));
    }
}
