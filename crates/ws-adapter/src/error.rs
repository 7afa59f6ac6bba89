//! The one error type of the WebSocket adapter.

use std::path::PathBuf;

/// Errors of the WebSocket adapter. `serve` has none today (it retries every accept error
/// and ends only on shutdown); configuration and TLS files do.
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
    /// A TLS certificate or key file that cannot be read.
    #[error("cannot read TLS file {}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// A TLS certificate or key file without what it should hold (PEM blocks of the
    /// right kind), or over `MAX_TLS_FILE_BYTES`.
    #[error("invalid TLS file {}: {reason}", path.display())]
    TlsPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the key with the certificate chain: the key does not belong to the
    /// certificate, or is of an unsupported kind.
    #[error(
        "TLS key {} refused with certificate {}",
        key_file.display(),
        cert_file.display()
    )]
    TlsKeyRejected {
        /// The certificate chain file.
        cert_file: PathBuf,
        /// The key file.
        key_file: PathBuf,
        /// rustls's reason, boxed: rustls's error type stays out of our API.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}
