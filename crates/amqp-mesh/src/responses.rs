//! The response-queue consumer: lapin deliveries become pending-request completions
//! here, at the adapter's edge. Duplicates (§6.1) and strays are counted and dropped.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use foldhash::fast::RandomState;
use handler_core::MeshError;
use lapin::Consumer;
use lapin::message::Delivery;
use nuropb_wire::mesh::MessageType;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::delivery::next;
use crate::envelope::read_headers;
use crate::pending::{PendingTable, RawResponse};
use crate::stats::{Counters, bump};

/// What the response consumer needs: the table it completes, the counters it bumps, and
/// `max_inbound_body_bytes`.
#[derive(Debug)]
pub(crate) struct ResponseConsumer {
    pub(crate) pending: Arc<PendingTable>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) max_inbound_body_bytes: usize,
}

/// How many answered correlation ids are remembered to tell duplicates (§6.1: nuropb
/// sends a second response after every error) from strays. Older ones count as strays.
const ANSWERED_MEMORY: usize = 4096;

/// Runs the response-queue consumer (auto-ack) until `link` is cancelled or the consumer
/// ends. Unbounded by prefetch (auto-ack), but responses only come for our own requests,
/// which the core bounds; anything else is dropped at once.
pub(crate) async fn run(
    responses: Arc<ResponseConsumer>,
    mut consumer: Consumer,
    link: CancellationToken,
) {
    let mut answered = RecentIds::default();
    while let Some(delivery) = next(&mut consumer, &link, "response").await {
        responses.on_response(&mut answered, delivery);
    }
}

impl ResponseConsumer {
    fn on_response(&self, answered: &mut RecentIds, delivery: Delivery) {
        let garbage = |why: &str| {
            bump(&self.counters.garbage_rejected);
            debug!(why, "dropped a malformed message on the response queue");
        };
        let headers = match read_headers(&delivery.properties) {
            Ok(headers) if headers.message_type == MessageType::Response => headers,
            Ok(_) => return garbage("not a response"),
            Err(why) => return garbage(why),
        };
        let Some(correlation_id) = delivery.properties.correlation_id().as_ref() else {
            return garbage("no correlation_id");
        };
        let correlation_id = correlation_id.as_str();
        let (bytes, limit) = (delivery.data.len(), self.max_inbound_body_bytes);
        if bytes > limit {
            // The body is dropped unread, but the request it answers ends now, not at its
            // timeout. Counted with the other deliveries dropped as unusable.
            bump(&self.counters.garbage_rejected);
            if self
                .pending
                .complete(correlation_id, Err(MeshError::ResponseTooLarge { bytes, limit }))
            {
                warn!(
                    correlation_id,
                    bytes, limit, "response larger than max_inbound_body_bytes; its request fails"
                );
                answered.insert(correlation_id);
            } else {
                debug!(
                    correlation_id,
                    bytes,
                    limit,
                    "dropped a response larger than max_inbound_body_bytes that nobody waits for"
                );
            }
            return;
        }
        let raw = RawResponse { body: delivery.data, encrypted: headers.encrypted };
        if self.pending.complete(correlation_id, Ok(raw)) {
            bump(&self.counters.responses);
            answered.insert(correlation_id);
        } else if answered.contains(correlation_id) {
            bump(&self.counters.duplicates_dropped);
            debug!(correlation_id, "dropped a duplicate response");
        } else {
            bump(&self.counters.strays_dropped);
            debug!(correlation_id, "dropped a response nobody waits for");
        }
    }
}

/// A bounded memory of recently answered correlation ids (oldest forgotten first). Only ids
/// that matched a pending request go in, so every key is one the gateway generated: hashed
/// with foldhash, like the pending table. Each id is stored once, shared by both fields.
#[derive(Debug, Default)]
struct RecentIds {
    order: VecDeque<Arc<str>>,
    set: HashSet<Arc<str>, RandomState>,
}

impl RecentIds {
    fn insert(&mut self, id: &str) {
        // Only ids that just completed a request come here, so the id is new: one lookup.
        let id: Arc<str> = Arc::from(id);
        if self.set.insert(Arc::clone(&id)) {
            self.order.push_back(id);
            if self.order.len() > ANSWERED_MEMORY
                && let Some(oldest) = self.order.pop_front()
            {
                self.set.remove(&oldest);
            }
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_are_bounded() {
        let mut recent = RecentIds::default();
        for i in 0..ANSWERED_MEMORY + 10 {
            recent.insert(&i.to_string());
        }
        assert!(!recent.contains("0"));
        assert!(recent.contains(&(ANSWERED_MEMORY + 9).to_string()));
        assert_eq!(recent.set.len(), ANSWERED_MEMORY);
    }
}
