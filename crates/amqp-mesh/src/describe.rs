//! Service descriptions (`nuropb_describe`, spec §6.4): the cache of other services'
//! descriptions that decides whether a call is encrypted (§10), and the gateway's own
//! description in nuropb's exact shape.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use handler_core::MeshError;
use mesh_crypto::ServicePublicKey;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// What a service's description says about encryption.
#[derive(Debug)]
pub(crate) struct ServiceCrypto {
    /// Present when the service published a usable key.
    pub(crate) public_key: Option<ServicePublicKey>,
    /// Methods whose spec says `requires_encryption: true`.
    pub(crate) encrypted_methods: HashSet<String>,
}

/// The outcome of one describe lookup, shared by everyone who asked at the same time.
#[derive(Debug, Clone)]
pub(crate) enum Described {
    /// The service described itself.
    Known(Arc<ServiceCrypto>),
    /// The lookup failed in a way that says nothing about the call itself (no answer in
    /// time, an error response, a malformed result): calls go out in plaintext.
    Unknown,
    /// The lookup failed in a way the call would too (unroutable, connection lost): the
    /// call fails the same way without being published.
    Failed(MeshError),
}

#[derive(Debug, Default)]
struct Slot {
    cell: OnceCell<(Described, Instant)>,
}

/// Descriptions by service name. One lookup per service runs at a time: concurrent first
/// callers wait for the same fetch (`OnceCell`; if the fetching caller is cancelled, the
/// next waiter fetches). Bounded: clients choose service names.
#[derive(Debug)]
pub(crate) struct DescribeCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    capacity: usize,
    ttl: Duration,
    negative_ttl: Duration,
}

impl DescribeCache {
    pub(crate) fn new(capacity: usize, ttl: Duration, negative_ttl: Duration) -> Self {
        DescribeCache { slots: Mutex::default(), capacity, ttl, negative_ttl }
    }

    /// The cached description of `service`, or the result of `fetch` (called at most once
    /// per expiry for all concurrent callers).
    pub(crate) async fn get<F, Fut>(&self, service: &str, fetch: F) -> Described
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Described>,
    {
        // Two rounds: a stale entry found in the first is replaced and fetched in the second.
        for _ in 0..2 {
            let slot = self.slot(service);
            let (described, expires) = slot
                .cell
                .get_or_init(|| async {
                    let described = fetch().await;
                    let ttl = match &described {
                        Described::Known(_) => self.ttl,
                        Described::Unknown => self.negative_ttl,
                        // Shared with concurrent callers, never reused afterwards: the
                        // service may appear (or the connection return) any moment.
                        Described::Failed(_) => Duration::ZERO,
                    };
                    (described, Instant::now() + ttl)
                })
                .await
                .clone();
            if Instant::now() < expires {
                return described;
            }
            {
                let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
                if slots.get(service).is_some_and(|current| Arc::ptr_eq(current, &slot)) {
                    slots.remove(service);
                }
            }
            // A failure was for the callers that waited on it, not for the next ones.
            if matches!(described, Described::Failed(_)) {
                return described;
            }
        }
        // Only reached if the fresh fetch expired at once (a zero TTL).
        Described::Unknown
    }

    fn slot(&self, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(service) {
            return Arc::clone(slot);
        }
        if slots.len() >= self.capacity {
            let now = Instant::now();
            slots.retain(|_, slot| slot.cell.get().is_none_or(|(_, expires)| *expires > now));
            // Still full of live entries: drop one; it is only a cache.
            if slots.len() >= self.capacity
                && let Some(victim) = slots.keys().next().cloned()
            {
                slots.remove(&victim);
            }
        }
        let slot = Arc::new(Slot::default());
        slots.insert(service.to_owned(), Arc::clone(&slot));
        slot
    }
}

/// Reads a describe result. `Err` says why it is unusable.
pub(crate) fn parse_description(result: &Value) -> Result<ServiceCrypto, String> {
    let object = result.as_object().ok_or("describe result is not an object")?;
    let methods = match object.get("methods") {
        Some(Value::Object(methods)) => methods,
        None | Some(Value::Null) => {
            return Ok(ServiceCrypto { public_key: None, encrypted_methods: HashSet::new() });
        }
        Some(_) => return Err("describe methods is not an object".to_owned()),
    };
    let encrypted_methods: HashSet<String> = methods
        .iter()
        .filter(|(_, spec)| spec.get("requires_encryption").and_then(Value::as_bool) == Some(true))
        .map(|(name, _)| name.clone())
        .collect();
    let public_key = match object.get("public_key").and_then(Value::as_str) {
        Some(pem) => {
            Some(ServicePublicKey::from_pem(pem).map_err(|e| format!("unusable public_key: {e}"))?)
        }
        None => None,
    };
    Ok(ServiceCrypto { public_key, encrypted_methods })
}

/// One parameter in nuropb's describe shape: `[name, {"type", "description", "default"}]`.
fn param(name: &str, kind: &str, default: Value) -> Value {
    json!([name, {"type": kind, "description": "", "default": default}])
}

/// A method spec in nuropb's shape (§6.4): `properties` is a list of pairs, a required
/// parameter shows `"default": ""`.
fn method(description: &str, properties: Vec<Value>, required: &[&str]) -> Value {
    json!({
        "description": description,
        "requires_encryption": false,
        "parameters": {"type": "object", "properties": properties, "required": required},
    })
}

/// The gateway's answer to `nuropb_describe`, key for key what a nuropb service sends.
pub(crate) fn gateway_description(service_name: &str) -> Value {
    let no_default = || Value::String(String::new());
    let user_params =
        || vec![param("user_id", "str", Value::Null), param("user_ids", "list", Value::Null)];
    let mut push_to_user =
        vec![param("topic", "str", no_default()), param("event", "Any", no_default())];
    push_to_user.extend(user_params());
    let mut disconnect_user = user_params();
    disconnect_user.push(param(
        "reason",
        "str",
        Value::String(crate::service::DEFAULT_DISCONNECT_REASON.into()),
    ));
    json!({
        "service_name": service_name,
        "service_version": env!("CARGO_PKG_VERSION"),
        "description": "nuropb-gateway: WebSocket gateway to the NuroPb mesh. Fan-out methods reach every gateway instance.",
        "warnings": [],
        "encrypted_methods": false,
        "public_key": null,
        "methods": {
            "disconnect_user": method(
                "Close every session of the given users (user_id or user_ids) on every gateway instance.",
                disconnect_user,
                &[],
            ),
            "push_to_all": method(
                "Send an event under a topic to every connected session on every gateway instance.",
                vec![param("topic", "str", no_default()), param("event", "Any", no_default())],
                &["topic", "event"],
            ),
            "push_to_user": method(
                "Send an event under a topic to every session of the given users (user_id or user_ids).",
                push_to_user,
                &["topic", "event"],
            ),
            "stats": method("Live figures of the gateway instance that answers.", vec![], &[]),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn parses_nuropb_descriptions() {
        let d = parse_description(&json!({"methods": {
            "a": {"requires_encryption": false}, "b": {"requires_encryption": true}, "c": {}
        }, "public_key": null}))
        .expect("valid");
        assert!(d.public_key.is_none());
        assert_eq!(d.encrypted_methods, HashSet::from(["b".to_owned()]));
        assert!(parse_description(&json!([])).is_err());
        assert!(parse_description(&json!({"methods": {}, "public_key": "not pem"})).is_err());
        assert!(parse_description(&json!({"methods": null})).is_ok());
    }

    #[test]
    fn gateway_description_has_nuropb_shape() {
        let d = gateway_description("gw");
        assert_eq!(d["service_name"], "gw");
        assert_eq!(d["encrypted_methods"], false);
        assert_eq!(d["public_key"], Value::Null);
        let keys: Vec<_> = d.as_object().expect("object").keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "service_name",
                "service_version",
                "description",
                "warnings",
                "encrypted_methods",
                "public_key",
                "methods"
            ]
        );
        let push = &d["methods"]["push_to_user"];
        assert_eq!(
            push["parameters"]["properties"][0],
            json!(["topic", {"type": "str", "description": "", "default": ""}])
        );
        assert_eq!(push["parameters"]["required"], json!(["topic", "event"]));
        assert!(
            parse_description(&d).expect("own description parses").encrypted_methods.is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch_and_entries_expire() {
        let cache = DescribeCache::new(2, Duration::from_secs(60), Duration::from_secs(5));
        let fetches = AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            Described::Unknown
        };
        let (a, b) = tokio::join!(cache.get("svc", fetch), cache.get("svc", fetch));
        assert!(matches!((a, b), (Described::Unknown, Described::Unknown)));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        cache.get("svc", fetch).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "negative result cached");
        tokio::time::advance(Duration::from_secs(6)).await;
        cache.get("svc", fetch).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "negative result expired");

        let failing = || async { Described::Failed(MeshError::Unavailable("down".into())) };
        assert!(matches!(cache.get("gone", failing).await, Described::Failed(_)));
        assert!(
            matches!(cache.get("gone", fetch).await, Described::Unknown),
            "failures are not reused"
        );

        for name in ["x", "y", "z"] {
            cache.get(name, fetch).await;
        }
        assert!(cache.slots.lock().expect("lock").len() <= 2, "bounded");
    }
}
