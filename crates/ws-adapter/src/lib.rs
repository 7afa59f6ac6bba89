//! The WebSocket side of nuropb-gateway (tokio-tungstenite): accept TCP connections, check
//! origin and credentials during the HTTP upgrade (403 / 401 before any WebSocket exists),
//! then run one task per connection that owns its socket and talks to the core through a
//! [`CoordinatorHandle`]. The core reaches a connection only through its bounded outbound
//! queue ([`Handler`] implementation below).

mod config;
mod connection;
mod upgrade;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{AuthSources, WsConfig};

use handler_core::CoordinatorHandle;

/// Errors of the WebSocket adapter.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
}

/// Accepts connections on `listener` until `shutdown`, one tracked task per connection.
/// Returns when the listener stops; connection tasks are left to the tracker's drain.
pub async fn serve(
    listener: TcpListener,
    config: WsConfig,
    coordinator: CoordinatorHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), WsError> {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let mut next_conn_id: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            // Cancel-safe: `accept` loses no connection when not chosen.
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if is_transient_accept_error(&e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(WsError::Accept(e)),
            },
        };
        next_conn_id += 1;
        // No permit: the connection is still upgraded far enough to be told 503.
        let permit = Arc::clone(&permits).try_acquire_owned().ok();
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let span = tracing::info_span!(
            "conn",
            conn.id = next_conn_id,
            peer = %peer,
            session.id = tracing::field::Empty
        );
        tracker.spawn(
            connection::run(stream, permit, Arc::clone(&config), coordinator.clone())
                .instrument(span),
        );
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}
