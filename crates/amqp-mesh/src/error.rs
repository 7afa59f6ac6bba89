//! The crate's one error type: why the adapter could not start. Failures of individual
//! calls are `handler_core::MeshError`s, the port's own error type.

use std::time::Duration;

/// A boxed cause. lapin's error type stays private: no dependency types in our API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why [`crate::AmqpMesh::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpMeshError {
    /// A configuration field has an unusable value; `field` names it.
    #[error("invalid amqp mesh configuration: {field}: {reason}")]
    Config {
        /// The field's name in [`crate::AmqpMeshConfig`].
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The broker could not be reached (refused, reset, DNS, TLS).
    #[error("cannot connect to the broker at {url}")]
    Connect {
        /// The URL with any password removed.
        url: String,
        /// Why the connection failed.
        #[source]
        source: BoxError,
    },
    /// The broker answered but refused us: bad credentials, unknown vhost, no permission.
    #[error("the broker at {url} refused the connection")]
    Refused {
        /// The URL with any password removed.
        url: String,
        /// The broker's refusal.
        #[source]
        source: BoxError,
    },
    /// Connecting (TCP, TLS and the AMQP handshake) took longer than `connect_timeout`.
    #[error("connecting to the broker at {url} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The URL with any password removed.
        url: String,
        /// The configured `connect_timeout`.
        timeout: Duration,
    },
    /// Declaring exchanges, queues, bindings or consumers failed, e.g. because an exchange
    /// exists with another type or a queue with other arguments.
    #[error("declaring the mesh topology failed: {what}")]
    Topology {
        /// The declaration that failed, e.g. `queue nuropb-…-rq`.
        what: String,
        /// The broker's or the client library's error.
        #[source]
        source: BoxError,
    },
    /// The shutdown token fired before the first connection was up.
    #[error("shut down before the first connection was made")]
    Shutdown,
}

impl AmqpMeshError {
    /// Whether starting again later may succeed without changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            AmqpMeshError::Connect { .. } | AmqpMeshError::ConnectTimeout { .. } => true,
            AmqpMeshError::Config { .. }
            | AmqpMeshError::Refused { .. }
            | AmqpMeshError::Topology { .. }
            | AmqpMeshError::Shutdown => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_only_for_network_failures() {
        let cause = || -> BoxError { "x".into() };
        let check =
            |e: AmqpMeshError, expected: bool| assert_eq!(e.is_transient(), expected, "{e}");
        check(AmqpMeshError::Connect { url: "u".into(), source: cause() }, true);
        check(AmqpMeshError::ConnectTimeout { url: "u".into(), timeout: Duration::ZERO }, true);
        check(AmqpMeshError::Refused { url: "u".into(), source: cause() }, false);
        check(AmqpMeshError::Config { field: "url", reason: "r".into() }, false);
        check(AmqpMeshError::Topology { what: "w".into(), source: cause() }, false);
        check(AmqpMeshError::Shutdown, false);
    }
}
