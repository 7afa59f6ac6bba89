//! One task per connection: upgrade, register with the core, then `select!` over the socket,
//! the bounded outbound queue, the close signal, the ping timer and shutdown. The task owns
//! the socket; the core holds only a [`WsHandle`]. Connections over the limit get a task
//! too, but only to be told 503 within a short, separately bounded handshake.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use handler_core::{
    ClientConnection, CloseCode, CloseReason, CoordinatorHandle, MeshError, Outbound, SendError,
    SessionId, SharedFrame,
};
use nuropb_wire::client::{Encoding, ErrorFrame, ServerFrame, ServerMessage};
use nuropb_wire::mesh::error_name;

use crate::config::WsConfig;
use crate::read_error::close_after_read_error;
use crate::stats::WsStatsHandle;
use crate::upgrade::check_upgrade;

/// Why a connection task exists. The permit is never read: the slot is freed when it drops,
/// at the end of the task.
pub(crate) enum Admission {
    /// A connection slot (`max_connections`): a session if the upgrade checks pass.
    Session { _permit: OwnedSemaphorePermit },
    /// Over `max_connections`, a refusal slot (`max_refusals_in_flight`): the client is told
    /// 503 within `refusal_handshake_timeout`.
    Refusal { _permit: OwnedSemaphorePermit },
}

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

impl ClientConnection for WsHandle {
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

/// Runs one connection from the HTTP upgrade to the close. Generic over the byte stream so
/// that tests drive it over `tokio::io::duplex` under paused time (`session_tests`); `serve`
/// passes a `TcpStream`.
#[allow(clippy::result_large_err, reason = "tungstenite's Callback fixes the error type")]
pub(crate) async fn run<S>(
    stream: S,
    admission: Admission,
    config: Arc<WsConfig>,
    coordinator: CoordinatorHandle,
    stats: WsStatsHandle,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // `admission` (and its permit) is held until this function returns.
    let mut identity = None;
    let (have_capacity, handshake_timeout) = match &admission {
        Admission::Session { .. } => (true, config.handshake_timeout),
        Admission::Refusal { .. } => (false, config.refusal_handshake_timeout),
    };
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let id = check_upgrade(
            request,
            have_capacity,
            &config.origins,
            &config.auth,
            &coordinator,
            &stats,
        )?;
        identity = Some(id);
        Ok(response)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(config.tungstenite()),
    );
    let ws = match tokio::time::timeout(handshake_timeout, handshake).await {
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
                .close(Some(close_frame(
                    e.close_reason()
                        .unwrap_or_else(|| CloseReason::new(CloseCode::GoingAway, e.to_string())),
                )))
                .await;
            return;
        }
    };
    tracing::Span::current().record("session.id", tracing::field::display(&session_id));
    session_loop(ws, rx, &close, &config, &coordinator, &session_id, &stats).await;
    coordinator.close_session(&session_id);
}

async fn session_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    mut rx: mpsc::Receiver<Outbound>,
    close: &CloseSignal,
    config: &WsConfig,
    coordinator: &CoordinatorHandle,
    session_id: &SessionId,
    stats: &WsStatsHandle,
) {
    let limit = config.max_outbound_message_size;
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
                    let encoding = out.encoding.unwrap_or(preferred);
                    let Some(message) = outbound_message(&out, encoding, limit, stats) else {
                        continue;
                    };
                    let left = deadline.saturating_duration_since(Instant::now());
                    if let Err(e) = write(&mut ws, message, left).await {
                        tracing::info!(error = %e, "write failed while closing");
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
                let Some(message) = outbound_message(&out, encoding, limit, stats) else {
                    continue;
                };
                if let Err(e) = write(&mut ws, message, config.write_timeout).await {
                    tracing::info!(error = %e, "write failed; closing");
                    break write_failed();
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > config.idle_timeout {
                    break CloseReason::new(CloseCode::GoingAway, "idle timeout");
                }
                let ping = Message::Ping(Bytes::new());
                if let Err(e) = write(&mut ws, ping, config.write_timeout).await {
                    tracing::info!(error = %e, "ping failed; closing");
                    break write_failed();
                }
            }
            incoming = ws.next() => {
                let message = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        tracing::info!(error = %e, "client message over the limit");
                        break CloseReason::new(CloseCode::TooBig, "message too big");
                    }
                    Some(Err(e)) => return close_after_read_error(&mut ws, e, config.write_timeout).await,
                    None => return,
                };
                last_seen = Instant::now();
                let (bytes, encoding) = match &message {
                    Message::Text(t) => (t.as_bytes(), Encoding::Json),
                    Message::Binary(b) => (b.as_ref(), Encoding::MessagePack),
                    Message::Close(_) => {
                        // tungstenite queued the close reply while reading this frame, but
                        // only a later write or flush sends it; without this the client
                        // sees 1006. The flush ends with `ConnectionClosed`, which
                        // tokio-tungstenite reports as success.
                        let flush = SinkExt::flush(&mut ws);
                        match tokio::time::timeout(config.write_timeout, flush).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "cannot complete the close handshake");
                            }
                            Err(_) => {
                                tracing::debug!("close handshake timed out: client not reading");
                            }
                        }
                        return;
                    }
                    // Pings are answered by tungstenite, but take a rate token like any frame
                    // (a ping flood leaves no room for data); pongs only refresh `last_seen`.
                    Message::Ping(_) => { let _ = limiter.allow(); continue }
                    Message::Pong(_) | Message::Frame(_) => continue,
                };
                preferred = encoding;
                // `select!` picks among ready branches at random: once the session was told
                // to close (kicked, token expired), no further client frame is served.
                if close.fired.is_cancelled() {
                    continue;
                }
                let accepted = if limiter.allow() {
                    coordinator.on_frame(session_id, bytes, encoding)
                } else {
                    let frame = ServerFrame::Error(ErrorFrame {
                        error: error_name::RATE_LIMITED.to_owned(),
                        description: format!(
                            "more than {} frames per second; frame dropped",
                            config.rate_per_second
                        ),
                        trace_id: None,
                    });
                    let out = Outbound { frame: SharedFrame::new(frame), encoding: Some(encoding) };
                    if let Some(m) = outbound_message(&out, encoding, limit, stats)
                        && let Err(e) = write(&mut ws, m, config.write_timeout).await
                    {
                        tracing::info!(error = %e, "write failed; closing");
                        break write_failed();
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

async fn write<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    message: Message,
    timeout: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, ws.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("write timed out: client not reading".to_owned()),
    }
}

/// The close reason after a failed write. The close frame that follows is best effort: after
/// an I/O error it fails at once, after a timeout it waits one more write timeout.
fn write_failed() -> CloseReason {
    CloseReason::new(CloseCode::Internal, "write failed")
}

/// The message to write for `out`, or `None` when nothing is to be sent: the frame cannot
/// be encoded, or it is over `limit` (`max_outbound_message_size`) and is not a response.
/// A response over the limit becomes an error response with the same trace id, so the
/// client's call does not hang; dropping anything else keeps the connection usable.
fn outbound_message(
    out: &Outbound,
    encoding: Encoding,
    limit: usize,
    stats: &WsStatsHandle,
) -> Option<Message> {
    let bytes = out.frame.encoded(encoding)?;
    if bytes.len() <= limit {
        return to_message(bytes, encoding);
    }
    let size = bytes.len();
    match out.frame.frame() {
        ServerFrame::Message(ServerMessage::Response { trace_id, .. }) => {
            stats.response_too_large();
            let trace_id_field = trace_id.as_deref();
            let what = "response over max_outbound_message_size; sending an error instead";
            if stats.oversized_warning_due() {
                tracing::warn!(trace_id = trace_id_field, size, limit, "{what}");
            } else {
                tracing::debug!(trace_id = trace_id_field, size, limit, "{what}");
            }
            let error = ServerFrame::Message(ServerMessage::Response {
                trace_id: trace_id.clone(),
                // `Value::Null`, as in every error response.
                result: Default::default(),
                // The same error a response refused by the mesh adapter gets.
                error: Some(MeshError::ResponseTooLarge { bytes: size, limit }.to_error_object()),
            });
            let replacement = SharedFrame::new(error).encoded(encoding)?;
            if replacement.len() > limit {
                // Only with an absurdly small limit; the error cannot be sent either.
                tracing::warn!(
                    size = replacement.len(),
                    limit,
                    "error response over the limit too; dropped"
                );
                return None;
            }
            to_message(replacement, encoding)
        }
        frame => {
            stats.frame_too_large_dropped();
            let topic = match frame {
                ServerFrame::Message(ServerMessage::Event { topic, .. }) => Some(topic.as_str()),
                _ => None,
            };
            let what = "frame over max_outbound_message_size dropped";
            if stats.oversized_warning_due() {
                tracing::warn!(topic, size, limit, "{what}");
            } else {
                tracing::debug!(topic, size, limit, "{what}");
            }
            None
        }
    }
}

fn to_message(bytes: std::sync::Arc<[u8]>, encoding: Encoding) -> Option<Message> {
    let bytes = Bytes::from_owner(bytes);
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

#[cfg(test)]
mod session_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use nuropb_wire::ErrorObject;
    use nuropb_wire::client::decode_server_frame;

    use super::*;
    use crate::stats::WsStats;

    fn outbound(message: ServerMessage) -> Outbound {
        Outbound { frame: SharedFrame::new(ServerFrame::Message(message)), encoding: None }
    }

    fn response(trace_id: &str, result: &str) -> Outbound {
        outbound(ServerMessage::Response {
            trace_id: Some(trace_id.to_owned()),
            result: result.into(),
            error: None,
        })
    }

    fn decoded(message: Message, encoding: Encoding) -> ServerFrame {
        decode_server_frame(&message.into_data(), encoding).unwrap()
    }

    #[test]
    fn frames_within_the_limit_pass_unchanged() {
        let stats = WsStatsHandle::new();
        for encoding in [Encoding::Json, Encoding::MessagePack] {
            let out = response("t", &"x".repeat(100));
            let size = out.frame.encoded(encoding).unwrap().len();
            let m = outbound_message(&out, encoding, size, &stats).unwrap();
            assert_eq!(decoded(m, encoding), *out.frame.frame());
        }
        assert_eq!(stats.stats(), WsStats::default());
    }

    #[test]
    fn responses_over_the_limit_become_limit_exceeded_errors() {
        let stats = WsStatsHandle::new();
        for encoding in [Encoding::Json, Encoding::MessagePack] {
            let out = response("big-1", &"x".repeat(2000));
            let size = out.frame.encoded(encoding).unwrap().len();
            let m = outbound_message(&out, encoding, 1000, &stats).unwrap();
            let expected = ServerFrame::Message(ServerMessage::Response {
                trace_id: Some("big-1".into()),
                result: Default::default(),
                error: Some(ErrorObject::new(
                    "LimitExceeded",
                    format!("response of {size} bytes exceeds the limit of 1000 bytes"),
                )),
            });
            assert_eq!(decoded(m, encoding), expected, "{encoding:?}");
        }
        // A limit too small even for the error: nothing is sent.
        assert!(outbound_message(&response("t", "xx"), Encoding::Json, 10, &stats).is_none());
        assert_eq!(stats.stats(), WsStats { responses_too_large: 3, ..WsStats::default() });
    }

    #[test]
    fn other_frames_over_the_limit_are_dropped_and_counted() {
        let stats = WsStatsHandle::new();
        let event = outbound(ServerMessage::Event {
            topic: "broadcast.big".into(),
            event: "x".repeat(2000).into(),
        });
        let error = Outbound {
            frame: SharedFrame::new(ServerFrame::Error(ErrorFrame {
                error: "E".into(),
                description: "x".repeat(2000),
                trace_id: None,
            })),
            encoding: None,
        };
        for out in [&event, &error] {
            for encoding in [Encoding::Json, Encoding::MessagePack] {
                assert!(outbound_message(out, encoding, 1000, &stats).is_none());
            }
        }
        assert_eq!(stats.stats(), WsStats { frames_too_large_dropped: 4, ..WsStats::default() });
    }
}
