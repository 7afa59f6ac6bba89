//! The coordinator: owns the `SessionRegistry` and the `ServiceMeshManager` and is the only
//! place they meet. Transports talk to it through a cloneable [`CoordinatorHandle`]; a call
//! is given its session's handle when submitted and answers it from its own task; the mesh
//! talks to the core through the inbound channel given at construction, which one task
//! ([`Coordinator::run`]) routes to sessions, besides sweeping expired tokens and draining.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nuropb_wire::ErrorObject;
use nuropb_wire::client::{
    ClientCall, ClientFrame, ClientLimits, ClientMessage, Encoding, ErrorFrame, ServerFrame,
    ServerMessage, decode_client_frame,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::connection::{ClientConnection, Outbound, SharedFrame};
use crate::error::CoreError;
use crate::ids::{SessionId, UserId};
use crate::mesh::{
    ControlOutcome, GatewayControl, GatewayStats, MeshEvent, MeshInbound, ServiceMesh,
};
use crate::mesh_manager::{CallPattern, MeshManagerConfig, ReplyTo, ServiceMeshManager};
use crate::metrics::CoreMetrics;
use crate::session_registry::{SessionHandle, SessionRegistry, SessionRegistryConfig};
use crate::topic::topic_matches;

/// Everything the core is configured with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Session registry limits and the topics open to subscription.
    pub sessions: SessionRegistryConfig,
    /// Request routing: timeout, in-flight limits, what clients may call.
    pub mesh: MeshManagerConfig,
    /// Bounds applied while decoding client frames (docs/PROTOCOL.md, "Limits").
    pub client_limits: ClientLimits,
    /// Topic patterns whose untargeted events go to every session (default none).
    pub broadcast_topics: Vec<String>,
    /// Most open sessions of one user (`sub`) across all connections (default 100); one
    /// more is refused (`CoreError::TooManySessions`). A leaked token then holds a bounded
    /// share of the gateway, and a looping client cannot pile up sessions.
    pub max_sessions_per_user: usize,
    /// How the sessions are closed at shutdown (default: all at once, after the drain).
    pub lame_duck: LameDuckConfig,
    /// Where the core records call latencies and event drops (default: fresh metrics
    /// registered nowhere). The binary registers them before building the core.
    pub metrics: CoreMetrics,
}

/// The lame-duck drain: at shutdown, after `grace`, the sessions are closed with 1001 one
/// after another, spread evenly over `window`, so that their clients do not all reconnect
/// elsewhere in the same instant (NATS' lame-duck mode). A session with calls in flight
/// at its turn is closed as soon as they are answered (at the latest at the drain
/// deadline, when what is left is answered with an error).
///
/// The spacing between two closes is at most [`LameDuckConfig::MAX_SPACING`], so a few
/// sessions are closed in a few seconds, not over the whole window. A zero `window` (the
/// default) keeps the plain drain: every session is closed at once once the calls are
/// answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LameDuckConfig {
    /// Wait after shutdown begins before the first close, e.g. for a load balancer to
    /// notice that readiness went 503 (default 0).
    pub grace: Duration,
    /// The time over which the sessions are closed (default 0: all at once).
    pub window: Duration,
}

impl LameDuckConfig {
    /// Most time between two consecutive closes: spreading 10 sessions over two minutes
    /// would only make the shutdown slow (NATS caps it at one second too).
    pub const MAX_SPACING: Duration = Duration::from_secs(1);

    /// When the `i`-th of `n` sessions is closed, counted from the end of the grace.
    fn offset(&self, i: usize, n: usize) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        // In nanoseconds (u128) so that neither `window / n` rounding nor `* i` overflows.
        let spacing = (self.window.as_nanos() / n as u128).min(Self::MAX_SPACING.as_nanos());
        let nanos = spacing.saturating_mul(i as u128).min(u64::MAX as u128);
        Duration::from_nanos(nanos as u64)
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            sessions: SessionRegistryConfig::default(),
            mesh: MeshManagerConfig::default(),
            client_limits: ClientLimits::default(),
            broadcast_topics: Vec::new(),
            max_sessions_per_user: 100,
            lame_duck: LameDuckConfig::default(),
            metrics: CoreMetrics::default(),
        }
    }
}

struct Shared {
    sessions: SessionRegistry,
    mesh: ServiceMeshManager,
    authenticator: Arc<dyn Authenticator>,
    limits: ClientLimits,
    broadcast_topics: Vec<String>,
    shutdown: CancellationToken,
    events_delivered: std::sync::atomic::AtomicU64,
    metrics: CoreMetrics,
    // Changed by `set_max_sessions_per_user` (a configuration reload); read at every open.
    max_sessions_per_user: std::sync::atomic::AtomicUsize,
    // Held from counting a user's sessions to registering the new one, so two concurrent
    // opens cannot both take the last slot. Never held across `.await` (there is none).
    open_gate: std::sync::Mutex<()>,
    lame_duck: LameDuckConfig,
    // Where `refresh` checks run, so the drain waits for them too.
    tracker: TaskTracker,
}

/// The transports' way into the core. Cheap to clone.
#[derive(Clone)]
pub struct CoordinatorHandle {
    shared: Arc<Shared>,
}

/// The routing task's state; run it with [`Coordinator::run`].
pub struct Coordinator {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<MeshInbound>,
    // Invariant: `false` once `inbound` returned `None`; it is not polled again.
    inbound_open: bool,
    // Once a second, sessions whose token expired (and was not refreshed) are closed.
    expiry: tokio::time::Interval,
    tracker: TaskTracker,
}

impl Coordinator {
    /// Builds the core. `inbound` is the mesh adapter's inbound channel. Call tasks are
    /// spawned on `tracker`, so the caller can wait for them to drain at shutdown.
    pub fn new(
        config: CoreConfig,
        authenticator: Arc<dyn Authenticator>,
        mesh: Arc<dyn ServiceMesh>,
        inbound: mpsc::Receiver<MeshInbound>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> (Coordinator, CoordinatorHandle) {
        let shared = Arc::new(Shared {
            sessions: SessionRegistry::new(config.sessions).with_metrics(config.metrics.clone()),
            mesh: ServiceMeshManager::new(mesh, config.mesh, tracker.clone(), shutdown.clone())
                .with_metrics(config.metrics.clone()),
            metrics: config.metrics,
            authenticator,
            limits: config.client_limits,
            broadcast_topics: config.broadcast_topics,
            shutdown,
            events_delivered: Default::default(),
            max_sessions_per_user: config.max_sessions_per_user.into(),
            open_gate: std::sync::Mutex::new(()),
            lame_duck: config.lame_duck,
            tracker: tracker.clone(),
        });
        (
            Coordinator {
                shared: Arc::clone(&shared),
                inbound,
                inbound_open: true,
                expiry: expiry_sweep(),
                tracker,
            },
            CoordinatorHandle { shared },
        )
    }

    /// Routes mesh traffic and sweeps expired tokens until shutdown, then drains: intake is
    /// already stopped (the shutdown token refuses new sessions and calls); the sessions
    /// are closed with 1001 as `CoreConfig::lame_duck` spreads them, each once its pending
    /// calls are answered; calls still pending `drain` after shutdown began are aborted
    /// (answered with an error), and every session left is closed with 1001.
    pub async fn run(mut self, drain: Duration) {
        let shutdown = self.shared.shutdown.clone();
        self.route_until(shutdown.cancelled()).await;
        let drain_deadline = tokio::time::Instant::now() + drain;

        // Mesh traffic is still routed while draining: a `disconnect_user` must not wait
        // for the drain. Each call task answers its session itself before it ends, so an
        // empty tracker means every pending call has been answered.
        self.tracker.close();
        if !self.shared.lame_duck.window.is_zero() {
            self.close_spread(drain_deadline).await;
        }
        let tracker = self.tracker.clone();
        let drained = tokio::time::timeout_at(drain_deadline, tracker.wait());
        if self.route_until(drained).await.is_err() {
            let in_flight = self.shared.mesh.in_flight();
            tracing::warn!(
                in_flight,
                "drain deadline reached; answering pending calls with an error"
            );
            self.shared.mesh.abort_pending();
            // Aborted calls answer at once; the second deadline only guards against a call
            // task stuck outside its `select!` (it would be a bug).
            let aborted = tokio::time::timeout(Duration::from_secs(1), tracker.wait());
            if self.route_until(aborted).await.is_err() {
                tracing::warn!("aborted calls did not all finish; closing anyway");
            }
        }
        self.shared.sessions.close_all(CoreError::ShuttingDown.closing());
    }

    /// The lame-duck part of the drain: after the grace, closes the sessions one by one
    /// over the window (several at a time when the timer is coarser than their spacing).
    /// A session with calls in flight at its turn is closed once they are answered; those
    /// still waiting at `drain_deadline` are left to the caller.
    async fn close_spread(&mut self, drain_deadline: tokio::time::Instant) {
        let lame_duck = self.shared.lame_duck;
        let grace_end = (tokio::time::Instant::now() + lame_duck.grace).min(drain_deadline);
        self.route_until(tokio::time::sleep_until(grace_end)).await;
        // No session opens after shutdown began, so this is every session there will be.
        let queue = self.shared.sessions.session_ids();
        let n = queue.len();
        tracing::info!(
            sessions = n,
            window_ms = lame_duck.window.as_millis() as u64,
            "lame duck: closing sessions over the window"
        );
        let start = tokio::time::Instant::now();
        let reason = CoreError::ShuttingDown.closing();
        let mut waiting: Vec<SessionId> = Vec::new();
        let mut next = 0;
        // Each turn closes at least one session or ends at the drain deadline, so the loop
        // runs at most `n` turns plus the polls for sessions whose calls are still pending.
        loop {
            let now = tokio::time::Instant::now();
            waiting.retain(|id| !self.shared.close_if_idle(id, &reason));
            while next < n && start + lame_duck.offset(next, n) <= now {
                if !self.shared.close_if_idle(&queue[next], &reason) {
                    waiting.push(queue[next].clone());
                }
                next += 1;
            }
            if (next == n && waiting.is_empty()) || now >= drain_deadline {
                break;
            }
            // Waiting sessions are looked at again every 50 ms: their calls end on their
            // own tasks, which say nothing to this one.
            let mut wake = drain_deadline;
            if next < n {
                wake = wake.min(start + lame_duck.offset(next, n));
            }
            if !waiting.is_empty() {
                wake = wake.min(now + Duration::from_millis(50));
            }
            self.route_until(tokio::time::sleep_until(wake)).await;
        }
    }

    /// Routes mesh traffic and sweeps expired tokens until `until` completes.
    async fn route_until<T>(&mut self, until: impl Future<Output = T>) -> T {
        tokio::pin!(until);
        loop {
            tokio::select! {
                // All branches are cancel-safe: `until` is pinned and re-polled, `recv` and
                // `tick` lose nothing when not chosen.
                t = &mut until => return t,
                _ = self.expiry.tick() => {
                    let closed = self.shared.sessions.close_expired(unix_now());
                    if closed > 0 {
                        tracing::info!(sessions = closed, "closed sessions with expired tokens");
                    }
                }
                m = self.inbound.recv(), if self.inbound_open => match m {
                    Some(m) => self.shared.on_inbound(m),
                    None => {
                        tracing::warn!("mesh inbound channel closed; no more mesh events");
                        self.inbound_open = false;
                    }
                },
            }
        }
    }
}

/// The token-expiry sweep's timer: once a second; a late tick is skipped, not caught up.
fn expiry_sweep() -> tokio::time::Interval {
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    expiry
}

impl Shared {
    /// Closes the session (1001, lame duck) unless it has calls in flight; `true` when it
    /// needs no more attention (closed now, or already gone).
    fn close_if_idle(
        &self,
        session_id: &SessionId,
        reason: &crate::connection::CloseReason,
    ) -> bool {
        if self.mesh.in_flight_for(session_id) > 0 {
            return false;
        }
        self.sessions.close_session(session_id, reason.clone());
        true
    }

    fn on_inbound(&self, m: MeshInbound) {
        match m {
            MeshInbound::Event(e) => self.on_event(e),
            MeshInbound::Control { op, reply } => {
                let outcome = self.on_control(op);
                if let Some(reply) = reply {
                    // The asker may have given up waiting; nothing to do then.
                    let _ = reply.send(outcome);
                }
            }
            MeshInbound::Stats { reply } => {
                // As above: the asker may be gone.
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Event routing: `target` → those users' sessions; broadcast topic → everyone;
    /// otherwise → sessions subscribed to a matching pattern.
    fn on_event(&self, e: MeshEvent) {
        let frame = SharedFrame::new(ServerFrame::Message(ServerMessage::Event {
            topic: e.topic.clone(),
            event: e.event,
        }));
        let reached = match &e.target {
            Some(users) => self.sessions.send_to_users(users, frame),
            None if self.broadcast_topics.iter().any(|p| topic_matches(p, &e.topic)) => {
                self.sessions.send_to_all(frame)
            }
            None => self.sessions.send_to_subscribers(&e.topic, frame),
        };
        self.events_delivered.fetch_add(reached as u64, std::sync::atomic::Ordering::Relaxed);
        // Events that reached no session, or not every session, are counted by the
        // registry, by reason.
        self.metrics.event_received();
        tracing::debug!(topic = %e.topic, sessions = reached, "mesh event delivered");
    }

    fn on_control(&self, op: GatewayControl) -> ControlOutcome {
        let sessions = match op {
            GatewayControl::PushToUsers { user_ids, topic, event } => self.sessions.send_to_users(
                &user_ids,
                SharedFrame::new(ServerFrame::Message(ServerMessage::Event { topic, event })),
            ),
            GatewayControl::PushToAll { topic, event } => self.sessions.send_to_all(
                SharedFrame::new(ServerFrame::Message(ServerMessage::Event { topic, event })),
            ),
            GatewayControl::DisconnectUsers { user_ids, reason } => {
                self.sessions.close_users(&user_ids, CoreError::Kicked(reason).closing())
            }
        };
        ControlOutcome { sessions }
    }

    /// Answers a `refresh` once its token is checked: the new identity replaces the
    /// session's when it is valid and the same user's.
    fn refreshed(
        &self,
        session_id: &SessionId,
        checked: Result<Identity, AuthError>,
        answer: &Answer<'_>,
    ) {
        let refreshed = checked.map_err(CoreError::RefreshRefused).and_then(|new| {
            let expires_at = new.token_expires_at;
            self.sessions.refresh_identity(session_id, new).map(|()| expires_at)
        });
        match refreshed {
            Ok(expires_at) => {
                answer.reply(ServerFrame::Message(ServerMessage::Refreshed { expires_at }));
            }
            Err(e) => {
                // `{:?}` of the source: the detail is ours, but never trust a log line to
                // stay one line.
                let reason = std::error::Error::source(&e).map(|c| format!("{c:?}"));
                tracing::info!(session.id = %session_id, error = %e, reason, "refresh refused");
                answer.refuse(None, e);
            }
        }
    }

    fn stats(&self) -> GatewayStats {
        GatewayStats {
            sessions: self.sessions.session_count(),
            sessions_high_water: self.sessions.high_water(),
            users: self.sessions.user_count(),
            requests_in_flight: self.mesh.in_flight(),
            requests_total: self.mesh.requests_total(),
            requests_timed_out: self.mesh.timeouts_total(),
            events_delivered: self.events_delivered.load(std::sync::atomic::Ordering::Relaxed),
            frames_dropped: self.sessions.frames_dropped(),
            mesh_connected: self.mesh.mesh().is_connected(),
        }
    }
}

impl CoordinatorHandle {
    /// The trace id of a frame a transport refuses without handing it to the core (over
    /// its rate limit), read under the core's limits without decoding the frame, so the
    /// refusal still answers that request.
    pub fn trace_id_of(&self, bytes: &[u8], encoding: Encoding) -> Option<String> {
        nuropb_wire::client::peek_trace_id(bytes, encoding, &self.shared.limits)
    }

    /// The top-level `id` of a frame a transport refuses without handing it to the core,
    /// read as [`Self::trace_id_of`] reads the trace id, so the refusal carries it too.
    pub fn id_of(&self, bytes: &[u8], encoding: Encoding) -> Option<String> {
        nuropb_wire::client::peek_id(bytes, encoding, &self.shared.limits)
    }

    /// The client limits frames are decoded under (a transport bounds what it reads before
    /// a session exists by them, e.g. the first-frame `auth`).
    pub fn client_limits(&self) -> &ClientLimits {
        &self.shared.limits
    }

    /// Checks a bearer token (already stripped of its `Bearer` prefix). May call out (a
    /// JWKS refresh, the mesh token check); the transport bounds the wait.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.shared.authenticator.authenticate(token).await
    }

    /// Registers a new session and queues its hello frame.
    pub fn open_session(
        &self,
        identity: Identity,
        handler: Arc<dyn ClientConnection>,
    ) -> Result<SessionId, CoreError> {
        self.open_session_answering(identity, handler, None)
    }

    /// Gives the session a default W3C `traceparent` (from its upgrade request's header):
    /// each of its calls without a `traceparent` of its own gets this trace with a fresh
    /// parent-id (docs/PROTOCOL.md). Refuses an invalid value, saying why; nothing is set
    /// then.
    pub fn set_session_traceparent(
        &self,
        session_id: &SessionId,
        traceparent: &str,
    ) -> Result<(), &'static str> {
        nuropb_wire::traceparent::check_traceparent(traceparent)?;
        if self.shared.sessions.set_traceparent(session_id, traceparent.into()) {
            Ok(())
        } else {
            Err("no such session")
        }
    }

    /// [`Self::open_session`] for a session opened by a client frame (the first-frame
    /// `auth`): the hello answers it, so it carries the frame's `id`.
    pub fn open_session_answering(
        &self,
        identity: Identity,
        handler: Arc<dyn ClientConnection>,
        id: Option<String>,
    ) -> Result<SessionId, CoreError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(CoreError::ShuttingDown);
        }
        // Every registration happens under the gate, so the count cannot move meanwhile.
        let _gate = self.shared.open_gate.lock().unwrap_or_else(|e| e.into_inner());
        if self.session_limit_reached(&identity.user_id) {
            tracing::info!(user.id = %identity.user_id, "session refused: too many sessions");
            return Err(CoreError::TooManySessions(self.max_sessions_per_user()));
        }
        let session_id = SessionId::generate();
        let hello = ServerFrame::Message(ServerMessage::Event {
            topic: "hello".to_owned(),
            event: json!({
                "session_id": session_id.as_str(),
                "user_id": identity.user_id.as_str(),
                "username": identity.username,
                // The token's own `exp`, so a client knows when to refresh (as `refreshed`
                // reports the new token's; the session closes with 4003 a leeway later).
                "expires_at": identity.token_expires_at,
            }),
        });
        let user_id = identity.user_id.clone();
        // The hello is queued before the session is visible to fan-out, so it is always the
        // first frame the client gets.
        let hello = SharedFrame::new(hello.with_id(id));
        let hello = Outbound { frame: hello, encoding: Some(Encoding::Json) };
        if handler.send(hello).is_err() {
            return Err(CoreError::ShuttingDown);
        }
        // Registration itself refuses sessions once shutdown closed them all, so a session
        // racing with shutdown either gets its 1001 or is never opened.
        if self.shared.sessions.register(session_id.clone(), identity, handler).is_err() {
            return Err(CoreError::ShuttingDown);
        }
        tracing::info!(session.id = %session_id, user.id = %user_id, "session opened");
        Ok(session_id)
    }

    /// Whether `user` already has `max_sessions_per_user` sessions: transports ask before
    /// upgrading (to refuse with a status rather than a close); `open_session` decides.
    pub fn session_limit_reached(&self, user: &UserId) -> bool {
        self.shared.sessions.session_count_of(user) >= self.max_sessions_per_user()
    }

    /// Forgets a session whose connection ended; its pending calls are cancelled.
    pub fn close_session(&self, session_id: &SessionId) {
        self.shared.mesh.session_closed(session_id);
        if let Some(identity) = self.shared.sessions.unregister(session_id) {
            tracing::info!(session.id = %session_id, user.id = %identity.user_id, "session closed");
        }
    }

    /// Handles one client frame. Never blocks: calls are spawned, replies queued.
    /// Returns `false` if the frame was rejected as bad input (for the transport's
    /// protocol-error budget).
    pub fn on_frame(&self, session_id: &SessionId, bytes: &[u8], encoding: Encoding) -> bool {
        let s = &self.shared;
        let decoded = decode_client_frame(bytes, encoding, &s.limits);
        // The session's handle is taken once: every answer to this frame, now or from the
        // call's task later, goes through it.
        let Some((identity, session)) = s.sessions.session(session_id) else {
            return decoded.is_ok();
        };
        let ClientFrame { id, message } = match decoded {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(session.id = %session_id, error = %e, "bad client frame");
                let answer = Answer { session: &session, id: e.id.clone(), encoding };
                answer.refuse(e.trace_id.clone(), e.into());
                return false;
            }
        };
        // Every answer to this frame carries its `id`.
        let answer = Answer { session: &session, id, encoding };
        // Between the token's expiry and the next sweep (at most a second), nothing but a
        // refresh is served with it.
        let expired = identity.expires_at.is_some_and(|e| e <= unix_now());
        if expired && !matches!(message, ClientMessage::Refresh { .. }) {
            answer.refuse(None, CoreError::TokenExpired);
            return false;
        }
        match message {
            ClientMessage::Request(mut call) => {
                session_traceparent(&s.sessions, session_id, &mut call);
                // A trace id is generated here when absent, so even a refusal can name it.
                let trace = Some(call.trace_id.get_or_insert_with(new_trace).clone());
                if let Err(e) = s.mesh.request(&session, &identity, call, answer.reply_to()) {
                    answer.refuse(trace, e);
                }
            }
            ClientMessage::Command(mut call) => {
                session_traceparent(&s.sessions, session_id, &mut call);
                let trace = Some(call.trace_id.get_or_insert_with(new_trace).clone());
                if let Err(e) = s.mesh.command(&session, &identity, call, answer.reply_to()) {
                    answer.refuse(trace, e);
                }
            }
            ClientMessage::Subscribe { topics } => {
                answer.subscribed(s.sessions.subscribe(session_id, &topics));
            }
            ClientMessage::Unsubscribe { topics } => {
                answer.subscribed(s.sessions.unsubscribe(session_id, &topics));
            }
            ClientMessage::Refresh { token } => {
                // `on_frame` never waits: a check that is not done at once (a JWKS refresh,
                // the mesh token check) is finished on a tracked task, its answer carrying
                // the frame's `id` (it may then come after answers to later frames).
                let shared = Arc::clone(s);
                let mut check =
                    Box::pin(async move { shared.authenticator.authenticate(&token).await });
                match futures::FutureExt::now_or_never(&mut check) {
                    Some(checked) => s.refreshed(session_id, checked, &answer),
                    None => {
                        let shared = Arc::clone(s);
                        let session_id = session_id.clone();
                        let session = session.clone();
                        let (id, encoding) = (answer.id.clone(), answer.encoding);
                        s.tracker.spawn(async move {
                            let checked = check.await;
                            let answer = Answer { session: &session, id, encoding };
                            shared.refreshed(&session_id, checked, &answer);
                        });
                    }
                }
            }
            ClientMessage::Ping => {
                answer.reply(ServerFrame::Message(ServerMessage::Pong {}));
            }
            ClientMessage::Auth { .. } => {
                // The first-frame route ends with the hello; a session is authenticated.
                answer.refuse(None, CoreError::AlreadyAuthenticated);
                return false;
            }
        }
        true
    }

    /// Live stats of this instance.
    pub fn stats(&self) -> GatewayStats {
        self.shared.stats()
    }

    /// Replaces the topic patterns open to subscription (`SessionRegistryConfig::subscribable`),
    /// e.g. on a configuration reload. Checked at every `subscribe` from now on;
    /// subscriptions already made stay.
    pub fn set_subscribable(&self, patterns: Vec<String>) {
        self.shared.sessions.set_subscribable(patterns);
    }

    /// Replaces `MeshManagerConfig::callable` and `client_describe`, e.g. on a
    /// configuration reload: calls submitted from now on are checked against them; calls
    /// in flight go on.
    pub fn set_call_rules(&self, callable: Vec<CallPattern>, client_describe: bool) {
        self.shared.mesh.set_call_rules(callable, client_describe);
    }

    /// Replaces `CoreConfig::max_sessions_per_user` (at least 1), e.g. on a configuration
    /// reload. Checked at every open from now on; no open session is closed.
    pub fn set_max_sessions_per_user(&self, max: usize) {
        self.shared.max_sessions_per_user.store(max.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn max_sessions_per_user(&self) -> usize {
        self.shared.max_sessions_per_user.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Completes once shutdown has begun: for a transport that waits outside any session
    /// (a connection waiting for its first-frame `auth`), which the drain does not close.
    /// Cancel-safe.
    pub async fn shutdown_started(&self) {
        self.shared.shutdown.cancelled().await;
    }
}

/// Where the answers to one client frame go: its session, in the frame's encoding, each
/// carrying the frame's `id` (none when it had none).
struct Answer<'a> {
    session: &'a SessionHandle,
    id: Option<String>,
    encoding: Encoding,
}

impl Answer<'_> {
    /// Queues `frame` with the `id`; `false` if the session is gone (or was just closed as
    /// too slow).
    fn reply(&self, frame: ServerFrame) -> bool {
        let frame = frame.with_id(self.id.clone());
        self.session
            .send(Outbound { frame: SharedFrame::new(frame), encoding: Some(self.encoding) })
    }

    /// Answers a refused frame: a `response` with the error when the client can match it to
    /// a request (`trace_id`), the top-level error frame otherwise.
    fn refuse(&self, trace_id: Option<String>, e: CoreError) {
        self.reply(error_frame(trace_id, e.to_error_object()));
    }

    /// The answer to subscribe/unsubscribe: the session's patterns now, or why not.
    fn subscribed(&self, result: Result<Vec<String>, CoreError>) {
        match result {
            Ok(topics) => {
                self.reply(ServerFrame::Message(ServerMessage::Subscribed { topics }));
            }
            Err(e) => self.refuse(None, e),
        }
    }

    /// How a call's task answers later.
    fn reply_to(&self) -> ReplyTo {
        ReplyTo { id: self.id.clone(), encoding: self.encoding }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A call without a `traceparent` of its own takes its session's, with a fresh parent-id.
fn session_traceparent(sessions: &SessionRegistry, session_id: &SessionId, call: &mut ClientCall) {
    if call.traceparent.is_none()
        && let Some(tp) = sessions.traceparent(session_id)
    {
        // 16 random hex digits; `with_parent_id` refuses the all-zero one (odds 2^-64),
        // and the call then simply has no traceparent.
        let random = crate::ids::TraceId::generate().into_string();
        call.traceparent = nuropb_wire::traceparent::with_parent_id(&tp, &random[..16]);
    }
}

fn new_trace() -> String {
    crate::ids::TraceId::generate().into_string()
}

/// An error the client can match to its request (a `response` carrying its trace id), or
/// the top-level `{"error", "description"}` frame when there is no trace id.
fn error_frame(trace_id: Option<String>, error: ErrorObject) -> ServerFrame {
    match trace_id {
        Some(t) => ServerFrame::Message(ServerMessage::Response {
            trace_id: Some(t),
            result: Value::Null,
            error: Some(error),
        }),
        None => ServerFrame::Error(ErrorFrame {
            error: error.error,
            description: error.description,
            trace_id: None,
            id: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use nuropb_wire::mesh::error_name;
    use tokio::sync::oneshot;

    use super::*;
    use crate::auth::MockAuthenticator;
    use crate::connection::{CloseCode, CloseReason, MockClientConnection, SendError};
    use crate::ids::UserId;
    use crate::mesh::{MeshCall, MeshError, MeshResponse, MockServiceMesh};

    /// What a connection was given, in order.
    #[derive(Debug)]
    enum Seen {
        Frame(Outbound),
        Close(CloseReason),
    }

    /// A connection that records everything; its queue never fills.
    #[derive(Default)]
    struct Client {
        seen: Mutex<Vec<Seen>>,
    }

    impl ClientConnection for Client {
        fn send(&self, outbound: Outbound) -> Result<(), SendError> {
            self.seen.lock().expect("lock").push(Seen::Frame(outbound));
            Ok(())
        }
        fn close(&self, reason: CloseReason) {
            self.seen.lock().expect("lock").push(Seen::Close(reason));
        }
    }

    impl Client {
        /// Frames after the hello, as JSON values.
        fn frames(&self) -> Vec<Value> {
            let seen = self.seen.lock().expect("lock");
            let frames = seen.iter().filter_map(|s| match s {
                Seen::Frame(o) => Some(o),
                Seen::Close(_) => None,
            });
            frames.skip(1).map(|o| json_of(&o.frame)).collect()
        }

        fn closes(&self) -> Vec<(u16, String)> {
            let seen = self.seen.lock().expect("lock");
            let closes = seen.iter().filter_map(|s| match s {
                Seen::Close(r) => Some((r.code.as_u16(), r.reason.clone())),
                Seen::Frame(_) => None,
            });
            closes.collect()
        }

        /// Whether the last thing seen is a close with `code`, after `frames` frames.
        fn ended_with(&self, code: u16, frames: usize) -> bool {
            let seen = self.seen.lock().expect("lock");
            let sent = seen.iter().filter(|s| matches!(s, Seen::Frame(_))).count();
            matches!(seen.last(), Some(Seen::Close(r)) if r.code.as_u16() == code)
                && sent == frames + 1
        }
    }

    fn json_of(frame: &SharedFrame) -> Value {
        let bytes = frame.encoded(Encoding::Json).expect("encodes");
        serde_json::from_slice(&bytes).expect("json")
    }

    fn identity(user: &str) -> Identity {
        Identity {
            user_id: UserId::new(user),
            username: format!("{user}@x"),
            token: format!("token-of-{user}"),
            expires_at: None,
            token_expires_at: None,
        }
    }

    /// A mesh whose calls end only when dropped (cancelled, or the drain gave up on them).
    struct Hanging;

    #[async_trait::async_trait]
    impl ServiceMesh for Hanging {
        async fn request(&self, _: MeshCall, _: Duration) -> Result<MeshResponse, MeshError> {
            std::future::pending().await
        }
        async fn command(&self, _: MeshCall) -> Result<(), MeshError> {
            std::future::pending().await
        }
        async fn publish_event(&self, _: MeshEvent) -> Result<(), MeshError> {
            Ok(())
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    /// A mesh answering every request with its method name after `delay`.
    struct Slow(Duration);

    #[async_trait::async_trait]
    impl ServiceMesh for Slow {
        async fn request(&self, call: MeshCall, _: Duration) -> Result<MeshResponse, MeshError> {
            tokio::time::sleep(self.0).await;
            Ok(MeshResponse { result: json!(call.method), error: None })
        }
        async fn command(&self, _: MeshCall) -> Result<(), MeshError> {
            Ok(())
        }
        async fn publish_event(&self, _: MeshEvent) -> Result<(), MeshError> {
            Ok(())
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    /// A mock mesh that is connected (for stats) and expects no calls unless told.
    fn mesh() -> MockServiceMesh {
        let mut mesh = MockServiceMesh::new();
        mesh.expect_is_connected().return_const(true);
        mesh
    }

    struct Core {
        coordinator: Option<Coordinator>,
        handle: CoordinatorHandle,
        inbound: mpsc::Sender<MeshInbound>,
        shutdown: CancellationToken,
    }

    fn core_with(mesh: impl ServiceMesh, auth: MockAuthenticator, config: CoreConfig) -> Core {
        let (inbound, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let (coordinator, handle) = Coordinator::new(
            config,
            Arc::new(auth),
            Arc::new(mesh),
            rx,
            TaskTracker::new(),
            shutdown.clone(),
        );
        Core { coordinator: Some(coordinator), handle, inbound, shutdown }
    }

    fn core(mesh: impl ServiceMesh) -> Core {
        core_with(mesh, MockAuthenticator::new(), test_config())
    }

    fn test_config() -> CoreConfig {
        CoreConfig {
            mesh: MeshManagerConfig {
                request_timeout: Duration::from_secs(5),
                reserved_services: vec!["gw".into()],
                ..Default::default()
            },
            sessions: SessionRegistryConfig {
                subscribable: vec!["news.#".into()],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    impl Core {
        fn open(&self, user: &str) -> (SessionId, Arc<Client>) {
            self.open_as(identity(user))
        }

        fn open_as(&self, identity: Identity) -> (SessionId, Arc<Client>) {
            let client = Arc::new(Client::default());
            let sid = self.handle.open_session(identity, client.clone()).expect("opened");
            (sid, client)
        }

        fn frame(&self, sid: &SessionId, frame: Value) -> bool {
            let bytes = serde_json::to_vec(&frame).expect("json");
            self.handle.on_frame(sid, &bytes, Encoding::Json)
        }

        fn request(&self, sid: &SessionId, service: &str, method: &str, trace: &str) -> bool {
            let payload =
                json!({"service": service, "method": method, "params": {}, "trace_id": trace});
            self.frame(sid, json!({"type": "request", "payload": payload}))
        }

        /// Spawns the routing task; the test awaits its handle.
        fn run(&mut self, drain: Duration) -> tokio::task::JoinHandle<()> {
            let coordinator = self.coordinator.take().expect("not yet running");
            tokio::spawn(coordinator.run(drain))
        }

        /// Lets the spawned tasks (call tasks, the routing task) run what is ready, without
        /// advancing time.
        async fn settle(&self) {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        }
    }

    fn response(trace: &str, result: Value, error: Option<(&str, &str)>) -> Value {
        let error = error.map(|(e, d)| json!({"error": e, "description": d}));
        json!({"type": "response", "payload": {"trace_id": trace, "result": result, "error": error}})
    }

    fn top_level_error(error: &str, description: &str) -> Value {
        json!({"error": error, "description": description})
    }

    #[tokio::test]
    async fn hello_is_the_first_frame_and_a_request_is_answered_on_its_session_only() {
        let mut mesh = mesh();
        mesh.expect_request().times(1).returning(|call, _| {
            assert_eq!(call.context["Authorization"], "Bearer token-of-alice");
            Ok(MeshResponse { result: json!(42), error: None })
        });
        let c = core(mesh);
        let (alice, a) = c.open("alice");
        let (_bob, b) = c.open("bob");
        let hello = {
            let seen = a.seen.lock().expect("lock");
            match seen.first() {
                Some(Seen::Frame(o)) => json_of(&o.frame),
                other => panic!("not a frame: {other:?}"),
            }
        };
        assert_eq!(hello["payload"]["topic"], "hello");
        assert_eq!(hello["payload"]["event"]["session_id"], alice.as_str());

        assert!(c.request(&alice, "svc", "m", "t1"));
        c.settle().await;
        assert_eq!(a.frames(), vec![response("t1", json!(42), None)]);
        assert!(b.frames().is_empty());
        let stats = c.handle.stats();
        assert_eq!((stats.requests_in_flight, stats.requests_total), (0, 1));
    }

    #[tokio::test]
    async fn every_answer_carries_the_frames_id_and_frames_without_one_get_none() {
        let mut mesh = mesh();
        mesh.expect_request().returning(|_, _| Ok(MeshResponse { result: json!(1), error: None }));
        mesh.expect_command().returning(|_| Ok(()));
        let mut auth = MockAuthenticator::new();
        auth.expect_authenticate().returning(|token| match token {
            "good" => Ok(Identity { token_expires_at: Some(4_000_000_000), ..identity("alice") }),
            _ => Err(crate::auth::AuthError::Expired),
        });
        let config = CoreConfig {
            sessions: SessionRegistryConfig {
                subscribable: vec!["news.#".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let c = core_with(mesh, auth, config);
        let (sid, client) = c.open_as(Identity {
            expires_at: Some(3_000_000_030),
            token_expires_at: Some(3_000_000_000),
            ..identity("alice")
        });
        let hello = {
            let seen = client.seen.lock().expect("lock");
            match seen.first() {
                Some(Seen::Frame(o)) => json_of(&o.frame),
                other => panic!("not a frame: {other:?}"),
            }
        };
        assert_eq!(hello["payload"]["event"]["expires_at"], 3_000_000_000u64);
        let call = json!({"service": "s", "method": "m", "params": {}, "trace_id": "t"});
        let frames = [
            json!({"type": "ping", "id": "1"}),
            json!({"type": "subscribe", "payload": {"topics": ["news.a"]}, "id": "2"}),
            json!({"type": "unsubscribe", "payload": {"topics": ["news.a"]}, "id": "3"}),
            json!({"type": "subscribe", "payload": {"topics": ["secret"]}, "id": "4"}),
            json!({"type": "refresh", "payload": {"token": "good"}, "id": "5"}),
            json!({"type": "refresh", "payload": {"token": "bad"}, "id": "6"}),
            json!({"type": "nope", "id": "7"}),
            json!({"type": "auth", "payload": {"token": "good"}, "id": "8"}),
            json!({"type": "request", "payload": call, "id": "9"}),
            json!({"type": "command", "payload": call, "id": "10"}),
        ];
        for frame in frames {
            c.frame(&sid, frame);
        }
        // The calls are answered by their tasks; the last frame comes after.
        c.settle().await;
        c.frame(&sid, json!({"type": "ping"}));
        let ids: Vec<Value> = client.frames().iter().map(|f| f["id"].clone()).collect();
        let expected: Vec<Value> =
            (1..=10).map(|i| json!(i.to_string())).chain([Value::Null]).collect();
        assert_eq!(ids, expected, "{:?}", client.frames());
        let frames = client.frames();
        assert_eq!(frames[0], json!({"type": "pong", "payload": {}, "id": "1"}));
        assert_eq!(frames[3]["error"], error_name::VALIDATION);
        assert_eq!(
            frames[4],
            json!({"type": "refreshed", "payload": {"expires_at": 4_000_000_000u64}, "id": "5"})
        );
        assert_eq!(frames[5]["description"], "unauthorized");
        assert_eq!(frames[8]["type"], "response");
        assert_eq!(
            frames[9],
            json!({"type": "accepted", "payload": {"trace_id": "t"}, "id": "10"})
        );
        // Without an id the answer is exactly today's frame.
        assert_eq!(frames[10], json!({"type": "pong", "payload": {}}));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_the_mesh_never_answers_times_out() {
        let c = core(Hanging);
        let (sid, client) = c.open("alice");
        let start = tokio::time::Instant::now();
        assert!(c.request(&sid, "svc", "m", "t1"));
        // The adapter owns the deadline; the core's guard fires 250 ms after it.
        tokio::time::sleep(Duration::from_millis(5_249)).await;
        assert!(client.frames().is_empty());
        tokio::time::sleep(Duration::from_millis(2)).await;
        c.settle().await;
        let frames = client.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["payload"]["error"]["error"], error_name::TIMEOUT);
        assert!(start.elapsed() < Duration::from_secs(6));
        assert_eq!(c.handle.stats().requests_timed_out, 1);
    }

    #[tokio::test]
    async fn an_answer_to_a_full_queue_is_dropped_counted_and_closes_1013() {
        let mut mesh = mesh();
        mesh.expect_request().returning(|_, _| Ok(MeshResponse { result: json!(1), error: None }));
        let c = core(mesh);
        let mut handler = MockClientConnection::new();
        let sends = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&sends);
        // The hello fits; the queue is full when the response comes.
        handler.expect_send().returning(move |_| match counted.fetch_add(1, Ordering::SeqCst) {
            0 => Ok(()),
            _ => Err(SendError::Full),
        });
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        handler
            .expect_close()
            .withf(|r| r.code == CloseCode::TryAgainLater)
            .times(1)
            .returning(move |_| flag.store(true, Ordering::SeqCst));
        let sid = c.handle.open_session(identity("slow"), Arc::new(handler)).expect("opened");
        assert!(c.request(&sid, "svc", "m", "t1"));
        c.settle().await;
        assert_eq!(sends.load(Ordering::SeqCst), 2);
        assert!(closed.load(Ordering::SeqCst), "closed with 1013");
        assert_eq!(c.handle.stats().frames_dropped, 1);
    }

    #[tokio::test]
    async fn a_closed_sessions_calls_are_cancelled_unanswered() {
        let c = core(Hanging);
        let (sid, client) = c.open("alice");
        assert!(c.request(&sid, "svc", "m", "t1"));
        c.settle().await;
        assert_eq!(c.handle.stats().requests_in_flight, 1);
        c.handle.close_session(&sid);
        c.settle().await;
        assert_eq!(c.handle.stats().requests_in_flight, 0);
        assert!(client.frames().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_lets_pending_calls_finish_within_the_deadline_then_closes_1001() {
        let mut c = core(Slow(Duration::from_secs(2)));
        let (sid, client) = c.open("alice");
        let routing = c.run(Duration::from_secs(10));
        assert!(c.request(&sid, "svc", "m", "t1"));
        c.settle().await;
        let start = tokio::time::Instant::now();
        c.shutdown.cancel();
        routing.await.expect("routing task");
        assert!(
            start.elapsed() >= Duration::from_secs(2) && start.elapsed() < Duration::from_secs(3)
        );
        assert_eq!(client.frames(), vec![response("t1", json!("m"), None)]);
        assert!(client.ended_with(1001, 1), "the answer, then the close");
        assert_eq!(client.closes(), vec![(1001, "gateway shutting down".to_owned())]);
    }

    fn lame_duck_core(mesh: impl ServiceMesh, grace: u64, window: u64) -> Core {
        let lame_duck = LameDuckConfig {
            grace: Duration::from_secs(grace),
            window: Duration::from_secs(window),
        };
        core_with(mesh, MockAuthenticator::new(), CoreConfig { lame_duck, ..test_config() })
    }

    #[test]
    fn lame_duck_offsets_are_even_and_at_most_a_second_apart() {
        let ld = |window_ms| LameDuckConfig {
            grace: Duration::ZERO,
            window: Duration::from_millis(window_ms),
        };
        let ms = Duration::from_millis;
        for (window, i, n, expected) in [
            (10_000, 0, 200, ms(0)),
            (10_000, 1, 200, ms(50)),
            (10_000, 199, 200, ms(9_950)),
            // Few sessions: a second apart, not spread over the whole window.
            (10_000, 2, 3, ms(2_000)),
            (120_000, 9, 10, ms(9_000)),
            (0, 5, 10, ms(0)),
            (1_000, 0, 0, ms(0)),
        ] {
            assert_eq!(ld(window).offset(i, n), expected, "{window} ms, {i} of {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lame_duck_closes_the_sessions_one_by_one_over_the_window_after_the_grace() {
        let mut c = lame_duck_core(mesh(), 2, 10);
        let clients: Vec<_> = (0..20).map(|i| c.open(&format!("user{i}")).1).collect();
        let routing = c.run(Duration::from_secs(30));
        let start = tokio::time::Instant::now();
        c.shutdown.cancel();
        let closed = || clients.iter().filter(|cl| !cl.closes().is_empty()).count();
        // 20 sessions over 10 s: one every 500 ms from the end of the 2 s grace.
        for (at_ms, expected) in
            [(1_900, 0), (2_100, 1), (4_100, 5), (6_900, 10), (11_400, 19), (11_600, 20)]
        {
            tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
            c.settle().await;
            assert_eq!(closed(), expected, "closed by {at_ms} ms");
        }
        routing.await.expect("routing task");
        assert!(start.elapsed() < Duration::from_secs(12));
        // (These fakes stay registered once closed, so the final sweep closes them again;
        // a real connection unregisters, and its first close wins anyway.)
        for client in &clients {
            assert_eq!(client.closes()[0], (1001, "gateway shutting down".to_owned()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lame_duck_closes_a_session_with_a_call_in_flight_once_it_is_answered() {
        let mut c = lame_duck_core(Slow(Duration::from_secs(3)), 0, 2);
        let (busy, busy_client) = c.open("alice");
        let (_idle, idle_client) = c.open("bob");
        let routing = c.run(Duration::from_secs(10));
        assert!(c.request(&busy, "svc", "m", "t1"));
        c.settle().await;
        let start = tokio::time::Instant::now();
        c.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(2_900)).await;
        c.settle().await;
        assert_eq!(idle_client.closes().len(), 1, "the idle one went on its turn");
        assert!(busy_client.closes().is_empty(), "not while its call is in flight");
        routing.await.expect("routing task");
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3) && took < Duration::from_millis(3_200), "{took:?}");
        assert_eq!(busy_client.frames(), vec![response("t1", json!("m"), None)]);
        assert!(busy_client.ended_with(1001, 1), "the answer, then the close");
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_drain_deadline_pending_calls_are_answered_with_an_error_then_closed() {
        let mut c = core(Hanging);
        let (sid, client) = c.open("alice");
        let routing = c.run(Duration::from_secs(1));
        assert!(c.request(&sid, "svc", "m", "t1"));
        c.settle().await;
        let start = tokio::time::Instant::now();
        c.shutdown.cancel();
        routing.await.expect("routing task");
        assert!(
            start.elapsed() >= Duration::from_secs(1) && start.elapsed() < Duration::from_secs(2)
        );
        let error = (error_name::TRANSPORT, "mesh unavailable: gateway shutting down");
        assert_eq!(client.frames(), vec![response("t1", Value::Null, Some(error))]);
        assert!(client.ended_with(1001, 1));
        assert_eq!(c.handle.stats().requests_in_flight, 0);
    }

    #[tokio::test]
    async fn sessions_per_user_are_bounded_and_freed_on_close() {
        let config = CoreConfig { max_sessions_per_user: 2, ..CoreConfig::default() };
        let c = core_with(mesh(), MockAuthenticator::new(), config);
        let alice = UserId::new("alice");
        let (first, _) = c.open("alice");
        assert!(!c.handle.session_limit_reached(&alice));
        let (_second, _) = c.open("alice");
        assert!(c.handle.session_limit_reached(&alice));
        let client = Arc::new(Client::default());
        let refused = c.handle.open_session(identity("alice"), client.clone());
        assert_eq!(refused, Err(CoreError::TooManySessions(2)));
        assert!(client.frames().is_empty(), "no hello for a refused session");
        assert_eq!(refused.unwrap_err().close_code(), Some(CloseCode::PolicyViolation));
        // Another user is not affected; a closed session frees its slot.
        c.open("bob");
        c.handle.close_session(&first);
        assert!(!c.handle.session_limit_reached(&alice));
        c.open("alice");
    }

    #[tokio::test]
    async fn once_shutdown_begins_no_session_opens_and_no_call_is_made() {
        let c = core(mesh()); // no expectations: a call would panic
        let (sid, client) = c.open("alice");
        c.shutdown.cancel();
        assert!(c.handle.is_shutting_down());
        let refused = c.handle.open_session(identity("bob"), Arc::new(Client::default()));
        assert_eq!(refused, Err(CoreError::ShuttingDown));
        assert!(c.request(&sid, "svc", "m", "t1"));
        let error = (error_name::TRANSPORT, "gateway shutting down");
        assert_eq!(client.frames(), vec![response("t1", Value::Null, Some(error))]);
    }

    #[tokio::test]
    async fn refusals_are_answered_with_the_one_mapping() {
        let mut auth = MockAuthenticator::new();
        auth.expect_authenticate().returning(|token| match token {
            "bob" => Ok(identity("bob")),
            "alice-later" => {
                Ok(Identity { token_expires_at: Some(4_000_000_000), ..identity("alice") })
            }
            _ => Err(crate::auth::AuthError::Expired),
        });
        let config = CoreConfig {
            mesh: MeshManagerConfig { reserved_services: vec!["gw".into()], ..Default::default() },
            sessions: SessionRegistryConfig {
                subscribable: vec!["news.#".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let c = core_with(mesh(), auth, config);
        let (sid, client) = c.open("alice");
        let refresh = |token: &str| json!({"type": "refresh", "payload": {"token": token}});
        let subscribe = |topic: &str| json!({"type": "subscribe", "payload": {"topics": [topic]}});
        let cases: Vec<(Value, bool, Value)> = vec![
            (
                json!({"type": "request", "payload": {"service": "gw", "method": "push_to_all", "params": {}, "trace_id": "t1"}}),
                true,
                response(
                    "t1",
                    Value::Null,
                    Some((
                        error_name::AUTHORIZATION,
                        "service gw cannot be called through the gateway",
                    )),
                ),
            ),
            (
                subscribe("secret"),
                true,
                top_level_error(
                    error_name::VALIDATION,
                    "topic pattern `secret` is not open to subscription",
                ),
            ),
            (
                subscribe("news.*"),
                true,
                json!({"type": "subscribed", "payload": {"topics": ["news.*"]}}),
            ),
            (refresh("bob"), true, top_level_error(error_name::AUTHORIZATION, "unauthorized")),
            (refresh("garbage"), true, top_level_error(error_name::AUTHORIZATION, "unauthorized")),
            (
                refresh("alice-later"),
                true,
                json!({"type": "refreshed", "payload": {"expires_at": 4_000_000_000u64}}),
            ),
            (json!({"type": "nonsense"}), false, Value::Null),
        ];
        for (i, (frame, accepted, expected)) in cases.into_iter().enumerate() {
            assert_eq!(c.frame(&sid, frame.clone()), accepted, "{frame}");
            let got = client.frames().pop().expect("answered");
            assert_eq!(client.frames().len(), i + 1, "one answer to {frame}");
            if expected.is_null() {
                assert_eq!(got["error"], error_name::VALIDATION, "{frame}: {got}");
            } else {
                assert_eq!(got, expected, "{frame}");
            }
        }
    }

    #[tokio::test]
    async fn an_expired_token_serves_nothing_but_a_refresh() {
        let c = core(mesh());
        let (sid, client) = c.open_as(Identity { expires_at: Some(1), ..identity("alice") });
        assert!(!c.request(&sid, "svc", "m", "t1"));
        assert_eq!(
            client.frames(),
            vec![top_level_error(
                error_name::AUTHORIZATION,
                "token expired; send `refresh` with a new token"
            )]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_routing_task_sweeps_expired_tokens_with_4003() {
        let mut c = core(mesh());
        let (_, expired) = c.open_as(Identity { expires_at: Some(1), ..identity("alice") });
        let (_, fresh) = c.open("bob");
        let routing = c.run(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        // Swept at once and again a second later: the session stays registered until its
        // connection task ends, and a close is idempotent.
        let closes = expired.closes();
        assert!(!closes.is_empty());
        assert!(closes.iter().all(|c| *c == (4003, "token expired".to_owned())), "{closes:?}");
        assert!(fresh.closes().is_empty());
        c.shutdown.cancel();
        routing.await.expect("routing task");
        assert_eq!(fresh.closes(), vec![(1001, "gateway shutting down".to_owned())]);
    }

    #[tokio::test]
    async fn mesh_inbound_is_routed_by_the_routing_task() {
        let mut c = core(mesh());
        let (_, alice) = c.open("alice");
        let (_, alice2) = c.open("alice");
        let (bob_sid, bob) = c.open("bob");
        assert!(c.frame(&bob_sid, json!({"type": "subscribe", "payload": {"topics": ["news.#"]}})));
        let routing = c.run(Duration::from_secs(1));
        let event = |topic: &str, event: Value| json!({"type": "event", "payload": {"topic": topic, "event": event}});

        let (tx, rx) = oneshot::channel();
        let op = GatewayControl::PushToUsers {
            user_ids: vec![UserId::new("alice")],
            topic: "t".into(),
            event: json!(1),
        };
        c.inbound.send(MeshInbound::Control { op, reply: Some(tx) }).await.expect("sent");
        assert_eq!(rx.await.expect("outcome").sessions, 2);
        assert_eq!(
            (alice.frames(), alice2.frames()),
            (vec![event("t", json!(1))], vec![event("t", json!(1))])
        );

        let news = MeshEvent {
            topic: "news.sport".into(),
            event: json!("goal"),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        c.inbound.send(MeshInbound::Event(news)).await.expect("sent");
        let (tx, rx) = oneshot::channel();
        let op = GatewayControl::DisconnectUsers {
            user_ids: vec![UserId::new("alice")],
            reason: "bye".into(),
        };
        c.inbound.send(MeshInbound::Control { op, reply: Some(tx) }).await.expect("sent");
        assert_eq!(rx.await.expect("outcome").sessions, 2);
        assert_eq!(alice.closes(), vec![(4001, "bye".to_owned())]);
        assert_eq!(bob.frames()[1..], [event("news.sport", json!("goal"))]);

        let (tx, rx) = oneshot::channel();
        c.inbound.send(MeshInbound::Stats { reply: tx }).await.expect("sent");
        let stats = rx.await.expect("stats");
        // Only mesh events count as delivered events; pushes answer with their own count.
        assert_eq!((stats.sessions, stats.users, stats.events_delivered), (3, 2, 1));

        c.shutdown.cancel();
        routing.await.expect("routing task");
    }
}
