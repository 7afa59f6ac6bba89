//! Command line and environment: every option, parsed and validated once before the runtime
//! starts. Each flag can also be set by the environment variable shown in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser, ValueEnum};

use handler_core::auth::{JwtConfig, JwtKey};
use handler_core::mesh_manager::CallPattern;
use ws_adapter::OriginPolicy;

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
#[derive(Debug, Parser)]
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
    #[arg(long, env = "NUROPB_AMQP_URL", value_delimiter = ',')]
    pub amqp_url: Vec<String>,

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
    pub jwt_secret: Option<String>,

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

    /// Seconds allowed at shutdown for in-flight requests to finish.
    #[arg(long, env = "NUROPB_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,

    /// Seconds between the demo service's `demo.tick` events (in-memory mode only; 0 = off).
    #[arg(long, env = "NUROPB_DEMO_TICK_SECS", default_value_t = 10)]
    pub demo_tick_secs: u64,

    /// Log filter (tracing env-filter syntax), e.g. `info` or `ws_adapter=debug`. lapin's
    /// own logs are off by default: the mesh adapter reports connection loss and recovery.
    #[arg(long, env = "NUROPB_LOG", default_value = "info,lapin=off")]
    pub log: String,
}

impl Cli {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
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

    pub fn validate(&self) -> Result<()> {
        self.callable_patterns()?;
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
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            bail!("--jwt-secret must be at least 16 bytes");
        }
        self.amqp_mesh_urls()?;
        if !self.amqp_url.is_empty()
            && self.jwt_secret.is_none()
            && self.jwt_public_key_file.is_none()
        {
            bail!("--jwt-secret or --jwt-public-key-file is required with --amqp-url");
        }
        if self.service_name.is_empty() || self.service_name.len() > 200 {
            bail!("--service-name must be 1 to 200 bytes");
        }
        self.origin_policy()?;
        Ok(())
    }

    /// `--amqp-url` as the mesh adapter takes it: the first node's URL and the others in
    /// order, checked (each parses, all name one vhost); `None` in demo mode.
    pub fn amqp_mesh_urls(&self) -> Result<Option<(String, Vec<String>)>> {
        let urls: Vec<String> = self
            .amqp_url
            .iter()
            .map(|u| u.trim())
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
        let demo_mode = self.amqp_url.is_empty();
        if self.allowed_origins.is_empty() && demo_mode {
            return OriginPolicy::new(&["localhost", "127.0.0.1"])
                .context("--allowed-origins (demo default)");
        }
        OriginPolicy::new(&self.allowed_origins).context("--allowed-origins")
    }

    /// The JWT verification config, or `None` when no key is configured.
    pub fn jwt_config(&self) -> Result<Option<JwtConfig>> {
        let key = if let Some(secret) = &self.jwt_secret {
            JwtKey::Hs256Secret(secret.as_bytes().to_vec())
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
        let mut config = JwtConfig::new(key);
        config.issuer.clone_from(&self.jwt_issuer);
        if !self.jwt_audience.is_empty() {
            config.audience = Some(self.jwt_audience.clone());
        }
        config.username_claim.clone_from(&self.jwt_username_claim);
        config.max_lifetime_secs = self.jwt_max_lifetime_secs;
        Ok(Some(config))
    }
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
