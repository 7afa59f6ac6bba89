//! Clients from a chosen loopback source address (`127.0.0.x`), so that each row's attacker
//! has per-address limits of its own and never shares them with the bystander
//! (`127.0.0.1`): raw HTTP upgrades with a status to read, raw WebSocket frames, and full
//! WebSocket clients (`e2e_tests::Client`) over such a socket. Every wait is bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use e2e_tests::Client;

/// How long a raw read of a head or a close frame may take.
pub const RAW_WAIT: Duration = Duration::from_secs(5);
/// The `Sec-WebSocket-Key` of RFC 6455's example.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// `127.0.0.<last>`.
pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A TCP connection to `to` from `from` (any port), with an optional receive buffer size
/// (set before connecting, so the window the peer sees stays that small).
pub async fn tcp_from(from: IpAddr, to: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind a loopback source address");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    tokio::time::timeout(RAW_WAIT, socket.connect(to))
        .await
        .expect("TCP connect in time")
        .expect("TCP connect")
}

/// A valid upgrade request for `/ws` with `extra` header lines (each ending in `\r\n`).
pub fn upgrade(extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// `Authorization: Bearer <token>\r\n`.
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// Sends `request` from `from`; returns the stream and the response head ("" if the
/// server closed without answering).
pub async fn http(from: IpAddr, to: SocketAddr, request: &[u8]) -> (TcpStream, String) {
    let mut stream = tcp_from(from, to, None).await;
    // A server that closes at once may reset the write; the head read then says "".
    let _ = stream.write_all(request).await;
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// The response head, up to the blank line, read within [`RAW_WAIT`].
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
    // A head that does not come in time is reported as what was read so far.
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

/// Reads server frames until a close frame and returns its code (`None`: TCP closed or
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

/// A WebSocket client from `from` with this bearer token and extra headers; `Err` is the
/// refusal as tungstenite reports it.
pub async fn ws_from(
    from: IpAddr,
    url: &str,
    to: SocketAddr,
    token: &str,
    recv_buffer: Option<u32>,
) -> Result<Client, String> {
    let stream = tcp_from(from, to, recv_buffer).await;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Authorization",
        http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
    );
    let connect = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream));
    match tokio::time::timeout(RAW_WAIT, connect).await {
        Err(_) => Err("no upgrade answer in time".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok((ws, _))) => Ok(Client { ws }),
    }
}

/// [`ws_from`], then the hello frame.
pub async fn session_from(
    from: IpAddr,
    url: &str,
    to: SocketAddr,
    token: &str,
) -> Result<Client, String> {
    let mut client = ws_from(from, url, to, token, None).await?;
    let hello = client.recv_json().await;
    if hello["payload"]["topic"] != "hello" {
        return Err(format!("first frame is not hello: {hello}"));
    }
    Ok(client)
}
