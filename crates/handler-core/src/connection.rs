//! The `ClientConnection` port: a client connection as the core sees it. The transport adapter owns
//! the socket; the core only queues frames to it and asks it to close.

use std::sync::{Arc, OnceLock};

use nuropb_wire::client::{Encoding, ServerFrame, encode_server_frame};

/// A server frame shared by every session it is sent to. Each encoding is produced at most
/// once, however many sessions receive the frame (broadcasts encode once).
#[derive(Debug)]
pub struct SharedFrame {
    frame: ServerFrame,
    json: OnceLock<Option<Arc<[u8]>>>,
    msgpack: OnceLock<Option<Arc<[u8]>>>,
}

impl SharedFrame {
    /// Wraps a frame for sharing; nothing is encoded until a session asks for an encoding.
    pub fn new(frame: ServerFrame) -> Arc<Self> {
        Arc::new(SharedFrame { frame, json: OnceLock::new(), msgpack: OnceLock::new() })
    }

    /// The frame itself.
    pub fn frame(&self) -> &ServerFrame {
        &self.frame
    }

    /// The encoded bytes, or `None` if the frame cannot be encoded that way (logged once).
    pub fn encoded(&self, encoding: Encoding) -> Option<Arc<[u8]>> {
        let cell = match encoding {
            Encoding::Json => &self.json,
            Encoding::MessagePack => &self.msgpack,
        };
        cell.get_or_init(|| match encode_server_frame(&self.frame, encoding) {
            Ok(bytes) => Some(Arc::from(bytes)),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a server frame");
                None
            }
        })
        .clone()
    }
}

/// One frame queued for one session. `encoding: None` means "the session's current
/// preference" (the encoding of the last frame the client sent; JSON until then).
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The frame, shared with every other session it is queued for.
    pub frame: Arc<SharedFrame>,
    /// The encoding to send it in; `None`: the session's current preference.
    pub encoding: Option<Encoding>,
}

/// WebSocket close codes the gateway uses (RFC 6455 §7.4 and the 4000 private range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: closed on request (e.g. a mesh peer disconnected the user).
    Normal,
    /// 1001: the gateway is shutting down.
    GoingAway,
    /// 1008: the client broke a rule (too many protocol errors, rate).
    PolicyViolation,
    /// 1009: a message over the size limit.
    TooBig,
    /// 1011: an internal error.
    Internal,
    /// 1013: the client does not read fast enough (outbound queue full); reconnect later.
    TryAgainLater,
    /// 4001: disconnected by a mesh peer (`disconnect_user`).
    Kicked,
    /// 4003: the session's token expired and was not refreshed.
    TokenExpired,
    /// 4401: a connection that upgraded without credentials did not authenticate with its
    /// first frame (bad token, another frame, or none in time).
    Unauthorized,
}

impl CloseCode {
    /// Whether a client should reconnect after this close (docs/PROTOCOL.md, "Close
    /// codes"): `false` for the closes a reconnect would only repeat (1008, 1009, 4401)
    /// or undo (4001, a deliberate kick). 4003 reconnects at once with a fresh token.
    pub fn should_reconnect(self) -> bool {
        match self {
            CloseCode::Normal
            | CloseCode::GoingAway
            | CloseCode::Internal
            | CloseCode::TryAgainLater
            | CloseCode::TokenExpired => true,
            CloseCode::PolicyViolation
            | CloseCode::TooBig
            | CloseCode::Kicked
            | CloseCode::Unauthorized => false,
        }
    }

    /// The numeric close code sent in the close frame.
    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Kicked => 4001,
            CloseCode::TokenExpired => 4003,
            CloseCode::Unauthorized => 4401,
        }
    }
}

/// Why a session is being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The close code.
    pub code: CloseCode,
    /// Short text for the close frame (kept under 123 bytes by the adapter).
    pub reason: String,
}

impl CloseReason {
    /// A close with this code and reason text.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        CloseReason { code, reason: reason.into() }
    }
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The session's bounded outbound queue is full.
    #[error("outbound queue full")]
    Full,
    /// The session is gone.
    #[error("session closed")]
    Closed,
}

/// A client connection, as the core sees it. Implementations must never block: `send` is a
/// `try_send` into the connection's bounded queue.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
pub trait ClientConnection: Send + Sync + 'static {
    /// Queues a frame for the client.
    fn send(&self, outbound: Outbound) -> Result<(), SendError>;
    /// Asks the connection to close with this reason (idempotent).
    fn close(&self, reason: CloseReason);
}
