//! The supervisor: keeps one connection up, fails pending requests the moment it is lost,
//! reconnects (to the next node of the cluster when there are several URLs, with capped
//! exponential backoff and jitter between full rounds over them), and drains on shutdown.

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
    /// Set once the first round is over: a connection was made, or every node was tried
    /// once (or the adapter shut down first).
    pub(crate) first_round_done: Arc<tokio::sync::watch::Sender<bool>>,
}

/// Which node to try next, and how many full rounds over the nodes have failed.
///
/// Invariant: `next < nodes` and `tried_this_round < nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rotation {
    nodes: usize,
    pub(crate) next: usize,
    tried_this_round: usize,
    pub(crate) rounds_failed: u32,
}

impl Rotation {
    /// A rotation over `nodes` nodes (at least one) starting at the first.
    pub(crate) fn new(nodes: usize) -> Rotation {
        Rotation { nodes: nodes.max(1), next: 0, tried_this_round: 0, rounds_failed: 0 }
    }

    /// Whether the next attempt opens a round (and so waits for the backoff first).
    pub(crate) fn at_round_start(&self) -> bool {
        self.tried_this_round == 0
    }

    /// The attempt on `next` failed: the next node, and a failed round after the last.
    pub(crate) fn failed(&mut self) {
        self.next = (self.next + 1) % self.nodes;
        self.tried_this_round += 1;
        if self.tried_this_round == self.nodes {
            self.tried_this_round = 0;
            self.rounds_failed = self.rounds_failed.saturating_add(1);
        }
    }

    /// The connection to `node` was up and is now lost: a fresh round from the node after
    /// it, so that the node just lost is tried last.
    pub(crate) fn lost(&mut self, node: usize) {
        *self = Rotation { next: (node + 1) % self.nodes, ..Rotation::new(self.nodes) };
    }
}

/// Runs until shutdown, starting with the connection `start` made, or with none (the
/// broker was not asked yet: the first round starts at once, without a backoff).
pub(crate) async fn run(supervisor: Supervisor, first: Option<Link>) {
    let nodes = supervisor.connector.config.node_urls().len();
    let mut rotation = Rotation::new(nodes);
    let mut current = first;
    let mut generation = current.as_ref().map_or(0, |l| l.handle.generation);
    // Whether a connection was ever up: later ones count as reconnects.
    let mut was_connected = current.is_some();
    // No backoff before the very first attempt of an adapter started unconnected.
    let mut first_round = current.is_none();
    loop {
        if let Some(link) = current.take() {
            let url = supervisor.connector.config.redacted_node_url(link.node);
            supervisor.link.set(Some(link.handle.clone()));
            // After the link is set, so that a waiter sees it connected.
            supervisor.first_round_done.send_replace(true);
            info!(generation, url = %url, "mesh connected");
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
                warn!(generation, url = %url, "mesh connection lost");
            }
            supervisor.link.set(None);
            let (through, why) = if shutting_down {
                (u64::MAX, "shutting down")
            } else {
                (generation, "connection lost")
            };
            supervisor.pending.fail_through(through, &MeshError::Unavailable(why.into()));
            rotation.lost(link.node);
            link.close().await;
        }
        if supervisor.shutdown.is_cancelled() {
            break;
        }
        if rotation.at_round_start() && !first_round {
            let delay =
                backoff(rotation.rounds_failed, supervisor.reconnect_min, supervisor.reconnect_max);
            // Cancellation safety: the sleep and the establish future own nothing that
            // must survive; a half-made connection is closed when dropped.
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = supervisor.shutdown.cancelled() => break,
            }
        }
        first_round = false;
        generation += 1;
        let node = rotation.next;
        let attempt = tokio::select! {
            attempt = supervisor.connector.establish(generation, node) => attempt,
            () = supervisor.shutdown.cancelled() => break,
        };
        match attempt {
            Ok(link) => {
                if was_connected {
                    bump(&supervisor.connector.counters.reconnects);
                }
                was_connected = true;
                current = Some(link);
            }
            // The error says what to fix (refused credentials, topology mismatch) and
            // names the node without its password; the loop keeps trying, since the
            // broker or its configuration may come back.
            Err(error) => {
                warn!(error = %error, node, rounds_failed = rotation.rounds_failed, "mesh connect failed");
                rotation.failed();
                if rotation.rounds_failed > 0 {
                    supervisor.first_round_done.send_replace(true);
                }
            }
        }
    }
    supervisor.link.set(None);
    supervisor.first_round_done.send_replace(true);
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

    #[test]
    fn rotation_walks_the_nodes_and_counts_rounds() {
        let mut r = Rotation::new(3);
        assert_eq!((r.next, r.rounds_failed, r.at_round_start()), (0, 0, true));
        r.failed();
        assert_eq!((r.next, r.rounds_failed, r.at_round_start()), (1, 0, false));
        r.failed();
        r.failed();
        // All three failed: one round, back at the first node, the next waits.
        assert_eq!((r.next, r.rounds_failed, r.at_round_start()), (0, 1, true));
        r.failed();
        // Connected to node 1, then lost it: a fresh round from node 2.
        r.lost(1);
        assert_eq!((r.next, r.rounds_failed, r.at_round_start()), (2, 0, true));
        r.lost(2);
        assert_eq!(r.next, 0);
    }

    #[test]
    fn one_node_backs_off_after_every_failure() {
        let mut r = Rotation::new(1);
        r.failed();
        assert_eq!((r.next, r.rounds_failed, r.at_round_start()), (0, 1, true));
        r.failed();
        assert_eq!(r.rounds_failed, 2);
        r.lost(0);
        assert_eq!((r.next, r.rounds_failed), (0, 0));
    }
}
