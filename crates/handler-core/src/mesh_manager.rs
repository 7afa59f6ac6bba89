//! `ServiceMeshManager`: turns client calls into mesh calls, bounds and tracks the pending
//! ones per session, and runs each in a tracked task that answers its session itself,
//! through the `SessionHandle` given with the call (so the slow-client policy applies
//! there too). A closed session's pending calls are cancelled; their late responses are
//! dropped by the mesh adapter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use nuropb_wire::JsonObject;
use nuropb_wire::client::{
    ClientCall, Encoding, ServerFrame, ServerMessage, estimated_object_size,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Identity;
use crate::connection::{Outbound, SharedFrame};
use crate::error::CoreError;
use crate::ids::{SessionId, TraceId};
use crate::mesh::{MeshCall, MeshError, ServiceMesh};
use crate::metrics::{CallOutcome, CoreMetrics};
use crate::session_registry::SessionHandle;

/// Bounds and deadlines for mesh calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshManagerConfig {
    /// How long a request may wait for its response (default 30 s). Services never answer
    /// requests that expired in their queue, so every request needs this deadline.
    pub request_timeout: Duration,
    /// Most requests and commands one session may have in flight (default 64).
    pub max_in_flight_per_session: usize,
    /// Most requests and commands in flight across the gateway (default 10 000).
    pub max_in_flight_total: usize,
    /// Most decoded bytes (`nuropb_wire::client::estimated_size` of the calls' `params`) one
    /// session's calls in flight may hold (default 64 MiB). Never below the client limit
    /// `max_decoded_bytes`, so a lone call always fits.
    pub max_in_flight_bytes_per_session: usize,
    /// Most decoded bytes all calls in flight may hold together (default 1 GiB).
    pub max_in_flight_bytes_total: usize,
    /// Services clients may never call: the gateway's own NuroPb service name (its methods
    /// push to and disconnect users, for mesh peers only). Default: none.
    pub reserved_services: Vec<String>,
    /// What clients may call, as `service.method` patterns where either side may be `*`
    /// (`orders.*`, `*.echo`, `billing.invoice`). Empty (the default): every method of
    /// every service but the reserved ones.
    pub callable: Vec<CallPattern>,
    /// Whether clients may call `nuropb_describe` (a service's description: its methods,
    /// their parameters, its public key). Default: yes, as nuropb-gw allowed; when `false`
    /// it is refused for every service, whatever `callable` says.
    pub client_describe: bool,
}

/// One entry of [`MeshManagerConfig::callable`]: `service.method`, either side `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPattern {
    service: Option<String>,
    method: Option<String>,
}

impl CallPattern {
    /// Parses `service.method` (the first `.` separates them; `*` is any). Refuses an entry
    /// without a `.` or with an empty side, naming it.
    pub fn parse(entry: &str) -> Result<CallPattern, String> {
        let (service, method) = entry
            .split_once('.')
            .filter(|(s, m)| !s.is_empty() && !m.is_empty())
            .ok_or_else(|| format!("{entry:?} is not `service.method` (either may be `*`)"))?;
        let side = |s: &str| (s != "*").then(|| s.to_owned());
        Ok(CallPattern { service: side(service), method: side(method) })
    }

    fn matches(&self, service: &str, method: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.method.as_deref().is_none_or(|m| m == method)
    }
}

impl Default for MeshManagerConfig {
    fn default() -> Self {
        MeshManagerConfig {
            request_timeout: Duration::from_secs(30),
            max_in_flight_per_session: 64,
            max_in_flight_total: 10_000,
            max_in_flight_bytes_per_session: 64 << 20,
            max_in_flight_bytes_total: 1 << 30,
            reserved_services: Vec::new(),
            callable: Vec::new(),
            client_describe: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum CallKind {
    Request,
    Command,
}

struct PendingSession {
    in_flight: usize,
    // Invariant: the sum of the `bytes` of this session's live `SlotGuard`s.
    bytes: usize,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Pending {
    // Invariant: `total` is the sum of `in_flight` over `sessions`; entries with zero in
    // flight are removed. Keyed by generated session ids: foldhash, as the registry.
    sessions: HashMap<SessionId, PendingSession, foldhash::fast::RandomState>,
    total: usize,
    // Invariant: the sum of `bytes` over `sessions`.
    total_bytes: usize,
}

/// What clients may call: `MeshManagerConfig::callable` and `client_describe` as in force.
#[derive(Debug)]
struct CallRules {
    callable: Vec<CallPattern>,
    client_describe: bool,
}

/// See the module docs.
pub(crate) struct ServiceMeshManager {
    mesh: Arc<dyn ServiceMesh>,
    // `config.callable` and `config.client_describe` are unused: `rules` is in force.
    config: MeshManagerConfig,
    // Replaced by `set_call_rules` (a configuration reload); read once per call.
    rules: RwLock<Arc<CallRules>>,
    pending: Arc<Mutex<Pending>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    // Fired at the drain deadline: calls still pending end with an error response.
    abort: CancellationToken,
    counters: Arc<Counters>,
    metrics: CoreMetrics,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    commands: AtomicU64,
    timeouts: AtomicU64,
    failures: AtomicU64,
}

/// Releases one in-flight slot (and its bytes) when the call's task ends, however it ends.
struct SlotGuard {
    pending: Arc<Mutex<Pending>>,
    session_id: SessionId,
    bytes: usize,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut p = lock(&self.pending);
        p.total = p.total.saturating_sub(1);
        p.total_bytes = p.total_bytes.saturating_sub(self.bytes);
        if let Some(s) = p.sessions.get_mut(&self.session_id) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(self.bytes);
            if s.in_flight == 0 {
                p.sessions.remove(&self.session_id);
            }
        }
    }
}

/// How a call's outcome is sent: in the encoding of the frame that made the call, with
/// that frame's top-level `id` (none when it had none).
#[derive(Debug, Clone)]
pub(crate) struct ReplyTo {
    pub(crate) id: Option<String>,
    pub(crate) encoding: Encoding,
}

impl From<Encoding> for ReplyTo {
    /// No `id`: the frame had none.
    fn from(encoding: Encoding) -> Self {
        ReplyTo { id: None, encoding }
    }
}

fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // The pending counts are plain integers; a poisoned lock still holds usable numbers.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServiceMeshManager {
    /// `tracker` tracks the per-call tasks so shutdown can drain them.
    pub(crate) fn new(
        mesh: Arc<dyn ServiceMesh>,
        config: MeshManagerConfig,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        ServiceMeshManager {
            mesh,
            rules: RwLock::new(Arc::new(CallRules {
                callable: config.callable.clone(),
                client_describe: config.client_describe,
            })),
            config,
            pending: Arc::new(Mutex::new(Pending::default())),
            tracker,
            shutdown,
            abort: CancellationToken::new(),
            counters: Arc::new(Counters::default()),
            metrics: CoreMetrics::default(),
        }
    }

    /// Replaces what clients may call, for every call submitted from now on.
    pub(crate) fn set_call_rules(&self, callable: Vec<CallPattern>, client_describe: bool) {
        let rules = Arc::new(CallRules { callable, client_describe });
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// Records call outcomes into `metrics` (by default, into metrics registered nowhere).
    pub(crate) fn with_metrics(mut self, metrics: CoreMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub(crate) fn mesh(&self) -> &Arc<dyn ServiceMesh> {
        &self.mesh
    }

    /// Calls in flight across the gateway.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.pending).total
    }

    /// Decoded bytes of the calls in flight across the gateway.
    #[cfg(test)]
    pub(crate) fn in_flight_bytes(&self) -> usize {
        lock(&self.pending).total_bytes
    }

    /// Calls in flight for one session.
    pub(crate) fn in_flight_for(&self, session_id: &SessionId) -> usize {
        lock(&self.pending).sessions.get(session_id).map_or(0, |s| s.in_flight)
    }

    pub(crate) fn requests_total(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn timeouts_total(&self) -> u64 {
        self.counters.timeouts.load(Ordering::Relaxed)
    }

    /// Takes an in-flight slot holding `bytes` for the session, or says why not.
    fn acquire(
        &self,
        session_id: &SessionId,
        bytes: usize,
    ) -> Result<(SlotGuard, CancellationToken), CoreError> {
        if self.shutdown.is_cancelled() {
            return Err(CoreError::ShuttingDown);
        }
        let mut p = lock(&self.pending);
        if p.total >= self.config.max_in_flight_total {
            return Err(CoreError::GatewayLimit(self.config.max_in_flight_total));
        }
        if p.total_bytes.saturating_add(bytes) > self.config.max_in_flight_bytes_total {
            return Err(CoreError::GatewayBytesLimit(self.config.max_in_flight_bytes_total));
        }
        let entry = p.sessions.entry(session_id.clone()).or_insert_with(|| PendingSession {
            in_flight: 0,
            bytes: 0,
            cancel: CancellationToken::new(),
        });
        if entry.in_flight >= self.config.max_in_flight_per_session {
            return Err(CoreError::SessionLimit(self.config.max_in_flight_per_session));
        }
        if entry.bytes.saturating_add(bytes) > self.config.max_in_flight_bytes_per_session {
            let limit = self.config.max_in_flight_bytes_per_session;
            // A refused first call must not leave an empty entry behind (see the invariant).
            if entry.in_flight == 0 {
                p.sessions.remove(session_id);
            }
            return Err(CoreError::SessionBytesLimit(limit));
        }
        entry.in_flight += 1;
        entry.bytes += bytes;
        let cancel = entry.cancel.clone();
        p.total += 1;
        p.total_bytes += bytes;
        Ok((
            SlotGuard { pending: Arc::clone(&self.pending), session_id: session_id.clone(), bytes },
            cancel,
        ))
    }

    /// Builds the mesh context. Clients never set it: only the gateway's identity fields.
    pub(crate) fn context_for(identity: &Identity, trace_id: &TraceId) -> JsonObject {
        let mut ctx = JsonObject::new();
        // Plain copies, not `format!`/`to_string` through a formatter: this runs per call.
        let mut bearer = String::with_capacity("Bearer ".len() + identity.token.len());
        bearer.push_str("Bearer ");
        bearer.push_str(&identity.token);
        ctx.insert("user_id".into(), Value::String(identity.user_id.as_str().to_owned()));
        ctx.insert("Authorization".into(), Value::String(bearer));
        ctx.insert("trace_id".into(), Value::String(trace_id.as_str().to_owned()));
        ctx
    }

    /// The mesh call and the trace id its answer carries to the client. The NuroPb
    /// `trace_id` is the call's W3C `traceparent` when it has one (docs/PROTOCOL.md), else
    /// the client's trace id; the answer always carries the client's (or a generated one,
    /// when the client sent neither).
    fn mesh_call(identity: &Identity, call: ClientCall) -> (MeshCall, TraceId) {
        let client = call.trace_id.map(TraceId::new);
        let mesh = call.traceparent.map(TraceId::new).or_else(|| client.clone());
        let mesh = mesh.unwrap_or_else(TraceId::generate);
        let reply = client.unwrap_or_else(|| mesh.clone());
        let call = MeshCall {
            context: Self::context_for(identity, &mesh),
            service: call.service,
            method: call.method,
            params: call.params,
            trace_id: mesh,
        };
        (call, reply)
    }

    /// Submits a request. Its outcome (response, service error, timeout, mesh failure) is
    /// sent to `session` later as one `response` frame. Returns the trace id used.
    pub(crate) fn request(
        &self,
        session: &SessionHandle,
        identity: &Identity,
        call: ClientCall,
        reply: ReplyTo,
    ) -> Result<TraceId, CoreError> {
        self.submit(session, identity, call, reply, CallKind::Request)
    }

    /// Publishes a command. Sends `accepted` once published, or an error `response`.
    pub(crate) fn command(
        &self,
        session: &SessionHandle,
        identity: &Identity,
        call: ClientCall,
        reply: ReplyTo,
    ) -> Result<TraceId, CoreError> {
        self.submit(session, identity, call, reply, CallKind::Command)
    }

    fn submit(
        &self,
        session: &SessionHandle,
        identity: &Identity,
        call: ClientCall,
        reply: ReplyTo,
        kind: CallKind,
    ) -> Result<TraceId, CoreError> {
        let started = tokio::time::Instant::now();
        // A refused call's outcome is recorded here, where its names are still at hand (no
        // copy on the accepted path); the accepted call's task records its own.
        let refused = |service: &str, method: &str| {
            let command = matches!(kind, CallKind::Command);
            self.metrics.call(service, method, command, CallOutcome::Refused, 0.0);
        };
        if self.config.reserved_services.contains(&call.service) {
            refused(&call.service, &call.method);
            return Err(CoreError::Reserved(call.service));
        }
        let describe = call.method == nuropb_wire::mesh::DESCRIBE_METHOD;
        // Poisoning cannot leave a half-written `Arc`: ignored.
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(|e| e.into_inner()));
        let allowed = if describe && !rules.client_describe {
            false
        } else {
            rules.callable.is_empty()
                || rules.callable.iter().any(|p| p.matches(&call.service, &call.method))
        };
        if !allowed {
            refused(&call.service, &call.method);
            return Err(CoreError::NotCallable { service: call.service, method: call.method });
        }
        // The call's params stay decoded until the mesh adapter encodes them; they are what a
        // call holds in flight. Names and the context are bounded by small fixed limits.
        let bytes = estimated_object_size(&call.params);
        let (slot, cancel) = match self.acquire(session.session_id(), bytes) {
            Ok(acquired) => acquired,
            Err(e) => {
                refused(&call.service, &call.method);
                return Err(e);
            }
        };
        let (call, trace_id) = Self::mesh_call(identity, call);
        match kind {
            CallKind::Request => self.counters.requests.fetch_add(1, Ordering::Relaxed),
            CallKind::Command => self.counters.commands.fetch_add(1, Ordering::Relaxed),
        };
        let mesh = Arc::clone(&self.mesh);
        let counters = Arc::clone(&self.counters);
        let abort = self.abort.clone();
        let timeout = self.config.request_timeout;
        let session = session.clone();
        let metrics = self.metrics.clone();
        let reply_trace = trace_id.clone();
        let names = metrics.names(&call.service, &call.method);
        let command = matches!(kind, CallKind::Command);
        let record = move |outcome: CallOutcome| {
            let seconds = started.elapsed().as_secs_f64();
            metrics.record(names, command, outcome, seconds);
        };
        let span = tracing::debug_span!(
            "mesh_call",
            kind = ?kind,
            session.id = %session.session_id(),
            trace_id = %call.trace_id,
            service = %call.service,
            method = %call.method,
        );
        self.tracker.spawn(
            async move {
                let _slot = slot;
                let reply_trace = Some(reply_trace.into_string());
                // The adapter applies `timeout` to requests itself; the outer deadline only
                // guards against an adapter that fails to.
                let work = async {
                    match kind {
                        CallKind::Request => tokio::time::timeout(
                            timeout + Duration::from_millis(250),
                            mesh.request(call, timeout),
                        )
                        .await
                        .unwrap_or(Err(MeshError::Timeout(timeout)))
                        .map(Some),
                        CallKind::Command => tokio::time::timeout(timeout, mesh.command(call))
                            .await
                            .unwrap_or(Err(MeshError::Timeout(timeout)))
                            .map(|()| None),
                    }
                };
                let outcome = tokio::select! {
                    // Cancel-safe: dropping the mesh future forgets the pending call (a
                    // command not yet published is simply not published).
                    _ = cancel.cancelled() => {
                        tracing::debug!("session closed; call abandoned");
                        record(CallOutcome::Abandoned);
                        return;
                    }
                    // The drain deadline passed: the client still gets an answer.
                    _ = abort.cancelled() => Err(MeshError::Unavailable("gateway shutting down".into())),
                    r = work => r,
                };
                record(match &outcome {
                    Ok(Some(resp)) if resp.error.is_some() => CallOutcome::ServiceError,
                    Ok(_) => CallOutcome::Ok,
                    Err(MeshError::Timeout(_)) => CallOutcome::Timeout,
                    Err(MeshError::NotDelivered { .. }) => CallOutcome::NotDelivered,
                    Err(MeshError::Unavailable(_)) => CallOutcome::Unavailable,
                    Err(MeshError::Rejected(_) | MeshError::Encryption(_)) => CallOutcome::Rejected,
                    Err(MeshError::ResponseTooLarge { .. }) => CallOutcome::ResponseTooLarge,
                });
                let message = match outcome {
                    Ok(Some(resp)) => ServerMessage::Response {
                        trace_id: reply_trace,
                        result: resp.result,
                        error: resp.error,
                    },
                    Ok(None) => ServerMessage::Accepted { trace_id: reply_trace },
                    Err(e) => {
                        let counter = match e {
                            MeshError::Timeout(_) => &counters.timeouts,
                            _ => &counters.failures,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "call failed");
                        ServerMessage::Response {
                            trace_id: reply_trace,
                            result: Value::Null,
                            error: Some(CoreError::from(e).to_error_object()),
                        }
                    }
                };
                let frame = SharedFrame::new(ServerFrame::Message(message).with_id(reply.id));
                // Straight into the session's queue (try-send, slow-client policy). Not
                // queued means the session is gone or was just closed as too slow.
                if !session.send(Outbound { frame, encoding: Some(reply.encoding) }) {
                    tracing::debug!("outcome for a closed session dropped");
                }
            }
            .instrument(span),
        );
        Ok(trace_id)
    }

    /// Ends every pending call now with a "gateway shutting down" error response (the drain
    /// deadline passed).
    pub(crate) fn abort_pending(&self) {
        self.abort.cancel();
    }

    /// Forgets a closed session: its pending calls are cancelled.
    pub(crate) fn session_closed(&self, session_id: &SessionId) {
        let p = lock(&self.pending);
        if let Some(s) = p.sessions.get(session_id) {
            s.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;

    use super::*;
    use crate::connection::{ClientConnection, CloseReason, SendError};
    use crate::ids::UserId;
    use crate::mesh::{MeshResponse, MockServiceMesh};
    use crate::session_registry::{SessionRegistry, SessionRegistryConfig};
    use tokio::sync::mpsc;

    /// A connection whose outbound queue the test reads.
    struct Queue(mpsc::Sender<Outbound>);

    impl ClientConnection for Queue {
        fn send(&self, outbound: Outbound) -> Result<(), SendError> {
            self.0.try_send(outbound).map_err(|_| SendError::Full)
        }
        fn close(&self, _: CloseReason) {}
    }

    /// Registers a session and returns its handle and what it is sent.
    fn session(registry: &SessionRegistry, id: &str) -> (SessionHandle, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(16);
        let sid = SessionId::new(id);
        registry.register(sid.clone(), identity(), Arc::new(Queue(tx))).expect("register");
        let (_, handle) = registry.session(&sid).expect("registered");
        (handle, rx)
    }

    fn registry() -> SessionRegistry {
        SessionRegistry::new(SessionRegistryConfig::default())
    }
    use nuropb_wire::ErrorObject;
    use nuropb_wire::mesh::error_name;

    fn identity() -> Identity {
        Identity {
            user_id: UserId::new("alice"),
            username: "alice@x".into(),
            token: "tok".into(),
            expires_at: None,
            token_expires_at: None,
        }
    }

    fn call(trace: Option<&str>) -> ClientCall {
        ClientCall {
            service: "svc".into(),
            method: "m".into(),
            params: JsonObject::new(),
            trace_id: trace.map(str::to_owned),
            traceparent: None,
        }
    }

    fn manager(mesh: MockServiceMesh, config: MeshManagerConfig) -> ServiceMeshManager {
        ServiceMeshManager::new(
            Arc::new(mesh),
            config,
            TaskTracker::new(),
            CancellationToken::new(),
        )
    }

    fn response_of(d: &Outbound) -> (Option<String>, Value, Option<ErrorObject>) {
        match d.frame.frame() {
            ServerFrame::Message(ServerMessage::Response { trace_id, result, error }) => {
                (trace_id.clone(), result.clone(), error.clone())
            }
            other => panic!("not a response: {other:?}"),
        }
    }

    #[tokio::test]
    async fn request_builds_context_and_routes_the_response_to_its_session() {
        let mut mesh = MockServiceMesh::new();
        mesh.expect_request().times(1).returning(|call, timeout| {
            assert_eq!(timeout, Duration::from_secs(30));
            assert_eq!(call.context["user_id"], "alice");
            assert_eq!(call.context["Authorization"], "Bearer tok");
            assert_eq!(call.context["trace_id"], "t1");
            assert_eq!(call.context.len(), 3);
            Ok(MeshResponse { result: json!(42), error: None })
        });
        let m = manager(mesh, MeshManagerConfig::default());
        let reg = registry();
        let (s1, mut rx) = session(&reg, "s1");
        let (_s2, mut other) = session(&reg, "s2");
        let trace = m.request(&s1, &identity(), call(Some("t1")), Encoding::MessagePack.into());
        assert_eq!(trace, Ok(TraceId::new("t1")));
        let d = rx.recv().await.expect("delivery");
        assert!(other.try_recv().is_err(), "only the caller's session is answered");
        assert_eq!(d.encoding, Some(Encoding::MessagePack));
        assert_eq!(response_of(&d), (Some("t1".into()), json!(42), None));
        tokio::task::yield_now().await;
        assert_eq!(m.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_traceparent_is_the_mesh_trace_id_and_the_answer_keeps_the_clients() {
        const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut mesh = MockServiceMesh::new();
        mesh.expect_request().times(2).returning(|call, _| {
            assert_eq!(call.trace_id, TraceId::new(TP));
            assert_eq!(call.context["trace_id"], TP);
            Ok(MeshResponse { result: json!(1), error: None })
        });
        let m = manager(mesh, MeshManagerConfig::default());
        let reg = registry();
        let (s, mut rx) = session(&reg, "s");
        // With a client trace id, the answer carries it.
        let with_trace = ClientCall { traceparent: Some(TP.into()), ..call(Some("t1")) };
        let trace = m.request(&s, &identity(), with_trace, Encoding::Json.into());
        assert_eq!(trace, Ok(TraceId::new("t1")));
        assert_eq!(response_of(&rx.recv().await.expect("delivery")).0.as_deref(), Some("t1"));
        // Without one, the answer carries the traceparent.
        let bare = ClientCall { traceparent: Some(TP.into()), ..call(None) };
        m.request(&s, &identity(), bare, Encoding::Json.into()).expect("submitted");
        assert_eq!(response_of(&rx.recv().await.expect("delivery")).0.as_deref(), Some(TP));
    }

    #[tokio::test(start_paused = true)]
    async fn mesh_timeout_becomes_a_timeout_response() {
        let mut mesh = MockServiceMesh::new();
        mesh.expect_request().returning(|_, _| Err(MeshError::Timeout(Duration::from_secs(1))));
        let m = manager(
            mesh,
            MeshManagerConfig { request_timeout: Duration::from_secs(1), ..Default::default() },
        );
        let reg = registry();
        let (s, mut rx) = session(&reg, "s");
        m.request(&s, &identity(), call(None), Encoding::Json.into()).expect("submitted");
        let d = rx.recv().await.expect("delivery");
        let (trace, result, error) = response_of(&d);
        assert!(trace.is_some_and(|t| t.len() == 32), "generated trace id");
        assert_eq!(result, Value::Null);
        assert_eq!(error.map(|e| e.error), Some(error_name::TIMEOUT.to_owned()));
        assert_eq!(m.timeouts_total(), 1);
    }

    /// A mesh whose requests never finish, counting how many futures were dropped.
    struct HangingMesh {
        dropped: Arc<AtomicUsize>,
    }

    struct DropCounter(Arc<AtomicUsize>);
    impl Drop for DropCounter {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[async_trait::async_trait]
    impl ServiceMesh for HangingMesh {
        async fn request(&self, _: MeshCall, _: Duration) -> Result<MeshResponse, MeshError> {
            let _guard = DropCounter(Arc::clone(&self.dropped));
            std::future::pending().await
        }
        async fn command(&self, _: MeshCall) -> Result<(), MeshError> {
            std::future::pending().await
        }
        async fn publish_event(&self, _: crate::mesh::MeshEvent) -> Result<(), MeshError> {
            Ok(())
        }
        fn is_connected(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_under_paused_time_and_session_close_drops_pending_state() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let tracker = TaskTracker::new();
        let m = ServiceMeshManager::new(
            Arc::new(HangingMesh { dropped: Arc::clone(&dropped) }),
            MeshManagerConfig { request_timeout: Duration::from_secs(5), ..Default::default() },
            tracker.clone(),
            CancellationToken::new(),
        );
        let reg = registry();
        let (sa, mut rx_a) = session(&reg, "a");
        let (sb, mut rx) = session(&reg, "b");
        let (a, b) = (SessionId::new("a"), SessionId::new("b"));
        m.request(&sa, &identity(), call(Some("a1")), Encoding::Json.into()).expect("a1");
        m.request(&sa, &identity(), call(Some("a2")), Encoding::Json.into()).expect("a2");
        m.request(&sb, &identity(), call(Some("b1")), Encoding::Json.into()).expect("b1");
        tokio::task::yield_now().await;
        assert_eq!((m.in_flight_for(&a), m.in_flight_for(&b), m.in_flight()), (2, 1, 3));

        // Closing session a cancels its calls at once: no response, nothing pending.
        m.session_closed(&a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(m.in_flight_for(&a), 0);
        assert_eq!(dropped.load(Ordering::SeqCst), 2, "the adapter's futures were dropped");

        // b's call times out after the deadline (outer guard: timeout + 250 ms).
        let d = rx.recv().await.expect("b1 delivery");
        assert_eq!(response_of(&d).2.map(|e| e.error), Some(error_name::TIMEOUT.to_owned()));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!((m.in_flight(), m.in_flight_for(&b)), (0, 0));
        assert!(rx.try_recv().is_err(), "one answer per call");
        assert!(rx_a.try_recv().is_err(), "no delivery for the closed session");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_limits_per_session_and_total() {
        let m = ServiceMeshManager::new(
            Arc::new(HangingMesh { dropped: Arc::new(AtomicUsize::new(0)) }),
            MeshManagerConfig {
                request_timeout: Duration::from_secs(5),
                max_in_flight_per_session: 2,
                max_in_flight_total: 3,
                ..Default::default()
            },
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let reg = registry();
        let ((a, _rx_a), (b, _rx_b)) = (session(&reg, "a"), session(&reg, "b"));
        let id = identity();
        assert!(m.request(&a, &id, call(None), Encoding::Json.into()).is_ok());
        assert!(m.command(&a, &id, call(None), Encoding::Json.into()).is_ok());
        assert_eq!(
            m.request(&a, &id, call(None), Encoding::Json.into()),
            Err(CoreError::SessionLimit(2))
        );
        assert!(m.request(&b, &id, call(None), Encoding::Json.into()).is_ok());
        assert_eq!(
            m.request(&b, &id, call(None), Encoding::Json.into()),
            Err(CoreError::GatewayLimit(3))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_byte_budgets_per_session_and_total() {
        let big = |n: usize| {
            let mut c = call(None);
            c.params.insert("blob".into(), Value::String("x".repeat(n)));
            c
        };
        let cost = estimated_object_size(&big(1000).params);
        let m = ServiceMeshManager::new(
            Arc::new(HangingMesh { dropped: Arc::new(AtomicUsize::new(0)) }),
            MeshManagerConfig {
                request_timeout: Duration::from_secs(5),
                max_in_flight_bytes_per_session: 2 * cost,
                max_in_flight_bytes_total: 3 * cost,
                ..Default::default()
            },
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let reg = registry();
        let ((a, _rx_a), (b, _rx_b), (c, _rx_c)) =
            (session(&reg, "a"), session(&reg, "b"), session(&reg, "c"));
        let id = identity();
        assert!(m.request(&a, &id, big(1000), Encoding::Json.into()).is_ok());
        assert!(m.command(&a, &id, big(1000), Encoding::Json.into()).is_ok());
        assert_eq!(
            m.request(&a, &id, big(1000), Encoding::Json.into()),
            Err(CoreError::SessionBytesLimit(2 * cost))
        );
        // Small calls still fit next to the big ones until the bytes run out.
        assert!(m.request(&b, &id, big(1000), Encoding::Json.into()).is_ok());
        assert_eq!(m.in_flight_bytes(), 3 * cost);
        assert_eq!(
            m.request(&c, &id, big(1000), Encoding::Json.into()),
            Err(CoreError::GatewayBytesLimit(3 * cost))
        );
        // A call too big for a session on its own leaves nothing behind.
        assert_eq!(
            m.request(&c, &id, big(3000), Encoding::Json.into())
                .map_err(|e| e.to_error_object().error),
            Err(error_name::OVERLOADED.to_owned())
        );
        assert_eq!(m.in_flight_for(&SessionId::new("c")), 0);

        // Closing a session gives its bytes back.
        m.session_closed(&SessionId::new("a"));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(m.in_flight_bytes(), cost);
        assert!(m.request(&c, &id, big(1000), Encoding::Json.into()).is_ok());
    }

    #[tokio::test]
    async fn reserved_services_are_refused_before_the_mesh() {
        let m = manager(
            MockServiceMesh::new(), // any call to it would panic: no expectations
            MeshManagerConfig { reserved_services: vec!["gw".into()], ..Default::default() },
        );
        let reg = registry();
        let (a, _rx) = session(&reg, "a");
        let mut c = call(None);
        c.service = "gw".into();
        let e = m.request(&a, &identity(), c.clone(), Encoding::Json.into());
        assert_eq!(e, Err(CoreError::Reserved("gw".into())));
        assert_eq!(
            e.unwrap_err().to_error_object().error,
            error_name::AUTHORIZATION,
            "clients see an authorization error"
        );
        assert!(m.command(&a, &identity(), c, Encoding::Json.into()).is_err());
        assert_eq!(m.in_flight(), 0);
    }

    #[test]
    fn call_patterns_parse_and_match() {
        let p = |s| CallPattern::parse(s).unwrap();
        let cases = [
            ("orders.*", "orders", "list", true),
            ("orders.*", "billing", "list", false),
            ("*.echo", "any", "echo", true),
            ("*.echo", "any", "add", false),
            ("billing.invoice", "billing", "invoice", true),
            ("billing.invoice", "billing", "refund", false),
            ("*.*", "x", "y", true),
        ];
        for (pattern, service, method, expected) in cases {
            assert_eq!(
                p(pattern).matches(service, method),
                expected,
                "{pattern} {service}.{method}"
            );
        }
        for bad in ["orders", ".x", "x.", ""] {
            assert!(CallPattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[tokio::test]
    async fn calls_outside_the_allow_list_and_refused_describes_never_reach_the_mesh() {
        let config = MeshManagerConfig {
            callable: vec![CallPattern::parse("svc.*").unwrap()],
            client_describe: false,
            ..Default::default()
        };
        let m = manager(MockServiceMesh::new(), config); // no expectations: a call panics
        let reg = registry();
        let (a, _rx) = session(&reg, "a");
        let mut other = call(None);
        other.service = "other".into();
        let e = m.request(&a, &identity(), other.clone(), Encoding::Json.into()).unwrap_err();
        assert_eq!(e.to_error_object().error, error_name::AUTHORIZATION);
        assert!(m.command(&a, &identity(), other, Encoding::Json.into()).is_err());
        let mut describe = call(None);
        describe.service = "svc".into();
        describe.method = nuropb_wire::mesh::DESCRIBE_METHOD.into();
        assert_eq!(
            m.request(&a, &identity(), describe, Encoding::Json.into()),
            Err(CoreError::NotCallable { service: "svc".into(), method: "nuropb_describe".into() })
        );
        assert_eq!(m.in_flight(), 0);
    }

    #[tokio::test]
    async fn each_refused_call_is_counted_once_as_refused() {
        use crate::metrics::{CallLabelConfig, CoreMetrics};
        let config = MeshManagerConfig {
            callable: vec![CallPattern::parse("svc.*").unwrap()],
            reserved_services: vec!["gw".into()],
            max_in_flight_per_session: 1,
            ..Default::default()
        };
        let metrics = CoreMetrics::new(CallLabelConfig {
            services: vec!["svc".into(), "gw".into(), "other".into()],
            max_methods_per_service: 4,
        });
        let mut mesh = MockServiceMesh::new();
        // The one accepted call never ends, so the second one is over the in-flight limit.
        mesh.expect_request().times(1).returning(|_, _| {
            std::thread::sleep(Duration::from_millis(1));
            Err(MeshError::Timeout(Duration::from_secs(60)))
        });
        let m = manager(mesh, config).with_metrics(metrics.clone());
        let reg = registry();
        let (a, _rx) = session(&reg, "a");
        let named = |service: &str| {
            let mut c = call(None);
            c.service = service.into();
            c
        };
        assert!(m.request(&a, &identity(), named("gw"), Encoding::Json.into()).is_err());
        assert!(m.request(&a, &identity(), named("other"), Encoding::Json.into()).is_err());
        assert!(m.request(&a, &identity(), named("svc"), Encoding::Json.into()).is_ok());
        assert!(m.request(&a, &identity(), named("svc"), Encoding::Json.into()).is_err());
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let refused = |s: &str| {
            format!(
                "nuropb_gateway_call_duration_seconds_count{{service=\"{s}\",method=\"m\",kind=\"request\",outcome=\"refused\"}} 1\n"
            )
        };
        for service in ["gw", "other", "svc"] {
            assert!(text.contains(&refused(service)), "{service} refused once:\n{text}");
        }
        let refusals = text
            .lines()
            .filter(|l| l.starts_with("nuropb_gateway_call_duration_seconds_count{"))
            .filter(|l| l.contains("outcome=\"refused\""))
            .count();
        assert_eq!(refusals, 3, "{text}");
    }

    #[tokio::test]
    async fn replaced_call_rules_apply_to_the_next_call() {
        let config = MeshManagerConfig {
            callable: vec![CallPattern::parse("svc.*").unwrap()],
            ..Default::default()
        };
        let m = manager(MockServiceMesh::new(), config); // no expectations: a call panics
        let reg = registry();
        let (a, _rx) = session(&reg, "a");
        let mut svc = call(None);
        svc.service = "svc".into();
        m.set_call_rules(vec![CallPattern::parse("other.*").unwrap()], true);
        assert_eq!(
            m.request(&a, &identity(), svc.clone(), Encoding::Json.into()),
            Err(CoreError::NotCallable { service: "svc".into(), method: svc.method.clone() })
        );
        let mut describe = svc;
        describe.method = nuropb_wire::mesh::DESCRIBE_METHOD.into();
        m.set_call_rules(Vec::new(), false);
        assert!(matches!(
            m.request(&a, &identity(), describe, Encoding::Json.into()),
            Err(CoreError::NotCallable { .. })
        ));
    }

    #[tokio::test]
    async fn shutdown_refuses_new_calls() {
        let shutdown = CancellationToken::new();
        let m = ServiceMeshManager::new(
            Arc::new(MockServiceMesh::new()),
            MeshManagerConfig::default(),
            TaskTracker::new(),
            shutdown.clone(),
        );
        let reg = registry();
        let (a, _rx) = session(&reg, "a");
        shutdown.cancel();
        assert_eq!(
            m.request(&a, &identity(), call(None), Encoding::Json.into()),
            Err(CoreError::ShuttingDown)
        );
    }
}
