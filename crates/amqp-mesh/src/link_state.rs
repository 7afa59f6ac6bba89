//! The link watch: which connection is live right now, written by the supervisor and read
//! by every caller. A call never waits for a reconnect; it takes the live connection or
//! fails at once.

use std::sync::Arc;

use handler_core::MeshError;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::publisher::{Direct, Publisher};

/// What requests need of the live connection.
#[derive(Debug, Clone)]
pub(crate) struct LinkHandle {
    /// Counts connections; pending requests are failed per generation.
    pub(crate) generation: u64,
    /// This connection's response queue (its name changes with every connection, see
    /// `AmqpMeshConfig::response_queue`): the `reply_to` of requests published on it.
    pub(crate) response_queue: Arc<str>,
    pub(crate) publisher: Publisher,
    /// Requests to services known routable on this connection (see `publisher`).
    pub(crate) direct: Direct,
}

/// The live connection, `None` while disconnected. Cheap to clone; every clone sees the
/// same state.
#[derive(Debug, Clone)]
pub(crate) struct LinkWatch {
    // Invariant: written only by the supervisor (and by `start` for the first connection).
    state: Arc<watch::Sender<Option<LinkHandle>>>,
    shutdown: CancellationToken,
}

impl LinkWatch {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        LinkWatch { state: Arc::new(watch::Sender::new(None)), shutdown }
    }

    /// The live connection, or an immediate `Unavailable`: calls never wait for a
    /// reconnect, and none is made after shutdown.
    pub(crate) fn current(&self) -> Result<LinkHandle, MeshError> {
        if self.shutdown.is_cancelled() {
            return Err(MeshError::Unavailable("shutting down".into()));
        }
        self.state
            .borrow()
            .clone()
            .ok_or_else(|| MeshError::Unavailable("not connected to the broker".into()))
    }

    pub(crate) fn set(&self, link: Option<LinkHandle>) {
        self.state.send_replace(link);
    }

    pub(crate) fn is_connected(&self) -> bool {
        !self.shutdown.is_cancelled() && self.state.borrow().is_some()
    }

    /// Waits until connected (at once if it is), or until shutdown; whether it is.
    pub(crate) async fn connected(&self) -> bool {
        let mut state = self.state.subscribe();
        // Cancellation safety: `wait_for` and `cancelled` hold no data.
        tokio::select! {
            up = state.wait_for(Option::is_some) => up.is_ok(),
            () = self.shutdown.cancelled() => false,
        }
    }

    pub(crate) fn response_queue(&self) -> Option<String> {
        self.state.borrow().as_ref().map(|link| link.response_queue.to_string())
    }
}
