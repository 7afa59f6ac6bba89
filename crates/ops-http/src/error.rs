//! The one error type of the operations endpoint.

/// Errors of the operations endpoint.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A limit in [`OpsConfig`](crate::config::OpsConfig) is out of range.
    #[error("invalid ops configuration: `{field}` {rule}")]
    Config {
        /// The field's name in `OpsConfig`.
        field: &'static str,
        /// The rule its value breaks, e.g. `must be at least 1`.
        rule: &'static str,
    },
    /// The listener failed for good.
    #[error("cannot accept ops connections")]
    Accept(#[source] std::io::Error),
}
