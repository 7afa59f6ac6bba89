//! The one error type of the WebSocket adapter.

/// Errors of the WebSocket adapter. `serve` has none today (it retries every accept error
/// and ends only on shutdown); configuration does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// An [`OriginPolicy`](crate::origin::OriginPolicy) entry that is not a host with an
    /// optional scheme and port.
    #[error("cannot parse origin entry {entry:?}: {reason}")]
    InvalidOrigin {
        /// The entry as configured.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}
