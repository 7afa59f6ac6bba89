//! What the examples share: a small WebSocket client of the gateway's client protocol
//! (docs/PROTOCOL.md), and the overall time bound. Written against tokio-tungstenite as a
//! client application would be; nothing here comes from the gateway's crates.

#![allow(dead_code, reason = "shared by several examples, each using part of it")]

use std::collections::VecDeque;
use std::error::Error;
use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The error type of the examples: anything, with a message.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// How long any one step may take before the example fails.
pub const STEP: Duration = Duration::from_secs(10);

/// Runs an example's body within `limit` (a hang fails the run rather than blocking CI).
pub async fn bounded(
    limit: Duration,
    body: impl Future<Output = Result<(), BoxError>>,
) -> Result<(), BoxError> {
    match tokio::time::timeout(limit, body).await {
        Ok(result) => result,
        Err(_) => Err(format!("the example did not finish within {limit:?}").into()),
    }
}

/// One WebSocket client of the gateway.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    // Frames read while waiting for a response (events), handed out by `next_frame` first.
    // Invariant: at most 16, the bound of `call`'s wait.
    unread: VecDeque<Value>,
}

/// How a connection ended: the close code and reason the gateway sent.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl Client {
    /// Connects to `url` with `Authorization: Bearer <token>` and reads the hello event,
    /// returning the client and the hello's `event` object.
    pub async fn connect(url: &str, token: &str) -> Result<(Client, Value), BoxError> {
        let mut request = url.into_client_request()?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))?;
        request.headers_mut().insert("authorization", bearer);
        let connect = tokio_tungstenite::connect_async(request);
        let (ws, _response) = tokio::time::timeout(STEP, connect).await??;
        let mut client = Client { ws, unread: VecDeque::new() };
        let hello = client.next_frame().await?;
        if hello["payload"]["topic"] != "hello" {
            return Err(format!("expected the hello event, got {hello}").into());
        }
        Ok((client, hello["payload"]["event"].clone()))
    }

    /// Sends a `request` frame and waits for the `response` with the same `trace_id`,
    /// returning its payload (`result` and `error`). Other frames that arrive first (events,
    /// at most 16) are kept for [`Client::next_frame`].
    pub async fn call(
        &mut self,
        service: &str,
        method: &str,
        params: Value,
        trace_id: &str,
    ) -> Result<Value, BoxError> {
        let frame = json!({
            "type": "request",
            "payload": {"service": service, "method": method, "params": params, "trace_id": trace_id},
        });
        self.ws.send(Message::text(frame.to_string())).await?;
        // Bounded: at most 16 unrelated frames (events) before the response.
        for _ in 0..16 {
            let frame = self.read_frame().await?;
            if frame["type"] == "response" && frame["payload"]["trace_id"] == trace_id {
                return Ok(frame["payload"].clone());
            }
            self.unread.push_back(frame);
        }
        Err(format!("no response to {trace_id}").into())
    }

    /// The next frame: one kept by [`Client::call`], else the next text frame read, parsed;
    /// an error if the connection closes or nothing comes within [`STEP`].
    pub async fn next_frame(&mut self) -> Result<Value, BoxError> {
        match self.unread.pop_front() {
            Some(frame) => Ok(frame),
            None => self.read_frame().await,
        }
    }

    /// The next text frame from the socket, parsed.
    async fn read_frame(&mut self) -> Result<Value, BoxError> {
        // Bounded: pings and pongs are skipped, at most 16 of them.
        for _ in 0..16 {
            let message =
                tokio::time::timeout(STEP, self.ws.next()).await?.ok_or("connection ended")??;
            match message {
                Message::Text(text) => return Ok(serde_json::from_str(text.as_str())?),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return Err(format!("unexpected message {other:?}").into()),
            }
        }
        Err("only pings and pongs".into())
    }

    /// Waits for the gateway to close the connection and returns the close frame's code
    /// and reason; frames received before it are skipped (at most 16).
    pub async fn closed(&mut self) -> Result<Closed, BoxError> {
        for _ in 0..16 {
            let message = tokio::time::timeout(STEP, self.ws.next())
                .await?
                .ok_or("ended without a close frame")??;
            if let Message::Close(frame) = message {
                let frame = frame.ok_or("close frame without a code")?;
                return Ok(Closed {
                    code: u16::from(frame.code),
                    reason: frame.reason.to_string(),
                });
            }
        }
        Err("no close frame".into())
    }

    /// Closes the connection from the client's side.
    pub async fn close(mut self) -> Result<(), BoxError> {
        self.ws.close(None).await?;
        Ok(())
    }
}
