//! What a failed read ends with: a client that broke the WebSocket protocol gets the close
//! frame RFC 6455 §7.4.1 names (1007 for a text message that is not UTF-8, 1002 for any
//! other violation) instead of a bare TCP close; a socket that failed gets nothing, since
//! nobody would read it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The close frame owed to the client after `error`, if any.
pub(crate) fn close_for(error: &Error) -> Option<CloseFrame> {
    let (code, reason) = match error {
        Error::Utf8(_) => (CloseCode::Invalid, "invalid UTF-8 in a text message"),
        // The peer went away, or the closing handshake is already under way: no frame.
        Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => return None,
        Error::Protocol(_) => (CloseCode::Protocol, "protocol error"),
        _ => return None,
    };
    Some(CloseFrame { code, reason: reason.into() })
}

/// Ends a connection whose read failed with `error`: logs it and, when the client broke
/// the protocol, sends the close frame within `timeout` (best effort).
pub(crate) async fn close_after_read_error<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    error: Error,
    timeout: Duration,
) {
    let Some(frame) = close_for(&error) else {
        tracing::debug!(error = %error, "read failed");
        return;
    };
    tracing::info!(error = %error, code = u16::from(frame.code), "client broke the protocol; closing");
    // Best effort: a client that sends garbage may not read either.
    let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_violations_get_their_close_code() {
        let code = |e: Error| close_for(&e).map(|f| u16::from(f.code));
        assert_eq!(code(Error::Utf8("bad".into())), Some(1007));
        assert_eq!(code(Error::Protocol(ProtocolError::NonZeroReservedBits)), Some(1002));
        assert_eq!(code(Error::Protocol(ProtocolError::UnmaskedFrameFromClient)), Some(1002));
        assert_eq!(code(Error::Protocol(ProtocolError::FragmentedControlFrame)), Some(1002));
        assert_eq!(code(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)), None);
        assert_eq!(code(Error::ConnectionClosed), None);
        assert_eq!(code(Error::Io(std::io::ErrorKind::BrokenPipe.into())), None);
    }
}
