//! One task per connection: upgrade, register with the core, then `select!` over the socket,
//! the bounded outbound queue, the close signal, the ping timer and shutdown. The task owns
//! the socket; the core holds only a [`WsHandle`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use handler_core::{
    CloseCode, CloseReason, CoordinatorHandle, Handler, Outbound, SendError, SessionId,
};
use nuropb_wire::client::{Encoding, ErrorFrame, ServerFrame};

use crate::config::WsConfig;
use crate::upgrade::check_upgrade;

/// The core's handle on one connection: a bounded queue in, a close signal.
struct WsHandle {
    outbound: mpsc::Sender<Outbound>,
    close: Arc<CloseSignal>,
}

#[derive(Default)]
struct CloseSignal {
    // Invariant: set at most once; the first reason wins.
    reason: Mutex<Option<CloseReason>>,
    fired: CancellationToken,
}

impl CloseSignal {
    fn fire(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.fired.cancel();
    }

    fn reason(&self) -> Option<CloseReason> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Handler for WsHandle {
    fn send(&self, outbound: Outbound) -> Result<(), SendError> {
        self.outbound.try_send(outbound).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    fn close(&self, reason: CloseReason) {
        self.close.fire(reason);
    }
}

/// A per-connection token bucket for client frames.
struct RateLimiter {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
}

impl RateLimiter {
    fn new(per_second: u32, burst: u32) -> Self {
        RateLimiter {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[allow(clippy::result_large_err, reason = "tungstenite's Callback fixes the error type")]
pub(crate) async fn run(
    stream: TcpStream,
    permit: Option<OwnedSemaphorePermit>,
    config: Arc<WsConfig>,
    coordinator: CoordinatorHandle,
) {
    // `permit` (a connection slot) is held until this function returns.
    let mut identity = None;
    let have_capacity = permit.is_some();
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let id =
            check_upgrade(request, have_capacity, &config.origins, &config.auth, &coordinator)?;
        identity = Some(id);
        Ok(response)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(config.tungstenite()),
    );
    let ws = match tokio::time::timeout(config.handshake_timeout, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return;
        }
    };
    let Some(identity) = identity else {
        // The callback ran and refused, or never ran; either way there is no session.
        return;
    };

    let (tx, rx) = mpsc::channel(config.outbound_queue);
    let close = Arc::new(CloseSignal::default());
    let handle = Arc::new(WsHandle { outbound: tx, close: Arc::clone(&close) });
    let session_id = match coordinator.open_session(identity, handle) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "session refused");
            let mut ws = ws;
            // Best effort: the client is told why; a failed send changes nothing.
            let _ = ws
                .close(Some(close_frame(CloseReason::new(CloseCode::GoingAway, e.to_string()))))
                .await;
            return;
        }
    };
    tracing::Span::current().record("session.id", tracing::field::display(&session_id));
    session_loop(ws, rx, &close, &config, &coordinator, &session_id).await;
    coordinator.close_session(&session_id);
}

async fn session_loop(
    mut ws: WebSocketStream<TcpStream>,
    mut rx: mpsc::Receiver<Outbound>,
    close: &CloseSignal,
    config: &WsConfig,
    coordinator: &CoordinatorHandle,
    session_id: &SessionId,
) {
    let mut preferred = Encoding::Json;
    let mut limiter = RateLimiter::new(config.rate_per_second, config.rate_burst);
    let mut protocol_errors: u32 = 0;
    let mut last_seen = Instant::now();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // The first tick is immediate; skip it.

    let reason: CloseReason = loop {
        tokio::select! {
            // Every branch is cancel-safe: `cancelled`, `recv`, `tick` and `next` lose
            // nothing when another branch wins. Shutdown is not a branch on purpose: the
            // coordinator first drains in-flight requests, then closes every session (1001).
            _ = close.fired.cancelled() => {
                let reason = close.reason().unwrap_or(CloseReason::new(CloseCode::Normal, ""));
                // Frames queued before the close was asked for (e.g. the last responses of
                // a drain) still go out, within one write timeout in all.
                let deadline = Instant::now() + config.write_timeout;
                while let Ok(out) = rx.try_recv() {
                    let Some(message) = to_message(&out, out.encoding.unwrap_or(preferred)) else {
                        continue;
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    if write(&mut ws, message, left).await.is_err() {
                        break;
                    }
                }
                break reason;
            }
            out = rx.recv() => {
                let Some(out) = out else {
                    break CloseReason::new(CloseCode::Internal, "session ended");
                };
                let encoding = out.encoding.unwrap_or(preferred);
                let Some(message) = to_message(&out, encoding) else { continue };
                if let Err(e) = write(&mut ws, message, config.write_timeout).await {
                    tracing::debug!(error = %e, "write failed");
                    return;
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > config.idle_timeout {
                    break CloseReason::new(CloseCode::GoingAway, "idle timeout");
                }
                if let Err(e) = write(&mut ws, Message::Ping(Bytes::new()), config.write_timeout).await {
                    tracing::debug!(error = %e, "ping failed");
                    return;
                }
            }
            incoming = ws.next() => {
                let message = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        tracing::info!(error = %e, "client message over the limit");
                        break CloseReason::new(CloseCode::TooBig, "message too big");
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "read failed");
                        return;
                    }
                    None => return,
                };
                last_seen = Instant::now();
                let (bytes, encoding) = match &message {
                    Message::Text(t) => (t.as_bytes(), Encoding::Json),
                    Message::Binary(b) => (b.as_ref(), Encoding::MessagePack),
                    Message::Close(_) => return,
                    // Pings are answered by tungstenite; pongs only refresh `last_seen`.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                preferred = encoding;
                let accepted = if limiter.allow() {
                    coordinator.on_frame(session_id, bytes, encoding)
                } else {
                    let frame = ServerFrame::Error(ErrorFrame {
                        error: "RateLimited".to_owned(),
                        description: format!(
                            "more than {} frames per second; frame dropped",
                            config.rate_per_second
                        ),
                        trace_id: None,
                    });
                    let out = Outbound { frame: handler_core::SharedFrame::new(frame), encoding: Some(encoding) };
                    if let Some(m) = to_message(&out, encoding)
                        && let Err(e) = write(&mut ws, m, config.write_timeout).await
                    {
                        tracing::debug!(error = %e, "write failed");
                        return;
                    }
                    false
                };
                if !accepted {
                    protocol_errors += 1;
                    if protocol_errors > config.max_protocol_errors {
                        break CloseReason::new(CloseCode::PolicyViolation, "too many bad frames");
                    }
                }
            }
        }
    };
    tracing::debug!(code = reason.code.as_u16(), reason = %reason.reason, "closing connection");
    // Best effort: the peer may already be gone.
    let _ = tokio::time::timeout(config.write_timeout, ws.close(Some(close_frame(reason)))).await;
}

async fn write(
    ws: &mut WebSocketStream<TcpStream>,
    message: Message,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, ws.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("write timed out: client not reading".to_owned()),
    }
}

fn to_message(out: &Outbound, encoding: Encoding) -> Option<Message> {
    let bytes = Bytes::from_owner(out.frame.encoded(encoding)?);
    match encoding {
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Some(Message::Text(text)),
            Err(e) => {
                tracing::error!(error = %e, "encoded JSON is not UTF-8");
                None
            }
        },
        Encoding::MessagePack => Some(Message::Binary(bytes)),
    }
}

fn close_frame(reason: CloseReason) -> CloseFrame {
    // Close reasons must fit a control frame (125 bytes with the code).
    let mut text = reason.reason;
    if text.len() > 120 {
        let mut end = 120;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    CloseFrame { code: WsCloseCode::from(reason.code.as_u16()), reason: text.into() }
}
