//! The coordinator: owns the `HandlerManager` and the `ServiceMeshManager` and is the only
//! place they meet. Transports talk to it through a cloneable [`CoordinatorHandle`]; a call
//! is given its session's handle when submitted and answers it from its own task; the mesh
//! talks to the core through the inbound channel given at construction, which one task
//! ([`Coordinator::run`]) routes to sessions, besides sweeping expired tokens and draining.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nuropb_wire::ErrorObject;
use nuropb_wire::client::{
    ClientLimits, ClientMessage, Encoding, ErrorFrame, ServerFrame, ServerMessage,
    decode_client_message,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::error::CoreError;
use crate::handler::{Handler, Outbound, SharedFrame};
use crate::handler_manager::{HandlerManager, HandlerManagerConfig, SessionHandle};
use crate::ids::SessionId;
use crate::mesh::{
    ControlOutcome, GatewayControl, GatewayStats, MeshEvent, MeshInbound, ServiceMesh,
};
use crate::mesh_manager::{MeshManagerConfig, ServiceMeshManager};
use crate::topic::topic_matches;

/// Everything the core is configured with.
#[derive(Debug, Clone, Default)]
pub struct CoreConfig {
    pub handlers: HandlerManagerConfig,
    pub mesh: MeshManagerConfig,
    pub client_limits: ClientLimits,
    /// Topic patterns whose untargeted events go to every session (default none).
    pub broadcast_topics: Vec<String>,
}

struct Shared {
    handlers: HandlerManager,
    mesh: ServiceMeshManager,
    authenticator: Arc<dyn Authenticator>,
    limits: ClientLimits,
    broadcast_topics: Vec<String>,
    shutdown: CancellationToken,
    events_delivered: std::sync::atomic::AtomicU64,
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
            handlers: HandlerManager::new(config.handlers),
            mesh: ServiceMeshManager::new(mesh, config.mesh, tracker.clone(), shutdown.clone()),
            authenticator,
            limits: config.client_limits,
            broadcast_topics: config.broadcast_topics,
            shutdown,
            events_delivered: Default::default(),
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
    /// already stopped (the shutdown token refuses new sessions and calls), the pending
    /// calls get `drain` to finish, those left are aborted (answered with an error), and
    /// every session is closed with 1001.
    pub async fn run(mut self, drain: Duration) {
        let shutdown = self.shared.shutdown.clone();
        self.route_until(shutdown.cancelled()).await;

        // Mesh traffic is still routed while draining: a `disconnect_user` must not wait
        // for the drain. Each call task answers its session itself before it ends, so an
        // empty tracker means every pending call has been answered.
        self.tracker.close();
        let tracker = self.tracker.clone();
        if self.route_until(tokio::time::timeout(drain, tracker.wait())).await.is_err() {
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
        self.shared.handlers.close_all(CoreError::ShuttingDown.closing());
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
                    let closed = self.shared.handlers.close_expired(unix_now());
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
            Some(users) => self.handlers.send_to_users(users, frame),
            None if self.broadcast_topics.iter().any(|p| topic_matches(p, &e.topic)) => {
                self.handlers.send_to_all(frame)
            }
            None => self.handlers.send_to_subscribers(&e.topic, frame),
        };
        self.events_delivered.fetch_add(reached as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(topic = %e.topic, sessions = reached, "mesh event delivered");
    }

    fn on_control(&self, op: GatewayControl) -> ControlOutcome {
        let sessions = match op {
            GatewayControl::PushToUsers { user_ids, topic, event } => self.handlers.send_to_users(
                &user_ids,
                SharedFrame::new(ServerFrame::Message(ServerMessage::Event { topic, event })),
            ),
            GatewayControl::PushToAll { topic, event } => self.handlers.send_to_all(
                SharedFrame::new(ServerFrame::Message(ServerMessage::Event { topic, event })),
            ),
            GatewayControl::DisconnectUsers { user_ids, reason } => {
                self.handlers.close_users(&user_ids, CoreError::Kicked(reason).closing())
            }
        };
        ControlOutcome { sessions }
    }

    fn stats(&self) -> GatewayStats {
        GatewayStats {
            sessions: self.handlers.session_count(),
            sessions_high_water: self.handlers.high_water(),
            users: self.handlers.user_count(),
            requests_in_flight: self.mesh.in_flight(),
            requests_total: self.mesh.requests_total(),
            requests_timed_out: self.mesh.timeouts_total(),
            events_delivered: self.events_delivered.load(std::sync::atomic::Ordering::Relaxed),
            frames_dropped: self.handlers.frames_dropped(),
            mesh_connected: self.mesh.mesh().is_connected(),
        }
    }
}

impl CoordinatorHandle {
    /// Checks a bearer token (already stripped of its `Bearer` prefix).
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.shared.authenticator.authenticate(token)
    }

    /// Registers a new session and queues its hello frame.
    pub fn open_session(
        &self,
        identity: Identity,
        handler: Arc<dyn Handler>,
    ) -> Result<SessionId, CoreError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(CoreError::ShuttingDown);
        }
        let session_id = SessionId::generate();
        let hello = ServerFrame::Message(ServerMessage::Event {
            topic: "hello".to_owned(),
            event: json!({
                "session_id": session_id.as_str(),
                "user_id": identity.user_id.as_str(),
                "username": identity.username,
            }),
        });
        let user_id = identity.user_id.clone();
        // The hello is queued before the session is visible to fan-out, so it is always the
        // first frame the client gets.
        let hello = Outbound { frame: SharedFrame::new(hello), encoding: Some(Encoding::Json) };
        if handler.send(hello).is_err() {
            return Err(CoreError::ShuttingDown);
        }
        // Registration itself refuses sessions once shutdown closed them all, so a session
        // racing with shutdown either gets its 1001 or is never opened.
        if self.shared.handlers.register(session_id.clone(), identity, handler).is_err() {
            return Err(CoreError::ShuttingDown);
        }
        tracing::info!(session.id = %session_id, user.id = %user_id, "session opened");
        Ok(session_id)
    }

    /// Forgets a session whose connection ended; its pending calls are cancelled.
    pub fn close_session(&self, session_id: &SessionId) {
        self.shared.mesh.session_closed(session_id);
        if let Some(identity) = self.shared.handlers.unregister(session_id) {
            tracing::info!(session.id = %session_id, user.id = %identity.user_id, "session closed");
        }
    }

    /// Handles one client frame. Never blocks: calls are spawned, replies queued.
    /// Returns `false` if the frame was rejected as bad input (for the transport's
    /// protocol-error budget).
    pub fn on_frame(&self, session_id: &SessionId, bytes: &[u8], encoding: Encoding) -> bool {
        let s = &self.shared;
        let decoded = decode_client_message(bytes, encoding, &s.limits);
        // The session's handle is taken once: every answer to this frame, now or from the
        // call's task later, goes through it.
        let Some((identity, session)) = s.handlers.session(session_id) else {
            return decoded.is_ok();
        };
        let message = match decoded {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(session.id = %session_id, error = %e, "bad client frame");
                refuse(&session, e.trace_id.clone(), e.into(), encoding);
                return false;
            }
        };
        // Between the token's expiry and the next sweep (at most a second), nothing but a
        // refresh is served with it.
        let expired = identity.expires_at.is_some_and(|e| e <= unix_now());
        if expired && !matches!(message, ClientMessage::Refresh { .. }) {
            refuse(&session, None, CoreError::TokenExpired, encoding);
            return false;
        }
        match message {
            ClientMessage::Request(mut call) => {
                // A trace id is generated here when absent, so even a refusal can name it.
                let trace = Some(call.trace_id.get_or_insert_with(new_trace).clone());
                if let Err(e) = s.mesh.request(&session, &identity, call, encoding) {
                    refuse(&session, trace, e, encoding);
                }
            }
            ClientMessage::Command(mut call) => {
                let trace = Some(call.trace_id.get_or_insert_with(new_trace).clone());
                if let Err(e) = s.mesh.command(&session, &identity, call, encoding) {
                    refuse(&session, trace, e, encoding);
                }
            }
            ClientMessage::Subscribe { topics } => {
                let result = s.handlers.subscribe(session_id, &topics);
                subscribed(&session, result, encoding);
            }
            ClientMessage::Unsubscribe { topics } => {
                let result = s.handlers.unsubscribe(session_id, &topics);
                subscribed(&session, result, encoding);
            }
            ClientMessage::Refresh { token } => {
                let refreshed = s
                    .authenticator
                    .authenticate(&token)
                    .map_err(CoreError::RefreshRefused)
                    .and_then(|new| {
                        let expires_at = new.expires_at;
                        s.handlers.refresh_identity(session_id, new).map(|()| expires_at)
                    });
                match refreshed {
                    Ok(expires_at) => {
                        let frame = ServerFrame::Message(ServerMessage::Refreshed { expires_at });
                        reply(&session, frame, encoding);
                    }
                    Err(e) => refuse(&session, None, e, encoding),
                }
            }
            ClientMessage::Ping => {
                reply(&session, ServerFrame::Message(ServerMessage::Pong {}), encoding);
            }
        }
        true
    }

    /// Live stats of this instance.
    pub fn stats(&self) -> GatewayStats {
        self.shared.stats()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }
}

/// Queues a frame for one session, in the given encoding; `false` if it is gone (or was
/// just closed as too slow).
fn reply(session: &SessionHandle, frame: ServerFrame, encoding: Encoding) -> bool {
    session.send(Outbound { frame: SharedFrame::new(frame), encoding: Some(encoding) })
}

/// Answers a refused frame: a `response` with the error when the client can match it to a
/// request (`trace_id`), the top-level error frame otherwise.
fn refuse(session: &SessionHandle, trace_id: Option<String>, e: CoreError, encoding: Encoding) {
    reply(session, error_frame(trace_id, e.to_error_object()), encoding);
}

/// The answer to subscribe/unsubscribe: the session's patterns now, or why not.
fn subscribed(session: &SessionHandle, result: Result<Vec<String>, CoreError>, encoding: Encoding) {
    match result {
        Ok(topics) => {
            reply(session, ServerFrame::Message(ServerMessage::Subscribed { topics }), encoding);
        }
        Err(e) => refuse(session, None, e, encoding),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
        }),
    }
}
