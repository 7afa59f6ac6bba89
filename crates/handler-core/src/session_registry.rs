//! `SessionRegistry`: the registry of live sessions, by id and by user, with their topic
//! subscriptions, and the fan-out paths (a set of users, subscribers, all).
//! `SessionHandle` is one session's way out, with the slow-client policy; a pending call
//! holds one, so its answer goes to its session without passing through the registry.
//!
//! Locking: one `RwLock` over the registry, held only to look up or change entries, never
//! across `.await` and never while calling into a `ClientConnection` (handles are collected first,
//! then sent to outside the lock).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::auth::Identity;
use crate::connection::{ClientConnection, CloseReason, Outbound, SendError, SharedFrame};
use crate::error::CoreError;
use crate::ids::{SessionId, UserId};
use crate::metrics::{CoreMetrics, EventDrop};
use crate::topic::{TopicPattern, pattern_covers};

/// Bounds of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRegistryConfig {
    /// Most topic patterns one session may subscribe to (default 64).
    pub max_subscriptions_per_session: usize,
    /// Patterns clients may subscribe to (AMQP topic syntax): a requested pattern is
    /// accepted only when one of these covers every topic it matches. `{user_id}` stands for
    /// the session's user id, e.g. `users.{user_id}.notify`. Default: none (deny).
    pub subscribable: Vec<String>,
}

impl Default for SessionRegistryConfig {
    fn default() -> Self {
        SessionRegistryConfig { max_subscriptions_per_session: 64, subscribable: Vec::new() }
    }
}

/// A live session as the registry keeps it.
struct Session {
    identity: Arc<Identity>,
    handle: SessionHandle,
    subscriptions: Vec<TopicPattern>,
    // Invariant: a valid W3C `traceparent` (checked by the coordinator) when set.
    traceparent: Option<Arc<str>>,
}

/// Frames queued and dropped, shared by every [`SessionHandle`] of one registry.
#[derive(Default)]
struct FrameCounters {
    sent: AtomicU64,
    dropped: AtomicU64,
}

/// One session's way out: its [`ClientConnection`] with the slow-client policy applied on every
/// send. Taken from the registry ([`SessionRegistry::session`]) and cheap to clone (one
/// reference count: the fan-out paths clone one per session reached); a call in flight
/// keeps one to answer its session directly.
#[derive(Clone)]
pub(crate) struct SessionHandle(Arc<HandleInner>);

struct HandleInner {
    session_id: SessionId,
    handler: Arc<dyn ClientConnection>,
    counters: Arc<FrameCounters>,
}

impl SessionHandle {
    pub(crate) fn session_id(&self) -> &SessionId {
        &self.0.session_id
    }

    /// Queues a frame. Returns whether it was queued.
    ///
    /// Overload policy: a full outbound queue means the client does not keep up. The frame
    /// is dropped, counted, and the session closed with 1013 so the client knows to
    /// reconnect — nothing is lost silently, and one slow client never blocks the others.
    pub(crate) fn send(&self, outbound: Outbound) -> bool {
        self.try_send(outbound).is_ok()
    }

    /// As [`SessionHandle::send`], saying why a frame was not queued.
    fn try_send(&self, outbound: Outbound) -> Result<(), SendError> {
        let this = &*self.0;
        match this.handler.send(outbound) {
            Ok(()) => {
                this.counters.sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(SendError::Full) => {
                this.counters.dropped.fetch_add(1, Ordering::Relaxed);
                this.handler.close(CoreError::SlowClient.closing());
                Err(SendError::Full)
            }
            Err(SendError::Closed) => Err(SendError::Closed),
        }
    }

    /// Asks the session's connection to close (idempotent).
    pub(crate) fn close(&self, reason: CloseReason) {
        self.0.handler.close(reason);
    }
}

#[derive(Default)]
struct Registry {
    // Set by `close_all`: no session registers after the gateway began closing them, so
    // none can miss its close.
    closed: bool,
    // Keyed by ids the coordinator generated at random, so hashed with foldhash (looked up
    // on every client frame); `by_user`, keyed by a token's `sub`, keeps SipHash.
    sessions: HashMap<SessionId, Session, foldhash::fast::RandomState>,
    // Invariant: `by_user[u]` is exactly the set of sessions whose identity has user id `u`,
    // and no entry holds an empty set.
    by_user: HashMap<UserId, HashSet<SessionId>>,
}

/// Session registry and fan-out.
pub(crate) struct SessionRegistry {
    // `config.subscribable` is unused: `subscribable` below is the one in force.
    config: SessionRegistryConfig,
    // Replaced by `set_subscribable` (a configuration reload). Taken after `registry` when
    // both are held, never the other way round.
    subscribable: RwLock<Arc<Vec<String>>>,
    registry: RwLock<Registry>,
    high_water: AtomicUsize,
    counters: Arc<FrameCounters>,
    metrics: CoreMetrics,
}

impl SessionRegistry {
    pub(crate) fn new(config: SessionRegistryConfig) -> Self {
        SessionRegistry {
            subscribable: RwLock::new(Arc::new(config.subscribable.clone())),
            config,
            registry: RwLock::new(Registry::default()),
            high_water: AtomicUsize::new(0),
            counters: Arc::default(),
            metrics: CoreMetrics::default(),
        }
    }

    /// Counts undelivered events and pushes into `metrics` (by default, into metrics
    /// registered nowhere).
    pub(crate) fn with_metrics(mut self, metrics: CoreMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole gateway, so poisoning is ignored.
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session. Replaces nothing: session ids are fresh random ids. Refused once
    /// `close_all` has run (shutdown).
    pub(crate) fn register(
        &self,
        session_id: SessionId,
        identity: Identity,
        handler: Arc<dyn ClientConnection>,
    ) -> Result<(), CoreError> {
        let identity = Arc::new(identity);
        let count = {
            let mut reg = self.write();
            if reg.closed {
                return Err(CoreError::ShuttingDown);
            }
            reg.by_user.entry(identity.user_id.clone()).or_default().insert(session_id.clone());
            let handle = SessionHandle(Arc::new(HandleInner {
                session_id: session_id.clone(),
                handler,
                counters: Arc::clone(&self.counters),
            }));
            reg.sessions.insert(
                session_id,
                Session { identity, handle, subscriptions: Vec::new(), traceparent: None },
            );
            reg.sessions.len()
        };
        let previous = self.high_water.fetch_max(count, Ordering::Relaxed);
        if count > previous {
            tracing::debug!(sessions = count, "new session high-water mark");
        }
        Ok(())
    }

    /// Removes a session. Returns its identity if it was registered.
    pub(crate) fn unregister(&self, session_id: &SessionId) -> Option<Arc<Identity>> {
        let mut reg = self.write();
        let session = reg.sessions.remove(session_id)?;
        let user = &session.identity.user_id;
        if let Some(set) = reg.by_user.get_mut(user) {
            set.remove(session_id);
            if set.is_empty() {
                reg.by_user.remove(user);
            }
        }
        Some(session.identity)
    }

    /// A live session's identity and handle.
    pub(crate) fn session(&self, session_id: &SessionId) -> Option<(Arc<Identity>, SessionHandle)> {
        let reg = self.read();
        let s = reg.sessions.get(session_id)?;
        Some((Arc::clone(&s.identity), s.handle.clone()))
    }

    /// The ids of every live session, in no particular order.
    pub(crate) fn session_ids(&self) -> Vec<SessionId> {
        self.read().sessions.keys().cloned().collect()
    }

    /// Sets the session's default `traceparent` (from its upgrade). Returns whether the
    /// session exists.
    pub(crate) fn set_traceparent(&self, session_id: &SessionId, traceparent: Arc<str>) -> bool {
        match self.write().sessions.get_mut(session_id) {
            Some(s) => {
                s.traceparent = Some(traceparent);
                true
            }
            None => false,
        }
    }

    /// The session's default `traceparent`, if it has one.
    pub(crate) fn traceparent(&self, session_id: &SessionId) -> Option<Arc<str>> {
        self.read().sessions.get(session_id)?.traceparent.clone()
    }

    pub(crate) fn session_count(&self) -> usize {
        self.read().sessions.len()
    }

    pub(crate) fn user_count(&self) -> usize {
        self.read().by_user.len()
    }

    /// The most sessions ever live at once.
    pub(crate) fn high_water(&self) -> usize {
        self.high_water.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn frames_sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// Frames not delivered because a session's queue was full (the session is then closed).
    pub(crate) fn frames_dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Sessions of a user.
    #[cfg(test)]
    pub(crate) fn sessions_of(&self, user: &UserId) -> Vec<SessionId> {
        self.read().by_user.get(user).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// How many sessions a user has, without copying their ids (asked on every upgrade).
    pub(crate) fn session_count_of(&self, user: &UserId) -> usize {
        self.read().by_user.get(user).map_or(0, HashSet::len)
    }

    /// Sends one frame to every session of these users. Returns the sessions reached.
    pub(crate) fn send_to_users(&self, users: &[UserId], frame: Arc<SharedFrame>) -> usize {
        let handles = self.handles_of(users);
        self.deliver_all(&handles, &frame)
    }

    /// The handles of every session of these users (each user counted once).
    fn handles_of(&self, users: &[UserId]) -> Vec<SessionHandle> {
        let reg = self.read();
        let mut seen = HashSet::new();
        users
            .iter()
            .filter(|u| seen.insert(*u))
            .filter_map(|u| reg.by_user.get(u))
            .flatten()
            .filter_map(|sid| reg.sessions.get(sid).map(|s| s.handle.clone()))
            .collect()
    }

    /// Sends one frame to every session. Returns the sessions reached.
    pub(crate) fn send_to_all(&self, frame: Arc<SharedFrame>) -> usize {
        // Handles are collected under the lock (one reference count each) and sent to
        // outside it, so a connection's `send` never runs while the registry is locked.
        let handles: Vec<SessionHandle> =
            self.read().sessions.values().map(|s| s.handle.clone()).collect();
        self.deliver_all(&handles, &frame)
    }

    /// Sends one frame to every session subscribed to a pattern matching `topic`.
    pub(crate) fn send_to_subscribers(&self, topic: &str, frame: Arc<SharedFrame>) -> usize {
        let words: Vec<&str> = topic.split('.').collect();
        let handles: Vec<SessionHandle> = self
            .read()
            .sessions
            .values()
            .filter(|s| s.subscriptions.iter().any(|p| p.matches(&words)))
            .map(|s| s.handle.clone())
            .collect();
        self.deliver_all(&handles, &frame)
    }

    /// Replaces a session's identity with a refreshed one of the same user.
    pub(crate) fn refresh_identity(
        &self,
        session_id: &SessionId,
        identity: Identity,
    ) -> Result<(), CoreError> {
        let mut reg = self.write();
        let session = reg.sessions.get_mut(session_id).ok_or(CoreError::UnknownSession)?;
        if session.identity.user_id != identity.user_id {
            return Err(CoreError::OtherUser);
        }
        session.identity = Arc::new(identity);
        Ok(())
    }

    /// Closes every session whose token expired at or before `now` (Unix seconds) with
    /// 4003. Returns how many.
    pub(crate) fn close_expired(&self, now: u64) -> usize {
        let handles: Vec<SessionHandle> = self
            .read()
            .sessions
            .values()
            .filter(|s| s.identity.expires_at.is_some_and(|e| e <= now))
            .map(|s| s.handle.clone())
            .collect();
        let reason = CoreError::TokenExpired.closing();
        for h in &handles {
            h.close(reason.clone());
        }
        handles.len()
    }

    /// Adds topic patterns to a session; returns its subscriptions afterwards. Every
    /// pattern must be covered by a `subscribable` pattern (all or nothing).
    pub(crate) fn subscribe(
        &self,
        session_id: &SessionId,
        topics: &[String],
    ) -> Result<Vec<String>, CoreError> {
        let mut reg = self.write();
        let session = reg.sessions.get_mut(session_id).ok_or(CoreError::UnknownSession)?;
        if let Some(refused) =
            topics.iter().find(|t| !self.may_subscribe(&session.identity.user_id, t))
        {
            return Err(CoreError::NotSubscribable(refused.clone()));
        }
        let new: Vec<&String> = {
            let mut seen = HashSet::new();
            topics
                .iter()
                .filter(|t| {
                    !session.subscriptions.iter().any(|p| p.as_str() == t.as_str())
                        && seen.insert(*t)
                })
                .collect()
        };
        if session.subscriptions.len() + new.len() > self.config.max_subscriptions_per_session {
            return Err(CoreError::TooManySubscriptions(self.config.max_subscriptions_per_session));
        }
        session.subscriptions.extend(new.into_iter().map(|t| TopicPattern::new(t)));
        Ok(session.subscriptions.iter().map(|p| p.as_str().to_owned()).collect())
    }

    /// Replaces the patterns open to subscription; existing subscriptions stay.
    pub(crate) fn set_subscribable(&self, patterns: Vec<String>) {
        *self.subscribable.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(patterns);
    }

    /// Whether `user` may subscribe to `pattern`. `{user_id}` is only substituted with ids
    /// that are plain topic words, so an id such as `*` or `a.b` cannot widen a template.
    fn may_subscribe(&self, user: &UserId, pattern: &str) -> bool {
        let id = user.as_str();
        let plain_word = !id.is_empty() && !id.contains(['.', '*', '#']);
        let subscribable = Arc::clone(&self.subscribable.read().unwrap_or_else(|e| e.into_inner()));
        subscribable.iter().any(|template| {
            if template.contains("{user_id}") {
                plain_word && pattern_covers(&template.replace("{user_id}", id), pattern)
            } else {
                pattern_covers(template, pattern)
            }
        })
    }

    /// Removes topic patterns from a session; returns its subscriptions afterwards.
    pub(crate) fn unsubscribe(
        &self,
        session_id: &SessionId,
        topics: &[String],
    ) -> Result<Vec<String>, CoreError> {
        let mut reg = self.write();
        let session = reg.sessions.get_mut(session_id).ok_or(CoreError::UnknownSession)?;
        session.subscriptions.retain(|p| !topics.iter().any(|t| t == p.as_str()));
        Ok(session.subscriptions.iter().map(|p| p.as_str().to_owned()).collect())
    }

    /// Closes one session (it unregisters itself when its connection ends).
    pub(crate) fn close_session(&self, session_id: &SessionId, reason: CloseReason) -> bool {
        let handle = self.read().sessions.get(session_id).map(|s| s.handle.clone());
        match handle {
            Some(h) => {
                h.close(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every session of these users. Returns the sessions closed.
    pub(crate) fn close_users(&self, users: &[UserId], reason: CloseReason) -> usize {
        let handles = self.handles_of(users);
        for h in &handles {
            h.close(reason.clone());
        }
        handles.len()
    }

    /// Closes every session, and refuses new ones from now on.
    pub(crate) fn close_all(&self, reason: CloseReason) -> usize {
        let handles: Vec<SessionHandle> = {
            let mut reg = self.write();
            reg.closed = true;
            reg.sessions.values().map(|s| s.handle.clone()).collect()
        };
        for h in &handles {
            h.close(reason.clone());
        }
        handles.len()
    }

    /// Events and pushes: the frame to each of `handles`, counting what was not delivered
    /// by reason. Returns the sessions reached.
    fn deliver_all(&self, handles: &[SessionHandle], frame: &Arc<SharedFrame>) -> usize {
        if handles.is_empty() {
            self.metrics.event_dropped(EventDrop::NoSession, 1);
            return 0;
        }
        let (mut reached, mut full, mut closed) = (0, 0, 0);
        for h in handles {
            match h.try_send(Outbound { frame: Arc::clone(frame), encoding: None }) {
                Ok(()) => reached += 1,
                Err(SendError::Full) => full += 1,
                Err(SendError::Closed) => closed += 1,
            }
        }
        self.metrics.event_dropped(EventDrop::QueueFull, full);
        self.metrics.event_dropped(EventDrop::SessionClosed, closed);
        reached
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nuropb_wire::client::{ServerFrame, ServerMessage};
    use serde_json::json;

    use super::*;
    use crate::connection::CloseCode;

    /// A handler that records what it is given; `capacity` frames fit before `Full`.
    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<Outbound>>,
        closed: Mutex<Vec<CloseReason>>,
        capacity: Option<usize>,
    }

    impl ClientConnection for Recorder {
        fn send(&self, outbound: Outbound) -> Result<(), SendError> {
            let mut frames = self.frames.lock().expect("lock");
            if self.capacity.is_some_and(|c| frames.len() >= c) {
                return Err(SendError::Full);
            }
            frames.push(outbound);
            Ok(())
        }
        fn close(&self, reason: CloseReason) {
            self.closed.lock().expect("lock").push(reason);
        }
    }

    impl Recorder {
        fn count(&self) -> usize {
            self.frames.lock().expect("lock").len()
        }
        fn closed(&self) -> Vec<CloseReason> {
            self.closed.lock().expect("lock").clone()
        }
    }

    fn identity(user: &str) -> Identity {
        Identity {
            user_id: UserId::new(user),
            username: format!("{user}@x"),
            token: "t".into(),
            expires_at: None,
            token_expires_at: None,
        }
    }

    fn frame() -> Arc<SharedFrame> {
        SharedFrame::new(ServerFrame::Message(ServerMessage::Event {
            topic: "t".into(),
            event: json!(1),
        }))
    }

    fn setup(sessions: &[(&str, &str)]) -> (SessionRegistry, HashMap<String, Arc<Recorder>>) {
        let m = SessionRegistry::new(SessionRegistryConfig::default());
        let mut recs = HashMap::new();
        for (sid, user) in sessions {
            let r = Arc::new(Recorder::default());
            m.register(SessionId::new(*sid), identity(user), r.clone()).expect("register");
            recs.insert((*sid).to_owned(), r);
        }
        (m, recs)
    }

    #[test]
    fn register_unregister_and_counts() {
        let (m, _) = setup(&[("s1", "alice"), ("s2", "alice"), ("s3", "bob")]);
        assert_eq!(m.session_count(), 3);
        assert_eq!(m.user_count(), 2);
        assert_eq!(m.high_water(), 3);
        let mut alice = m.sessions_of(&UserId::new("alice"));
        alice.sort();
        assert_eq!(alice, vec![SessionId::new("s1"), SessionId::new("s2")]);
        assert_eq!(m.session_count_of(&UserId::new("alice")), 2);
        assert_eq!(m.session_count_of(&UserId::new("bob")), 1);

        assert_eq!(
            m.unregister(&SessionId::new("s1")).map(|i| i.user_id.clone()),
            Some(UserId::new("alice"))
        );
        assert_eq!(m.unregister(&SessionId::new("s1")), None, "second unregister is a no-op");
        assert_eq!(m.session_count(), 2);
        assert_eq!(m.user_count(), 2);
        m.unregister(&SessionId::new("s2"));
        assert_eq!(m.user_count(), 1, "a user with no sessions left is forgotten");
        assert!(m.sessions_of(&UserId::new("alice")).is_empty());
        assert_eq!(m.session_count_of(&UserId::new("alice")), 0);
        assert_eq!(m.high_water(), 3, "high-water mark survives unregistering");
    }

    #[test]
    fn per_user_fan_out_reaches_every_session_of_those_users_only() {
        let (m, r) = setup(&[("s1", "alice"), ("s2", "alice"), ("s3", "bob"), ("s4", "carol")]);
        let reached = m.send_to_users(
            &[
                UserId::new("alice"),
                UserId::new("carol"),
                UserId::new("alice"),
                UserId::new("nobody"),
            ],
            frame(),
        );
        assert_eq!(reached, 3);
        assert_eq!(
            (r["s1"].count(), r["s2"].count(), r["s3"].count(), r["s4"].count()),
            (1, 1, 0, 1)
        );
        assert_eq!(m.send_to_all(frame()), 4);
        assert_eq!(r["s3"].count(), 1);
        let (_, s3) = m.session(&SessionId::new("s3")).expect("live");
        assert!(s3.send(Outbound { frame: frame(), encoding: None }));
        assert!(m.session(&SessionId::new("zz")).is_none());
        assert_eq!(m.frames_sent(), 8);
    }

    #[test]
    fn close_by_user_closes_only_that_users_sessions() {
        let (m, r) = setup(&[("s1", "alice"), ("s2", "alice"), ("s3", "bob")]);
        let n = m.close_users(&[UserId::new("alice")], CloseReason::new(CloseCode::Kicked, "bye"));
        assert_eq!(n, 2);
        assert_eq!(r["s1"].closed()[0].code, CloseCode::Kicked);
        assert_eq!(r["s2"].closed().len(), 1);
        assert!(r["s3"].closed().is_empty());
        assert!(m.close_session(&SessionId::new("s3"), CloseReason::new(CloseCode::Normal, "")));
        assert_eq!(m.close_all(CloseReason::new(CloseCode::GoingAway, "")), 3);
    }

    #[test]
    fn refresh_keeps_the_user_and_expiry_closes_with_4003() {
        let m = SessionRegistry::new(SessionRegistryConfig::default());
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let expiring = |user: &str, at: u64| Identity { expires_at: Some(at), ..identity(user) };
        m.register(SessionId::new("a"), expiring("u1", 100), a.clone()).expect("register");
        m.register(SessionId::new("b"), expiring("u2", 200), b.clone()).expect("register");
        assert_eq!(
            m.refresh_identity(&SessionId::new("a"), expiring("u2", 500)),
            Err(CoreError::OtherUser)
        );
        assert_eq!(m.close_expired(99), 0);
        assert_eq!(m.close_expired(100), 1);
        assert_eq!(a.closed()[0].code, CloseCode::TokenExpired);
        assert_eq!(m.refresh_identity(&SessionId::new("b"), expiring("u2", 500)), Ok(()));
        assert_eq!(m.close_expired(300), 1, "a is still registered until its task unregisters it");
        assert!(b.closed().is_empty(), "the refreshed session lives on");
        assert_eq!(m.session(&SessionId::new("b")).and_then(|(i, _)| i.expires_at), Some(500));
        assert_eq!(
            m.refresh_identity(&SessionId::new("zz"), expiring("u2", 1)),
            Err(CoreError::UnknownSession)
        );
    }

    #[test]
    fn subscriptions_route_by_pattern_and_are_bounded() {
        let m = SessionRegistry::new(SessionRegistryConfig {
            max_subscriptions_per_session: 2,
            subscribable: vec!["#".into()],
        });
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        m.register(SessionId::new("a"), identity("u1"), a.clone()).expect("register");
        m.register(SessionId::new("b"), identity("u2"), b.clone()).expect("register");
        let subs =
            m.subscribe(&SessionId::new("a"), &["news.*".into(), "news.*".into()]).expect("ok");
        assert_eq!(subs, vec!["news.*".to_owned()]);
        m.subscribe(&SessionId::new("b"), &["#".into()]).expect("ok");
        assert_eq!(m.send_to_subscribers("news.sport", frame()), 2);
        assert_eq!(m.send_to_subscribers("weather.today", frame()), 1);
        assert_eq!((a.count(), b.count()), (1, 2));
        assert_eq!(
            m.subscribe(&SessionId::new("a"), &["x".into(), "y".into()]),
            Err(CoreError::TooManySubscriptions(2))
        );
        assert_eq!(m.unsubscribe(&SessionId::new("a"), &["news.*".into()]), Ok(vec![]));
        assert_eq!(m.send_to_subscribers("news.sport", frame()), 1);
        assert_eq!(m.subscribe(&SessionId::new("zz"), &[]), Err(CoreError::UnknownSession));
    }

    #[test]
    fn replaced_subscribable_patterns_apply_to_later_subscribes_only() {
        let m = SessionRegistry::new(SessionRegistryConfig {
            subscribable: vec!["news.#".into()],
            ..Default::default()
        });
        m.register(SessionId::new("a"), identity("alice"), Arc::new(Recorder::default()))
            .expect("register");
        let a = SessionId::new("a");
        assert!(m.subscribe(&a, &["news.sport".to_owned()]).is_ok());
        m.set_subscribable(vec!["weather.#".into()]);
        assert_eq!(
            m.subscribe(&a, &["news.politics".to_owned()]),
            Err(CoreError::NotSubscribable("news.politics".into()))
        );
        // What was subscribed before stays.
        assert_eq!(
            m.subscribe(&a, &["weather.today".to_owned()]),
            Ok(vec!["news.sport".to_owned(), "weather.today".to_owned()])
        );
    }

    #[test]
    fn only_subscribable_patterns_are_accepted() {
        let m = SessionRegistry::new(SessionRegistryConfig {
            subscribable: vec!["news.#".into(), "users.{user_id}.notify".into()],
            ..Default::default()
        });
        m.register(SessionId::new("a"), identity("alice"), Arc::new(Recorder::default()))
            .expect("register");
        m.register(SessionId::new("w"), identity("*"), Arc::new(Recorder::default()))
            .expect("register");
        let a = SessionId::new("a");
        for (pattern, ok) in [
            ("news.sport", true),
            ("news.*", true),
            ("news.#", true),
            ("users.alice.notify", true),
            ("users.bob.notify", false),
            ("users.*.notify", false),
            ("users.#", false),
            ("#", false),
            ("weather.today", false),
        ] {
            let r = m.subscribe(&a, &[pattern.to_owned()]);
            assert_eq!(r.is_ok(), ok, "{pattern}: {r:?}");
        }
        // All or nothing: one refused pattern refuses the frame.
        assert_eq!(
            m.subscribe(&a, &["news.a".into(), "secret".into()]),
            Err(CoreError::NotSubscribable("secret".into()))
        );
        // A user id that is a wildcard cannot widen `{user_id}`.
        assert!(m.subscribe(&SessionId::new("w"), &["users.*.notify".into()]).is_err());
        assert!(m.subscribe(&SessionId::new("w"), &["users.bob.notify".into()]).is_err());
    }

    #[test]
    fn no_registration_after_close_all() {
        let m = SessionRegistry::new(SessionRegistryConfig::default());
        m.close_all(CloseReason::new(CloseCode::GoingAway, ""));
        assert_eq!(
            m.register(SessionId::new("late"), identity("u"), Arc::new(Recorder::default())),
            Err(CoreError::ShuttingDown)
        );
    }

    #[test]
    fn full_queue_drops_counts_and_closes_the_slow_session_only() {
        let m = SessionRegistry::new(SessionRegistryConfig::default());
        let slow = Arc::new(Recorder { capacity: Some(1), ..Default::default() });
        let fast = Arc::new(Recorder::default());
        m.register(SessionId::new("slow"), identity("u1"), slow.clone()).expect("register");
        m.register(SessionId::new("fast"), identity("u2"), fast.clone()).expect("register");
        assert_eq!(m.send_to_all(frame()), 2);
        assert_eq!(m.send_to_all(frame()), 1);
        assert_eq!(m.frames_dropped(), 1);
        assert_eq!(slow.closed()[0].code, CloseCode::TryAgainLater);
        assert_eq!(fast.count(), 2);
    }
}
