//! Counters of what the adapter did, kept as relaxed atomics (each is an independent
//! figure; nobody needs a consistent cut across them) and read as an [`AmqpStats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the adapter's counters. Counters only grow; `connected` and
/// `pending_requests` are current values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmqpStats {
    /// Whether the connection and topology are up right now.
    pub connected: bool,
    /// Requests waiting for a response right now.
    pub pending_requests: usize,
    /// Messages published: those the broker confirmed (commands, events, responses, a
    /// service's first request) and requests on the direct path, which has no confirms,
    /// counted when their request ends without lapin having reported a failure to write
    /// them. A direct request of at most 4 KiB counts once, here or in `publish_failures`;
    /// a larger one, waited for until written, counts in neither if its request ends (times
    /// out) during that wait. A direct request the broker returns counts here and in
    /// `returned` (a confirmed one only in `returned`).
    pub published: u64,
    /// Publishes that failed (channel down, broker nack, publish queue full, timeout). A
    /// fan-out operation refused by a full control queue is a broker nack.
    pub publish_failures: u64,
    /// Calls refused by the validation guard before anything was published.
    pub rejected_by_guard: u64,
    /// Responses handed to a waiting request (the first one per correlation id).
    pub responses: u64,
    /// Later responses for a correlation id that was already answered (§6.1).
    pub duplicates_dropped: u64,
    /// Responses nobody waited for (timed out, cancelled, or never ours).
    pub strays_dropped: u64,
    /// Requests and commands the broker returned as unroutable (`basic.return`).
    pub returned: u64,
    /// Malformed deliveries on any of our queues (bad headers, wrong type, not JSON, too
    /// big), dropped or rejected without requeue. A response over
    /// `max_inbound_body_bytes` counts here too, and fails its request at once
    /// (`MeshError::ResponseTooLarge`).
    pub garbage_rejected: u64,
    /// Events forwarded to the core.
    pub events_received: u64,
    /// Events the broker dropped from this instance's events queue because it was full
    /// (`x-max-length`, oldest first), counted as the broker dead-letters them to the
    /// instance's drop queue.
    pub events_dropped_by_broker: u64,
    /// Control operations forwarded to the core.
    pub controls_received: u64,
    /// Requests and commands handled on the gateway's service queue (client-relayed ones
    /// refused with `NuropbAuthorizationError` included).
    pub service_calls: u64,
    /// Successful reconnects after a lost connection.
    pub reconnects: u64,
}

/// The live counters behind [`AmqpStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_failures: AtomicU64,
    pub(crate) rejected_by_guard: AtomicU64,
    pub(crate) responses: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
    pub(crate) strays_dropped: AtomicU64,
    pub(crate) returned: AtomicU64,
    pub(crate) garbage_rejected: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) events_dropped_by_broker: AtomicU64,
    pub(crate) controls_received: AtomicU64,
    pub(crate) service_calls: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self, connected: bool, pending_requests: usize) -> AmqpStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AmqpStats {
            connected,
            pending_requests,
            published: get(&self.published),
            publish_failures: get(&self.publish_failures),
            rejected_by_guard: get(&self.rejected_by_guard),
            responses: get(&self.responses),
            duplicates_dropped: get(&self.duplicates_dropped),
            strays_dropped: get(&self.strays_dropped),
            returned: get(&self.returned),
            garbage_rejected: get(&self.garbage_rejected),
            events_received: get(&self.events_received),
            events_dropped_by_broker: get(&self.events_dropped_by_broker),
            controls_received: get(&self.controls_received),
            service_calls: get(&self.service_calls),
            reconnects: get(&self.reconnects),
        }
    }
}
