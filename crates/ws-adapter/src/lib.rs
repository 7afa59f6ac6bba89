//! The WebSocket side of nuropb-gateway (tokio-tungstenite): accept TCP connections, check
//! origin and credentials during the HTTP upgrade (403 / 401 before any WebSocket exists),
//! then run one task per connection that owns its socket and talks to the core through a
//! [`CoordinatorHandle`]. The core reaches a connection only through its bounded outbound
//! queue (its [`handler_core::ClientConnection`] implementation is in `connection`). The
//! same port answers plain HTTP (a request without any field of a WebSocket handshake) with
//! hyper: `GET /healthz`, then the embedder's [`HttpRoutes`] (`WsConfig::http_routes`).
//! Behind trusted proxies (`WsConfig::trusted_proxies`), the client's address comes from
//! the PROXY protocol header or the forwarding fields of the head (`client_addr`).
//!
//! An adapter in the layering (docs/ARCHITECTURE.md): it depends on `handler-core` and the
//! wire crate, and no tungstenite type appears in its API. [`serve`] takes tokio's
//! `TcpListener` and tokio-util's `CancellationToken` and `TaskTracker` (the runtime's
//! own vocabulary) so that the caller owns the socket, the shutdown signal and the drain.
//! Every limit is a field of [`WsConfig`], with its default documented there. The
//! repository's `examples/embed.rs` runs it with a client.
//!
//! Serving until shutdown:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use handler_core::in_memory::InMemoryMesh;
//! use handler_core::{Coordinator, CoreConfig, JwtAuthenticator, JwtConfig, JwtKey};
//! use tokio::net::TcpListener;
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//! use ws_adapter::{WsConfig, WsStatsHandle};
//!
//! let (mesh, inbound) = InMemoryMesh::builder().build();
//! let auth = JwtAuthenticator::new(JwtConfig::new(JwtKey::Hs256Secret(b"secret".to_vec())))?;
//! let shutdown = CancellationToken::new();
//! let (coordinator, handle) = Coordinator::new(
//!     CoreConfig::default(),
//!     Arc::new(auth),
//!     Arc::new(mesh),
//!     inbound,
//!     TaskTracker::new(),
//!     shutdown.clone(),
//! );
//! let routing = tokio::spawn(coordinator.run(Duration::from_secs(1)));
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let connections = TaskTracker::new();
//! let server = tokio::spawn(ws_adapter::serve(
//!     listener,
//!     WsConfig::default(),
//!     handle,
//!     shutdown.clone(),
//!     connections.clone(),
//!     WsStatsHandle::new(),
//! ));
//! // ... clients connect to ws://<listener address>/ ...
//! shutdown.cancel();
//! server.await??;
//! routing.await?;
//! connections.close();
//! connections.wait().await;
//! # Ok(())
//! # }
//! ```

// Crate-level because `[lints] workspace = true` takes no additions: a `pub` item that is
// not reachable from outside the crate is dead public API or should say `pub(crate)`.
#![warn(missing_docs, unreachable_pub)]

mod client_addr;
mod config;
mod connection;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod http;
mod origin;
mod peer_limits;
mod read_error;
mod stats;
mod tls;
mod token_bucket;
mod upgrade;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use client_addr::TrustedProxies;
pub use config::{AuthSources, WsConfig};
pub use error::WsError;
pub use http::{HttpRequest, HttpResponse, HttpRoutes, answer_http};
pub use origin::{OriginPolicy, OriginPolicyHandle};
pub use stats::{WsStats, WsStatsHandle};
pub use tls::{MAX_TLS_FILE_BYTES, PreparedTls, TlsAcceptorHandle};

use handler_core::CoordinatorHandle;

use crate::connection::Admission;
use crate::handshake::{HeadError, HeadKind, Prefixed};
use crate::peer_limits::{PeerGuard, PeerLimits, PeerLimitsConfig, PeerRefusal};
use crate::tls::Transport;

/// Accepts connections on `listener` until `shutdown`, one tracked task per connection.
/// Returns when `shutdown` fires; connection tasks are left to the tracker's drain. This
/// `shutdown` may fire after the coordinator's: meanwhile connections are still accepted
/// and answered 503 (upgrades) or `/healthz` 503, as the lame-duck drain wants.
///
/// Overload policy, in the order checked at accept:
/// 0. with `proxy_protocol`, a peer that is not one of `trusted_proxies` is closed at once;
/// 1. per client address (IPv6 per /64): at most `max_connections_per_ip` live
///    connections and `connect_rate_per_ip`/`connect_burst_per_ip` attempts → 429. From a
///    trusted proxy, this is checked after the PROXY header and the head are read, for the
///    client they name;
/// 2. at most `max_connections` sessions → 503;
/// 3. at most `max_handshakes_in_flight` upgrade requests being read → 503, so sockets that
///    send nothing hold a handshake slot, not a session slot.
///
/// With [`WsConfig::tls`] every connection first completes a TLS handshake, on its own
/// task and within the same timeout and slot as the head that follows (a failure is
/// logged and counted in `WsStats::tls_handshake_failures`, and ends that connection only).
/// A refusal is answered by a task of its own, at most `max_refusals_in_flight` at once
/// (within `refusal_handshake_timeout`); beyond that the connection is closed at once. An
/// accepted connection's head is read and checked (400/426/431) before it takes a session
/// slot. Accept errors (out of file descriptors or buffers, a connection aborted before
/// it was accepted, a firewall's EPERM …) are retried with a backoff of up to one second
/// and logged at most once per interval. `stats` counts what was refused, shed or dropped.
pub async fn serve(
    listener: TcpListener,
    config: WsConfig,
    coordinator: CoordinatorHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    stats: WsStatsHandle,
) -> Result<(), WsError> {
    let config = Arc::new(config);
    // `Semaphore::new` panics above `MAX_PERMITS`; no deployment gets near it.
    let semaphore = |n: usize| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)));
    let sessions = semaphore(config.max_connections);
    let refusals = semaphore(config.max_refusals_in_flight);
    let handshakes = semaphore(config.max_handshakes_in_flight);
    let peers = PeerLimits::new(PeerLimitsConfig {
        max_connections_per_ip: config.max_connections_per_ip,
        connect_rate_per_ip: config.connect_rate_per_ip,
        connect_burst_per_ip: config.connect_burst_per_ip,
        max_tracked: config.max_tracked_ips,
    });
    let mut backoff = AcceptBackoff::default();
    let mut next_conn_id: u64 = 0;
    loop {
        let accept = || listener.accept();
        let Some((stream, peer)) =
            accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await
        else {
            return Ok(());
        };
        next_conn_id += 1;
        let trusted_peer = config.trusted_proxies.contains(peer.ip());
        // The client's address is the peer's unless a trusted proxy names another; that
        // is known once its PROXY header or head is read (`Accepted::client_of`).
        let span = tracing::info_span!(
            "conn",
            conn.id = next_conn_id,
            peer = %peer,
            client = tracing::field::Empty,
            session.id = tracing::field::Empty,
            user.id = tracing::field::Empty
        );
        if !trusted_peer {
            span.record("client", tracing::field::display(peer.ip()));
        }
        if config.proxy_protocol && !trusted_peer {
            // Behind a PROXY-protocol balancer only the balancer connects; anyone else is
            // closed at once (nothing it says could be believed or parsed).
            stats.proxy_refused();
            let _entered = span.enter();
            tracing::debug!("not a trusted proxy (--proxy-protocol); closed");
            continue;
        }
        // Which refusal, if any: (status, body, the counter it bumps). A trusted proxy's
        // connection is counted as its client's, once the client is known.
        let peer_guard = if trusted_peer {
            Ok(None)
        } else {
            admit_peer(&peers, peer.ip(), &stats).map_err(|(s, r, l)| Refuse::Status(s, r, l))
        };
        let admitted = peer_guard.and_then(|guard| {
            if sessions.available_permits() == 0 {
                stats.connection_refused();
                return Err(Refuse::Capacity);
            }
            match Arc::clone(&handshakes).try_acquire_owned() {
                Ok(permit) => Ok((guard, permit)),
                Err(_) => {
                    stats.handshake_refused();
                    Err(Refuse::Capacity)
                }
            }
        });
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let task = Accepted {
            stream: Transport::Plain(stream),
            peer,
            trusted_peer,
            peers: peers.clone(),
            span: span.clone(),
            config: Arc::clone(&config),
            coordinator: coordinator.clone(),
            stats: stats.clone(),
        };
        match admitted {
            Ok((guard, handshake)) => {
                let sessions = Arc::clone(&sessions);
                tracker.spawn(task.run(guard, handshake, sessions).instrument(span));
            }
            Err(refuse) => match Arc::clone(&refusals).try_acquire_owned() {
                Ok(permit) => {
                    tracker.spawn(task.refuse(refuse, permit).instrument(span));
                }
                Err(_) => {
                    // Closing at once is the only answer that costs nothing: a task per
                    // connection here is what a flood of idle sockets would exploit.
                    stats.connection_shed();
                    stats.refused("shed", "none");
                    let _entered = span.enter();
                    tracing::debug!("over a limit and the refusal budget; closed unanswered");
                }
            },
        }
    }
}

/// Counts a connection from `ip` against the per-address limits, or the 429 refusal (status,
/// body, the metrics' reason label).
fn admit_peer(
    peers: &PeerLimits,
    ip: IpAddr,
    stats: &WsStatsHandle,
) -> Result<Option<PeerGuard>, (u16, &'static str, &'static str)> {
    match peers.admit(ip) {
        Ok(guard) => Ok(guard),
        Err(PeerRefusal::TooManyConnections) => {
            stats.per_ip_connection_refused();
            Err((429, "too many connections from this address", "per_ip_connections"))
        }
        Err(PeerRefusal::TooManyAttempts) => {
            stats.per_ip_rate_refused();
            Err((429, "too many connection attempts from this address", "per_ip_rate"))
        }
    }
}

/// The `status` label of a refusal: the statuses this crate sends, each its own value.
fn status_label(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        403 => "403",
        426 => "426",
        429 => "429",
        431 => "431",
        503 => "503",
        _ => "other",
    }
}

/// Why a connection is refused at accept.
#[derive(Debug, Clone, Copy)]
enum Refuse {
    /// No session or handshake slot: 503, through the upgrade checks (as when shutting
    /// down).
    Capacity,
    /// A per-address limit: this status and body, and the metrics' reason label.
    Status(u16, &'static str, &'static str),
}

/// A head read and checked: what the connection becomes.
enum Head {
    /// A WebSocket upgrade that passed the RFC 6455 checks.
    Upgrade(Vec<u8>),
    /// A plain HTTP request, for hyper.
    Http(Vec<u8>),
}

impl Head {
    /// The bytes read: the head, and maybe some of what followed it.
    fn bytes(&self) -> &[u8] {
        match self {
            Head::Upgrade(b) | Head::Http(b) => b,
        }
    }
}

/// An upgrade that passed the steps at accept and holds a session slot: what its
/// connection runs with.
struct Admitted {
    /// The transport, with the head read so far to replay.
    stream: Prefixed<Transport>,
    admission: Admission,
    /// The client address's count (`max_connections_per_ip`), held to the end.
    client: Option<PeerGuard>,
    config: Arc<WsConfig>,
    coordinator: CoordinatorHandle,
    stats: WsStatsHandle,
}

/// An accepted connection, before its task decides what it becomes.
struct Accepted {
    // Invariant: `Plain` until `secure` has run.
    stream: Transport,
    peer: SocketAddr,
    // Whether `peer` is a trusted proxy: its PROXY header and forwarding fields name the
    // client, and its per-address count waits until they are read.
    trusted_peer: bool,
    peers: PeerLimits,
    span: tracing::Span,
    config: Arc<WsConfig>,
    coordinator: CoordinatorHandle,
    stats: WsStatsHandle,
}

impl Accepted {
    /// Reads the PROXY header (when on), completes the TLS handshake (when on), reads and
    /// checks the head (holding a handshake slot, all within `handshake_timeout`), then takes
    /// a session slot and runs the connection. The address's count is held to the end. From
    /// a trusted proxy, the client the PROXY header (or the head) names is counted once known.
    async fn run(
        self,
        peer: Option<PeerGuard>,
        handshake: OwnedSemaphorePermit,
        sessions: Arc<Semaphore>,
    ) {
        // Boxed, and freed once it is done: a task is as large as its largest state for as
        // long as it lives, and the steps before the session (a TLS handshake, the head and
        // its buffers, a refusal's answer) must not size a task that then idles for hours.
        let Some(admitted) = Box::pin(self.admit(peer, handshake, sessions)).await else {
            return;
        };
        let Admitted { stream, admission, client: _client, config, coordinator, stats } = admitted;
        connection::run(stream, admission, config, coordinator, stats).await;
    }

    /// The steps of [`run`](Self::run) before the connection: `None` when the connection
    /// ends there (answered, refused or gone).
    async fn admit(
        mut self,
        peer: Option<PeerGuard>,
        handshake: OwnedSemaphorePermit,
        sessions: Arc<Semaphore>,
    ) -> Option<Admitted> {
        let deadline = Instant::now() + self.config.handshake_timeout;
        // First on the connection, before anything else reads it (the TLS handshake included).
        let hop = self.proxy_step(deadline).await?;
        let mut this = self.secure(deadline).await?;
        let head = this.checked_head(deadline.saturating_duration_since(Instant::now())).await?;
        let client = this.client_of(hop, head.bytes());
        // Counted at accept unless the peer is a trusted proxy; then the client is counted.
        let client_guard = match peer {
            Some(guard) => Some(guard),
            None if !this.trusted_peer => None,
            None => match admit_peer(&this.peers, client, &this.stats) {
                Ok(guard) => guard,
                Err((status, reason, label)) => {
                    this.stats.refused(label, status_label(status));
                    tracing::info!(status, reason, "upgrade refused");
                    let left = deadline.saturating_duration_since(Instant::now());
                    let linger = left.min(this.config.refusal_handshake_timeout);
                    handshake::answer(&mut this.stream, status, reason, linger).await;
                    return None;
                }
            },
        };
        let head = match head {
            Head::Upgrade(head) => head,
            Head::Http(head) => {
                // Boxed: the hyper connection's state must not enlarge the admission step
                // every upgrade goes through. The handshake slot is held while the request
                // is served.
                let stream = Prefixed::new(head, this.stream);
                let routes = this.config.http_routes.clone();
                let coordinator = this.coordinator;
                let shutting_down = move || coordinator.is_shutting_down();
                Box::pin(http::serve(stream, routes, shutting_down, deadline)).await;
                drop(handshake);
                return None;
            }
        };
        drop(handshake);
        let admission = match sessions.try_acquire_owned() {
            Ok(permit) => Admission::Session { _permit: permit, deadline },
            Err(_) => {
                // Taken between the check at accept and now; this task answers it itself.
                this.stats.connection_refused();
                this.stats.refused("capacity", "503");
                let linger = this.config.refusal_handshake_timeout;
                handshake::answer(&mut this.stream, 503, "too many connections", linger).await;
                return None;
            }
        };
        Some(Admitted {
            stream: Prefixed::new(head, this.stream),
            admission,
            client: client_guard,
            config: this.config,
            coordinator: this.coordinator,
            stats: this.stats,
        })
    }

    /// With `proxy_protocol`, reads the PROXY header by `deadline`: the address of the hop
    /// before the proxy (the proxy itself for a `LOCAL` header). Without it, the peer's.
    /// `None` when the connection ends here (the header was missing, bad or too slow: the
    /// connection is closed unanswered, since what follows cannot be trusted to be HTTP).
    async fn proxy_step(&mut self, deadline: Instant) -> Option<IpAddr> {
        if !self.config.proxy_protocol {
            return Some(self.peer.ip());
        }
        let read = client_addr::read_proxy_header(&mut self.stream);
        let refused = match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(Some(source))) => return Some(source.ip().to_canonical()),
            Ok(Ok(None)) => return Some(self.peer.ip()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "PROXY header timed out".to_owned(),
        };
        self.stats.proxy_refused();
        tracing::info!(reason = refused, "PROXY header refused; closed");
        // Best effort: a FIN rather than nothing; the peer may be gone already.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await;
        None
    }

    /// The client's address, now that `hop` (what the PROXY step found) and the head are
    /// known: the forwarding fields are believed only from a trusted hop. Recorded in the
    /// connection's span as `client`.
    fn client_of(&self, hop: IpAddr, head: &[u8]) -> IpAddr {
        if !self.trusted_peer {
            return hop;
        }
        let proxies = &self.config.trusted_proxies;
        let client = if proxies.contains(hop) {
            client_addr::forwarded_client(head, hop, proxies)
        } else {
            hop
        };
        self.span.record("client", tracing::field::display(client));
        client
    }

    /// Answers a refusal (holding a refusal slot; PROXY header, TLS handshake and all
    /// within `refusal_handshake_timeout`).
    async fn refuse(mut self, refuse: Refuse, permit: OwnedSemaphorePermit) {
        let timeout = self.config.refusal_handshake_timeout;
        let started = Instant::now();
        let Some(hop) = self.proxy_step(started + timeout).await else {
            return;
        };
        let Some(mut this) = self.secure(started + timeout).await else { return };
        let head = this.checked_head(timeout.saturating_sub(started.elapsed())).await;
        if let Some(head) = &head {
            this.client_of(hop, head.bytes());
        }
        let head = match head {
            None => return,
            Some(Head::Upgrade(head)) => head,
            Some(Head::Http(_)) => {
                // Plain HTTP over a limit gets the same status as an upgrade would.
                let (status, reason, label) = match refuse {
                    Refuse::Capacity => (503, "too many connections", "capacity"),
                    Refuse::Status(status, reason, label) => (status, reason, label),
                };
                this.stats.refused(label, status_label(status));
                tracing::info!(status, reason, "http request refused");
                let left = timeout.saturating_sub(started.elapsed());
                handshake::answer(&mut this.stream, status, reason, left).await;
                return;
            }
        };
        match refuse {
            Refuse::Capacity => {
                // The upgrade checks say 503 (and why) as they always have.
                let admission = Admission::Refusal { _permit: permit, deadline: started + timeout };
                let stream = Prefixed::new(head, this.stream);
                connection::run(stream, admission, this.config, this.coordinator, this.stats).await;
            }
            Refuse::Status(status, reason, label) => {
                tracing::info!(status, reason, "upgrade refused");
                this.stats.refused(label, status_label(status));
                let left = timeout.saturating_sub(started.elapsed());
                handshake::answer(&mut this.stream, status, reason, left).await;
            }
        }
    }

    /// With TLS on, the connection after its TLS handshake (completed by `deadline`); `None`
    /// when the handshake failed or timed out (logged and counted). Without TLS, as it is.
    async fn secure(self, deadline: Instant) -> Option<Accepted> {
        let Some(tls) = &self.config.tls else { return Some(self) };
        let tcp = match self.stream {
            Transport::Plain(tcp) => tcp,
            tls @ Transport::Tls(_) => return Some(Accepted { stream: tls, ..self }),
        };
        let error = match tokio::time::timeout_at(deadline, tls.acceptor().accept(tcp)).await {
            Ok(Ok(stream)) => {
                return Some(Accepted { stream: Transport::Tls(Box::new(stream)), ..self });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        self.stats.tls_handshake_failed();
        tracing::info!(error, "TLS handshake failed");
        None
    }

    /// The head, read within `timeout` and checked; `None` when the connection ends here
    /// (closed, too slow, or answered 400/426/431).
    async fn checked_head(&mut self, timeout: Duration) -> Option<Head> {
        let started = Instant::now();
        let max = self.config.max_head_bytes;
        let bad = match tokio::time::timeout(timeout, handshake::read_head(&mut self.stream, max))
            .await
        {
            Err(_) => {
                tracing::debug!("handshake timed out");
                return None;
            }
            Ok(Err(HeadError::Closed)) => return None,
            Ok(Err(HeadError::TooLarge)) => {
                handshake::BadHandshake { status: 431, reason: "request head too large" }
            }
            Ok(Ok(head)) => match handshake::classify(&head) {
                Ok(HeadKind::Upgrade) => return Some(Head::Upgrade(head)),
                Ok(HeadKind::Http) => return Some(Head::Http(head)),
                Err(bad) => bad,
            },
        };
        self.stats.bad_handshake();
        self.stats.refused("bad_handshake", status_label(bad.status));
        tracing::info!(status = bad.status, reason = bad.reason, "bad handshake");
        // At most the refusal timeout: a client that never closes must not keep its slot
        // for the whole handshake timeout.
        let left = timeout.saturating_sub(started.elapsed());
        let linger = left.min(self.config.refusal_handshake_timeout);
        handshake::answer(&mut self.stream, bad.status, bad.reason, linger).await;
        None
    }
}

/// Accepts the next connection, retrying every error after a backoff; `None` on shutdown.
/// Generic over the accept call so that tests can script its errors.
async fn accept_with_backoff<S, F, Fut>(
    mut accept: F,
    backoff: &mut AcceptBackoff,
    shutdown: &CancellationToken,
    stats: &WsStatsHandle,
) -> Option<(S, SocketAddr)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, SocketAddr)>>,
{
    loop {
        let result = tokio::select! {
            // Cancel-safe: `TcpListener::accept` loses no connection when not chosen.
            _ = shutdown.cancelled() => return None,
            r = accept() => r,
        };
        let e = match result {
            Ok(accepted) => {
                backoff.succeeded();
                return Some(accepted);
            }
            Err(e) => e,
        };
        // Every accept error is treated as transient. Most concern one connection (aborted,
        // EPROTO, EPERM from a firewall, network errors Linux passes on); the rest are a
        // resource shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) that passes. Giving up would
        // leave the process running without a listener.
        stats.accept_error();
        let pause = backoff.failed();
        match backoff.should_log(Instant::now()) {
            Some(suppressed) => tracing::warn!(
                error = %e,
                retry_in_ms = pause.as_millis() as u64,
                suppressed,
                "accept failed; retrying"
            ),
            None => tracing::debug!(error = %e, "accept failed; retrying"),
        }
        tokio::select! {
            // Cancel-safe: a sleep.
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Backoff and log rate limit for accept errors: the pause doubles from 10 ms to 1 s while
/// errors repeat and starts over after a success; at most one warning per 10 s.
#[derive(Debug)]
struct AcceptBackoff {
    pause: Duration,
    last_warning: Option<Instant>,
    // Errors not logged at warn since the last warning.
    suppressed: u64,
}

impl AcceptBackoff {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const WARNING_INTERVAL: Duration = Duration::from_secs(10);

    fn succeeded(&mut self) {
        self.pause = Self::FIRST_PAUSE;
    }

    /// The pause before the next attempt.
    fn failed(&mut self) -> Duration {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Self::MAX_PAUSE);
        pause
    }

    /// `Some(errors suppressed since the last warning)` when this error is to be logged at
    /// warn.
    fn should_log(&mut self, now: Instant) -> Option<u64> {
        let due = self.last_warning.is_none_or(|t| now.duration_since(t) >= Self::WARNING_INTERVAL);
        if due {
            self.last_warning = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { pause: Self::FIRST_PAUSE, last_warning: None, suppressed: 0 }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::collections::VecDeque;
    use std::io;

    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[tokio::test(start_paused = true)]
    async fn every_accept_error_is_retried_with_backoff() {
        // ENOBUFS, ENOMEM, EPROTO, EPERM: the errors that used to end `serve`.
        let mut script: VecDeque<io::Result<((), SocketAddr)>> = [105, 12, 71, 1]
            .into_iter()
            .map(|code| Err(io::Error::from_raw_os_error(code)))
            .chain([Err(io::ErrorKind::ConnectionAborted.into()), Ok(((), addr()))])
            .collect();
        let stats = WsStatsHandle::new();
        let mut backoff = AcceptBackoff::default();
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let accept = || {
            let next = script.pop_front().unwrap();
            async move { next }
        };
        let accepted = accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await;
        assert_eq!(accepted.map(|(_, a)| a), Some(addr()));
        assert_eq!(started.elapsed(), Duration::from_millis(10 + 20 + 40 + 80 + 160));
        assert_eq!(stats.stats().accept_errors, 5);
        // A success starts the backoff over.
        assert_eq!(backoff.pause, AcceptBackoff::FIRST_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_retries() {
        let stats = WsStatsHandle::new();
        let mut backoff = AcceptBackoff::default();
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        let tracker = TaskTracker::new();
        tracker.spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        });
        let started = Instant::now();
        let accept = || async { Err::<((), SocketAddr), _>(io::Error::from_raw_os_error(24)) };
        assert!(accept_with_backoff(accept, &mut backoff, &shutdown, &stats).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // 10 + 20 + … + 640 ms, then one per second: 7 + 4 errors before the 5 s mark
        // (the pause in progress is cut short).
        assert_eq!(stats.stats().accept_errors, 11);
        assert_eq!(backoff.pause, AcceptBackoff::MAX_PAUSE);
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut backoff = AcceptBackoff::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for (at, expected) in [
            (s(0), Some(0)),
            (s(1), None),
            (s(9), None),
            (s(10), Some(2)),
            (s(15), None),
            (s(30), Some(1)),
        ] {
            assert_eq!(backoff.should_log(t0 + at), expected, "{at:?}");
        }
    }
}
