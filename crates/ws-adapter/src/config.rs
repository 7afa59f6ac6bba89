//! `WsConfig`: every limit of the WebSocket side, with its default. Nothing here trusts a
//! library default (tungstenite's write buffer, for one, is unlimited unless set).

use std::time::Duration;

use handler_core::OriginPolicy;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    /// Most concurrent connections (default 10 000); beyond it upgrades get 503.
    pub max_connections: usize,
    /// Largest client message, in bytes, after reassembly (default 1 MiB); larger → 1009.
    pub max_message_size: usize,
    /// Largest single frame, in bytes (default 1 MiB).
    pub max_frame_size: usize,
    /// Bytes buffered before a write is flushed (default 128 KiB).
    pub write_buffer_size: usize,
    /// Most bytes buffered for writing before writes fail (default 4 MiB).
    pub max_write_buffer_size: usize,
    /// Frames queued per connection before the client counts as too slow and is closed with
    /// 1013 (default 256).
    pub outbound_queue: usize,
    /// Time allowed for the TCP + HTTP upgrade (default 10 s).
    pub handshake_timeout: Duration,
    /// Time allowed for one frame to be written to the socket (default 10 s); a client that
    /// does not read is closed.
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
    /// Allowed browser origins. Requests without `Origin` are allowed.
    pub origins: OriginPolicy,
    pub auth: AuthSources,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_connections: 10_000,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            write_buffer_size: 128 << 10,
            max_write_buffer_size: 4 << 20,
            outbound_queue: 256,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            rate_per_second: 100,
            rate_burst: 200,
            max_protocol_errors: 100,
            origins: OriginPolicy::allow_all(),
            auth: AuthSources::default(),
        }
    }
}

impl WsConfig {
    /// The tungstenite limits, every one set explicitly.
    pub(crate) fn tungstenite(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(128 << 10)
            .write_buffer_size(self.write_buffer_size)
            .max_write_buffer_size(self.max_write_buffer_size.max(self.write_buffer_size + 1))
            .max_message_size(Some(self.max_message_size))
            .max_frame_size(Some(self.max_frame_size))
            .accept_unmasked_frames(false)
    }
}
