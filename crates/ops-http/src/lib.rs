//! The operations endpoint of nuropb-gateway: HTTP/1.1 served by hyper on its own
//! listener, so probes and scrapes never compete with WebSocket clients for the gateway's
//! port.
//!
//! - `GET /healthz`: 200 `ok` while the process runs (liveness);
//! - `GET /readyz`: 200 `ok` when [`OpsSource::ready`] says so, else 503 with the reason;
//! - `GET /metrics`: the `prometheus_client` [`Registry`] given to [`serve`], in the
//!   OpenMetrics 1.0 text format;
//! - `HEAD` on each of them; 404 for other paths, 405 for other methods, 400 for
//!   anything that is not HTTP/1.0 or 1.1 (or an absolute-form target), 431 for a head
//!   over the size limit. Every response carries `Connection: close`; a head left
//!   unfinished (the peer closed, or `read_timeout` passed) gets no answer.
//!
//! Code map: `config` ([`OpsConfig`], every limit with its default), `source` (the
//! [`OpsSource`] seam), `routes` (request to response), `connection` (one task per
//! connection: hyper with the limits, then a lingering close).
//!
//! Architecture invariant: no dependency on lapin, tungstenite or any other gateway crate;
//! readiness comes in through [`OpsSource`], figures through the registry.
//!
//! In the layering (docs/ARCHITECTURE.md) it stands alone: the binary implements
//! [`OpsSource`] over the core, builds the registry every crate registers its metrics in,
//! and runs [`serve`] on its own listener.
//!
//! Serving `/metrics` from a registry of your own:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//!
//! use ops_http::{OpsConfig, OpsSource};
//! use prometheus_client::metrics::gauge::Gauge;
//! use prometheus_client::registry::Registry;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//! use tokio_util::sync::CancellationToken;
//!
//! struct AlwaysReady;
//!
//! impl OpsSource for AlwaysReady {
//!     fn ready(&self) -> Result<(), String> {
//!         Ok(())
//!     }
//! }
//!
//! let mut registry = Registry::default();
//! let sessions: Gauge = Gauge::default();
//! registry.register("my_sessions", "Open sessions", sessions.clone());
//! sessions.set(3);
//!
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let shutdown = CancellationToken::new();
//! let server = tokio::spawn(ops_http::serve(
//!     listener,
//!     OpsConfig::default(),
//!     Arc::new(AlwaysReady),
//!     Arc::new(registry),
//!     shutdown.clone(),
//! ));
//!
//! let mut client = TcpStream::connect(addr).await?;
//! client.write_all(b"GET /metrics HTTP/1.1\r\nHost: ops\r\n\r\n").await?;
//! let mut response = String::new();
//! client.read_to_string(&mut response).await?; // `Connection: close`: read to the end.
//! assert!(response.starts_with("HTTP/1.1 200"));
//! assert!(response.contains("# TYPE my_sessions gauge\nmy_sessions 3\n"));
//!
//! shutdown.cancel();
//! server.await??;
//! # Ok(())
//! # }
//! ```

// Crate-level because `[lints] workspace = true` takes no additions: a `pub` item that is
// not reachable from outside the crate is dead public API or should say `pub(crate)`.
#![warn(missing_docs, unreachable_pub)]

mod config;
mod connection;
mod error;
mod routes;
mod source;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::OpsConfig;
pub use error::OpsError;
pub use source::OpsSource;

/// Serves the operations endpoint on `listener` until `shutdown` fires (or the listener
/// fails), one tracked task per connection, at most `config.max_connections` at a time.
///
/// On return the listener is closed and every connection task has ended: they are
/// cancelled, not drained (an ops response has nothing worth finishing). Keep `shutdown`
/// separate from the gateway's own drain signal if `/readyz` should keep answering 503
/// while the gateway drains.
pub async fn serve(
    listener: TcpListener,
    config: OpsConfig,
    source: Arc<dyn OpsSource>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), OpsError> {
    config.validate()?;
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let shared = Arc::new(connection::Shared { config, source, registry });
    let tracker = TaskTracker::new();
    // Cancelled with `shutdown`, and also when this function returns for another reason,
    // so no connection task outlives `serve`.
    let connections = shutdown.child_token();
    let mut next_conn_id: u64 = 0;
    let result = loop {
        // A slot first, then a connection: beyond the limit, connections wait in the listen
        // backlog, each slot being freed within the timeouts of `OpsConfig`. (hyper has no
        // connection limit of its own: this semaphore is it.)
        let permit = tokio::select! {
            // Cancel-safe: an acquire that is not chosen takes no permit.
            () = shutdown.cancelled() => break Ok(()),
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                // Only a closed semaphore fails, and this one is never closed.
                Err(_closed) => break Ok(()),
            },
        };
        let (stream, peer) = tokio::select! {
            // Cancel-safe: `accept` loses no connection when not chosen.
            () = shutdown.cancelled() => break Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if is_transient_accept_error(&e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "ops accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => break Err(OpsError::Accept(e)),
            },
        };
        next_conn_id += 1;
        let span = tracing::debug_span!("ops.conn", conn.id = next_conn_id, peer = %peer);
        tracker.spawn(
            connection::run(stream, permit, Arc::clone(&shared), connections.clone())
                .instrument(span),
        );
    };
    // Refuse new connections before waiting for the current ones.
    drop(listener);
    connections.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

/// Accept errors that concern one connection or a passing shortage, not the listener.
fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE (Linux)
}
