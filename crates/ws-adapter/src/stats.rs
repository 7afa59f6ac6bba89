//! Counters of the WebSocket side: plain atomics bumped by the accept loop and the
//! connection tasks (each counter is its own figure; nobody needs a consistent cut across
//! them), read as a [`WsStats`] snapshot through a [`WsStatsHandle`]; and the labelled
//! metrics (upgrade refusals by reason and status, closes by code, outbound queue depth) as
//! `prometheus_client` handles in the same handle, registered by the binary
//! ([`WsStatsHandle::register`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

/// A snapshot of the WebSocket side's counters. Every counter only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WsStats {
    /// Connections over `max_connections` that were given a short handshake to be told 503
    /// (`max_refusals_in_flight` had room).
    pub connections_refused: u64,
    /// Connections over `max_connections` closed at once, unanswered, because
    /// `max_refusals_in_flight` refusals were already in progress.
    pub connections_shed: u64,
    /// Failed `accept` calls, each followed by a backoff.
    pub accept_errors: u64,
    /// Responses over `max_outbound_message_size`, replaced by a `LimitExceeded` error
    /// response with the same trace id.
    pub responses_too_large: u64,
    /// Events and other non-response frames over `max_outbound_message_size`, dropped (one
    /// per session the frame was meant for).
    pub frames_too_large_dropped: u64,
    /// Connections over `max_handshakes_in_flight`, given a short handshake to be told 503
    /// (the rest are counted in `connections_shed`).
    pub handshakes_refused: u64,
    /// Connections over `max_connections_per_ip`, told 429 (or shed).
    pub per_ip_connections_refused: u64,
    /// Connection attempts over `connect_rate_per_ip`/`connect_burst_per_ip`, told 429 (or
    /// shed).
    pub per_ip_rate_refused: u64,
    /// Upgrade requests that were not a valid WebSocket handshake: answered 400, 426 or 431.
    pub bad_handshakes: u64,
    /// Upgrades refused with 429 because the user had `max_sessions_per_user` sessions.
    pub per_user_sessions_refused: u64,
    /// TLS handshakes that failed or timed out (`WsConfig::tls` only): a client that does
    /// not trust the certificate, one speaking plain HTTP to the TLS port, a scanner.
    pub tls_handshake_failures: u64,
    /// Connections closed unanswered for the PROXY protocol (`WsConfig::proxy_protocol`):
    /// from a peer that is not a trusted proxy, or whose header was missing, malformed,
    /// too large or too slow.
    pub proxy_refused: u64,
}

/// The live counters behind [`WsStats`]; clones share them. Create one, pass a clone to
/// [`serve`](crate::serve) and read [`stats`](Self::stats) from anywhere (e.g. `/metrics`).
#[derive(Debug, Clone, Default)]
pub struct WsStatsHandle {
    counters: Arc<Counters>,
    metrics: WsMetrics,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    code: u16,
}

/// Outbound queue depths observed: powers of two up to the largest queue allowed.
const DEPTH_BUCKETS: [f64; 12] =
    [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// Label sets are closed: `reason` and `status` come from this crate's fixed strings, and
/// `code` from the close codes the gateway sends (docs/PROTOCOL.md).
#[derive(Debug, Clone)]
struct WsMetrics {
    refused: Family<RefusalLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    queue_depth: Histogram,
}

impl Default for WsMetrics {
    fn default() -> Self {
        WsMetrics {
            refused: Family::default(),
            closes: Family::default(),
            queue_depth: Histogram::new(DEPTH_BUCKETS),
        }
    }
}

#[derive(Debug)]
struct Counters {
    connections_refused: AtomicU64,
    connections_shed: AtomicU64,
    accept_errors: AtomicU64,
    responses_too_large: AtomicU64,
    frames_too_large_dropped: AtomicU64,
    handshakes_refused: AtomicU64,
    per_ip_connections_refused: AtomicU64,
    per_ip_rate_refused: AtomicU64,
    bad_handshakes: AtomicU64,
    per_user_sessions_refused: AtomicU64,
    tls_handshake_failures: AtomicU64,
    proxy_refused: AtomicU64,
    /// Milliseconds since `epoch` before which no oversized-frame warning is logged.
    next_oversized_warning_ms: AtomicU64,
    epoch: Instant,
    // Invariant: the number of live `PendingAuth` guards. Not a reported counter but a
    // gauge that bounds the first-frame route (it lives here because every connection task
    // already shares this handle).
    pending_auth: AtomicUsize,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            connections_refused: AtomicU64::new(0),
            connections_shed: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            responses_too_large: AtomicU64::new(0),
            frames_too_large_dropped: AtomicU64::new(0),
            handshakes_refused: AtomicU64::new(0),
            per_ip_connections_refused: AtomicU64::new(0),
            per_ip_rate_refused: AtomicU64::new(0),
            bad_handshakes: AtomicU64::new(0),
            per_user_sessions_refused: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            proxy_refused: AtomicU64::new(0),
            next_oversized_warning_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            pending_auth: AtomicUsize::new(0),
        }
    }
}

/// At most one oversized-frame warning per interval, across all connections.
const OVERSIZED_WARNING_INTERVAL: Duration = Duration::from_secs(1);

impl WsStatsHandle {
    /// Counters all at zero; clone the handle into [`crate::serve`] and wherever they are
    /// read.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of every counter (each read independently).
    pub fn stats(&self) -> WsStats {
        let c = &*self.counters;
        // Relaxed: independent counters, read for reporting only.
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WsStats {
            connections_refused: get(&c.connections_refused),
            connections_shed: get(&c.connections_shed),
            accept_errors: get(&c.accept_errors),
            responses_too_large: get(&c.responses_too_large),
            frames_too_large_dropped: get(&c.frames_too_large_dropped),
            handshakes_refused: get(&c.handshakes_refused),
            per_ip_connections_refused: get(&c.per_ip_connections_refused),
            per_ip_rate_refused: get(&c.per_ip_rate_refused),
            bad_handshakes: get(&c.bad_handshakes),
            per_user_sessions_refused: get(&c.per_user_sessions_refused),
            tls_handshake_failures: get(&c.tls_handshake_failures),
            proxy_refused: get(&c.proxy_refused),
        }
    }

    /// Registers the labelled metrics under their `nuropb_gateway_ws_*` names. The counters
    /// of [`WsStats`] are not registered here: the binary reports them from
    /// [`stats`](Self::stats).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nuropb_gateway_ws_upgrades_refused",
            "Connections and upgrades refused, by reason and HTTP status (none: closed unanswered)",
            self.metrics.refused.clone(),
        );
        registry.register(
            "nuropb_gateway_ws_closes",
            "WebSocket close frames sent, by close code (a reply to the client's close echoes its code, 1005 when it gave none)",
            self.metrics.closes.clone(),
        );
        registry.register(
            "nuropb_gateway_ws_outbound_queue_depth",
            "Frames waiting in a session's outbound queue, observed as each frame is queued",
            self.metrics.queue_depth.clone(),
        );
    }

    /// One refusal: `status` is the HTTP status sent, `"none"` when closed unanswered.
    pub(crate) fn refused(&self, reason: &'static str, status: &'static str) {
        self.metrics.refused.get_or_create(&RefusalLabels { reason, status }).inc();
    }

    /// One close frame sent with `code`.
    pub(crate) fn closed(&self, code: u16) {
        self.metrics.closes.get_or_create(&CloseLabels { code }).inc();
    }

    /// The outbound queue's depth after a frame was queued.
    pub(crate) fn queue_depth(&self, depth: usize) {
        self.metrics.queue_depth.observe(depth as f64);
    }

    pub(crate) fn connection_refused(&self) {
        self.counters.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_shed(&self) {
        self.counters.connections_shed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn accept_error(&self) {
        self.counters.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn response_too_large(&self) {
        self.counters.responses_too_large.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn frame_too_large_dropped(&self) {
        self.counters.frames_too_large_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn handshake_refused(&self) {
        self.counters.handshakes_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn per_ip_connection_refused(&self) {
        self.counters.per_ip_connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn per_ip_rate_refused(&self) {
        self.counters.per_ip_rate_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bad_handshake(&self) {
        self.counters.bad_handshakes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake_failed(&self) {
        self.counters.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn proxy_refused(&self) {
        self.counters.proxy_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn per_user_session_refused(&self) {
        self.counters.per_user_sessions_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A slot for a connection waiting for its first-frame `auth`, or `None` when `limit`
    /// connections already wait; the slot is given back when the guard drops.
    pub(crate) fn begin_pending_auth(&self, limit: usize) -> Option<PendingAuth> {
        let gauge = &self.counters.pending_auth;
        gauge
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| PendingAuth { counters: Arc::clone(&self.counters) })
    }

    /// Whether an oversized frame may be logged at warn now (else at debug). One big
    /// broadcast event is dropped once per session; this keeps it to one warning, while the
    /// counters keep the full count.
    pub(crate) fn oversized_warning_due(&self) -> bool {
        let c = &*self.counters;
        let now = u64::try_from(c.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = c.next_oversized_warning_ms.load(Ordering::Relaxed);
        let interval = OVERSIZED_WARNING_INTERVAL.as_millis() as u64;
        // Only the connection that moves the mark forward warns.
        now >= next
            && c.next_oversized_warning_ms
                .compare_exchange(
                    next,
                    now.saturating_add(interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// One connection waiting for its first-frame `auth` (see
/// [`WsStatsHandle::begin_pending_auth`]).
#[derive(Debug)]
pub(crate) struct PendingAuth {
    counters: Arc<Counters>,
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        self.counters.pending_auth.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn oversized_warnings_are_rate_limited_across_clones() {
        let stats = WsStatsHandle::new();
        let other = stats.clone();
        assert!(stats.oversized_warning_due());
        assert!(!other.oversized_warning_due());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!stats.oversized_warning_due());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(other.oversized_warning_due());
        assert!(!stats.oversized_warning_due());
    }

    #[test]
    fn pending_auth_slots_are_bounded_and_given_back() {
        let stats = WsStatsHandle::new();
        let a = stats.begin_pending_auth(2);
        let b = stats.clone().begin_pending_auth(2);
        assert!(a.is_some() && b.is_some());
        assert!(stats.begin_pending_auth(2).is_none());
        drop(a);
        assert!(stats.begin_pending_auth(2).is_some());
    }
}
