//! One task per connection: upgrade, register with the core, then `select!` over the socket,
//! the bounded outbound queue, the close signal, the ping timer and shutdown. The task owns
//! the socket; the core holds only a [`WsHandle`]. Connections over the limit get a task
//! too, but only to be told 503 within a short, separately bounded handshake. A connection
//! that upgraded without credentials authenticates with its first frame (`first_frame`)
//! before its session opens.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use handler_core::auth::Identity;
use handler_core::{
    ClientConnection, CloseCode, CloseReason, CoordinatorHandle, MeshError, Outbound, SendError,
    SessionId, SharedFrame,
};
use nuropb_wire::client::{
    ClientFrame, ClientMessage, Encoding, ErrorFrame, ServerFrame, ServerMessage,
    decode_client_frame,
};
use nuropb_wire::mesh::error_name;

use crate::config::WsConfig;
use crate::handshake::Prefixed;
use crate::read_error::close_after_read_error;
use crate::stats::WsStatsHandle;
use crate::token_bucket::TokenBucket;
use crate::upgrade::{Credentials, PROTOCOL, check_upgrade, offers_protocol};

/// Why a connection task exists. The permit is never read: the slot is freed when it drops,
/// at the end of the task.
pub(crate) enum Admission {
    /// A connection slot (`max_connections`): a session if the upgrade checks pass, with
    /// the upgrade done by `deadline` (the accept plus `handshake_timeout`: reading the
    /// head and answering it share one budget).
    Session { _permit: OwnedSemaphorePermit, deadline: Instant },
    /// Over `max_connections`, a refusal slot (`max_refusals_in_flight`): the client is told
    /// 503 by `deadline` (the accept plus `refusal_handshake_timeout`).
    Refusal { _permit: OwnedSemaphorePermit, deadline: Instant },
}

/// The core's handle on one connection: a queue bounded in frames and in bytes, a close
/// signal. Dropping it (the session left the registry and no call holds it any more) ends
/// the session once what it queued is written.
struct WsHandle {
    shared: Arc<Shared>,
    // Where queue depths are observed.
    stats: WsStatsHandle,
}

impl Drop for WsHandle {
    fn drop(&mut self) {
        self.shared.queue.handle_dropped();
    }
}

/// What the handle and the connection task share.
struct Shared {
    close: CloseSignal,
    budget: QueueBudget,
    queue: OutboundQueue,
}

/// One frame in a connection's outbound queue, with the bytes it was charged.
struct Queued {
    out: Outbound,
    bytes: usize,
}

/// Frames' room an outbound queue keeps once drained: room for a burst's first frames, so a
/// steady trickle of responses does not allocate on every frame. Larger room, grown by a
/// burst, is given back as soon as the queue is empty.
const KEPT_QUEUE_SLOTS: usize = 8;

/// One connection's outbound queue, bounded in frames (`outbound_queue`; the byte bound is
/// [`QueueBudget`]). A `VecDeque` under a lock held for one push or pop, never across
/// `.await`, rather than tokio's bounded mpsc: that allocates its channel state and a first
/// block of 32 slots up front (~1.3 KiB), which every idle connection would hold. This queue
/// holds nothing until a frame is queued and gives back what a burst grew once it is drained.
struct OutboundQueue {
    state: Mutex<QueueState>,
    // Woken when a frame is queued and when the handle is dropped. One waiter: the
    // connection task.
    ready: Notify,
    max_frames: usize,
}

#[derive(Default)]
struct QueueState {
    frames: VecDeque<Queued>,
    // Set when the `WsHandle` is dropped: nothing more is queued, and once `frames` is
    // drained the session is over.
    handle_dropped: bool,
    // Set when the connection task stopped taking frames: further frames are refused as
    // `Closed`, as a send to a gone session is.
    receiver_dropped: bool,
}

impl OutboundQueue {
    fn new(max_frames: usize) -> Self {
        OutboundQueue { state: Mutex::default(), ready: Notify::new(), max_frames }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // Every update leaves the state whole; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame; the queue's depth with it, or why it was refused (the frame is
    /// dropped).
    fn push(&self, queued: Queued) -> Result<usize, SendError> {
        let depth = {
            let mut state = self.lock();
            if state.receiver_dropped {
                return Err(SendError::Closed);
            }
            if state.frames.len() >= self.max_frames {
                return Err(SendError::Full);
            }
            state.frames.push_back(queued);
            state.frames.len()
        };
        self.ready.notify_one();
        Ok(depth)
    }

    /// The next frame queued, without waiting.
    fn try_pop(&self) -> Option<Queued> {
        let mut state = self.lock();
        let queued = state.frames.pop_front();
        if state.frames.is_empty() && state.frames.capacity() > KEPT_QUEUE_SLOTS {
            state.frames.shrink_to(KEPT_QUEUE_SLOTS);
        }
        queued
    }

    /// The next frame, waiting for one; `None` once the handle is dropped and every frame
    /// it queued was taken. Cancel-safe: a frame is taken only by the poll that returns it,
    /// and a wake-up that arrives while no one waits is kept for the next call (`Notify`).
    async fn recv(&self) -> Option<Queued> {
        loop {
            if let Some(queued) = self.try_pop() {
                return Some(queued);
            }
            if self.lock().handle_dropped {
                return None;
            }
            self.ready.notified().await;
        }
    }

    fn handle_dropped(&self) {
        self.lock().handle_dropped = true;
        self.ready.notify_one();
    }

    /// The connection task takes no more frames: those still queued are dropped (with
    /// their memory), later ones refused.
    fn receiver_dropped(&self) {
        let frames = {
            let mut state = self.lock();
            state.receiver_dropped = true;
            std::mem::take(&mut state.frames)
        };
        // Dropped outside the lock.
        drop(frames);
    }
}

/// The byte bound of one connection's outbound queue (`outbound_queue_bytes`).
struct QueueBudget {
    // Invariant: the sum of `Queued::bytes` over the frames in the queue: charged before a
    // frame is queued, released when the connection task takes it out.
    queued: AtomicUsize,
    limit: usize,
    /// The connection's preferred encoding (true: MessagePack), so a frame queued with
    /// `encoding: None` is charged the size it will be sent at.
    msgpack: AtomicBool,
}

impl QueueBudget {
    fn new(limit: usize) -> Self {
        QueueBudget { queued: AtomicUsize::new(0), limit, msgpack: AtomicBool::new(false) }
    }

    /// Charges `bytes`, or refuses when the queue would go over the limit. A frame alone
    /// in the queue always fits, so no frame within `max_outbound_message_size` is
    /// undeliverable.
    fn charge(&self, bytes: usize) -> bool {
        // Relaxed: a counter on its own; the channel orders the frames themselves.
        self.queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued == 0 || queued.saturating_add(bytes) <= self.limit)
                    .then(|| queued.saturating_add(bytes))
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn preferred(&self) -> Encoding {
        if self.msgpack.load(Ordering::Relaxed) { Encoding::MessagePack } else { Encoding::Json }
    }

    fn prefer(&self, encoding: Encoding) {
        self.msgpack.store(encoding == Encoding::MessagePack, Ordering::Relaxed);
    }
}

/// The close signal: a flag and a `Notify` inline in [`Shared`] rather than a
/// `CancellationToken`, which allocates a tree node of its own for every connection.
#[derive(Default)]
struct CloseSignal {
    // Invariant: set at most once; the first reason wins.
    reason: Mutex<Option<CloseReason>>,
    // Invariant: set (and never cleared) once `fire` ran.
    fired: AtomicBool,
    notify: Notify,
}

impl CloseSignal {
    fn fire(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        // Release: pairs with the Acquire in `is_fired`, so the reason is seen with the flag.
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes once the signal fired (at once if it already has). Cancel-safe: it takes
    /// nothing, and the flag stays set.
    async fn fired(&self) {
        let notified = self.notify.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read, so a `fire` in between still wakes it.
        notified.as_mut().enable();
        if self.is_fired() {
            return;
        }
        notified.await;
    }

    fn reason(&self) -> Option<CloseReason> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientConnection for WsHandle {
    fn send(&self, out: Outbound) -> Result<(), SendError> {
        // Encoding here rather than in the connection task costs nothing more: a frame is
        // encoded once per encoding however many sessions it goes to (`SharedFrame`).
        let encoding = out.encoding.unwrap_or_else(|| self.shared.budget.preferred());
        let bytes = out.frame.encoded(encoding).map_or(0, |b| b.len());
        if !self.shared.budget.charge(bytes) {
            return Err(SendError::Full);
        }
        let depth = self.shared.queue.push(Queued { out, bytes }).inspect_err(|_| {
            self.shared.budget.release(bytes);
        })?;
        self.stats.queue_depth(depth);
        Ok(())
    }

    fn close(&self, reason: CloseReason) {
        self.shared.close.fire(reason);
    }
}

/// Runs one connection from the HTTP upgrade to the close. Generic over the byte stream so
/// that tests drive it over `tokio::io::duplex` under paused time (`session_tests`); `serve`
/// passes a `TcpStream`.
pub(crate) async fn run<S>(
    stream: S,
    admission: Admission,
    config: Arc<WsConfig>,
    coordinator: CoordinatorHandle,
    stats: WsStatsHandle,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // `admission` (and its permit) is held until this function returns. The upgrade is
    // boxed, and freed once the session is open: a task is as large as its largest state for
    // as long as it lives, and the upgrade's states (the head, the request, tungstenite's
    // handshake, the first-frame wait) are far larger than an idle session's.
    let opened = Box::pin(open(stream, &admission, &config, &coordinator, &stats)).await;
    let Some(Opened { mut ws, shared, session_id }) = opened else { return };
    // By reference: an `async fn` keeps the arguments it was called with for as long as it
    // runs, besides the locals they are moved into, so a socket passed by value would be
    // held twice by every idle task.
    session_loop(&mut ws, &shared, &config, &coordinator, &session_id, &stats).await;
    coordinator.close_session(&session_id);
}

/// A session opened by [`open`]: its socket, what it shares with its handle, its id.
struct Opened<S> {
    ws: WebSocketStream<Metered<Prefixed<S>>>,
    shared: Arc<Shared>,
    session_id: SessionId,
}

/// The upgrade, the first-frame authentication when the upgrade had no credentials, and
/// the session's registration; `None` when the connection ends before it has a session
/// (refused, closed, timed out).
#[allow(clippy::result_large_err, reason = "tungstenite's Callback fixes the error type")]
async fn open<S>(
    stream: S,
    admission: &Admission,
    config: &WsConfig,
    coordinator: &CoordinatorHandle,
    stats: &WsStatsHandle,
) -> Option<Opened<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut credentials = None;
    // The upgrade's `traceparent` header: the session's default trace context.
    let mut traceparent = None;
    // Held while the connection waits for its first-frame `auth` (dropped once it is
    // authenticated or closed), so that at most `max_handshakes_in_flight` wait at once.
    let mut pending_auth = None;
    let first_frame = !config.auth_timeout.is_zero();
    let (have_capacity, deadline) = match admission {
        Admission::Session { deadline, .. } => (true, *deadline),
        Admission::Refusal { deadline, .. } => (false, *deadline),
    };
    // The checks may wait for the authenticator (a JWKS refresh, the mesh token check),
    // which tungstenite's synchronous callback cannot: the head is read and checked here,
    // within the same deadline as the handshake, then replayed to tungstenite, whose callback
    // only answers what was decided here.
    let mut stream = stream;
    let checks = async {
        let head = crate::handshake::read_head(&mut stream, config.max_head_bytes).await.ok()?;
        let checked = match Request::try_parse(&head) {
            Ok(Some((_, request))) => Some(
                check_upgrade(
                    &request,
                    have_capacity,
                    &config.origins.current(),
                    &config.auth,
                    first_frame,
                    coordinator,
                    stats,
                )
                .await,
            ),
            // tungstenite parses it again and refuses it before the callback runs.
            _ => None,
        };
        Some((head, checked))
    };
    let (head, checked) = match tokio::time::timeout_at(deadline, checks).await {
        Ok(Some(prepared)) => prepared,
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!("handshake timed out");
            return None;
        }
    };
    let stream = Prefixed::new(head, stream);
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let bad = || crate::upgrade::refuse(http::StatusCode::BAD_REQUEST, "malformed request");
        let checked = checked.ok_or_else(bad)??;
        if matches!(checked, Credentials::FirstFrame) {
            let Some(slot) = stats.begin_pending_auth(config.max_handshakes_in_flight) else {
                tracing::info!("upgrade refused: too many connections waiting to authenticate");
                let status = http::StatusCode::SERVICE_UNAVAILABLE;
                return Err(crate::upgrade::refuse(status, "too many connections"));
            };
            pending_auth = Some(slot);
        }
        // Selected whenever offered, on every route; the token entry never is.
        if offers_protocol(request.headers()) {
            response.headers_mut().insert(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                http::HeaderValue::from_static(PROTOCOL),
            );
        }
        credentials = Some(checked);
        traceparent = request.headers().get("traceparent").map(|v| v.to_str().map(str::to_owned));
        Ok(response)
    };
    let read_budget = Arc::new(AtomicUsize::new(UNMETERED));
    let stream = Metered { inner: stream, budget: Arc::clone(&read_budget) };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(config.tungstenite()),
    );
    let ws = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            return None;
        }
    };
    let mut ws = ws;
    let (identity, auth_id) = match credentials {
        Some(Credentials::Authenticated(identity)) => (identity, None),
        Some(Credentials::FirstFrame) => {
            // The auth frame and little else: a token and an envelope.
            let limit = coordinator.client_limits().max_token_len.saturating_add(1024);
            read_budget.store(limit, Ordering::Relaxed);
            match first_frame_auth(&mut ws, config, coordinator).await {
                Ok(authenticated) => {
                    read_budget.store(UNMETERED, Ordering::Relaxed);
                    drop(pending_auth.take());
                    authenticated
                }
                Err(reason) => {
                    if let Some(reason) = reason {
                        tracing::info!(reason = %reason.reason, "first-frame authentication failed");
                        close_unauthenticated(&mut ws, reason, config, stats).await;
                    }
                    return None;
                }
            }
        }
        // The callback ran and refused, or never ran; either way there is no session.
        None => return None,
    };

    let traceparent = match traceparent {
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            tracing::debug!("traceparent header ignored: not visible ASCII");
            None
        }
        None => None,
    };

    let shared = Arc::new(Shared {
        close: CloseSignal::default(),
        budget: QueueBudget::new(config.outbound_queue_bytes),
        queue: OutboundQueue::new(config.outbound_queue),
    });
    let handle = Arc::new(WsHandle { shared: Arc::clone(&shared), stats: stats.clone() });
    // Once per connection: every later line of it carries the user (never the token).
    tracing::Span::current().record("user.id", identity.user_id.as_str());
    let session_id = match coordinator.open_session_answering(identity, handle, auth_id) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(error = %e, "session refused");
            // Best effort: the client is told why; a failed send changes nothing.
            let _ = ws
                .close(Some(close_frame(
                    e.close_reason()
                        .unwrap_or_else(|| CloseReason::new(CloseCode::GoingAway, e.to_string())),
                    stats,
                )))
                .await;
            return None;
        }
    };
    tracing::Span::current().record("session.id", tracing::field::display(&session_id));
    // Set before this task reads the session's first frame, so every call sees it. An
    // invalid header is ignored (a tracing header from a proxy must not cost the client its
    // connection), and never reaches the mesh.
    if let Some(tp) = traceparent
        && let Err(why) = coordinator.set_session_traceparent(&session_id, &tp)
    {
        tracing::debug!(why, "traceparent header ignored");
    }
    Some(Opened { ws, shared, session_id })
}

/// Frames handed to tungstenite per batch before it flushes: enough to turn a burst of
/// queued events into few syscalls, few enough that a batch never holds the loop long.
const MAX_BATCH: usize = 64;

/// Time a client closed as too slow (1013) gets to take the frames still queued and the
/// close frame: it has already shown it does not keep up, so it does not get a full write
/// timeout, and a dead reader is gone about this long after its queue tripped.
const SLOW_CLIENT_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The receiving side of one connection's outbound queue, and what turning a queued frame
/// into a WebSocket message needs.
struct Outgoing<'a> {
    queue: &'a OutboundQueue,
    budget: &'a QueueBudget,
    /// The encoding of the last frame the client sent (JSON until then).
    preferred: Encoding,
    /// `max_outbound_message_size`.
    limit: usize,
    stats: &'a WsStatsHandle,
}

impl Outgoing<'_> {
    /// The message for a frame taken from the queue (its bytes leave the budget now), or
    /// `None` when nothing is to be sent for it.
    fn take(&self, queued: Queued) -> Option<Message> {
        self.budget.release(queued.bytes);
        let encoding = queued.out.encoding.unwrap_or(self.preferred);
        outbound_message(&queued.out, encoding, self.limit, self.stats)
    }

    /// The next message already queued, without waiting.
    fn next_ready(&mut self) -> Option<Message> {
        while let Some(queued) = self.queue.try_pop() {
            if let Some(message) = self.take(queued) {
                return Some(message);
            }
        }
        None
    }

    fn prefer(&mut self, encoding: Encoding) {
        self.preferred = encoding;
        self.budget.prefer(encoding);
    }
}

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        self.queue.receiver_dropped();
    }
}

/// How a write of the session loop ended.
enum Written {
    Done,
    /// The session was told to close; what was not written yet is in `pending` or in
    /// tungstenite's buffer, for the close to send.
    Interrupted,
    /// An I/O error or the write timeout: the connection is dropped without a close frame.
    Failed,
}

async fn session_loop<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    shared: &Shared,
    config: &WsConfig,
    coordinator: &CoordinatorHandle,
    session_id: &SessionId,
    stats: &WsStatsHandle,
) {
    let close = &shared.close;
    let mut outgoing = Outgoing {
        queue: &shared.queue,
        budget: &shared.budget,
        preferred: Encoding::Json,
        limit: config.max_outbound_message_size,
        stats,
    };
    // Invariant: `None` whenever the loop waits in its `select!`; only an interrupted write
    // leaves a message here, and the close that follows sends it first.
    let mut pending: Option<Message> = None;
    // The client's frames, pings included.
    let mut limiter = TokenBucket::new(config.rate_per_second, config.rate_burst, Instant::now());
    let mut protocol_errors: u32 = 0;
    let mut last_seen = Instant::now();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // The first tick is immediate; skip it.

    let reason: CloseReason = loop {
        if close.is_fired() {
            break close.reason().unwrap_or(CloseReason::new(CloseCode::Normal, ""));
        }
        tokio::select! {
            // Every branch is cancel-safe: `fired`, `recv`, `tick` and `next` lose
            // nothing when another branch wins. Shutdown is not a branch on purpose: the
            // coordinator first drains in-flight requests, then closes every session (1001).
            // A close is handled at the top of the loop.
            _ = close.fired() => {}
            queued = outgoing.queue.recv() => {
                let Some(queued) = queued else {
                    break CloseReason::new(CloseCode::Internal, "session ended");
                };
                pending = outgoing.take(queued);
                if pending.is_none() {
                    continue;
                }
                match write_raced(&mut *ws, &mut pending, &mut outgoing, close, config).await {
                    Written::Done | Written::Interrupted => {}
                    Written::Failed => return,
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() > config.idle_timeout {
                    break CloseReason::new(CloseCode::GoingAway, "idle timeout");
                }
                pending = Some(Message::Ping(Bytes::new()));
                match write_raced(&mut *ws, &mut pending, &mut outgoing, close, config).await {
                    Written::Done | Written::Interrupted => {}
                    Written::Failed => return,
                }
            }
            incoming = ws.next() => {
                let message = match incoming {
                    Some(Ok(m)) => m,
                    Some(Err(tungstenite::Error::Capacity(e))) => {
                        tracing::info!(error = %e, "client message over the limit");
                        break CloseReason::new(CloseCode::TooBig, "message too big");
                    }
                    Some(Err(e)) => {
                        // Boxed, as the close below: once per connection, and larger than
                        // the loop's other states.
                        let closing = close_after_read_error(&mut *ws, e, config.write_timeout);
                        return Box::pin(closing).await;
                    }
                    None => return,
                };
                last_seen = Instant::now();
                let (bytes, encoding) = match &message {
                    Message::Text(t) => (t.as_bytes(), Encoding::Json),
                    Message::Binary(b) => (b.as_ref(), Encoding::MessagePack),
                    Message::Close(frame) => {
                        // The reply echoes the client's code (none: 1005, "no status").
                        stats.closed(frame.as_ref().map_or(1005, |f| u16::from(f.code)));
                        // tungstenite queued the close reply while reading this frame, but
                        // only a later write or flush sends it; without this the client
                        // sees 1006. The flush ends with `ConnectionClosed`, which
                        // tokio-tungstenite reports as success.
                        let flush = SinkExt::flush(&mut *ws);
                        match tokio::time::timeout(config.write_timeout, flush).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "cannot complete the close handshake");
                            }
                            Err(_) => {
                                tracing::debug!("close handshake timed out: client not reading");
                            }
                        }
                        return;
                    }
                    // Pings are answered by tungstenite, but take a rate token like any frame
                    // (a ping flood leaves no room for data); pongs only refresh `last_seen`.
                    Message::Ping(_) => { let _ = limiter.take(Instant::now()); continue }
                    Message::Pong(_) | Message::Frame(_) => continue,
                };
                outgoing.prefer(encoding);
                // `select!` picks among ready branches at random: once the session was told
                // to close (kicked, token expired), no further client frame is served.
                if close.is_fired() {
                    continue;
                }
                let accepted = if limiter.take(Instant::now()) {
                    coordinator.on_frame(session_id, bytes, encoding)
                } else {
                    let frame = ServerFrame::Error(ErrorFrame {
                        error: error_name::RATE_LIMITED.to_owned(),
                        description: format!(
                            "more than {} frames per second; frame dropped",
                            config.rate_per_second
                        ),
                        // Every request gets exactly one answer its client can match.
                        trace_id: coordinator.trace_id_of(bytes, encoding),
                        id: coordinator.id_of(bytes, encoding),
                    });
                    let out = Outbound { frame: SharedFrame::new(frame), encoding: Some(encoding) };
                    pending = outbound_message(&out, encoding, outgoing.limit, stats);
                    if pending.is_some() {
                        match write_raced(&mut *ws, &mut pending, &mut outgoing, close, config)
                            .await
                        {
                            Written::Done | Written::Interrupted => {}
                            Written::Failed => return,
                        }
                    }
                    false
                };
                if !accepted {
                    protocol_errors += 1;
                    if protocol_errors > config.max_protocol_errors {
                        break CloseReason::new(CloseCode::PolicyViolation, "too many bad frames");
                    }
                }
            }
        }
    };
    tracing::debug!(code = reason.code.as_u16(), reason = %reason.reason, "closing connection");
    // Frames queued before the close (e.g. the last responses of a drain) still go out, then
    // the close frame, all within one bound: a client that does not take them is dropped
    // when it passes.
    let grace = if reason.code == CloseCode::TryAgainLater {
        SLOW_CLIENT_CLOSE_GRACE
    } else {
        config.write_timeout
    };
    let closing = async {
        write_queued(&mut *ws, &mut pending, &mut outgoing, usize::MAX).await?;
        ws.close(Some(close_frame(reason, stats))).await
    };
    // Boxed: it runs once, at the end, and must not size the task the whole session lives in.
    match Box::pin(tokio::time::timeout(grace, closing)).await {
        Ok(Ok(())) => {}
        // Best effort: the peer may already be gone.
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot send the close frame"),
        Err(_) => tracing::info!("close timed out: client not reading; dropping the connection"),
    }
}

/// Writes `pending` and what is queued behind it (see [`write_queued`]) within one write
/// timeout, unless the session is told to close first.
async fn write_raced<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    pending: &mut Option<Message>,
    outgoing: &mut Outgoing<'_>,
    close: &CloseSignal,
    config: &WsConfig,
) -> Written {
    let write =
        tokio::time::timeout(config.write_timeout, write_queued(ws, pending, outgoing, MAX_BATCH));
    tokio::select! {
        // Close first, so a session told to close writes nothing more here: a dead reader
        // stuck in a write is closed at once rather than at the write timeout.
        biased;
        // Cancel-safety: `write_queued` keeps a message it has not handed to tungstenite in
        // `pending`, and what it handed over stays in tungstenite's buffer; the close sends
        // both, in order.
        _ = close.fired() => Written::Interrupted,
        written = write => match written {
            Ok(Ok(())) => Written::Done,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "write failed; dropping the connection");
                Written::Failed
            }
            Err(_) => {
                // No close frame: the peer does not read, so it would only cost a second
                // timeout (the documented bound is one).
                tracing::info!("write timed out: client not reading; dropping the connection");
                Written::Failed
            }
        },
    }
}

/// Hands `pending`, then up to `max_frames` in all of what is already queued, to tungstenite
/// and flushes once: a burst of queued frames costs one flush, not one each. tungstenite
/// writes its buffer out whenever it holds more than `write_buffer_size`.
///
/// Cancel-safe in the sense the close needs: a message not yet handed to tungstenite stays
/// in `pending`; one handed over is in tungstenite's buffer.
async fn write_queued<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    pending: &mut Option<Message>,
    outgoing: &mut Outgoing<'_>,
    max_frames: usize,
) -> Result<(), tungstenite::Error> {
    let mut fed = 0;
    loop {
        if pending.is_none() && fed < max_frames {
            *pending = outgoing.next_ready();
        }
        if pending.is_none() {
            break;
        }
        // Waits only while an earlier write is blocked (a full socket).
        std::future::poll_fn(|cx| ws.poll_ready_unpin(cx)).await?;
        if let Some(message) = pending.take() {
            ws.start_send_unpin(message)?;
            fed += 1;
        }
    }
    SinkExt::flush(ws).await
}

/// The message to write for `out`, or `None` when nothing is to be sent: the frame cannot
/// be encoded, or it is over `limit` (`max_outbound_message_size`) and is not a response.
/// A response over the limit becomes an error response with the same trace id, so the
/// client's call does not hang; dropping anything else keeps the connection usable.
fn outbound_message(
    out: &Outbound,
    encoding: Encoding,
    limit: usize,
    stats: &WsStatsHandle,
) -> Option<Message> {
    let bytes = out.frame.encoded(encoding)?;
    if bytes.len() <= limit {
        return to_message(bytes, encoding);
    }
    let size = bytes.len();
    match out.frame.frame().message() {
        Some(ServerMessage::Response { trace_id, .. }) => {
            stats.response_too_large();
            let trace_id_field = trace_id.as_deref();
            let what = "response over max_outbound_message_size; sending an error instead";
            if stats.oversized_warning_due() {
                tracing::warn!(trace_id = trace_id_field, size, limit, "{what}");
            } else {
                tracing::debug!(trace_id = trace_id_field, size, limit, "{what}");
            }
            let error = ServerFrame::Message(ServerMessage::Response {
                trace_id: trace_id.clone(),
                // `Value::Null`, as in every error response.
                result: Default::default(),
                // The same error a response refused by the mesh adapter gets.
                error: Some(MeshError::ResponseTooLarge { bytes: size, limit }.to_error_object()),
            });
            let error = error.with_id(out.frame.frame().id().map(str::to_owned));
            let replacement = SharedFrame::new(error).encoded(encoding)?;
            if replacement.len() > limit {
                // Only with an absurdly small limit; the error cannot be sent either.
                tracing::warn!(
                    size = replacement.len(),
                    limit,
                    "error response over the limit too; dropped"
                );
                return None;
            }
            to_message(replacement, encoding)
        }
        message => {
            stats.frame_too_large_dropped();
            let topic = match message {
                Some(ServerMessage::Event { topic, .. }) => Some(topic.as_str()),
                _ => None,
            };
            let what = "frame over max_outbound_message_size dropped";
            if stats.oversized_warning_due() {
                tracing::warn!(topic, size, limit, "{what}");
            } else {
                tracing::debug!(topic, size, limit, "{what}");
            }
            None
        }
    }
}

fn to_message(bytes: std::sync::Arc<[u8]>, encoding: Encoding) -> Option<Message> {
    let bytes = Bytes::from_owner(bytes);
    match encoding {
        Encoding::Json => match Utf8Bytes::try_from(bytes) {
            Ok(text) => Some(Message::Text(text)),
            Err(e) => {
                tracing::error!(error = %e, "encoded JSON is not UTF-8");
                None
            }
        },
        Encoding::MessagePack => Some(Message::Binary(bytes)),
    }
}

/// Frames a connection may send before its `auth` frame that are not acted on at all
/// (pings and pongs, answered by tungstenite); one more closes it with 4401.
const MAX_CONTROL_FRAMES_BEFORE_AUTH: usize = 16;

/// The first-frame route: waits (until `auth_timeout`) for `{"type":"auth","payload":
/// {"token"}}` and checks the token; gives who it is and the frame's `id` (for the hello).
/// `Err(Some(_))`: close with this (4401, a reason the browser can read and that never
/// repeats the token); `Err(None)`: the connection is gone. Nothing but the auth frame is
/// acted on: any other data frame, text or binary, ends it.
async fn first_frame_auth<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<Metered<S>>,
    config: &WsConfig,
    coordinator: &CoordinatorHandle,
) -> Result<(Identity, Option<String>), Option<CloseReason>> {
    let unauthorized = |reason: &str| Some(CloseReason::new(CloseCode::Unauthorized, reason));
    let deadline = Instant::now() + config.auth_timeout;
    for _ in 0..=MAX_CONTROL_FRAMES_BEFORE_AUTH {
        let next = tokio::select! {
            // Both cancel-safe: `next` loses no frame when shutdown wins, and the connection
            // ends then anyway.
            () = coordinator.shutdown_started() => {
                return Err(Some(CloseReason::new(CloseCode::GoingAway, "gateway shutting down")));
            }
            next = tokio::time::timeout_at(deadline, ws.next()) => next,
        };
        let message = match next {
            Err(_) => return Err(unauthorized("authentication timeout")),
            Ok(None) => return Err(None),
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(tungstenite::Error::Capacity(_)))) => {
                return Err(unauthorized("authentication frame too large"));
            }
            Ok(Some(Err(tungstenite::Error::Io(e)))) if is_budget_spent(&e) => {
                return Err(unauthorized("authentication frame too large"));
            }
            Ok(Some(Err(e))) => {
                close_after_read_error(ws, e, config.write_timeout).await;
                return Err(None);
            }
        };
        let text = match &message {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(_) => return Err(unauthorized("authentication required")),
            Message::Close(_) => {
                // Completes the close handshake tungstenite queued the reply for.
                let flush = SinkExt::flush(ws);
                let _ = tokio::time::timeout(config.write_timeout, flush).await;
                return Err(None);
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        return match decode_client_frame(text, Encoding::Json, coordinator.client_limits()) {
            Ok(ClientFrame { message: ClientMessage::Auth { token }, id }) => {
                // Within the same deadline as the frame: the authenticator may call out.
                match tokio::time::timeout_at(deadline, coordinator.authenticate(&token)).await {
                    Err(_) => Err(unauthorized("authentication timeout")),
                    Ok(Ok(identity)) => Ok((identity, id)),
                    Ok(Err(e)) if e.is_unavailable() => {
                        tracing::warn!(reason = %e, "auth frame refused: the token could not be checked");
                        Err(unauthorized("authentication unavailable"))
                    }
                    Ok(Err(e)) => {
                        tracing::info!(reason = %e, "auth frame refused: not authenticated");
                        Err(unauthorized("unauthorized"))
                    }
                }
            }
            _ => Err(unauthorized("authentication required")),
        };
    }
    Err(unauthorized("authentication required"))
}

/// Sends the close to a connection that never had a session and waits (within
/// `refusal_handshake_timeout`) for the client's close, so that it reads the code and the
/// reason rather than a reset.
async fn close_unauthenticated<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    reason: CloseReason,
    config: &WsConfig,
    stats: &WsStatsHandle,
) {
    let closing = async {
        ws.close(Some(close_frame(reason, stats))).await?;
        // Bounded by the timeout; frames after our close are discarded by tungstenite.
        while let Some(next) = ws.next().await {
            next?;
        }
        Ok::<(), tungstenite::Error>(())
    };
    match tokio::time::timeout(config.refusal_handshake_timeout, closing).await {
        Ok(Ok(())) | Err(_) => {}
        // Best effort: the peer may already be gone.
        Ok(Err(e)) => tracing::debug!(error = %e, "close of an unauthenticated connection failed"),
    }
}

/// [`Metered`]'s budget when reads are not metered.
const UNMETERED: usize = usize::MAX;

/// A stream whose reads stop with an error once `budget` bytes were read (`UNMETERED`: no
/// limit), so a connection that is not authenticated yet cannot make the gateway read, and
/// buffer, more than its auth frame needs: `max_message_size` applies to sessions. The
/// budget is checked before each read, so at most one read's buffer goes past it.
pub(crate) struct Metered<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
}

/// The error a [`Metered`] read ends with once the budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("read budget of an unauthenticated connection spent")]
struct BudgetSpent;

fn is_budget_spent(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<BudgetSpent>())
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Relaxed: written only by this connection's task, which also does the reads.
        let budget = this.budget.load(Ordering::Relaxed);
        if budget == UNMETERED {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if budget == 0 {
            return Poll::Ready(Err(io::Error::other(BudgetSpent)));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let read = buf.filled().len() - before;
            let _ = this.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b != UNMETERED).then(|| b.saturating_sub(read))
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The close frame for `reason`, counted in the closes-by-code metric.
fn close_frame(reason: CloseReason, stats: &WsStatsHandle) -> CloseFrame {
    stats.closed(reason.code.as_u16());
    // Close reasons must fit a control frame (125 bytes with the code).
    let mut text = reason.reason;
    if text.len() > 120 {
        let mut end = 120;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    CloseFrame { code: WsCloseCode::from(reason.code.as_u16()), reason: text.into() }
}

#[cfg(test)]
mod session_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use nuropb_wire::ErrorObject;
    use nuropb_wire::client::decode_server_frame;

    use super::*;
    use crate::stats::WsStats;

    fn outbound(message: ServerMessage) -> Outbound {
        Outbound { frame: SharedFrame::new(ServerFrame::Message(message)), encoding: None }
    }

    fn response(trace_id: &str, result: &str) -> Outbound {
        outbound(ServerMessage::Response {
            trace_id: Some(trace_id.to_owned()),
            result: result.into(),
            error: None,
        })
    }

    fn decoded(message: Message, encoding: Encoding) -> ServerFrame {
        decode_server_frame(&message.into_data(), encoding).unwrap()
    }

    fn queued(trace_id: &str) -> Queued {
        Queued { out: response(trace_id, "r"), bytes: 1 }
    }

    fn trace_id_of(queued: &Queued) -> Option<String> {
        match queued.out.frame.frame().message() {
            Some(ServerMessage::Response { trace_id, .. }) => trace_id.clone(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn the_outbound_queue_is_bounded_ordered_and_gives_back_a_burst() {
        let queue = OutboundQueue::new(20);
        // Nothing is held before the first frame.
        assert_eq!(queue.lock().frames.capacity(), 0);
        for i in 0..20 {
            assert_eq!(queue.push(queued(&i.to_string())), Ok(i + 1));
        }
        assert_eq!(queue.push(queued("over")).err(), Some(SendError::Full));
        assert!(queue.lock().frames.capacity() > KEPT_QUEUE_SLOTS);
        for i in 0..20 {
            let next = queue.recv().await.unwrap();
            assert_eq!(trace_id_of(&next).as_deref(), Some(i.to_string().as_str()));
        }
        // Drained: the burst's room is given back, down to the slots kept.
        assert!(queue.lock().frames.capacity() <= KEPT_QUEUE_SLOTS);
        assert!(queue.try_pop().is_none());
        // A frame queued before the handle went away is still taken; then the queue ends.
        queue.push(queued("last")).unwrap();
        queue.handle_dropped();
        assert_eq!(trace_id_of(&queue.recv().await.unwrap()).as_deref(), Some("last"));
        assert!(queue.recv().await.is_none());
    }

    #[tokio::test]
    async fn the_outbound_queue_wakes_its_waiter_and_refuses_once_the_task_is_gone() {
        let queue = Arc::new(OutboundQueue::new(4));
        let waiter = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.recv().await.map(|q| trace_id_of(&q)) }
        });
        tokio::task::yield_now().await;
        queue.push(queued("woken")).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(Some("woken".to_owned())));
        queue.push(queued("dropped")).unwrap();
        queue.receiver_dropped();
        assert_eq!(queue.lock().frames.len(), 0);
        assert_eq!(queue.push(queued("late")).err(), Some(SendError::Closed));
    }

    #[test]
    fn frames_within_the_limit_pass_unchanged() {
        let stats = WsStatsHandle::new();
        for encoding in [Encoding::Json, Encoding::MessagePack] {
            let out = response("t", &"x".repeat(100));
            let size = out.frame.encoded(encoding).unwrap().len();
            let m = outbound_message(&out, encoding, size, &stats).unwrap();
            assert_eq!(decoded(m, encoding), *out.frame.frame());
        }
        assert_eq!(stats.stats(), WsStats::default());
    }

    #[test]
    fn responses_over_the_limit_become_limit_exceeded_errors() {
        let stats = WsStatsHandle::new();
        for encoding in [Encoding::Json, Encoding::MessagePack] {
            let out = response("big-1", &"x".repeat(2000));
            let size = out.frame.encoded(encoding).unwrap().len();
            let m = outbound_message(&out, encoding, 1000, &stats).unwrap();
            let expected = ServerFrame::Message(ServerMessage::Response {
                trace_id: Some("big-1".into()),
                result: Default::default(),
                error: Some(ErrorObject::new(
                    "LimitExceeded",
                    format!("response of {size} bytes exceeds the limit of 1000 bytes"),
                )),
            });
            assert_eq!(decoded(m, encoding), expected, "{encoding:?}");
        }
        // A limit too small even for the error: nothing is sent.
        assert!(outbound_message(&response("t", "xx"), Encoding::Json, 10, &stats).is_none());
        assert_eq!(stats.stats(), WsStats { responses_too_large: 3, ..WsStats::default() });
    }

    #[test]
    fn other_frames_over_the_limit_are_dropped_and_counted() {
        let stats = WsStatsHandle::new();
        let event = outbound(ServerMessage::Event {
            topic: "broadcast.big".into(),
            event: "x".repeat(2000).into(),
        });
        let error = Outbound {
            frame: SharedFrame::new(ServerFrame::Error(ErrorFrame {
                error: "E".into(),
                description: "x".repeat(2000),
                trace_id: None,
                id: None,
            })),
            encoding: None,
        };
        for out in [&event, &error] {
            for encoding in [Encoding::Json, Encoding::MessagePack] {
                assert!(outbound_message(out, encoding, 1000, &stats).is_none());
            }
        }
        assert_eq!(stats.stats(), WsStats { frames_too_large_dropped: 4, ..WsStats::default() });
    }
}
