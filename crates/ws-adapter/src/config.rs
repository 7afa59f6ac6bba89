//! `WsConfig`: every limit of the WebSocket side, with its default. Nothing here trusts a
//! library default (tungstenite's write buffer, for one, is unlimited unless set; its
//! origin-less defaults would allow every browser origin).

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client_addr::TrustedProxies;
use crate::http::HttpRoutes;
use crate::origin::OriginPolicyHandle;
use crate::tls::TlsAcceptorHandle;

/// Where credentials may come from during the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSources {
    /// Header carrying `Bearer <jwt>` (default `Authorization`).
    pub header: String,
    /// Cookie carrying the token (default `Authorization`), or `None` to refuse cookies.
    /// Cookie credentials are sent by browsers cross-site, so the origin policy matters.
    pub cookie: Option<String>,
    /// Query parameter carrying the token (default `None`: off, because URLs end up in
    /// logs). Browsers cannot set headers on WebSocket upgrades, so some deployments need it.
    pub query_param: Option<String>,
}

impl Default for AuthSources {
    fn default() -> Self {
        AuthSources {
            header: "Authorization".to_owned(),
            cookie: Some("Authorization".to_owned()),
            query_param: None,
        }
    }
}

/// Limits and policies of the WebSocket side.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Most concurrent connections (default 10 000). A connection over it gets no session
    /// slot: while fewer than `max_refusals_in_flight` refusals are in progress it is told
    /// 503 (within `refusal_handshake_timeout`), otherwise it is closed at once.
    pub max_connections: usize,
    /// Connections over `max_connections` being told 503 at the same time (default 64).
    /// When these are all in progress, further connections over the limit are closed at
    /// once without an answer (counted in `WsStats::connections_shed`), so a flood of idle
    /// sockets cannot pile up tasks and file descriptors.
    pub max_refusals_in_flight: usize,
    /// Time a connection over `max_connections` gets to send its upgrade request and read
    /// the 503 (default 1 s).
    pub refusal_handshake_timeout: Duration,
    /// Upgrade requests being read at the same time (default 1 024): a budget apart from
    /// `max_connections`, so clients that connect and send nothing hold a handshake slot,
    /// never a session slot. Over it, connections go the way of those over
    /// `max_connections` (503 within the refusal budget, else closed at once).
    pub max_handshakes_in_flight: usize,
    /// Live connections (handshakes included) from one client address, IPv6 per /64
    /// (default 256); more → HTTP 429.
    pub max_connections_per_ip: usize,
    /// Connection attempts per second from one client address (default 50) ...
    pub connect_rate_per_ip: u32,
    /// ... with this burst (default 200), sized for a reconnect storm from one NAT. Over it
    /// → HTTP 429; a refused attempt counts too.
    pub connect_burst_per_ip: u32,
    /// Client addresses whose limits are tracked at once (default 65 536). Beyond it idle
    /// ones are forgotten; when none is idle, a new address is let through without its
    /// own rate limit (the global limits still hold).
    pub max_tracked_ips: usize,
    /// Largest HTTP head of an upgrade request, in bytes (default 16 KiB); larger → 431.
    pub max_head_bytes: usize,
    /// Largest client message, in bytes, after reassembly (default 1 MiB); larger → 1009.
    pub max_message_size: usize,
    /// Largest single frame, in bytes (default 1 MiB).
    pub max_frame_size: usize,
    /// Bytes tungstenite reads from the socket at a time, and the read buffer an idle
    /// connection keeps (default 1 KiB: a typical client frame, a request of a few hundred
    /// bytes, fits, and at 19k idle connections every KiB here is 19 MiB). A larger frame
    /// grows the buffer to its size while it is read; `max_frame_size` still bounds it.
    pub read_buffer_size: usize,
    /// Bytes of frames collected before tungstenite writes them to the socket (default
    /// 8 KiB). Not preallocated: the connection task feeds every frame that is queued and
    /// then flushes once, so this only caps how much one batch holds before it is written.
    pub write_buffer_size: usize,
    /// Largest frame the gateway sends, in bytes once encoded (default 8 MiB). A response
    /// over it is replaced by an error response with the same `trace_id` (`LimitExceeded`);
    /// any other frame over it (an event, say) is dropped, logged and counted in
    /// `WsStats::frames_too_large_dropped`. The connection stays open either way.
    /// tungstenite's write buffer limit is derived from it (`write_buffer_size` + this +
    /// 64 KiB), so a frame within it never fails for want of buffer space.
    pub max_outbound_message_size: usize,
    /// Frames queued per connection before the client counts as too slow and is closed with
    /// 1013 (default 256).
    pub outbound_queue: usize,
    /// Bytes (encoded frames) queued per connection before the client counts as too slow and
    /// is closed with 1013 (default 16 MiB, twice the default `max_outbound_message_size`), whichever of this and `outbound_queue` trips
    /// first. A frame larger than this is still queued when nothing else is, so a response
    /// within `max_outbound_message_size` can always be delivered to a client that reads.
    pub outbound_queue_bytes: usize,
    /// Time allowed for the TCP + HTTP upgrade (default 10 s).
    pub handshake_timeout: Duration,
    /// Time allowed for one write to the socket (default 10 s); a client that does not read
    /// is dropped when it passes, without a close frame (it would not read that either). A
    /// close (shutdown, kick) gets the same time in all for the frames still queued and the
    /// close frame; a client closed as too slow (1013) gets `SLOW_CLIENT_CLOSE_GRACE`.
    pub write_timeout: Duration,
    /// Interval of server pings (default 20 s).
    pub ping_interval: Duration,
    /// A connection from which nothing (not even a pong) arrived for this long is closed
    /// (default 60 s).
    pub idle_timeout: Duration,
    /// Sustained client frames per second per connection (default 100) ...
    pub rate_per_second: u32,
    /// ... with this burst (default 200). Frames over the rate get an error frame.
    pub rate_burst: u32,
    /// Bad frames (invalid input, over rate) tolerated per connection before it is closed
    /// with 1008 (default 100).
    pub max_protocol_errors: u32,
    /// Allowed browser origins (default: none, so every upgrade carrying an `Origin`
    /// header gets 403). Requests without `Origin` (non-browser clients) are allowed. Cookie
    /// credentials are on by default and browsers send them cross-site, so allowing origins
    /// is a decision for the deployment, not a library default. A handle, so that a
    /// configuration reload can replace the policy while the server runs
    /// (`OriginPolicy::into()` makes one).
    pub origins: OriginPolicyHandle,
    /// Where credentials are looked for during the upgrade, in order (default: the
    /// `Authorization` header, then the `nuropb.token.<jwt>` subprotocol, then the cookie).
    pub auth: AuthSources,
    /// Plain HTTP on this port (default `None`: only the built-in `GET /healthz`, 404 for
    /// the rest). A request without any field of a WebSocket handshake is served by hyper:
    /// `/healthz` first, then these routes, one request per connection, no body (413),
    /// within `max_head_bytes` and `handshake_timeout`, holding a handshake slot. A
    /// request over a limit at accept gets the same 429/503 as an upgrade.
    pub http_routes: Option<Arc<dyn HttpRoutes>>,
    /// Time a connection that upgraded with no credentials at all has to send its
    /// `{"type":"auth"}` frame (default 5 s); it is closed with 4401 when it passes.
    /// `Duration::ZERO` turns the first-frame route off: such upgrades get 401, as before
    /// it existed. At most `max_handshakes_in_flight` connections wait for their auth frame
    /// at once (more are refused with 503 at the upgrade), and each may send at most
    /// `max_token_len` + 1 KiB before it is authenticated.
    pub auth_timeout: Duration,
    /// TLS on this port (`wss://`; default `None`: plain `ws://`, e.g. behind a proxy
    /// that terminates TLS). Every accepted connection then completes a TLS handshake
    /// (TLS 1.2 or 1.3, ALPN `http/1.1`) before its head is read, within
    /// `handshake_timeout` (`refusal_handshake_timeout` for a connection over a limit) and
    /// holding the same handshake slot, so a client that connects and sends nothing holds
    /// no session slot. Plain HTTP (`/healthz`, `http_routes`) is served over TLS too. Keep
    /// a clone of the handle to [`reload`](TlsAcceptorHandle::reload) the certificate.
    pub tls: Option<TlsAcceptorHandle>,
    /// Peers whose client-address headers are believed (default none): `Forwarded` /
    /// `X-Forwarded-For` in the head (rightmost untrusted hop) and, with `proxy_protocol`,
    /// the PROXY header. A connection from a trusted proxy is counted against the
    /// per-address limits as the client it names (after its head is read), not as the
    /// proxy; the proxy itself is bounded by `max_connections`, `max_handshakes_in_flight`
    /// and `handshake_timeout`. The address is logged as `client` in the connection span.
    pub trusted_proxies: TrustedProxies,
    /// Every connection starts with a PROXY protocol header (v2 binary or v1 text, at most
    /// 1 KiB, read within `handshake_timeout` before anything else), and only
    /// `trusted_proxies` may connect: other peers are closed at once (default `false`). A
    /// missing, malformed or oversized header closes the connection unanswered
    /// (`WsStats::proxy_refused`).
    pub proxy_protocol: bool,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_connections: 10_000,
            max_refusals_in_flight: 64,
            refusal_handshake_timeout: Duration::from_secs(1),
            max_handshakes_in_flight: 1024,
            max_connections_per_ip: 256,
            connect_rate_per_ip: 50,
            connect_burst_per_ip: 200,
            max_tracked_ips: 65_536,
            max_head_bytes: 16 << 10,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            read_buffer_size: 1 << 10,
            write_buffer_size: 8 << 10,
            max_outbound_message_size: 8 << 20,
            outbound_queue: 256,
            outbound_queue_bytes: 16 << 20,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            rate_per_second: 100,
            rate_burst: 200,
            max_protocol_errors: 100,
            origins: OriginPolicyHandle::default(),
            auth: AuthSources::default(),
            http_routes: None,
            auth_timeout: Duration::from_secs(5),
            tls: None,
            trusted_proxies: TrustedProxies::default(),
            proxy_protocol: false,
        }
    }
}

/// Room in tungstenite's write buffer beyond one largest frame's payload: the frame header
/// (at most 14 bytes) and the control frames tungstenite queues itself (a pong, a close
/// frame: at most 131 bytes each), with a wide margin.
const WRITE_BUFFER_SLACK: usize = 64 << 10;

impl WsConfig {
    /// The tungstenite limits, every one set explicitly.
    ///
    /// `max_write_buffer_size` is `write_buffer_size + max_outbound_message_size + 64 KiB`:
    /// tungstenite refuses a frame (`WriteBufferFull`) when buffered bytes plus the frame
    /// would exceed it, even on an empty buffer, so a fixed limit below the largest frame
    /// would make that frame unsendable. tungstenite writes the buffer out once it holds more
    /// than `write_buffer_size`, and accepts no further frame until a blocked write is
    /// flushed, so it never holds more than `write_buffer_size`, one frame and its own
    /// control frames.
    pub(crate) fn tungstenite(&self) -> WebSocketConfig {
        let max_write_buffer_size = self
            .write_buffer_size
            .saturating_add(self.max_outbound_message_size)
            .saturating_add(WRITE_BUFFER_SLACK);
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer_size)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(max_write_buffer_size)
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
            .accept_unmasked_frames(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allows_no_browser_origin() {
        let origins = WsConfig::default().origins;
        for origin in ["https://example.com", "http://localhost:3000", "null"] {
            assert!(!origins.allows(origin), "{origin}");
        }
    }

    #[test]
    fn write_buffer_holds_the_largest_outbound_frame() {
        for (write_buffer_size, max_outbound_message_size) in
            [(128 << 10, 8 << 20), (0, 0), (1, 64 << 20), (128 << 10, usize::MAX)]
        {
            let config =
                WsConfig { write_buffer_size, max_outbound_message_size, ..WsConfig::default() };
            let t = config.tungstenite();
            // tungstenite asserts this when the socket is created.
            assert!(t.max_write_buffer_size > t.write_buffer_size);
            assert!(
                t.max_write_buffer_size
                    >= write_buffer_size
                        .saturating_add(max_outbound_message_size)
                        .saturating_add(14),
                "{write_buffer_size} {max_outbound_message_size}"
            );
        }
    }
}
