//! `CoreMetrics`: the core's labelled metrics (call latency by service, method and outcome;
//! events received and dropped), as `prometheus_client` handles. The binary builds one,
//! registers it in its registry ([`CoreMetrics::register`]) and hands it to the core in
//! [`CoreConfig`](crate::CoreConfig); nothing here is global.
//!
//! Label sets are bounded whatever clients send: `service` is one of the operator's
//! allow-list ([`CallLabelConfig::services`]) or `other`; `method` is only kept for an
//! allow-listed service, for the first [`CallLabelConfig::max_methods_per_service`] distinct
//! methods seen, then `other`; `kind` and `outcome` are fixed sets. The call histogram has
//! at most `(services + 1) × (max_methods_per_service + 1) × 2 kinds × 9 outcomes` series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The label value every service or method outside the bounds is counted under.
pub const OTHER: &str = "other";

/// Call latency buckets, in seconds: 1 ms to 30 s (the default request timeout).
const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Which services and methods get their own label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallLabelConfig {
    /// Services labelled by name (default none: every call is `service="other"`). The
    /// operator's choice, so a client calling random service names adds no series.
    pub services: Vec<String>,
    /// Distinct methods labelled per allow-listed service (default 32); later ones are
    /// `method="other"`. Methods are taken in the order calls first name them.
    pub max_methods_per_service: usize,
}

impl Default for CallLabelConfig {
    fn default() -> Self {
        CallLabelConfig { services: Vec::new(), max_methods_per_service: 32 }
    }
}

/// How a call ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The service answered with a result (requests) or the command was published.
    Ok,
    /// The service answered with an error.
    ServiceError,
    /// No answer within the request timeout.
    Timeout,
    /// No queue is bound for the service.
    NotDelivered,
    /// The mesh is down, or the gateway shut down while the call was pending.
    Unavailable,
    /// Refused by the mesh adapter before publishing (validation, encryption, too large).
    Rejected,
    /// Refused by the core before reaching the mesh: not callable, reserved, over an
    /// in-flight limit, shutting down.
    Refused,
    /// The session closed while its call was pending; nobody got an answer.
    Abandoned,
    /// The service's response was over the size the gateway forwards.
    ResponseTooLarge,
}

impl CallOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::ServiceError => "service_error",
            CallOutcome::Timeout => "timeout",
            CallOutcome::NotDelivered => "not_delivered",
            CallOutcome::Unavailable => "unavailable",
            CallOutcome::Rejected => "rejected",
            CallOutcome::Refused => "refused",
            CallOutcome::Abandoned => "abandoned",
            CallOutcome::ResponseTooLarge => "response_too_large",
        }
    }
}

/// Why an event did not reach a session, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDrop {
    /// No session matched the event (no subscriber, target users not connected).
    NoSession,
    /// The session's outbound queue was full (the session is closed as too slow).
    QueueFull,
    /// The session was closing when the event came.
    SessionClosed,
}

impl EventDrop {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EventDrop::NoSession => "no_session",
            EventDrop::QueueFull => "queue_full",
            EventDrop::SessionClosed => "session_closed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: Arc<String>,
    method: Arc<String>,
    kind: &'static str,
    outcome: &'static str,
}

/// A call's `service` and `method` label values, picked when it is submitted
/// ([`CoreMetrics::names`]) and recorded under when it ends ([`CoreMetrics::record`]). Shared
/// with the bound's own table, so a call copies no string for its metrics.
#[derive(Debug, Clone)]
pub(crate) struct CallNames {
    service: Arc<String>,
    method: Arc<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Picks the label values of a call: see the module docs for the bound.
#[derive(Debug)]
struct LabelBound {
    config: CallLabelConfig,
    /// [`OTHER`], shared by every call outside the bounds.
    other: Arc<String>,
    // Invariant: keys are allow-listed services; each holds at most
    // `max_methods_per_service` methods.
    services: Mutex<HashMap<String, ServiceLabels>>,
}

/// An allow-listed service's label value and the method label values kept for it.
#[derive(Debug)]
struct ServiceLabels {
    name: Arc<String>,
    methods: HashMap<String, Arc<String>>,
}

impl LabelBound {
    fn new(config: CallLabelConfig) -> LabelBound {
        LabelBound {
            config,
            other: Arc::new(OTHER.to_owned()),
            services: Mutex::new(HashMap::new()),
        }
    }

    fn labels(&self, service: &str, method: &str) -> CallNames {
        if !self.config.services.iter().any(|s| s == service) {
            return CallNames { service: self.other.clone(), method: self.other.clone() };
        }
        // Held for a lookup and maybe an insert, never across an `.await`. A poisoned lock
        // still holds a usable table.
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = services.get_mut(service) {
            return self.names_in(seen, method);
        }
        let mut seen =
            ServiceLabels { name: Arc::new(service.to_owned()), methods: HashMap::new() };
        let names = self.names_in(&mut seen, method);
        services.insert(service.to_owned(), seen);
        names
    }

    /// A call's names under an allow-listed service: `method` is kept while the service has
    /// fewer than `max_methods_per_service`, else `other`.
    fn names_in(&self, seen: &mut ServiceLabels, method: &str) -> CallNames {
        let method = match seen.methods.get(method) {
            Some(kept) => kept.clone(),
            None if seen.methods.len() < self.config.max_methods_per_service => {
                let kept = Arc::new(method.to_owned());
                seen.methods.insert(method.to_owned(), kept.clone());
                kept
            }
            None => self.other.clone(),
        };
        CallNames { service: seen.name.clone(), method }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// See the module docs. Cheap to clone: every clone records into the same metrics.
#[derive(Debug, Clone)]
pub struct CoreMetrics {
    calls: Family<CallLabels, Histogram, fn() -> Histogram>,
    events_received: Counter,
    events_dropped: Family<DropLabels, Counter>,
    bound: Arc<LabelBound>,
}

impl Default for CoreMetrics {
    /// Metrics with the default label bounds, registered nowhere (tests, embedders who do
    /// not scrape).
    fn default() -> Self {
        CoreMetrics::new(CallLabelConfig::default())
    }
}

impl CoreMetrics {
    /// Fresh metrics with these label bounds.
    pub fn new(config: CallLabelConfig) -> CoreMetrics {
        CoreMetrics {
            calls: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            events_received: Counter::default(),
            events_dropped: Family::default(),
            bound: Arc::new(LabelBound::new(config)),
        }
    }

    /// Registers every metric under its `nuropb_gateway_*` name.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nuropb_gateway_call_duration_seconds",
            "Client requests and commands from the frame's arrival in the core to their outcome, by service, method, kind and outcome",
            self.calls.clone(),
        );
        registry.register(
            "nuropb_gateway_events_received",
            "Mesh events the core routed to sessions",
            self.events_received.clone(),
        );
        registry.register(
            "nuropb_gateway_events_dropped",
            "Mesh events not delivered to a session, by reason (no_session counts once per event, the others once per session)",
            self.events_dropped.clone(),
        );
    }

    /// Records one call's outcome after `seconds`.
    pub(crate) fn call(
        &self,
        service: &str,
        method: &str,
        command: bool,
        outcome: CallOutcome,
        seconds: f64,
    ) {
        self.record(self.names(service, method), command, outcome, seconds);
    }

    /// The label values a call of `method` on `service` is recorded under.
    pub(crate) fn names(&self, service: &str, method: &str) -> CallNames {
        self.bound.labels(service, method)
    }

    /// Records one call's outcome after `seconds`, under names picked earlier.
    pub(crate) fn record(
        &self,
        names: CallNames,
        command: bool,
        outcome: CallOutcome,
        seconds: f64,
    ) {
        let CallNames { service, method } = names;
        let kind = if command { "command" } else { "request" };
        self.calls
            .get_or_create(&CallLabels { service, method, kind, outcome: outcome.as_str() })
            .observe(seconds);
    }

    pub(crate) fn event_received(&self) {
        self.events_received.inc();
    }

    pub(crate) fn event_dropped(&self, reason: EventDrop, count: u64) {
        if count > 0 {
            self.events_dropped
                .get_or_create(&DropLabels { reason: reason.as_str() })
                .inc_by(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_calls_names_are_shared_not_copied() {
        let m = CoreMetrics::new(CallLabelConfig {
            services: vec!["orders".into()],
            max_methods_per_service: 1,
        });
        let (a, b) = (m.names("orders", "get"), m.names("orders", "get"));
        assert!(Arc::ptr_eq(&a.service, &b.service) && Arc::ptr_eq(&a.method, &b.method));
        assert_eq!((a.service.as_str(), a.method.as_str()), ("orders", "get"));
        let (past_cap, outside) = (m.names("orders", "put"), m.names("random", "x"));
        assert_eq!(past_cap.method.as_str(), OTHER);
        assert!(Arc::ptr_eq(&past_cap.method, &outside.service));
        assert!(Arc::ptr_eq(&outside.service, &outside.method));
    }

    fn encode(m: &CoreMetrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        text
    }

    #[test]
    fn labels_are_bounded_by_the_allow_list_and_the_method_cap() {
        let m = CoreMetrics::new(CallLabelConfig {
            services: vec!["orders".into()],
            max_methods_per_service: 2,
        });
        for i in 0..500 {
            m.call("orders", &format!("m{i}"), false, CallOutcome::Ok, 0.01);
            m.call(&format!("random{i}"), "x", false, CallOutcome::Ok, 0.01);
        }
        m.call("orders", "m0", false, CallOutcome::Timeout, 1.0);
        let text = encode(&m);
        let series: HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("nuropb_gateway_call_duration_seconds_count{"))
            .collect();
        let kept = |s: &str, m: &str, o: &str| {
            format!(
                "nuropb_gateway_call_duration_seconds_count{{service=\"{s}\",method=\"{m}\",kind=\"request\",outcome=\"{o}\"}}"
            )
        };
        let expected: HashSet<String> = [
            format!("{} 1", kept("orders", "m0", "ok")),
            format!("{} 1", kept("orders", "m1", "ok")),
            format!("{} 498", kept("orders", "other", "ok")),
            format!("{} 500", kept("other", "other", "ok")),
            format!("{} 1", kept("orders", "m0", "timeout")),
        ]
        .into_iter()
        .collect();
        assert_eq!(series, expected.iter().map(String::as_str).collect(), "{text}");
    }

    #[test]
    fn events_dropped_by_reason() {
        let m = CoreMetrics::default();
        m.event_received();
        m.event_dropped(EventDrop::NoSession, 1);
        m.event_dropped(EventDrop::QueueFull, 0);
        m.event_dropped(EventDrop::QueueFull, 3);
        let text = encode(&m);
        assert!(text.contains("nuropb_gateway_events_received_total 1\n"), "{text}");
        assert!(text.contains("nuropb_gateway_events_dropped_total{reason=\"no_session\"} 1\n"));
        assert!(text.contains("nuropb_gateway_events_dropped_total{reason=\"queue_full\"} 3\n"));
        assert!(!text.contains("session_closed"), "{text}");
    }
}
