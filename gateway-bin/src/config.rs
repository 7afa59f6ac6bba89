//! Command line and environment: every option, parsed and validated once before the runtime
//! starts. Each flag can also be set by the environment variable shown in `--help`, and by
//! a key of the configuration file (`--config`, see `config_file.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use amqp_mesh::{AmqpMeshError, AmqpTlsConfig, ClientIdentity};
use handler_core::auth::{JwtConfig, JwtKey};
use handler_core::mesh_manager::CallPattern;
use ws_adapter::{OriginPolicy, TlsAcceptorHandle, WsError};

/// How calls to methods that require encryption are handled (AMQP mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Encryption {
    /// Never encrypt, never fetch service descriptions (like nuropb-gw 0.1.4).
    Off,
    /// Encrypt when the service's description says so; a service never described
    /// successfully gets plaintext (like nuropb's own requester).
    Auto,
    /// As auto, but a service never described successfully gets no calls until it is.
    Required,
}

/// The log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text, one event per line, control characters escaped.
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret given on the command line, in the environment or in a file: its `Debug` never
/// shows it, so neither does a debug print of the whole configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself; say why at every call.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// What the binary does besides serving (none: serve).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validates a configuration file exactly as start-up would (with the environment and
    /// any flags given before the subcommand), prints `configuration OK` and exits 0, or
    /// names the bad key and exits 2. An empty file is valid: all defaults.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Prints docs/CONFIGURATION.md as generated from the options (`cargo xtask config-doc`).
    #[command(hide = true)]
    ConfigDoc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

/// nuropb-gateway: a WebSocket gateway to a NuroPb service mesh.
///
/// With no --amqp-url it runs on an embedded in-memory mesh with a demo service and prints a
/// demo token, so you can connect a WebSocket client right away.
#[derive(Debug, Clone, Parser)]
#[command(name = "nuropb-gateway", version)]
pub struct Cli {
    /// Address to accept WebSocket connections on.
    #[arg(long, env = "NUROPB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the operations HTTP endpoint: `/healthz`, `/readyz` and Prometheus
    /// `/metrics` (off when unset). It has no authentication: keep it on a private network.
    #[arg(long, env = "NUROPB_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,

    /// RabbitMQ URL of the mesh (amqp:// or amqps://; the vhost is the mesh name). Without
    /// it the gateway runs on the embedded in-memory demo mesh. Several URLs (comma-separated
    /// or the option repeated) are the nodes of one RabbitMQ cluster, all on the same vhost:
    /// the gateway connects to the first and moves to the next when a connection is lost or
    /// fails (percent-encode a comma in a password as %2C). The gateway starts even when no
    /// node is up: /readyz answers 503 and calls fail at once until it connects.
    #[arg(long, env = "NUROPB_AMQP_URL", value_delimiter = ',', hide_env_values = true)]
    pub amqp_url: Vec<Secret>,

    /// The gateway's own NuroPb service name (its queue is `nuropb-<name>-sq`).
    #[arg(long, env = "NUROPB_SERVICE_NAME", default_value = "nuropb-gateway")]
    pub service_name: String,

    /// This instance's id (response and event queue names); random when unset.
    #[arg(long, env = "NUROPB_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Event topic patterns (AMQP topic syntax) this instance receives, comma separated.
    #[arg(long, env = "NUROPB_EVENT_BINDINGS", value_delimiter = ',')]
    pub event_bindings: Vec<String>,

    /// Topic patterns clients may subscribe to, comma separated; `{user_id}` stands for the
    /// session's user id (e.g. `news.#,users.{user_id}.#`). A requested pattern must be
    /// covered by one of these. None by default (in-memory demo mode: `demo.#`).
    #[arg(long, env = "NUROPB_SUBSCRIBABLE_TOPICS", value_delimiter = ',')]
    pub subscribable_topics: Vec<String>,

    /// What clients may call, as `service.method` patterns, comma separated; either side may
    /// be `*` (e.g. `orders.*,billing.invoice`). Empty: every method of every service but
    /// the gateway's own.
    #[arg(long, env = "NUROPB_CALLABLE", value_delimiter = ',')]
    pub callable: Vec<String>,

    /// Whether clients may call `nuropb_describe` (a service's methods, parameters and
    /// public key); `false` refuses it for every service, whatever --callable allows.
    #[arg(long, env = "NUROPB_CLIENT_DESCRIBE", action = ArgAction::Set, default_value_t = true)]
    pub client_describe: bool,

    /// Topic patterns whose untargeted events go to every session, comma separated.
    #[arg(long, env = "NUROPB_BROADCAST_TOPICS", value_delimiter = ',')]
    pub broadcast_topics: Vec<String>,

    /// How long a request waits for its response, in milliseconds.
    #[arg(long, env = "NUROPB_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Encryption of calls to methods marked `requires_encryption` (found through a cached
    /// `nuropb_describe` of the target service).
    #[arg(long, env = "NUROPB_ENCRYPTION", value_enum, default_value = "auto")]
    pub encryption: Encryption,

    /// Seconds a service's public key may be used before it is fetched again through
    /// `nuropb_describe` (0: before every encrypted call). nuropb services often make a new
    /// key when they restart, and an undecryptable message takes a Python service off the mesh.
    #[arg(long, env = "NUROPB_ENCRYPTION_KEY_TTL_SECS", default_value_t = 30)]
    pub encryption_key_ttl_secs: u64,

    /// Largest frame sent to a client, in bytes; a larger response becomes a
    /// `LimitExceeded` error, a larger event is dropped and counted.
    #[arg(long, env = "NUROPB_MAX_OUTBOUND_MESSAGE_BYTES", default_value_t = 8 << 20)]
    pub max_outbound_message_bytes: usize,

    /// AMQP prefetch of the gateway's own queues.
    #[arg(long, env = "NUROPB_PREFETCH", default_value_t = 64)]
    pub prefetch: u16,

    /// Reconnect backoff start, in milliseconds (doubles up to --reconnect-max-ms).
    #[arg(long, env = "NUROPB_RECONNECT_MIN_MS", default_value_t = 100)]
    pub reconnect_min_ms: u64,

    /// Reconnect backoff cap, in milliseconds.
    #[arg(long, env = "NUROPB_RECONNECT_MAX_MS", default_value_t = 10_000)]
    pub reconnect_max_ms: u64,

    /// HS256 secret for client JWTs. Without any JWT key, the in-memory mode generates a
    /// dev secret and prints a demo token; AMQP mode refuses to start.
    #[arg(long, env = "NUROPB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// PEM public key file for RS256/ES256 client JWTs (see --jwt-algorithm).
    #[arg(long, env = "NUROPB_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Algorithm of --jwt-public-key-file.
    #[arg(long, env = "NUROPB_JWT_ALGORITHM", value_enum, default_value = "rs256")]
    pub jwt_algorithm: JwtAlgorithm,

    /// Required JWT issuer (`iss`).
    #[arg(long, env = "NUROPB_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required JWT audience (`aud`), comma separated: any of them.
    #[arg(long, env = "NUROPB_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// JWT claim holding the username (`sub` is the user id).
    #[arg(long, env = "NUROPB_JWT_USERNAME_CLAIM", default_value = "username")]
    pub jwt_username_claim: String,

    /// Longest accepted token lifetime (`exp - iat`) in seconds; when set, tokens must
    /// carry `iat`. Unset: any lifetime. A future `iat` is refused either way.
    #[arg(long, env = "NUROPB_JWT_MAX_LIFETIME_SECS")]
    pub jwt_max_lifetime_secs: Option<u64>,

    /// Allowed browser origins, comma separated: a host allows itself and its subdomains,
    /// `.host` only its subdomains; `host:port` pins a port, `https://host` the scheme; `*`
    /// allows all; anything else is refused at start-up. Clients sending no Origin are
    /// allowed. None by default (in-memory demo mode: `localhost,127.0.0.1`).
    #[arg(long, env = "NUROPB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Accept the token from the `Authorization` cookie (browsers send cookies cross-site,
    /// so keep --allowed-origins tight when this is on).
    #[arg(long, env = "NUROPB_COOKIE_AUTH", action = ArgAction::Set, default_value_t = true)]
    pub cookie_auth: bool,

    /// Accept the token from this query parameter (off when unset; URLs end up in logs).
    #[arg(long, env = "NUROPB_TOKEN_QUERY_PARAM")]
    pub token_query_param: Option<String>,

    /// Seconds a client that upgraded with no credentials has to send its first frame,
    /// `{"type":"auth","payload":{"token":"<jwt>"}}` (else close 4401); 0 turns this route
    /// off, so such upgrades get 401.
    #[arg(long, env = "NUROPB_AUTH_TIMEOUT_SECS", default_value_t = 5)]
    pub auth_timeout_secs: u64,

    /// Most concurrent WebSocket connections.
    #[arg(long, env = "NUROPB_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Upgrade requests being read at once, apart from --max-connections (sockets that send
    /// nothing hold one of these, never a session slot); over it → HTTP 503.
    #[arg(long, env = "NUROPB_MAX_HANDSHAKES_IN_FLIGHT", default_value_t = 1024)]
    pub max_handshakes_in_flight: usize,

    /// Live connections from one client address (IPv6: per /64); over it → HTTP 429.
    #[arg(long, env = "NUROPB_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// Connection attempts per second from one client address; over it (and the burst)
    /// → HTTP 429.
    #[arg(long, env = "NUROPB_CONNECT_RATE_PER_IP", default_value_t = 50)]
    pub connect_rate_per_ip: u32,

    /// Burst of connection attempts from one client address (a reconnect storm from a NAT).
    #[arg(long, env = "NUROPB_CONNECT_BURST_PER_IP", default_value_t = 200)]
    pub connect_burst_per_ip: u32,

    /// Open sessions of one user (`sub`); one more → HTTP 429 at the upgrade.
    #[arg(long, env = "NUROPB_MAX_SESSIONS_PER_USER", default_value_t = 100)]
    pub max_sessions_per_user: usize,

    /// Listen backlog of the WebSocket listener (capped by the kernel, e.g. Linux's
    /// net.core.somaxconn), sized for every client reconnecting at once.
    #[arg(long, env = "NUROPB_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Largest client message, in bytes.
    #[arg(long, env = "NUROPB_MAX_MESSAGE_BYTES", default_value_t = 1 << 20)]
    pub max_message_bytes: usize,

    /// Frames queued per connection before a slow client is closed (1013).
    #[arg(long, env = "NUROPB_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Bytes (encoded frames) queued per connection before a slow client is closed (1013),
    /// whichever of this and --outbound-queue trips first. At least
    /// --max-outbound-message-bytes, so one largest response fits beside what is queued.
    #[arg(long, env = "NUROPB_OUTBOUND_QUEUE_BYTES", default_value_t = 16 << 20)]
    pub outbound_queue_bytes: usize,

    /// Requests in flight per connection.
    #[arg(long, env = "NUROPB_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,

    /// Requests in flight across the gateway.
    #[arg(long, env = "NUROPB_MAX_IN_FLIGHT_TOTAL", default_value_t = 10_000)]
    pub max_in_flight_total: usize,

    /// Most values (scalars, arrays, objects) one client frame may decode to; more is
    /// refused with `LimitExceeded` while decoding.
    #[arg(long, env = "NUROPB_MAX_DECODED_VALUES", default_value_t = 128 * 1024)]
    pub max_decoded_values: usize,

    /// Most bytes of memory one client frame's decoded tree may hold (an estimate: value
    /// slots, object entries, string bytes); more is refused with `LimitExceeded` while
    /// decoding.
    #[arg(long, env = "NUROPB_MAX_DECODED_BYTES", default_value_t = 32 << 20)]
    pub max_decoded_bytes: usize,

    /// Decoded bytes the calls in flight of one connection may hold (at least
    /// --max-decoded-bytes); beyond, calls get `NuropbOverloadedError`.
    #[arg(long, env = "NUROPB_MAX_IN_FLIGHT_BYTES", default_value_t = 64 << 20)]
    pub max_in_flight_bytes: usize,

    /// Decoded bytes all calls in flight may hold together (at least --max-in-flight-bytes).
    #[arg(long, env = "NUROPB_MAX_IN_FLIGHT_BYTES_TOTAL", default_value_t = 1 << 30)]
    pub max_in_flight_bytes_total: usize,

    /// Sustained client frames per second per connection.
    #[arg(long, env = "NUROPB_RATE_PER_SECOND", default_value_t = 100)]
    pub rate_per_second: u32,

    /// Burst of client frames per connection.
    #[arg(long, env = "NUROPB_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,

    /// Seconds between server pings.
    #[arg(long, env = "NUROPB_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,

    /// Seconds of client silence after which a connection is closed.
    #[arg(long, env = "NUROPB_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Seconds from SIGTERM/Ctrl-C by which in-flight requests must finish (those left are
    /// answered with an error); the lame-duck window (--lame-duck-grace-secs plus
    /// --lame-duck-secs) fits within it, and the process exits a few seconds after it.
    #[arg(long, env = "NUROPB_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,

    /// Seconds between the demo service's `demo.tick` events (in-memory mode only; 0 = off).
    #[arg(long, env = "NUROPB_DEMO_TICK_SECS", default_value_t = 10)]
    pub demo_tick_secs: u64,

    // TLS: wss:// on the WebSocket port and amqps:// to the broker.
    /// PEM certificate chain (server certificate first) for wss:// on --listen; with
    /// --tls-key-file. Unset: plain ws:// (e.g. behind a proxy that terminates TLS).
    #[arg(long, env = "NUROPB_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "NUROPB_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA certificates trusted for the broker's certificate (amqps:// --amqp-url only),
    /// in addition to the system's trust store.
    #[arg(long, env = "NUROPB_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// PEM client certificate chain presented to the broker (amqps:// only); with
    /// --amqp-client-key-file.
    #[arg(long, env = "NUROPB_AMQP_CLIENT_CERT_FILE")]
    pub amqp_client_cert_file: Option<PathBuf>,

    /// PEM private key of --amqp-client-cert-file.
    #[arg(long, env = "NUROPB_AMQP_CLIENT_KEY_FILE")]
    pub amqp_client_key_file: Option<PathBuf>,

    // --- Lame-duck drain and the real client address (docs/OPERATIONS.md, "Drain and
    // upgrades" and "Behind a load balancer") ---
    /// Seconds over which the sessions are closed (1001, "reconnect elsewhere") at
    /// shutdown, one by one and at most one second apart, so that their clients do not all
    /// reconnect at once. Default: --drain-timeout-secs minus --lame-duck-grace-secs (10 s
    /// with the defaults). 0 closes them all at once after the in-flight requests.
    #[arg(long, env = "NUROPB_LAME_DUCK_SECS")]
    pub lame_duck_secs: Option<u64>,

    /// Seconds after SIGTERM before the first session is closed, while readiness and
    /// `/healthz` answer 503 and new upgrades are refused with 503, so that a load balancer
    /// stops sending clients here before the existing ones reconnect.
    #[arg(long, env = "NUROPB_LAME_DUCK_GRACE_SECS", default_value_t = 0)]
    pub lame_duck_grace_secs: u64,

    /// Proxies (IP addresses or CIDR blocks, comma separated) whose `X-Forwarded-For`,
    /// `Forwarded` and PROXY protocol headers name the real client. None by default:
    /// those headers are ignored and the TCP peer is the client.
    #[arg(long, env = "NUROPB_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Every connection must start with a PROXY protocol (v1 or v2) header, and only
    /// --trusted-proxies may connect (others are closed at once). Off by default.
    #[arg(long, env = "NUROPB_PROXY_PROTOCOL", action = ArgAction::Set, default_value_t = false)]
    pub proxy_protocol: bool,
    // Configuration file, secrets from files, log format.
    /// TOML configuration file: its keys are the long flag names with `_` for `-` (see
    /// docs/CONFIGURATION.md). A flag beats its environment variable, which beats the file,
    /// which beats the default. SIGHUP re-reads it.
    #[arg(long, env = "NUROPB_CONFIG")]
    pub config: Option<PathBuf>,

    /// File holding the HS256 secret for client JWTs (exclusive with --jwt-secret; one
    /// trailing newline is dropped). Re-read on SIGHUP.
    #[arg(long, env = "NUROPB_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// File holding the RabbitMQ URL (exclusive with --amqp-url; one trailing newline is
    /// dropped), so the broker password stays out of the environment and the process list.
    #[arg(long, env = "NUROPB_AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// Log line format on stderr: `text`, or `json` (one JSON object per line).
    #[arg(long, env = "NUROPB_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    // --- Identity: JWKS key sets and the mesh token check (issue 12, docs/OPERATIONS.md
    // "Identity"). ---
    /// JWKS file (RFC 7517) whose keys verify client JWTs; re-read every
    /// --jwks-refresh-secs and when a token names an unknown `kid`. Merged with
    /// --jwt-secret / --jwt-public-key-file (both sets of keys are accepted) and with
    /// --jwks-url.
    #[arg(long, env = "NUROPB_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// JWKS URL whose keys verify client JWTs (https, or http to a loopback address only);
    /// fetched at start (the gateway does not start when that fails), then like --jwks-file.
    #[arg(long, env = "NUROPB_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Seconds between JWKS refreshes; a failed refresh keeps the current keys.
    #[arg(long, env = "NUROPB_JWKS_REFRESH_SECS", default_value_t = 300)]
    pub jwks_refresh_secs: u64,

    /// Fewest seconds between two JWKS fetches: tokens with unknown `kid`s trigger one
    /// fetch at most this often (concurrent ones share it).
    #[arg(long, env = "NUROPB_JWKS_MIN_REFRESH_SECS", default_value_t = 10)]
    pub jwks_min_refresh_secs: u64,

    /// Milliseconds one JWKS fetch may take (1 to 5000); a token with an unknown `kid`
    /// waits at most this long for the refresh it triggered.
    #[arg(long, env = "NUROPB_JWKS_TIMEOUT_MS", default_value_t = 3000)]
    pub jwks_timeout_ms: u64,

    /// Largest JWKS document accepted, in bytes (a larger answer fails the fetch).
    #[arg(long, env = "NUROPB_JWKS_MAX_BYTES", default_value_t = 256 << 10)]
    pub jwks_max_bytes: usize,

    /// Check tokens that are not JWTs with this NuroPb service method (`service.method`,
    /// e.g. `auth.authorise`), called with `{"token": ...}` (the answer's contract is in
    /// docs/OPERATIONS.md). Off when unset.
    #[arg(long, env = "NUROPB_AUTH_SERVICE_METHOD")]
    pub auth_service_method: Option<String>,

    /// Send every token to --auth-service-method, JWTs included.
    #[arg(long, env = "NUROPB_AUTH_SERVICE_ALL_TOKENS", action = ArgAction::Set, default_value_t = false)]
    pub auth_service_all_tokens: bool,

    /// Milliseconds the auth service has to answer (1 to 5000); then the token is refused.
    #[arg(long, env = "NUROPB_AUTH_SERVICE_TIMEOUT_MS", default_value_t = 2000)]
    pub auth_service_timeout_ms: u64,

    /// Seconds an auth service answer is reused for the same token (never past the answer's
    /// expiry); 0 turns the cache off.
    #[arg(long, env = "NUROPB_AUTH_CACHE_SECS", default_value_t = 60)]
    pub auth_cache_secs: u64,

    /// Most auth service answers cached (least recently used evicted first).
    #[arg(long, env = "NUROPB_AUTH_CACHE_ENTRIES", default_value_t = 10_000)]
    pub auth_cache_entries: usize,

    // --- Observability: metrics label bounds and the x-max-length drop watch (issue 11) ---
    /// Services whose calls are labelled by name in `nuropb_gateway_call_duration_seconds`,
    /// comma separated; calls to any other service are labelled `service="other"`. None by
    /// default. Bounds the series count whatever service names clients send.
    #[arg(long, env = "NUROPB_METRICS_SERVICES", value_delimiter = ',')]
    pub metrics_services: Vec<String>,

    /// Distinct methods labelled per service of `--metrics-services` (the first seen); the
    /// rest are labelled `method="other"`.
    #[arg(long, env = "NUROPB_METRICS_MAX_METHODS", default_value_t = 32)]
    pub metrics_max_methods: usize,

    /// Log filter (tracing env-filter syntax), e.g. `info` or `ws_adapter=debug`. lapin's
    /// own logs are off by default: the mesh adapter reports connection loss and recovery.
    #[arg(long, env = "NUROPB_LOG", default_value = "info,lapin=off")]
    pub log: String,

    /// A subcommand (`check-config`), or none: serve.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The lame-duck drain: the grace, then the window (by default the rest of the drain
    /// timeout).
    pub fn lame_duck(&self) -> handler_core::LameDuckConfig {
        let grace = self.lame_duck_grace_secs.min(self.drain_timeout_secs);
        let window = self.lame_duck_secs.unwrap_or(self.drain_timeout_secs.saturating_sub(grace));
        handler_core::LameDuckConfig {
            grace: Duration::from_secs(grace),
            window: Duration::from_secs(window),
        }
    }

    /// `--trusted-proxies` parsed; an entry that is not an address or CIDR block is refused
    /// by name.
    pub fn trusted_proxies(&self) -> Result<ws_adapter::TrustedProxies> {
        let entries: Vec<&str> =
            self.trusted_proxies.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
        ws_adapter::TrustedProxies::parse(&entries)
            .map_err(|why| anyhow::anyhow!("--trusted-proxies: {why}"))
    }

    /// Checks what clap cannot; every message names the option.
    /// `--callable` parsed; an entry that is not `service.method` is refused by name.
    pub fn callable_patterns(&self) -> Result<Vec<CallPattern>> {
        self.callable
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                CallPattern::parse(e.trim()).map_err(|why| anyhow::anyhow!("--callable: {why}"))
            })
            .collect()
    }

    /// Reads `--jwt-secret-file` and `--amqp-url-file` into `jwt_secret` and `amqp_url`,
    /// each exclusive with its inline form. The messages name the option and the file,
    /// never its content.
    pub fn load_secret_files(&mut self) -> Result<()> {
        fn read(path: &std::path::Path, option: &str) -> Result<Secret> {
            let mut text = std::fs::read_to_string(path)
                .with_context(|| format!("{option}: cannot read {}", path.display()))?;
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            Ok(Secret::new(text))
        }
        if let Some(path) = &self.jwt_secret_file {
            if self.jwt_secret.is_some() {
                bail!("--jwt-secret and --jwt-secret-file are exclusive");
            }
            self.jwt_secret = Some(read(path, "--jwt-secret-file")?);
        }
        if let Some(path) = &self.amqp_url_file {
            if !self.amqp_url.is_empty() {
                bail!("--amqp-url and --amqp-url-file are exclusive");
            }
            // As the option: the nodes of one cluster, comma separated.
            let urls = read(path, "--amqp-url-file")?;
            self.amqp_url = urls.expose().split(',').map(|u| Secret::new(u.to_owned())).collect();
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        self.callable_patterns()?;
        if self.metrics_services.iter().any(|s| s.is_empty() || s == handler_core::metrics::OTHER) {
            bail!("--metrics-services: names must be non-empty and not `other`");
        }
        if self.metrics_services.len() > 256 {
            bail!("--metrics-services: at most 256 services");
        }
        if self.metrics_max_methods > 1024 {
            bail!("--metrics-max-methods must be at most 1024");
        }
        if self.ops_listen.is_some_and(|ops| ops == self.listen && ops.port() != 0) {
            bail!("--ops-listen must differ from --listen ({})", self.listen);
        }
        if self.request_timeout_ms == 0 {
            bail!("--request-timeout-ms must be greater than 0");
        }
        if self.max_connections == 0 {
            bail!("--max-connections must be greater than 0");
        }
        if self.max_handshakes_in_flight == 0 || self.max_connections_per_ip == 0 {
            bail!("--max-handshakes-in-flight and --max-connections-per-ip must be greater than 0");
        }
        if self.connect_rate_per_ip == 0 || self.connect_burst_per_ip == 0 {
            bail!("--connect-rate-per-ip and --connect-burst-per-ip must be greater than 0");
        }
        if self.max_sessions_per_user == 0 {
            bail!("--max-sessions-per-user must be greater than 0");
        }
        if self.listen_backlog == 0 {
            bail!("--listen-backlog must be greater than 0");
        }
        if self.max_in_flight == 0 || self.max_in_flight_total == 0 {
            bail!("--max-in-flight and --max-in-flight-total must be greater than 0");
        }
        // Responses to one connection's own requests must always fit its queue; otherwise a
        // client pipelining up to its in-flight limit would be closed as "too slow".
        if self.outbound_queue < self.max_in_flight {
            bail!("--outbound-queue must be at least --max-in-flight ({})", self.max_in_flight);
        }
        // A largest allowed response must fit a queue that holds anything else; otherwise a
        // client that reads would be closed as "too slow" by one big response.
        if self.outbound_queue_bytes < self.max_outbound_message_bytes.max(1024) {
            bail!(
                "--outbound-queue-bytes must be at least --max-outbound-message-bytes ({})",
                self.max_outbound_message_bytes
            );
        }
        if self.max_message_bytes < 1024 {
            bail!("--max-message-bytes must be at least 1024");
        }
        if self.max_outbound_message_bytes < 1024 {
            bail!("--max-outbound-message-bytes must be at least 1024");
        }
        if self.max_decoded_values == 0 || self.max_decoded_bytes < 1024 {
            bail!("--max-decoded-values must be > 0 and --max-decoded-bytes at least 1024");
        }
        // A lone call of the largest frame allowed must always fit the byte budgets.
        if self.max_in_flight_bytes < self.max_decoded_bytes {
            bail!(
                "--max-in-flight-bytes must be at least --max-decoded-bytes ({})",
                self.max_decoded_bytes
            );
        }
        if self.max_in_flight_bytes_total < self.max_in_flight_bytes {
            bail!(
                "--max-in-flight-bytes-total must be at least --max-in-flight-bytes ({})",
                self.max_in_flight_bytes
            );
        }
        if self.rate_per_second == 0 || self.rate_burst == 0 {
            bail!("--rate-per-second and --rate-burst must be greater than 0");
        }
        if self.ping_interval_secs == 0 || self.idle_timeout_secs <= self.ping_interval_secs {
            bail!("--idle-timeout-secs must be greater than --ping-interval-secs (> 0)");
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            bail!("--reconnect-max-ms must be at least --reconnect-min-ms (> 0)");
        }
        if self.jwt_secret.is_some() && self.jwt_public_key_file.is_some() {
            bail!("--jwt-secret and --jwt-public-key-file are exclusive");
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            bail!("--jwt-secret must be at least 16 bytes");
        }
        self.amqp_mesh_urls()?;
        if !self.amqp_url.is_empty()
            && self.jwt_secret.is_none()
            && self.jwt_public_key_file.is_none()
            && !self.uses_jwks()
            && self.auth_service_method.is_none()
        {
            bail!(
                "--jwt-secret, --jwt-public-key-file, --jwks-file, --jwks-url or \
                 --auth-service-method is required with --amqp-url"
            );
        }
        self.validate_identity()?;
        if self.service_name.is_empty() || self.service_name.len() > 200 {
            bail!("--service-name must be 1 to 200 bytes");
        }
        self.origin_policy()?;
        self.tls_acceptor()?;
        self.amqp_tls()?;
        // The whole drain has one deadline: the lame-duck window must fit in it, or the
        // last sessions would have their calls cut off before their turn.
        let window = self.lame_duck_secs.unwrap_or(0);
        if self.lame_duck_grace_secs.saturating_add(window) > self.drain_timeout_secs {
            bail!(
                "--lame-duck-grace-secs ({}) plus --lame-duck-secs ({window}) must not exceed \
                 --drain-timeout-secs ({})",
                self.lame_duck_grace_secs,
                self.drain_timeout_secs
            );
        }
        if self.drain_timeout_secs > 3600 {
            bail!("--drain-timeout-secs must be at most 3600");
        }
        let proxies = self.trusted_proxies()?;
        if self.proxy_protocol && proxies.is_empty() {
            bail!("--proxy-protocol needs --trusted-proxies (the proxies allowed to connect)");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            bail!("--log {:?}: {e}", self.log);
        }
        Ok(())
    }

    /// wss:// on the WebSocket port: the certificate and key read and checked, or `None`
    /// without --tls-cert-file. The message names the option whose file is at fault.
    pub fn tls_acceptor(&self) -> Result<Option<TlsAcceptorHandle>> {
        let (cert, key) = match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => bail!("--tls-cert-file needs --tls-key-file"),
            (None, Some(_)) => bail!("--tls-key-file needs --tls-cert-file"),
        };
        TlsAcceptorHandle::from_pem_files(cert, key).map(Some).map_err(|e| {
            let option = match &e {
                WsError::TlsFile { path, .. } | WsError::TlsPem { path, .. } if path == key => {
                    "--tls-key-file"
                }
                WsError::TlsKeyRejected { .. } => "--tls-key-file (with --tls-cert-file)",
                _ => "--tls-cert-file",
            };
            anyhow::Error::new(e).context(option)
        })
    }

    /// amqps:// settings for the mesh: the files read and checked. The message names the
    /// option.
    pub fn amqp_tls(&self) -> Result<AmqpTlsConfig> {
        let read = |option: &str, path: &PathBuf| -> Result<String> {
            read_pem_file(path).with_context(|| format!("{option}: cannot read {}", path.display()))
        };
        let ca_pem = self.amqp_ca_file.as_ref().map(|p| read("--amqp-ca-file", p)).transpose()?;
        let client_identity = match (&self.amqp_client_cert_file, &self.amqp_client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read("--amqp-client-cert-file", cert)?,
                key_pem: read("--amqp-client-key-file", key)?,
            }),
            (Some(_), None) => bail!("--amqp-client-cert-file needs --amqp-client-key-file"),
            (None, Some(_)) => bail!("--amqp-client-key-file needs --amqp-client-cert-file"),
        };
        let tls = AmqpTlsConfig { ca_pem, client_identity };
        if tls.is_empty() {
            return Ok(tls);
        }
        let amqps = !self.amqp_url.is_empty()
            && self.amqp_url.iter().all(|u| {
                let u = u.expose().trim();
                u.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("amqps://"))
            });
        if !amqps {
            bail!("--amqp-ca-file and --amqp-client-cert-file need an amqps:// --amqp-url");
        }
        tls.validate().map_err(|e| {
            let option = match &e {
                AmqpMeshError::Config { field: "tls.client_identity.cert_pem", .. } => {
                    "--amqp-client-cert-file"
                }
                AmqpMeshError::Config { field: "tls.client_identity.key_pem", .. } => {
                    "--amqp-client-key-file"
                }
                _ => "--amqp-ca-file",
            };
            anyhow::Error::new(e).context(option)
        })?;
        Ok(tls)
    }

    /// Whether client JWTs are (also) verified with JWKS keys.
    pub fn uses_jwks(&self) -> bool {
        self.jwks_file.is_some() || self.jwks_url.is_some()
    }

    /// The identity options (JWKS, the mesh token check); every message names the option.
    fn validate_identity(&self) -> Result<()> {
        if let Some(url) = &self.jwks_url {
            crate::jwks::check_url(url).context("--jwks-url")?;
        }
        if self.jwks_refresh_secs == 0 {
            bail!("--jwks-refresh-secs must be greater than 0");
        }
        if self.jwks_min_refresh_secs > self.jwks_refresh_secs {
            bail!("--jwks-min-refresh-secs must be at most --jwks-refresh-secs");
        }
        if !(1..=5000).contains(&self.jwks_timeout_ms) {
            bail!("--jwks-timeout-ms must be 1 to 5000");
        }
        if !(64..=16 << 20).contains(&self.jwks_max_bytes) {
            bail!("--jwks-max-bytes must be 64 to 16777216");
        }
        if let Some(target) = &self.auth_service_method {
            self.auth_service_target()
                .with_context(|| format!("--auth-service-method {target:?}"))?;
        } else if self.auth_service_all_tokens {
            bail!("--auth-service-all-tokens needs --auth-service-method");
        }
        if !(1..=5000).contains(&self.auth_service_timeout_ms) {
            bail!("--auth-service-timeout-ms must be 1 to 5000");
        }
        if !(1..=1_000_000).contains(&self.auth_cache_entries) {
            bail!("--auth-cache-entries must be 1 to 1000000");
        }
        if self.auth_cache_secs > 86_400 {
            bail!("--auth-cache-secs must be at most 86400");
        }
        Ok(())
    }

    /// `--auth-service-method` as (service, method): both non-empty, split at the last `.`.
    pub fn auth_service_target(&self) -> Result<Option<(String, String)>> {
        let Some(target) = &self.auth_service_method else { return Ok(None) };
        match target.rsplit_once('.') {
            Some((service, method))
                if !service.is_empty()
                    && !method.is_empty()
                    && target.len() <= 200
                    && target.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Ok(Some((service.to_owned(), method.to_owned())))
            }
            _ => bail!("must be `service.method` (visible ASCII, at most 200 bytes)"),
        }
    }

    /// `--amqp-url` as the mesh adapter takes it: the first node's URL and the others in
    /// order, checked (each parses, all name one vhost); `None` in demo mode.
    pub fn amqp_mesh_urls(&self) -> Result<Option<(String, Vec<String>)>> {
        let urls: Vec<String> = self
            .amqp_url
            .iter()
            // The URLs hold the password: only redacted forms reach a message.
            .map(|u| u.expose().trim())
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() && !self.amqp_url.is_empty() {
            bail!("--amqp-url must name at least one URL");
        }
        let Some((first, rest)) = urls.split_first() else { return Ok(None) };
        let mut check = amqp_mesh::AmqpMeshConfig::new(first.clone());
        check.failover_urls = rest.to_vec();
        // Only the URLs are checked here; the rest of the adapter's config is the gateway's.
        check.validate().map_err(|e| anyhow::anyhow!("--amqp-url: {e}"))?;
        Ok(Some((first.clone(), rest.to_vec())))
    }

    /// The browser origins allowed at the upgrade. In-memory demo mode (no --amqp-url)
    /// with no --allowed-origins allows pages on this machine; anywhere else, origins are
    /// opt-in.
    pub fn origin_policy(&self) -> Result<OriginPolicy> {
        self.origin_policy_in(self.amqp_url.is_empty())
    }

    /// [`Cli::origin_policy`] for a gateway in demo mode or not (a reload keeps the mode
    /// the gateway started in).
    pub fn origin_policy_in(&self, demo_mode: bool) -> Result<OriginPolicy> {
        if self.allowed_origins.is_empty() && demo_mode {
            return OriginPolicy::new(&["localhost", "127.0.0.1"])
                .context("--allowed-origins (demo default)");
        }
        OriginPolicy::new(&self.allowed_origins).context("--allowed-origins")
    }

    /// The topic patterns open to subscription. The demo is meant to be explored: its
    /// topics are open by default.
    pub fn subscribable(&self, demo_mode: bool) -> Vec<String> {
        if self.subscribable_topics.is_empty() && demo_mode {
            vec!["demo.#".to_owned()]
        } else {
            self.subscribable_topics.clone()
        }
    }

    /// The configured JWT key (`--jwt-secret`, or `--jwt-public-key-file` read now), or `None`
    /// when no key is configured.
    pub fn jwt_key(&self) -> Result<Option<JwtKey>> {
        let key = if let Some(secret) = &self.jwt_secret {
            // The key itself: the authenticator needs it.
            JwtKey::Hs256Secret(secret.expose().as_bytes().to_vec())
        } else if let Some(path) = &self.jwt_public_key_file {
            let pem = std::fs::read_to_string(path).with_context(|| {
                format!("--jwt-public-key-file: cannot read {}", path.display())
            })?;
            match self.jwt_algorithm {
                JwtAlgorithm::Rs256 => JwtKey::Rs256PublicPem(pem),
                JwtAlgorithm::Es256 => JwtKey::Es256PublicPem(pem),
                JwtAlgorithm::Hs256 => {
                    bail!("--jwt-algorithm hs256 takes --jwt-secret, not a key file")
                }
            }
        } else {
            return Ok(None);
        };
        Ok(Some(key))
    }

    /// The JWT checks (issuer, audience, claims, lifetime) of the options, with `key`.
    pub fn jwt_config_with(&self, key: JwtKey) -> JwtConfig {
        let mut config = JwtConfig::new(key);
        config.issuer.clone_from(&self.jwt_issuer);
        if !self.jwt_audience.is_empty() {
            config.audience = Some(self.jwt_audience.clone());
        }
        config.username_claim.clone_from(&self.jwt_username_claim);
        config.max_lifetime_secs = self.jwt_max_lifetime_secs;
        config
    }
}

/// A PEM file's text, at most `ws_adapter::MAX_TLS_FILE_BYTES` (a CA bundle of a few hundred
/// certificates fits; anything larger is the wrong file).
fn read_pem_file(path: &std::path::Path) -> Result<String> {
    use std::io::Read as _;
    let limit = ws_adapter::MAX_TLS_FILE_BYTES;
    let mut text = String::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        bail!("larger than {limit} bytes");
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    fn urls(args: &[&str]) -> Result<Option<(String, Vec<String>)>, String> {
        let mut argv = vec!["nuropb-gateway"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.amqp_mesh_urls().map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn amqp_urls_are_a_list_of_one_vhost() {
        let (a, b, c) = ("amqp://u:p@a:5672/m", "amqp://u:p@b:5672/m", "amqp://u:p@c:5672/m");
        assert_eq!(urls(&[]), Ok(None));
        assert_eq!(urls(&["--amqp-url", a]), Ok(Some((a.to_owned(), vec![]))));
        let list = format!("{a}, {b}");
        let expected = Some((a.to_owned(), vec![b.to_owned(), c.to_owned()]));
        assert_eq!(urls(&["--amqp-url", &list, "--amqp-url", c]), Ok(expected));
        let refused = urls(&["--amqp-url", ","]).unwrap_err();
        assert!(refused.contains("--amqp-url must name at least one URL"), "{refused}");
        let other = format!("{a},amqp://u:secret@b:5672/other");
        let refused = urls(&["--amqp-url", &other]).unwrap_err();
        assert!(refused.starts_with("--amqp-url: ") && refused.contains("vhost"), "{refused}");
        assert!(!refused.contains("secret"), "a password in the error: {refused}");
    }
}
