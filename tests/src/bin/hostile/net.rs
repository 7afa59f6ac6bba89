//! Clients from a chosen loopback source address (`127.0.0.x`), so that each row's attacker
//! has per-address limits of its own and never shares them with the bystander
//! (`127.0.0.1`): raw HTTP upgrades with a status to read, raw WebSocket frames, and full
//! WebSocket clients (`e2e_tests::Client`) over such a socket. Every wait is bounded.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use e2e_tests::Client;

pub use e2e_tests::raw::{RAW_WAIT, close_code, masked_frame, read_head, status, upgrade};

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
