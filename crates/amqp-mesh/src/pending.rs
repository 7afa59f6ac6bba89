//! Requests waiting for their response, keyed by correlation id. The table is touched
//! twice per request (insert, take) plus once more when the caller goes away; it is split
//! into shards so concurrent requests rarely meet on one lock, and every lock is held for
//! one map operation, never across an `.await`. An owner task would cost two channel hops
//! per request for the same guarantees.
//!
//! Invariant: an entry exists only while a [`PendingGuard`] for it is alive, so a
//! cancelled or timed-out request leaves nothing behind.
//!
//! The shards hash with foldhash, not SipHash: every key in them is a correlation id the
//! gateway generated at random (a response naming another id only looks it up), so no
//! peer can choose keys that collide.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use foldhash::fast::RandomState;
use handler_core::MeshError;
use tokio::sync::oneshot;

const SHARDS: usize = 16;

type Shard = HashMap<String, oneshot::Sender<Reply>, RandomState>;

/// A response as it came off the response queue; the waiting caller decodes it, so that
/// decryption and JSON parsing of large bodies run in parallel, not in the consumer.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) body: Vec<u8>,
    pub(crate) encrypted: bool,
}

pub(crate) type Reply = Result<RawResponse, MeshError>;

#[derive(Debug, Default)]
pub(crate) struct PendingTable {
    shards: [Mutex<Shard>; SHARDS],
    /// Requests of connection generations up to this one are failed and refused.
    /// Read under the shard lock so that a registration and a `fail_through` cannot cross.
    closed_through: AtomicU64,
    len: AtomicUsize,
}

impl PendingTable {
    /// Registers a request made on connection `generation`. Refused when that connection
    /// has already been given up, so a request can never wait on a dead link.
    pub(crate) fn register(
        self: &Arc<Self>,
        correlation_id: String,
        generation: u64,
    ) -> Result<(PendingGuard, oneshot::Receiver<Reply>), MeshError> {
        let (tx, rx) = oneshot::channel();
        let mut shard = self.shard(&correlation_id);
        if generation <= self.closed_through.load(Ordering::SeqCst) {
            return Err(MeshError::Unavailable("connection lost".into()));
        }
        if shard.insert(correlation_id.clone(), tx).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        drop(shard);
        Ok((PendingGuard { table: Arc::clone(self), correlation_id }, rx))
    }

    /// Hands `reply` to the request waiting under `correlation_id`, if any. The first call
    /// wins: the entry is removed, so later responses find nothing (duplicates).
    pub(crate) fn complete(&self, correlation_id: &str, reply: Reply) -> bool {
        let Some(tx) = self.remove(correlation_id) else {
            return false;
        };
        // The caller may have given up an instant ago; its guard then found nothing to
        // remove, and the response is simply dropped.
        tx.send(reply).is_ok()
    }

    /// Fails every waiting request and refuses new ones from connection generations up
    /// to `generation` (`u64::MAX` on shutdown).
    pub(crate) fn fail_through(&self, generation: u64, error: &MeshError) {
        self.closed_through.fetch_max(generation, Ordering::SeqCst);
        for shard in &self.shards {
            let drained: Vec<_> = {
                let mut shard = lock(shard);
                self.len.fetch_sub(shard.len(), Ordering::Relaxed);
                shard.drain().map(|(_, tx)| tx).collect()
            };
            for tx in drained {
                // A caller that is already gone needs no error.
                let _ = tx.send(Err(error.clone()));
            }
        }
    }

    /// Requests waiting right now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn remove(&self, correlation_id: &str) -> Option<oneshot::Sender<Reply>> {
        let removed = self.shard(correlation_id).remove(correlation_id);
        if removed.is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    fn shard(&self, correlation_id: &str) -> MutexGuard<'_, Shard> {
        let hash = correlation_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
        lock(&self.shards[hash % SHARDS])
    }
}

/// Every critical section is a single map operation, so a panic elsewhere cannot leave a
/// shard half-updated; a poisoned lock is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes its entry when the request finishes in any way: answered, timed out, failed,
/// or dropped by its caller.
#[derive(Debug)]
pub(crate) struct PendingGuard {
    table: Arc<PendingTable>,
    correlation_id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        // Already gone if the response or a connection failure took it.
        let _ = self.table.remove(&self.correlation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> Reply {
        Ok(RawResponse { body: b"{}".to_vec(), encrypted: false })
    }

    #[test]
    fn first_response_wins_and_guard_cleans_up() {
        let table = Arc::new(PendingTable::default());
        let (guard, mut rx) = table.register("a".into(), 1).expect("register");
        assert_eq!(table.len(), 1);
        assert!(table.complete("a", raw()));
        assert!(!table.complete("a", raw()), "a duplicate finds nothing");
        assert!(rx.try_recv().is_ok());
        assert_eq!(table.len(), 0);
        drop(guard);
        assert_eq!(table.len(), 0);

        let (guard, _rx) = table.register("b".into(), 1).expect("register");
        assert_eq!(table.len(), 1);
        drop(guard);
        assert_eq!(table.len(), 0, "a dropped request leaves no entry");
        assert!(!table.complete("b", raw()), "a late response is a stray");
    }

    #[test]
    fn failing_a_generation_fails_waiters_and_refuses_late_registrations() {
        let table = Arc::new(PendingTable::default());
        let (_g1, mut rx1) = table.register("x".into(), 3).expect("register");
        let (_g2, mut rx2) = table.register("y".into(), 3).expect("register");
        table.fail_through(3, &MeshError::Unavailable("connection lost".into()));
        assert!(matches!(rx1.try_recv(), Ok(Err(MeshError::Unavailable(_)))));
        assert!(matches!(rx2.try_recv(), Ok(Err(MeshError::Unavailable(_)))));
        assert_eq!(table.len(), 0);
        assert!(table.register("z".into(), 3).is_err(), "generation 3 is gone");
        assert!(table.register("z".into(), 4).is_ok(), "generation 4 is live");
    }
}
