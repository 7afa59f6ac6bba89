//! Other services' descriptions (`nuropb_describe`, spec §6.4): the cache that decides
//! whether a call is encrypted (§10). The gateway's own description is in
//! `gateway_description`.
//!
//! The cache is stale-while-revalidate for one decision only: whether a method requires
//! encryption. Once a service has described itself, its description is kept for good
//! (until evicted) and only refreshed. A refresh runs in the background while callers
//! keep using the last known description, and a refresh that fails (a busy service
//! missing `describe_timeout`, an error answer) leaves it in use. Without this, one slow
//! describe answer turned encryption off for a while ([`DescribeCache::get`]).
//!
//! The public key is another matter: a service may restart with a new one, and a nuropb
//! service handed a body it cannot decrypt drops off the mesh (§7.5). So encrypting takes
//! a description no older than `encryption_key_ttl`, waiting for a lookup when the newest
//! one is older, and never falling back to an older one ([`DescribeCache::current`]); a
//! key whose service stopped answering encrypted calls is dropped
//! ([`DescribeCache::forget_key`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use handler_core::MeshError;
use mesh_crypto::ServicePublicKey;
use nuropb_wire::mesh::DescribeEncryption;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    /// The service described itself (now, or at some earlier lookup).
    Known(Arc<ServiceCrypto>),
    /// The service has never described itself successfully, and the lookup failed in a
    /// way that says nothing about the call itself (no answer in time, an error response,
    /// a malformed result): the caller applies `EncryptionMode`'s fallback.
    Unknown,
    /// The lookup failed in a way the call would too (unroutable, connection lost): the
    /// call fails the same way without being published.
    Failed(MeshError),
}

/// Why a lookup runs; the fetch logs differently for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Nothing is known about the service: callers wait for this lookup.
    First,
    /// A description is known but expired: callers keep using it meanwhile.
    Refresh,
    /// A call is about to be encrypted and the key it would use is too old (or was
    /// dropped): the call waits for this lookup, and is refused if it fails.
    Key,
}

/// A description an earlier lookup got, carried from slot to slot.
#[derive(Debug, Clone)]
struct KnownAt {
    crypto: Arc<ServiceCrypto>,
    /// When that lookup finished: the age of its public key. `None` once the key was
    /// dropped ([`DescribeCache::forget_key`]): the description still decides whether to
    /// encrypt, but its key is not used any more.
    key_fetched: Option<Instant>,
}

/// A finished lookup.
#[derive(Debug)]
struct Outcome {
    described: Described,
    /// When the lookup finished: the age of the public key in a `Known` description.
    at: Instant,
    /// When the outcome stops being used for the encryption decision.
    expires: Instant,
}

/// One lookup of one service, and what earlier lookups learnt.
#[derive(Debug, Default)]
struct Slot {
    /// Orders the slots of the cache: a slot with a higher number was created later, so
    /// its lookup started later.
    seq: u64,
    /// This lookup's outcome.
    cell: OnceCell<Outcome>,
    /// The description an earlier lookup got, served while this one runs and after it
    /// fails. `None` until the service has described itself once.
    last_known: Option<KnownAt>,
    /// Whether the background refresh of this slot was started (only with `last_known`).
    refresh_started: AtomicBool,
}

impl Slot {
    /// What callers get from this slot's finished lookup: a failed refresh falls back to
    /// the last known description.
    fn answer(&self, described: &Described) -> Described {
        match (described, &self.last_known) {
            (Described::Known(_), _) | (_, None) => described.clone(),
            (Described::Unknown | Described::Failed(_), Some(known)) => {
                Described::Known(Arc::clone(&known.crypto))
            }
        }
    }

    /// The newest description this slot knows, carried into the next lookup's slot.
    fn known(&self) -> Option<KnownAt> {
        match self.cell.get() {
            Some(Outcome { described: Described::Known(crypto), at, .. }) => {
                Some(KnownAt { crypto: Arc::clone(crypto), key_fetched: Some(*at) })
            }
            _ => self.last_known.clone(),
        }
    }

    /// The newest description this slot knows if its key is at most `max_age` old.
    fn young_key(&self, now: Instant, max_age: Duration) -> Option<Arc<ServiceCrypto>> {
        let known = self.known()?;
        let fetched = known.key_fetched?;
        (now.saturating_duration_since(fetched) <= max_age).then_some(known.crypto)
    }

    fn expired(&self, now: Instant) -> bool {
        self.cell.get().is_some_and(|outcome| outcome.expires <= now)
    }

    /// Runs this slot's lookup, or waits for the one already running (a caller's or a
    /// background refresh); with tokio's `OnceCell`, if the caller running it is
    /// cancelled, the next waiter runs its own `fetch`.
    async fn lookup<F, Fut>(&self, lookup: Lookup, fetch: &F, cache: &DescribeCache) -> &Outcome
    where
        F: Fn(Lookup) -> Fut,
        Fut: Future<Output = Described>,
    {
        let refresh = self.last_known.is_some();
        self.cell
            .get_or_init(|| async {
                let described = fetch(lookup).await;
                Outcome::new(described, refresh, cache.ttl, cache.negative_ttl)
            })
            .await
    }
}

impl Outcome {
    fn new(described: Described, refresh: bool, ttl: Duration, negative_ttl: Duration) -> Self {
        let at = Instant::now();
        let expires = at + ttl_of(&described, refresh, ttl, negative_ttl);
        Outcome { described, at, expires }
    }
}

/// Descriptions by service name. One lookup per service runs at a time: concurrent first
/// callers wait for the same fetch (`OnceCell`; if the fetching caller is cancelled, the
/// next waiter fetches), later refreshes run in a tracked background task. Bounded:
/// clients choose service names.
#[derive(Debug)]
pub(crate) struct DescribeCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The number of the next slot created.
    next_seq: AtomicU64,
    capacity: usize,
    ttl: Duration,
    negative_ttl: Duration,
    /// Runs the background refreshes; the adapter's tracker, so that `closed()` also
    /// waits for them (each is bounded by `describe_timeout`).
    tracker: TaskTracker,
}

impl DescribeCache {
    pub(crate) fn new(
        capacity: usize,
        ttl: Duration,
        negative_ttl: Duration,
        tracker: TaskTracker,
    ) -> Self {
        DescribeCache {
            slots: Mutex::default(),
            next_seq: AtomicU64::new(1),
            capacity,
            ttl,
            negative_ttl,
            tracker,
        }
    }

    /// What is known about `service`'s encryption, fetching with `fetch` when needed
    /// (at most one fetch per service at a time, for all callers).
    ///
    /// - fresh entry: returned as is;
    /// - expired known description: returned at once, and a background refresh starts;
    /// - nothing known yet (first lookup, or the negative result expired): the caller
    ///   waits for the lookup, shared with concurrent callers.
    pub(crate) async fn get<F, Fut>(&self, service: &str, fetch: F) -> Described
    where
        F: Fn(Lookup) -> Fut + Send + 'static,
        Fut: Future<Output = Described> + Send + 'static,
    {
        // An expired slot is replaced and the loop looks at its successor; a third round
        // only happens when a concurrent caller's lookup finished and expired in between
        // (a failure, which expires at once). The last round answers whatever it finds.
        const ROUNDS: usize = 3;
        let mut round = 0;
        loop {
            round += 1;
            let slot = self.slot(service);
            if let Some(outcome) = slot.cell.get() {
                if Instant::now() < outcome.expires || round == ROUNDS {
                    return slot.answer(&outcome.described);
                }
                self.replace(service, &slot);
                continue;
            }
            if let Some(known) = &slot.last_known {
                if !slot.refresh_started.swap(true, Ordering::SeqCst) {
                    self.spawn_refresh(service, Arc::clone(&slot), fetch);
                }
                return Described::Known(Arc::clone(&known.crypto));
            }
            let outcome = slot.lookup(Lookup::First, &fetch, self).await;
            // Returned even if already expired (a failure): it is this caller's answer.
            return slot.answer(&outcome.described);
        }
    }

    /// A description of `service` whose public key is at most `max_age` old, for
    /// encrypting a call: the newest known description if it is that recent (and its key
    /// was not dropped), or else the outcome of a lookup this caller waits for (shared
    /// with concurrent callers and with a background refresh running at the time). Never
    /// an older description: a failed lookup is this caller's answer (`Unknown` or
    /// `Failed`).
    ///
    /// A failed key lookup that says nothing about the call (`Unknown`: no answer in
    /// time, an error answer) is remembered like a failed refresh, for
    /// `describe_negative_ttl`, so that a struggling service does not get one describe per
    /// call; one that does (`Failed`: unroutable, connection lost) is only shared with the
    /// callers that waited for it, since the service may be back any moment.
    pub(crate) async fn current<F, Fut>(
        &self,
        service: &str,
        max_age: Duration,
        fetch: F,
    ) -> Described
    where
        F: Fn(Lookup) -> Fut + Send + 'static,
        Fut: Future<Output = Described> + Send + 'static,
    {
        // The slot current when this caller arrived. A lookup in a later slot started after
        // the caller arrived: as fresh as it can ask for, whatever its outcome.
        let mut first_seen = None;
        // The second round always finds a later slot; the bound only guards the loop.
        const ROUNDS: usize = 3;
        for _ in 0..ROUNDS {
            let slot = self.slot(service);
            let now = Instant::now();
            if let Some(crypto) = slot.young_key(now, max_age) {
                return Described::Known(crypto);
            }
            let Some(outcome) = slot.cell.get() else {
                return slot.lookup(Lookup::Key, &fetch, self).await.described.clone();
            };
            let later = first_seen.is_some_and(|first| slot.seq > first);
            let remembered =
                matches!(outcome.described, Described::Unknown) && now < outcome.expires;
            if later || remembered {
                return outcome.described.clone();
            }
            // A description with an old key, a failure, or an expired failure.
            first_seen.get_or_insert(slot.seq);
            self.replace(service, &slot);
        }
        Described::Unknown
    }

    /// Forgets `used`, the description whose key an encrypted call to `service` was sent
    /// with, when that call got no response: the service may have restarted with a new
    /// key (and died of the old one, §7.5). The next encrypted call then waits for a
    /// fresh lookup; the encryption decision keeps using `used` meanwhile. Nothing happens
    /// when a newer lookup already replaced it.
    pub(crate) fn forget_key(&self, service: &str, used: &Arc<ServiceCrypto>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let newest = slots.get(service).and_then(|slot| slot.known());
        if newest.is_some_and(|known| Arc::ptr_eq(&known.crypto, used)) {
            // Also when a lookup is running in that slot: its waiters still get its
            // outcome, and the next caller starts another (one describe too many at worst).
            let dropped = KnownAt { crypto: Arc::clone(used), key_fetched: None };
            slots.insert(service.to_owned(), self.new_slot(Some(dropped)));
        }
    }

    fn spawn_refresh<F, Fut>(&self, service: &str, slot: Arc<Slot>, fetch: F)
    where
        F: Fn(Lookup) -> Fut + Send + 'static,
        Fut: Future<Output = Described> + Send + 'static,
    {
        let (ttl, negative_ttl) = (self.ttl, self.negative_ttl);
        let span = tracing::info_span!("amqp.describe_refresh", service);
        self.tracker.spawn(
            async move {
                let refresh = fetch(Lookup::Refresh);
                // The outcome stays in the slot for later callers, which is all this task
                // is for. `get` callers see `last_known` and return without waiting; a
                // `current` caller may run this slot's lookup first, and then this one
                // finds it done.
                let _ = slot
                    .cell
                    .get_or_init(
                        || async move { Outcome::new(refresh.await, true, ttl, negative_ttl) },
                    )
                    .await;
            }
            .instrument(span),
        );
    }

    /// Replaces an expired `slot` (unless a concurrent caller already did) by a fresh one
    /// that remembers the last known description.
    fn replace(&self, service: &str, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.get(service).is_some_and(|current| Arc::ptr_eq(current, slot)) {
            slots.insert(service.to_owned(), self.new_slot(slot.known()));
        }
    }

    fn slot(&self, service: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(service) {
            return Arc::clone(slot);
        }
        if slots.len() >= self.capacity {
            // Expired entries that never described anything go first: nothing is lost
            // with them. Known descriptions go last: losing one means a first lookup
            // again, and with it the plaintext fallback if that lookup fails.
            let now = Instant::now();
            slots.retain(|_, slot| !(slot.expired(now) && slot.known().is_none()));
            if slots.len() >= self.capacity {
                let victim = slots
                    .iter()
                    .find(|(_, slot)| slot.known().is_none())
                    .or_else(|| slots.iter().next())
                    .map(|(name, _)| name.clone());
                if let Some(victim) = victim {
                    slots.remove(&victim);
                }
            }
        }
        let slot = self.new_slot(None);
        slots.insert(service.to_owned(), Arc::clone(&slot));
        slot
    }

    fn new_slot(&self, last_known: Option<KnownAt>) -> Arc<Slot> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        Arc::new(Slot { seq, last_known, ..Slot::default() })
    }
}

/// How long a lookup's outcome is used; `refresh` when a description was known before.
fn ttl_of(described: &Described, refresh: bool, ttl: Duration, negative_ttl: Duration) -> Duration {
    match described {
        Described::Known(_) => ttl,
        // Remembered so that a service without a working describe does not cost a round
        // trip per call, and a failing refresh is not retried per call; the last known
        // description (if any) stays in use meanwhile.
        Described::Unknown => negative_ttl,
        Described::Failed(_) if refresh => negative_ttl,
        // Shared with concurrent callers, never reused afterwards: the service may appear
        // (or the connection return) any moment.
        Described::Failed(_) => Duration::ZERO,
    }
}

impl ServiceCrypto {
    /// Reads a describe result (§6.4) leniently (see `DescribeEncryption`). `Err` says
    /// why it is unusable.
    pub(crate) fn from_result(result: Value) -> Result<ServiceCrypto, String> {
        let description: DescribeEncryption =
            serde_json::from_value(result).map_err(|e| format!("unusable describe result: {e}"))?;
        let encrypted_methods = description.encrypted_methods().map(str::to_owned).collect();
        let public_key = match &description.public_key {
            Some(pem) => Some(
                ServicePublicKey::from_pem(pem).map_err(|e| format!("unusable public_key: {e}"))?,
            ),
            None => None,
        };
        Ok(ServiceCrypto { public_key, encrypted_methods })
    }
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_what_decides_encryption() {
        let d = ServiceCrypto::from_result(json!({"methods": {
            "a": {"requires_encryption": false}, "b": {"requires_encryption": true}, "c": {}
        }, "public_key": null}))
        .expect("valid");
        assert!(d.public_key.is_none());
        assert_eq!(d.encrypted_methods, HashSet::from(["b".to_owned()]));
        assert!(ServiceCrypto::from_result(json!([])).is_err());
        assert!(
            ServiceCrypto::from_result(json!({"methods": {}, "public_key": "not pem"})).is_err()
        );
        assert!(ServiceCrypto::from_result(json!({"methods": null})).is_ok());
    }

    fn cache(capacity: usize) -> DescribeCache {
        DescribeCache::new(
            capacity,
            Duration::from_secs(60),
            Duration::from_secs(5),
            TaskTracker::new(),
        )
    }

    fn known(method: &str) -> Described {
        Described::Known(Arc::new(ServiceCrypto {
            public_key: None,
            encrypted_methods: HashSet::from([method.to_owned()]),
        }))
    }

    /// The encrypted method a `Known` answer names (`known(m)` above), or what it is.
    fn seen(described: &Described) -> String {
        match described {
            Described::Known(crypto) => {
                crypto.encrypted_methods.iter().next().cloned().unwrap_or_default()
            }
            Described::Unknown => "unknown".into(),
            Described::Failed(_) => "failed".into(),
        }
    }

    /// A scripted describe: each fetch takes 10 ms and returns the next outcome (the last
    /// one forever); it records which kinds of lookup were made.
    #[derive(Clone)]
    struct Script {
        outcomes: Arc<Mutex<Vec<Described>>>,
        lookups: Arc<Mutex<Vec<Lookup>>>,
    }

    impl Script {
        fn new(outcomes: Vec<Described>) -> Script {
            Script { outcomes: Arc::new(Mutex::new(outcomes)), lookups: Arc::default() }
        }

        fn fetch(&self) -> impl Fn(Lookup) -> BoxFuture<'static, Described> + Send + 'static {
            let script = self.clone();
            move |lookup| {
                let script = script.clone();
                Box::pin(async move {
                    script.lookups.lock().expect("lock").push(lookup);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let mut outcomes = script.outcomes.lock().expect("lock");
                    if outcomes.len() > 1 { outcomes.remove(0) } else { outcomes[0].clone() }
                })
            }
        }

        fn lookups(&self) -> Vec<Lookup> {
            self.lookups.lock().expect("lock").clone()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch_and_entries_expire() {
        let cache = cache(2);
        let script = Script::new(vec![Described::Unknown]);
        let (a, b) =
            tokio::join!(cache.get("svc", script.fetch()), cache.get("svc", script.fetch()));
        assert_eq!((seen(&a), seen(&b)), ("unknown".into(), "unknown".into()));
        assert_eq!(script.lookups(), [Lookup::First]);
        cache.get("svc", script.fetch()).await;
        assert_eq!(script.lookups().len(), 1, "negative result cached");
        tokio::time::advance(Duration::from_secs(6)).await;
        cache.get("svc", script.fetch()).await;
        assert_eq!(
            script.lookups(),
            [Lookup::First, Lookup::First],
            "negative result expired; never described, so the caller waits again"
        );

        let failing = Script::new(vec![Described::Failed(MeshError::Unavailable("down".into()))]);
        assert_eq!(seen(&cache.get("gone", failing.fetch()).await), "failed");
        assert_eq!(
            seen(&cache.get("gone", script.fetch()).await),
            "unknown",
            "failures are not reused"
        );

        for name in ["x", "y", "z"] {
            cache.get(name, script.fetch()).await;
        }
        assert!(cache.slots.lock().expect("lock").len() <= 2, "bounded");
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_description_outlives_its_ttl_and_failed_refreshes() {
        let cache = cache(8);
        // Described once, then the service stops answering describe, then answers anew.
        let script =
            Script::new(vec![known("v1"), Described::Unknown, Described::Unknown, known("v2")]);
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");

        tokio::time::advance(Duration::from_secs(61)).await;
        // Expired: answered at once from the stale description, refreshed in the background.
        let started = Instant::now();
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        assert_eq!(started.elapsed(), Duration::ZERO, "nobody waits for a refresh");
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1", "while refreshing");
        cache.tracker.close();
        cache.tracker.wait().await;
        assert_eq!(script.lookups(), [Lookup::First, Lookup::Refresh], "one refresh at a time");

        // The refresh failed: the stale description stays, and no new refresh is tried
        // before describe_negative_ttl.
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        assert_eq!(script.lookups().len(), 2);

        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        cache.tracker.wait().await;
        assert_eq!(script.lookups().len(), 3, "retried after describe_negative_ttl");
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1", "second refresh failed");

        tokio::time::advance(Duration::from_secs(6)).await;
        cache.get("svc", script.fetch()).await;
        cache.tracker.wait().await;
        assert_eq!(
            seen(&cache.get("svc", script.fetch()).await),
            "v2",
            "a good refresh replaces it"
        );
        assert_eq!(script.lookups().last(), Some(&Lookup::Refresh));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_description() {
        let cache = cache(8);
        let down = Described::Failed(MeshError::Unavailable("connection lost".into()));
        let script = Script::new(vec![known("v1"), down]);
        cache.get("svc", script.fetch()).await;
        tokio::time::advance(Duration::from_secs(61)).await;
        cache.get("svc", script.fetch()).await;
        cache.tracker.close();
        cache.tracker.wait().await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        assert_eq!(script.lookups().len(), 2, "not retried per call");
    }

    const KEY_TTL: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn a_key_older_than_its_ttl_is_looked_up_before_encrypting() {
        let cache = cache(8);
        let script = Script::new(vec![known("v1"), known("v2"), known("v3")]);
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "v1", "fresh");
        assert_eq!(script.lookups(), [Lookup::First]);

        // Within describe_ttl, but past the key's: the decision needs no lookup, the key does,
        // and the caller waits for it (one lookup for concurrent callers).
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        assert_eq!(script.lookups().len(), 1);
        let started = Instant::now();
        let (a, b) = tokio::join!(
            cache.current("svc", KEY_TTL, script.fetch()),
            cache.current("svc", KEY_TTL, script.fetch())
        );
        assert_eq!((seen(&a), seen(&b)), ("v2".into(), "v2".into()));
        assert_eq!(started.elapsed(), Duration::from_millis(10), "waited for the lookup");
        assert_eq!(script.lookups(), [Lookup::First, Lookup::Key]);
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v2", "the decision follows");

        // Past describe_ttl too: the background refresh and the key lookup are one fetch.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v2", "stale for the decision");
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "v3");
        cache.tracker.close();
        cache.tracker.wait().await;
        assert_eq!(script.lookups().len(), 3, "{:?}", script.lookups());
    }

    #[tokio::test(start_paused = true)]
    async fn a_young_key_is_used_while_its_description_is_refreshed() {
        let cache = cache(8);
        // describe_ttl (60 s) shorter than the key's: an expired description whose key is
        // young enough serves at once, during the refresh and after it failed.
        let script = Script::new(vec![known("v1"), Described::Unknown]);
        cache.get("svc", script.fetch()).await;
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1");
        let long = Duration::from_secs(120);
        let started = Instant::now();
        assert_eq!(seen(&cache.current("svc", long, script.fetch()).await), "v1");
        assert_eq!(started.elapsed(), Duration::ZERO);
        cache.tracker.close();
        cache.tracker.wait().await;
        assert_eq!(seen(&cache.current("svc", long, script.fetch()).await), "v1");
        assert_eq!(script.lookups(), [Lookup::First, Lookup::Refresh]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_key_lookup_refuses_rather_than_falls_back() {
        let cache = cache(8);
        let script = Script::new(vec![known("v1"), Described::Unknown, known("v2")]);
        cache.get("svc", script.fetch()).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "unknown");
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1", "the decision stays");
        // Remembered for describe_negative_ttl, like a failed refresh.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "unknown");
        assert_eq!(script.lookups().len(), 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "v2");
        assert_eq!(script.lookups(), [Lookup::First, Lookup::Key, Lookup::Key]);

        // An unroutable service or a lost connection is not remembered: the next caller
        // looks again, the service may be back.
        let down = Described::Failed(MeshError::Unavailable("connection lost".into()));
        let script = Script::new(vec![known("v1"), down, known("v2")]);
        cache.get("other", script.fetch()).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(seen(&cache.current("other", KEY_TTL, script.fetch()).await), "failed");
        assert_eq!(seen(&cache.current("other", KEY_TTL, script.fetch()).await), "v2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_key_is_looked_up_again() {
        let cache = cache(8);
        let script = Script::new(vec![known("v1"), known("v2")]);
        let Described::Known(v1) = cache.get("svc", script.fetch()).await else {
            panic!("described")
        };
        cache.forget_key("svc", &v1);
        assert_eq!(seen(&cache.get("svc", script.fetch()).await), "v1", "the decision stays");
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "v2");
        let lookups = script.lookups().len();
        // A stale forget (v1 was already replaced) changes nothing.
        cache.forget_key("svc", &v1);
        assert_eq!(seen(&cache.current("svc", KEY_TTL, script.fetch()).await), "v2");
        assert_eq!(script.lookups().len(), lookups);
        cache.forget_key("unknown-service", &v1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_key_ttl_looks_up_before_every_encrypted_call() {
        let cache = cache(8);
        let script = Script::new(vec![known("v1")]);
        cache.get("svc", script.fetch()).await;
        tokio::time::advance(Duration::from_millis(1)).await;
        for _ in 0..3 {
            let (a, b) = tokio::join!(
                cache.current("svc", Duration::ZERO, script.fetch()),
                cache.current("svc", Duration::ZERO, script.fetch())
            );
            assert_eq!((seen(&a), seen(&b)), ("v1".into(), "v1".into()));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(script.lookups().len(), 4, "one shared lookup per round");
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_keeps_known_descriptions_longest() {
        let cache = cache(2);
        cache.get("known", Script::new(vec![known("k")]).fetch()).await;
        let unknown = Script::new(vec![Described::Unknown]);
        cache.get("a", unknown.fetch()).await;
        cache.get("b", unknown.fetch()).await;
        tokio::time::advance(Duration::from_secs(120)).await;
        for name in ["c", "d", "e"] {
            cache.get(name, unknown.fetch()).await;
        }
        let slots = cache.slots.lock().expect("lock");
        assert!(slots.len() <= 2);
        assert!(slots.contains_key("known"), "{:?}", slots.keys().collect::<Vec<_>>());
    }
}
