//! The supervisor: keeps one connection up, fails pending requests the moment it is lost,
//! reconnects with capped exponential backoff and jitter, and drains on shutdown.

use std::sync::Arc;
use std::time::Duration;

use handler_core::MeshError;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::link::{Connector, Link};
use crate::link_state::LinkWatch;
use crate::pending::PendingTable;
use crate::stats::bump;

/// What the supervisor needs: how to connect, where to announce the live connection, the
/// requests to fail when it is lost, its timings, and the shutdown signal.
#[derive(Debug)]
pub(crate) struct Supervisor {
    pub(crate) connector: Connector,
    pub(crate) link: LinkWatch,
    pub(crate) pending: Arc<PendingTable>,
    pub(crate) reconnect_min: Duration,
    pub(crate) reconnect_max: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) shutdown: CancellationToken,
}

/// Runs until shutdown, starting with the connection `start` made.
pub(crate) async fn run(supervisor: Supervisor, first: Link) {
    let mut current = Some(first);
    let mut generation = current.as_ref().map_or(1, |l| l.handle.generation);
    let mut failures: u32 = 0;
    loop {
        if let Some(link) = current.take() {
            supervisor.link.set(Some(link.handle.clone()));
            info!(generation, "mesh connected");
            // Cancellation safety: both branches are plain notifications.
            let shutting_down = tokio::select! {
                () = link.token.cancelled() => false,
                () = supervisor.shutdown.cancelled() => true,
            };
            if shutting_down {
                // New calls are refused from here on (`LinkWatch::current`); let those in flight
                // receive their responses and confirmations while the consumers and the
                // publisher still run.
                drain(&supervisor, &link).await;
            } else {
                warn!(generation, "mesh connection lost");
            }
            supervisor.link.set(None);
            let (through, why) = if shutting_down {
                (u64::MAX, "shutting down")
            } else {
                (generation, "connection lost")
            };
            supervisor.pending.fail_through(through, &MeshError::Unavailable(why.into()));
            link.close().await;
        }
        if supervisor.shutdown.is_cancelled() {
            break;
        }
        let delay = backoff(failures, supervisor.reconnect_min, supervisor.reconnect_max);
        failures = failures.saturating_add(1);
        // Cancellation safety: the sleep and the establish future own nothing that must
        // survive; a half-made connection is closed when dropped.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = supervisor.shutdown.cancelled() => break,
        }
        generation += 1;
        let attempt = tokio::select! {
            attempt = supervisor.connector.establish(generation) => attempt,
            () = supervisor.shutdown.cancelled() => break,
        };
        match attempt {
            Ok(link) => {
                bump(&supervisor.connector.counters.reconnects);
                failures = 0;
                current = Some(link);
            }
            // The error says what to fix (refused credentials, topology mismatch); the
            // loop keeps trying, since the broker or its configuration may come back.
            Err(error) => warn!(error = %error, attempt = failures, "mesh reconnect failed"),
        }
    }
    supervisor.link.set(None);
    supervisor.pending.fail_through(u64::MAX, &MeshError::Unavailable("shutting down".into()));
    info!("mesh stopped");
}

/// Waits until no request is pending and the publisher has settled everything it was
/// given (commands and events awaiting their confirmation included), at most
/// `drain_timeout`, and no longer than the connection lives.
async fn drain(supervisor: &Supervisor, link: &Link) {
    let publisher = &link.handle.publisher;
    let outstanding = || (supervisor.pending.len(), publisher.unsettled());
    let timeout = supervisor.drain_timeout;
    let (pending, unconfirmed) = outstanding();
    if (pending, unconfirmed) != (0, 0) {
        info!(pending, unconfirmed, ?timeout, "draining");
    }
    let drained = async {
        // Polling is enough here: this runs once per process, for a few seconds at most.
        while outstanding() != (0, 0) {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    };
    // Cancellation safety: the drain future holds nothing; the other two are timers and
    // notifications.
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(timeout) => {
            let (pending, unconfirmed) = outstanding();
            warn!(pending, unconfirmed, "drain timed out; failing what is left");
        }
        () = link.token.cancelled() => debug!("connection lost while draining"),
    }
}

/// How often the drain looks at what is outstanding.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The delay before reconnect attempt `failures` (0-based): `min · 2^failures`, capped at
/// `max`, then jittered uniformly down to half of it so that many gateways cut off at once
/// do not reconnect in lockstep.
pub(crate) fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(31));
    let ceiling = min.saturating_mul(factor).min(max);
    let floor = ceiling / 2;
    let jitter = rand::thread_rng().gen_range(0..=(ceiling - floor).as_millis() as u64);
    floor + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        let within = |failures: u32, lo: u64, hi: u64| {
            for _ in 0..50 {
                let d = backoff(failures, min, max).as_millis() as u64;
                assert!((lo..=hi).contains(&d), "failures {failures}: {d} ms not in {lo}..={hi}");
            }
        };
        within(0, 50, 100);
        within(1, 100, 200);
        within(3, 400, 800);
        within(7, 5_000, 10_000);
        within(40, 5_000, 10_000);
    }
}
