//! The WebSocket side of nuropb-gateway (tokio-tungstenite): accept TCP connections, check
//! origin and credentials during the HTTP upgrade (403 / 401 before any WebSocket exists),
//! then run one task per connection that owns its socket and talks to the core through a
//! [`CoordinatorHandle`]. The core reaches a connection only through its bounded outbound
//! queue (its [`handler_core::ClientConnection`] implementation is in `connection`).

// Crate-level because `[lints] workspace = true` takes no additions: a `pub` item that is
// not reachable from outside the crate is dead public API or should say `pub(crate)`.
#![warn(unreachable_pub)]

mod config;
mod connection;
mod origin;
mod stats;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use config::{AuthSources, WsConfig};
pub use origin::OriginPolicy;
pub use stats::{WsStats, WsStatsHandle};

use handler_core::CoordinatorHandle;

use crate::connection::Admission;

/// Errors of the WebSocket adapter. `serve` has none today (it retries every accept error
/// and ends only on shutdown); configuration does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// An [`OriginPolicy`] entry that is not a host with an optional scheme and port.
    #[error("cannot parse origin entry {entry:?}: {reason}")]
    InvalidOrigin { entry: String, reason: &'static str },
}

/// Accepts connections on `listener` until `shutdown`, one tracked task per connection.
/// Returns when `shutdown` fires; connection tasks are left to the tracker's drain.
///
/// Overload policy: at most `max_connections` sessions; beyond that at most
/// `max_refusals_in_flight` connections are told 503 (within `refusal_handshake_timeout`)
/// and the rest are closed at once. Accept errors (out of file descriptors or buffers, a
/// connection aborted before it was accepted, a firewall's EPERM …) are retried with a
/// backoff of up to one second and logged at most once per interval. `stats` counts what
/// was refused, shed or dropped.
pub async fn serve(
    listener: TcpListener,
    config: WsConfig,
    coordinator: CoordinatorHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: WsStatsHandle,
) -> Result<(), WsError> {
    let config = Arc::new(config);
    // `Semaphore::new` panics above `MAX_PERMITS`; no deployment gets near it.
    let sessions = Arc::new(Semaphore::new(config.max_connections.min(Semaphore::MAX_PERMITS)));
    let refusals =
        Arc::new(Semaphore::new(config.max_refusals_in_flight.min(Semaphore::MAX_PERMITS)));
    let mut backoff = AcceptBackoff::default();
    let mut next_conn_id: u64 = 0;
    loop {
        let accept = || listener.accept();
        let Some((stream, peer)) =
            accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await
        else {
            return Ok(());
        };
        next_conn_id += 1;
        let admission = match Arc::clone(&sessions).try_acquire_owned() {
            Ok(permit) => Admission::Session { _permit: permit },
            Err(_) => match Arc::clone(&refusals).try_acquire_owned() {
                Ok(permit) => {
                    stats.connection_refused();
                    Admission::Refusal { _permit: permit }
                }
                Err(_) => {
                    // Closing at once is the only answer that costs nothing: a task per
                    // connection here is what a flood of idle sockets would exploit.
                    stats.connection_shed();
                    tracing::debug!(
                        conn.id = next_conn_id,
                        peer = %peer,
                        "over the connection limit and the refusal budget; closed unanswered"
                    );
                    drop(stream);
                    continue;
                }
            },
        };
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
            connection::run(
                stream,
                admission,
                Arc::clone(&config),
                coordinator.clone(),
                stats.clone(),
            )
            .instrument(span),
        );
    }
}

/// Accepts the next connection, retrying every error after a backoff; `None` on shutdown.
/// Generic over the accept call so that tests can script its errors.
async fn accept_with_backoff<S, F, Fut>(
    mut accept: F,
    backoff: &mut AcceptBackoff,
    shutdown: &CancellationToken,
    stats: &WsStatsHandle,
) -> Option<(S, SocketAddr)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    loop {
        let result = tokio::select! {
            // Cancel-safe: `TcpListener::accept` loses no connection when not chosen.
            _ = shutdown.cancelled() => return None,
            r = accept() => r,
        };
        let e = match result {
            Ok(accepted) => {
                backoff.succeeded();
                return Some(accepted);
            }
            Err(e) => e,
        };
        // Every accept error is treated as transient. Most concern one connection (aborted,
        // EPROTO, EPERM from a firewall, network errors Linux passes on); the rest are a
        // resource shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) that passes. Giving up would
        // leave the process running without a listener.
        stats.accept_error();
        let pause = backoff.failed();
        match backoff.should_log(Instant::now()) {
            Some(suppressed) => tracing::warn!(
                error = %e,
                retry_in_ms = pause.as_millis() as u64,
                suppressed,
                "accept failed; retrying"
            ),
            None => tracing::debug!(error = %e, "accept failed; retrying"),
        }
        tokio::select! {
            // Cancel-safe: a sleep.
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Backoff and log rate limit for accept errors: the pause doubles from 10 ms to 1 s while
/// errors repeat and starts over after a success; at most one warning per 10 s.
#[derive(Debug)]
struct AcceptBackoff {
    pause: Duration,
    last_warning: Option<Instant>,
    // Errors not logged at warn since the last warning.
    suppressed: u64,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const WARNING_INTERVAL: Duration = Duration::from_secs(10);

    fn succeeded(&mut self) {
        self.pause = Self::FIRST_PAUSE;
    }

    /// The pause before the next attempt.
    fn failed(&mut self) -> Duration {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        pause
    }

    /// `Some(errors suppressed since the last warning)` when this error is to be logged at
    /// warn.
    fn should_log(&mut self, now: Instant) -> Option<u64> {
        let due = self.last_warning.is_none_or(|t| now.duration_since(t) >= Self::WARNING_INTERVAL);
        if due {
            self.last_warning = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { pause: Self::FIRST_PAUSE, last_warning: None, suppressed: 0 }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::collections::VecDeque;
    use std::io;

    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[tokio::test(start_paused = true)]
    async fn every_accept_error_is_retried_with_backoff() {
        // ENOBUFS, ENOMEM, EPROTO, EPERM: the errors that used to end `serve`.
        let mut script: VecDeque<io::Result<((), SocketAddr)>> = [105, 12, 71, 1]
            .into_iter()
            .map(|code| Err(io::Error::from_raw_os_error(code)))
            .chain([Err(io::ErrorKind::ConnectionAborted.into()), Ok(((), addr()))])
            .collect();
        let stats = WsStatsHandle::new();
        let mut backoff = AcceptBackoff::default();
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let accept = || {
            let next = script.pop_front().unwrap();
            async move { next }
        };
        let accepted = accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await;
        assert_eq!(accepted.map(|(_, a)| a), Some(addr()));
        assert_eq!(started.elapsed(), Duration::from_millis(10 + 20 + 40 + 80 + 160));
        assert_eq!(stats.stats().accept_errors, 5);
        // A success starts the backoff over.
        assert_eq!(backoff.pause, AcceptBackoff::FIRST_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries() {
        let stats = WsStatsHandle::new();
        let mut backoff = AcceptBackoff::default();
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        let tracker = TaskTracker::new();
        tracker.spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let accept = || async { Err::<((), SocketAddr), _>(io::Error::from_raw_os_error(24)) };
        assert!(accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // 10 + 20 + … + 640 ms, then one per second: 7 + 4 errors before the 5 s mark
        // (the pause in progress is cut short).
        assert_eq!(stats.stats().accept_errors, 11);
        assert_eq!(backoff.pause, AcceptBackoff::MAX_PAUSE);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut backoff = AcceptBackoff::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for (at, expected) in [
            (s(0), Some(0)),
            (s(1), None),
            (s(9), None),
            (s(10), Some(2)),
            (s(15), None),
            (s(30), Some(1)),
        ] {
            assert_eq!(backoff.should_log(t0 + at), expected, "{at:?}");
        }
    }
}
