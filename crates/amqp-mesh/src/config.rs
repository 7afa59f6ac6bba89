//! [`AmqpMeshConfig`]: everything the adapter needs, as plain data with documented
//! defaults. The binary fills it from its own configuration; this crate never reads the
//! environment, files or the command line.

use std::fmt;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::AmqpMeshError;

/// AMQP short strings (queue names, routing keys, correlation ids) hold at most 255 bytes.
pub(crate) const MAX_SHORT_STRING: usize = 255;

/// Length of the per-connection token in queue names (lowercase hex).
pub(crate) const CONNECTION_TOKEN_LEN: usize = 8;

/// Whether requests and commands are encrypted for methods that ask for it (spec §10).
///
/// In `Auto` and `Required` the target service's `nuropb_describe` decides: a method it
/// marks `requires_encryption: true` is always sent encrypted with the service's public
/// key, or not at all (`MeshError::Encryption` if the service publishes no key). Once a
/// service has described itself, that description stays in use until a later lookup
/// succeeds: expired descriptions are refreshed in the background and a failed refresh
/// (timeout, error answer) keeps the old one, so a busy service never turns encryption
/// off. The modes differ only for a service that has never described itself
/// successfully since the adapter started (describe timed out, answered an error or
/// garbage), for `describe_negative_ttl` after each failed lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptionMode {
    /// Never encrypt and never fetch service descriptions (what nuropb-gw 0.1.4 does).
    Off,
    /// A service never described successfully gets its calls in plaintext, including
    /// calls to methods that may require encryption (the lookup failure is logged at
    /// `warn` with the service name). What nuropb's own requester does.
    Auto,
    /// A service never described successfully gets no calls: they fail with
    /// `MeshError::Encryption` until a lookup succeeds. Choose this when some service
    /// must never receive plaintext, at the price of failing calls to a service too busy
    /// to answer its first describe within `describe_timeout`.
    Required,
}

/// TLS of an `amqps://` connection, as PEM text (the binary reads the files). lapin
/// verifies the broker's certificate against the system's trust store plus `ca_pem`, and
/// checks that it names the URL's host.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AmqpTlsConfig {
    /// CA certificates (PEM, one or more) trusted for the broker's certificate, in addition
    /// to the system's. Default: none (the system's trust store only).
    pub ca_pem: Option<String>,
    /// A client certificate to present to the broker (for brokers that require one, e.g.
    /// RabbitMQ with `ssl_options.fail_if_no_peer_cert`). Default: none.
    pub client_identity: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, both PEM. `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate first, then any intermediates.
    pub cert_pem: String,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for AmqpTlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Whether each part is set; the certificates themselves are long and say little.
        f.debug_struct("AmqpTlsConfig")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<set>"))
            .field("client_identity", &self.client_identity.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl AmqpTlsConfig {
    /// Whether anything is set.
    pub fn is_empty(&self) -> bool {
        self.ca_pem.is_none() && self.client_identity.is_none()
    }

    /// Checks the PEM text: `ca_pem` holds at least one certificate and every one parses
    /// as X.509; the client identity has a certificate and a private key. The error names
    /// the field (`tls.ca_pem`, `tls.client_identity.cert_pem`, `…key_pem`).
    pub fn validate(&self) -> Result<(), AmqpMeshError> {
        let bad = |field: &'static str, reason: String| AmqpMeshError::Config { field, reason };
        if let Some(ca) = &self.ca_pem {
            let certs = certificates(ca).map_err(|reason| bad("tls.ca_pem", reason))?;
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| bad("tls.ca_pem", format!("not a usable CA certificate: {e}")))?;
            }
        }
        if let Some(identity) = &self.client_identity {
            certificates(&identity.cert_pem)
                .map_err(|reason| bad("tls.client_identity.cert_pem", reason))?;
            PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|e| {
                bad("tls.client_identity.key_pem", format!("no usable PEM private key: {e}"))
            })?;
        }
        Ok(())
    }

    /// lapin's form of it.
    pub(crate) fn to_lapin(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self.client_identity.as_ref().map(|id| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: id.cert_pem.clone().into_bytes(),
                key: id.key_pem.clone().into_bytes(),
            }),
            cert_chain: self.ca_pem.clone(),
        }
    }
}

/// The certificates of a PEM text: at least one, each block valid.
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block".to_owned());
    }
    Ok(certs)
}

/// Configuration of [`crate::AmqpMesh`]. Build with [`AmqpMeshConfig::new`] and adjust
/// fields; [`AmqpMesh::start`](crate::AmqpMesh::start) validates it once and names the
/// offending field on error. Its `Debug` output hides the URL's password.
#[derive(Clone)]
pub struct AmqpMeshConfig {
    /// Broker URL, `amqp://user:pass@host:port/<vhost>` or `amqps://…`. The vhost is the
    /// mesh name (nuropb's default is `nuropb`). `heartbeat` below applies unless the URL
    /// sets `?heartbeat=`. Default: `amqp://guest:guest@127.0.0.1:5672/nuropb`.
    pub url: String,
    /// Further nodes of the same RabbitMQ cluster, in the order they are tried after
    /// `url` (see [`AmqpMeshConfig::node_urls`]). Each must name the same vhost as `url`
    /// (one mesh). The first connection goes to `url`, so instances spread over the
    /// nodes by listing them in different orders. Default: none.
    pub failover_urls: Vec<String>,
    /// The gateway's own NuroPb service name: its service queue is `nuropb-<name>-sq` and
    /// peers call it under this name. Must not contain `.`, `*` or `#` (it is a word of
    /// the control topic). Default: `nuropb-gateway`.
    pub service_name: String,
    /// This process's instance id, part of its response, events and control queue names
    /// (with a fresh token per connection, see [`AmqpMeshConfig::response_queue`]). Two
    /// live processes should not share one. Default: a fresh `uuid4` in 32 lowercase hex.
    pub instance_id: String,
    /// Direct exchange for requests and commands. Default: `nuropb-rpc-exchange`.
    pub rpc_exchange: String,
    /// Topic exchange for events. Default: `nuropb-events-exchange`.
    pub events_exchange: String,
    /// Fanout exchange that receives rejected and expired messages. Default:
    /// `nuropb-dl-exchange`.
    pub dl_exchange: String,
    /// Topic patterns (AMQP `*`/`#` syntax) whose events this instance receives and
    /// forwards to the core. Every instance receives every matching event. Default: none.
    pub event_bindings: Vec<String>,
    /// AMQP `expiration` of requests and commands: a message still queued after this long
    /// is dead-lettered instead of being processed for a caller that gave up. Set it to
    /// the gateway's request timeout. Default: 60 s.
    pub request_ttl: Duration,
    /// Unacknowledged deliveries the broker may push to each of this instance's
    /// manual-ack consumers (service queue, events queue). Bounds the memory and the
    /// work in progress of inbound traffic. Default: 64.
    pub prefetch: u16,
    /// First reconnect delay after the connection drops. Default: 100 ms.
    pub reconnect_min: Duration,
    /// Longest reconnect delay; delays double from `reconnect_min` up to this, each
    /// jittered down by up to half. Default: 10 s.
    pub reconnect_max: Duration,
    /// Limit for one connection attempt (TCP, TLS, AMQP handshake). Default: 5 s.
    pub connect_timeout: Duration,
    /// AMQP heartbeat requested from the broker, in whole seconds. A dead link (even one
    /// that is silent, with no FIN or RST) is noticed within 2.5 heartbeats: lapin gives
    /// up after two heartbeats without a byte from the broker and checks every half
    /// heartbeat; the mesh then goes unready and reconnects. Ignored when the URL sets
    /// `heartbeat`. Default: 5 s (a dead link is noticed within 12.5 s; the heartbeat
    /// frames cost a few bytes a second).
    pub heartbeat: Duration,
    /// Capacity of the channel to the core ([`handler_core::MeshInbound`]). When it is
    /// full, the consumers wait, no more deliveries are acknowledged, and the broker stops
    /// pushing after `prefetch` unacknowledged messages: back-pressure goes to the broker
    /// queue, never to memory here. Default: 1024.
    pub inbound_capacity: usize,
    /// Messages waiting for the publisher task. When full, publishing fails at once with
    /// `MeshError::Unavailable` (the broker is not keeping up; waiting would only hide it).
    /// Default: 1024.
    pub publish_queue_capacity: usize,
    /// Longest wait for the broker to confirm a command, event or response (requests are
    /// bounded by their own timeout). Default: 5 s.
    pub publish_timeout: Duration,
    /// Largest serialized body the gateway publishes; larger calls are rejected before
    /// publishing. Default: 1 MiB.
    pub max_body_bytes: usize,
    /// Largest body accepted from the broker (responses, events, calls to the gateway);
    /// larger ones are dropped and counted. Default: 16 MiB.
    pub max_inbound_body_bytes: usize,
    /// Longest `trace_id` the gateway publishes. Default: 256 bytes.
    pub max_trace_id_len: usize,
    /// Deepest nesting of arrays/objects in `params`, `context` and event payloads. Python's
    /// decoder dies on very deep documents (a fatal message for a service, §7.5) and
    /// serde_json refuses more than 127 levels. Default: 64.
    pub max_json_depth: usize,
    /// How long a service description (for encryption) is used before it is refreshed.
    /// The refresh runs in the background; the expired description stays in use meanwhile
    /// and for good if the refresh fails, but only to decide that a method requires
    /// encryption: its public key is used for at most `encryption_key_ttl`. Default: 5 min.
    pub describe_ttl: Duration,
    /// Oldest public key a call is encrypted with. A service may restart with a new key
    /// (nuropb services often generate one at start), and a nuropb service that receives a
    /// body it cannot decrypt drops off the mesh for good (spec §7.5), so a key older than
    /// this is fetched again (`nuropb_describe`) before the next encrypted call, which
    /// waits for it (at most `describe_timeout`, one lookup shared by concurrent callers).
    /// If that lookup fails, the call is refused with `MeshError::Encryption` rather than
    /// encrypted with the old key. A key is also dropped at once when an encrypted request
    /// to its service gets no response in time. Shorter means a smaller window in which a
    /// restarted service can receive a body for its old key, at the price of one describe
    /// round trip per service per period; zero means a describe before every encrypted
    /// call. Default: 30 s.
    pub encryption_key_ttl: Duration,
    /// How long a failed description lookup is remembered before the next attempt, so
    /// that a service without a working describe does not cost an extra round trip per
    /// call. For a service never described successfully, this is how long its calls get
    /// `encryption`'s fallback (plaintext in `Auto`, refusal in `Required`); for one
    /// described before, how long its last known description is used before the next
    /// refresh attempt. Default: 10 s.
    pub describe_negative_ttl: Duration,
    /// Timeout of one `nuropb_describe` call. A first lookup delays the calls waiting for
    /// it by at most this much; refreshes delay nobody. Default: 2 s.
    pub describe_timeout: Duration,
    /// Services whose description is cached; past it, entries without a known
    /// description go first, then arbitrary ones (clients choose service names, so this
    /// must be bounded; an evicted service starts over with a first lookup).
    /// Default: 256.
    pub describe_cache_capacity: usize,
    /// Whether requests and commands are encrypted for methods that require it, and what
    /// happens when a service's description is unavailable (see [`EncryptionMode`]).
    /// Default: `Auto`.
    pub encryption: EncryptionMode,
    /// Bound of this instance's events queue on the broker (`x-max-length`); when the
    /// core falls that far behind, the oldest events are dropped by the broker.
    /// Default: 10 000.
    pub events_queue_max_length: u32,
    /// Bound of this instance's control queue on the broker (`x-max-length` with
    /// `x-overflow: reject-publish`), which carries the fan-out operations (`push_to_user`,
    /// `push_to_all`, `disconnect_user`) to this instance. When the core falls that far
    /// behind, the broker refuses new operations instead of dropping accepted ones, and
    /// the peer that asked gets an error instead of `accepted`. Default: 1 000.
    pub control_queue_max_length: u32,
    /// Longest wait for the core to answer a `stats` call from the mesh. Default: 2 s.
    pub core_reply_timeout: Duration,
    /// On shutdown, how long pending requests may still receive their responses, and
    /// published messages (commands, events, responses) their broker confirmations, before
    /// the connection is closed and what is left fails with `MeshError::Unavailable`.
    /// The drain ends as soon as nothing is outstanding. Default: 5 s.
    pub drain_timeout: Duration,
    /// TLS of an `amqps://` URL: extra trusted CAs and a client certificate (see
    /// [`AmqpTlsConfig`]). Only with an `amqps://` URL. Default: none (an `amqps://` URL
    /// then trusts the system's store only).
    pub tls: AmqpTlsConfig,
}

impl Default for AmqpMeshConfig {
    fn default() -> Self {
        AmqpMeshConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/nuropb".to_owned(),
            failover_urls: Vec::new(),
            service_name: "nuropb-gateway".to_owned(),
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
            rpc_exchange: "nuropb-rpc-exchange".to_owned(),
            events_exchange: "nuropb-events-exchange".to_owned(),
            dl_exchange: "nuropb-dl-exchange".to_owned(),
            event_bindings: Vec::new(),
            request_ttl: Duration::from_secs(60),
            prefetch: 64,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(5),
            inbound_capacity: 1024,
            publish_queue_capacity: 1024,
            publish_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            max_inbound_body_bytes: 16 * 1024 * 1024,
            max_trace_id_len: 256,
            max_json_depth: 64,
            describe_ttl: Duration::from_secs(300),
            describe_negative_ttl: Duration::from_secs(10),
            describe_timeout: Duration::from_secs(2),
            describe_cache_capacity: 256,
            encryption_key_ttl: Duration::from_secs(30),
            encryption: EncryptionMode::Auto,
            events_queue_max_length: 10_000,
            control_queue_max_length: 1_000,
            core_reply_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(5),
            tls: AmqpTlsConfig::default(),
        }
    }
}

impl fmt::Debug for AmqpMeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written out (not derived) so that the password never reaches a log.
        f.debug_struct("AmqpMeshConfig")
            .field("url", &self.redacted_url())
            .field(
                "failover_urls",
                &self.failover_urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("service_name", &self.service_name)
            .field("instance_id", &self.instance_id)
            .field("rpc_exchange", &self.rpc_exchange)
            .field("events_exchange", &self.events_exchange)
            .field("dl_exchange", &self.dl_exchange)
            .field("event_bindings", &self.event_bindings)
            .field("request_ttl", &self.request_ttl)
            .field("prefetch", &self.prefetch)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("inbound_capacity", &self.inbound_capacity)
            .field("publish_queue_capacity", &self.publish_queue_capacity)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_inbound_body_bytes", &self.max_inbound_body_bytes)
            .field("max_trace_id_len", &self.max_trace_id_len)
            .field("max_json_depth", &self.max_json_depth)
            .field("describe_ttl", &self.describe_ttl)
            .field("describe_negative_ttl", &self.describe_negative_ttl)
            .field("describe_timeout", &self.describe_timeout)
            .field("describe_cache_capacity", &self.describe_cache_capacity)
            .field("encryption_key_ttl", &self.encryption_key_ttl)
            .field("encryption", &self.encryption)
            .field("events_queue_max_length", &self.events_queue_max_length)
            .field("control_queue_max_length", &self.control_queue_max_length)
            .field("core_reply_timeout", &self.core_reply_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl AmqpMeshConfig {
    /// Defaults with the given broker URL.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpMeshConfig { url: url.into(), ..AmqpMeshConfig::default() }
    }

    /// The response queue of one connection of this instance,
    /// `nuropb-<service_name>-<instance_id>-<connection>-rq`: nuropb's naming (§2.3) with
    /// `<instance_id>-<connection>` as the instance id. `connection` is a fresh token per
    /// connection (8 lowercase hex), so that a reconnect never
    /// needs a queue the broker may still hold for the previous, half-dead connection
    /// (an exclusive queue or consumer is only released once the broker notices, after up
    /// to two heartbeats).
    pub fn response_queue(&self, connection: &str) -> String {
        format!("nuropb-{}-{}-{connection}-rq", self.service_name, self.instance_id)
    }

    /// The events queue of one connection, `nuropb-<service_name>-<instance_id>-<connection>-eq`.
    pub fn events_queue(&self, connection: &str) -> String {
        format!("nuropb-{}-{}-{connection}-eq", self.service_name, self.instance_id)
    }

    /// Where the broker dead-letters the events its events queue drops when full (only to
    /// count them): `nuropb-<service_name>-<instance_id>-<connection>-dq`.
    pub fn events_drop_queue(&self, connection: &str) -> String {
        format!("nuropb-{}-{}-{connection}-dq", self.service_name, self.instance_id)
    }

    /// The control queue of one connection, `nuropb-<service_name>-<instance_id>-<connection>-cq`.
    pub fn control_queue(&self, connection: &str) -> String {
        format!("nuropb-{}-{}-{connection}-cq", self.service_name, self.instance_id)
    }

    /// The gateway's service queue, shared by all instances: `nuropb-<service_name>-sq`.
    pub fn service_queue(&self) -> String {
        format!("nuropb-{}-sq", self.service_name)
    }

    /// The topic on which fan-out operations (`push_to_user`, …) reach every instance.
    pub fn control_topic(&self) -> String {
        format!("nuropb-gateway.{}.control", self.service_name)
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Every node's URL in the order they are tried: `url`, then `failover_urls`.
    ///
    /// The supervisor connects to the first; when a connection is lost, or an attempt
    /// fails, it goes on with the next one in the list (wrapping around), with no delay
    /// between the nodes of one round and the usual backoff (`reconnect_min` doubling up
    /// to `reconnect_max`) before each new round. A lost connection starts a new round at
    /// the node after the one it was on, so a stopped node is tried last.
    pub fn node_urls(&self) -> Vec<&str> {
        std::iter::once(self.url.as_str())
            .chain(self.failover_urls.iter().map(String::as_str))
            .collect()
    }

    /// Node `index`'s URL without its password (as [`AmqpMeshConfig::node_urls`] counts).
    pub fn redacted_node_url(&self, index: usize) -> String {
        self.node_urls().get(index).map(|url| redact_url(url)).unwrap_or_default()
    }

    /// Checks every field once; the error names the first bad one.
    pub fn validate(&self) -> Result<(), AmqpMeshError> {
        let uri = self.parse_uri()?;
        let vhost = uri.vhost.clone();
        for url in &self.failover_urls {
            let node = parse_uri(url, "failover_urls", self.heartbeat)?;
            if !self.tls.is_empty() && node.scheme != AMQPScheme::AMQPS {
                return Err(AmqpMeshError::Config {
                    field: "failover_urls",
                    reason: format!(
                        "{}: tls is set, but this node is not amqps://",
                        redact_url(url)
                    ),
                });
            }
            if node.vhost != vhost {
                return Err(AmqpMeshError::Config {
                    field: "failover_urls",
                    reason: format!(
                        "{} names vhost {:?}, url names {vhost:?}: all nodes must serve one mesh",
                        redact_url(url),
                        node.vhost
                    ),
                });
            }
        }
        let bad = |field: &'static str, reason: &str| {
            Err(AmqpMeshError::Config { field, reason: reason.to_owned() })
        };
        if !self.tls.is_empty() && uri.scheme != AMQPScheme::AMQPS {
            return bad("tls", "is set, but url is not amqps://");
        }
        self.tls.validate()?;
        if self.service_name.is_empty() {
            return bad("service_name", "must not be empty");
        }
        if self.service_name.contains(['.', '*', '#'])
            || self.service_name.contains(char::is_whitespace)
        {
            return bad("service_name", "must not contain '.', '*', '#' or whitespace");
        }
        if self.instance_id.is_empty() || self.instance_id.contains(char::is_whitespace) {
            return bad("instance_id", "must be non-empty without whitespace");
        }
        // The longest derived name decides whether the pair fits in AMQP short strings.
        let token = "0".repeat(CONNECTION_TOKEN_LEN);
        if self.response_queue(&token).len() > MAX_SHORT_STRING
            || self.control_topic().len() > MAX_SHORT_STRING
        {
            return bad(
                "service_name",
                "service_name and instance_id are too long for queue names (255 bytes)",
            );
        }
        for (field, name) in [
            ("rpc_exchange", &self.rpc_exchange),
            ("events_exchange", &self.events_exchange),
            ("dl_exchange", &self.dl_exchange),
        ] {
            if name.is_empty() || name.len() > MAX_SHORT_STRING {
                return bad(field, "must be 1 to 255 bytes");
            }
        }
        if self.event_bindings.iter().any(|b| b.is_empty() || b.len() > MAX_SHORT_STRING) {
            return bad("event_bindings", "every pattern must be 1 to 255 bytes");
        }
        if self.request_ttl < Duration::from_millis(1)
            || self.request_ttl.as_millis() > u128::from(u32::MAX)
        {
            return bad("request_ttl", "must be between 1 ms and about 49 days");
        }
        if self.prefetch == 0 {
            return bad("prefetch", "must be at least 1 (0 would mean unlimited)");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad("reconnect_min", "must be positive and not above reconnect_max");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must be positive");
        }
        if self.heartbeat.as_secs() > u64::from(u16::MAX) {
            return bad("heartbeat", "must fit in 16 bits of seconds");
        }
        for (field, value) in [
            ("inbound_capacity", self.inbound_capacity),
            ("publish_queue_capacity", self.publish_queue_capacity),
            ("max_body_bytes", self.max_body_bytes),
            ("max_inbound_body_bytes", self.max_inbound_body_bytes),
            ("max_trace_id_len", self.max_trace_id_len),
            ("max_json_depth", self.max_json_depth),
            ("describe_cache_capacity", self.describe_cache_capacity),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.max_json_depth > 127 {
            return bad("max_json_depth", "must be at most 127 (serde_json's own limit)");
        }
        for (field, value) in [
            ("publish_timeout", self.publish_timeout),
            ("describe_timeout", self.describe_timeout),
            ("core_reply_timeout", self.core_reply_timeout),
        ] {
            if value.is_zero() {
                return bad(field, "must be positive");
            }
        }
        if self.events_queue_max_length == 0 {
            return bad("events_queue_max_length", "must be at least 1");
        }
        if self.control_queue_max_length == 0 {
            return bad("control_queue_max_length", "must be at least 1");
        }
        Ok(())
    }

    /// The parsed `url` with the heartbeat default applied.
    pub(crate) fn parse_uri(&self) -> Result<AMQPUri, AmqpMeshError> {
        parse_uri(&self.url, "url", self.heartbeat)
    }

    /// Node `index`'s parsed URL (as [`AmqpMeshConfig::node_urls`] counts), heartbeat
    /// default applied.
    pub(crate) fn parse_node_uri(&self, index: usize) -> Result<AMQPUri, AmqpMeshError> {
        match index.checked_sub(1) {
            None => self.parse_uri(),
            Some(i) => match self.failover_urls.get(i) {
                Some(url) => parse_uri(url, "failover_urls", self.heartbeat),
                None => Err(AmqpMeshError::Config {
                    field: "failover_urls",
                    reason: format!("no node {index}"),
                }),
            },
        }
    }
}

/// Parses one node's URL; errors name `field` and never quote the password.
fn parse_uri(
    url: &str,
    field: &'static str,
    heartbeat: Duration,
) -> Result<AMQPUri, AmqpMeshError> {
    let mut uri: AMQPUri = url.parse().map_err(|reason: String| {
        // Some parse errors quote the whole URL, password included.
        let reason = if reason.contains(url) { "not a valid amqp url".to_owned() } else { reason };
        AmqpMeshError::Config { field, reason }
    })?;
    if uri.query.heartbeat.is_none() {
        // Checked in `validate`; saturate rather than panic if called before it.
        uri.query.heartbeat = Some(u16::try_from(heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    Ok(uri)
}

/// Removes the password from an `amqp://user:password@host/…` URL.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &AmqpMeshConfig) -> Option<&'static str> {
        match config.validate() {
            Ok(()) => None,
            Err(AmqpMeshError::Config { field, .. }) => Some(field),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_named_like_nuropb() {
        let c = AmqpMeshConfig { instance_id: "i1".into(), ..AmqpMeshConfig::default() };
        assert_eq!(field_of(&c), None);
        assert_eq!(c.response_queue("0a1b2c3d"), "nuropb-nuropb-gateway-i1-0a1b2c3d-rq");
        assert_eq!(c.events_queue("0a1b2c3d"), "nuropb-nuropb-gateway-i1-0a1b2c3d-eq");
        assert_eq!(c.control_queue("0a1b2c3d"), "nuropb-nuropb-gateway-i1-0a1b2c3d-cq");
        assert_eq!(c.encryption_key_ttl, Duration::from_secs(30));
        assert_eq!(c.service_queue(), "nuropb-nuropb-gateway-sq");
        assert_eq!(c.control_topic(), "nuropb-gateway.nuropb-gateway.control");
        assert_eq!(AmqpMeshConfig::default().instance_id.len(), 32);
    }

    #[test]
    fn tls_needs_amqps_and_valid_pem() {
        #![allow(clippy::unwrap_used, reason = "tests")]
        let pki = nuropb_testkit::tls::TestPki::generate("CA");
        let amqps = "amqps://guest:guest@localhost:5671/nuropb";
        let identity = |cert: &str, key: &str| {
            Some(ClientIdentity { cert_pem: cert.to_owned(), key_pem: key.to_owned() })
        };
        let check = |url: &str, tls: AmqpTlsConfig, expected: Option<&str>| {
            let c = AmqpMeshConfig { tls: tls.clone(), ..AmqpMeshConfig::new(url) };
            assert_eq!(field_of(&c), expected, "{url} {tls:?}");
        };
        let ca = |pem: &str| AmqpTlsConfig { ca_pem: Some(pem.to_owned()), ..Default::default() };
        check(amqps, AmqpTlsConfig::default(), None);
        check(amqps, ca(&pki.ca_pem), None);
        // Two CAs in one bundle.
        check(amqps, ca(&format!("{}{}", pki.ca_pem, pki.cert_pem)), None);
        check("amqp://guest:guest@localhost/nuropb", ca(&pki.ca_pem), Some("tls"));
        check(amqps, ca(""), Some("tls.ca_pem"));
        check(amqps, ca(&pki.key_pem), Some("tls.ca_pem"));
        check(
            amqps,
            ca("-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"),
            Some("tls.ca_pem"),
        );
        // Valid base64, not a certificate.
        check(
            amqps,
            ca("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Some("tls.ca_pem"),
        );
        let with_identity = |id| AmqpTlsConfig { ca_pem: None, client_identity: id };
        check(amqps, with_identity(identity(&pki.cert_pem, &pki.key_pem)), None);
        check(
            amqps,
            with_identity(identity(&pki.key_pem, &pki.key_pem)),
            Some("tls.client_identity.cert_pem"),
        );
        check(
            amqps,
            with_identity(identity(&pki.cert_pem, &pki.cert_pem)),
            Some("tls.client_identity.key_pem"),
        );
        // The key never shows in Debug.
        let debug = format!("{:?}", identity(&pki.cert_pem, &pki.key_pem).unwrap());
        assert!(!debug.contains(pki.key_pem.lines().nth(1).unwrap()), "{debug}");
    }

    #[test]
    fn validation_names_the_field() {
        let check = |f: fn(&mut AmqpMeshConfig), expected: &str| {
            let mut c = AmqpMeshConfig::default();
            f(&mut c);
            assert_eq!(field_of(&c), Some(expected));
        };
        check(|c| c.url = "http://x".into(), "url");
        check(|c| c.url = "not a url".into(), "url");
        check(|c| c.failover_urls = vec!["not a url".into()], "failover_urls");
        // Another vhost is another mesh.
        check(|c| c.failover_urls = vec!["amqp://127.0.0.1:5673/other".into()], "failover_urls");
        check(|c| c.service_name = String::new(), "service_name");
        check(|c| c.service_name = "a.b".into(), "service_name");
        check(|c| c.service_name = "x".repeat(250), "service_name");
        check(|c| c.instance_id = "a b".into(), "instance_id");
        check(|c| c.rpc_exchange = String::new(), "rpc_exchange");
        check(|c| c.event_bindings = vec![String::new()], "event_bindings");
        check(|c| c.request_ttl = Duration::ZERO, "request_ttl");
        check(|c| c.prefetch = 0, "prefetch");
        check(|c| c.reconnect_min = Duration::from_secs(60), "reconnect_min");
        check(|c| c.inbound_capacity = 0, "inbound_capacity");
        check(|c| c.max_json_depth = 500, "max_json_depth");
        check(|c| c.publish_timeout = Duration::ZERO, "publish_timeout");
        check(|c| c.control_queue_max_length = 0, "control_queue_max_length");
        // The connection token counts: 255 bytes in all, or refused.
        check(
            |c| c.instance_id = "i".repeat(255 - "nuropb-nuropb-gateway--12345678-rq".len() + 1),
            "service_name",
        );
        let fits = AmqpMeshConfig {
            instance_id: "i".repeat(255 - "nuropb-nuropb-gateway--12345678-rq".len()),
            ..AmqpMeshConfig::default()
        };
        assert_eq!(field_of(&fits), None);
    }

    #[test]
    fn heartbeat_from_config_unless_in_url() {
        let mut c = AmqpMeshConfig::new("amqp://127.0.0.1:5672/mesh");
        assert_eq!(c.parse_uri().expect("uri").query.heartbeat, Some(5));
        c.url = "amqp://127.0.0.1:5672/mesh?heartbeat=7".into();
        assert_eq!(c.parse_uri().expect("uri").query.heartbeat, Some(7));
        assert_eq!(c.parse_uri().expect("uri").vhost, "mesh");
    }

    #[test]
    fn passwords_are_redacted() {
        let check = |url: &str, expected: &str| assert_eq!(redact_url(url), expected);
        check("amqp://guest:secret@host:5672/vh", "amqp://guest:***@host:5672/vh");
        check("amqps://u:p@h", "amqps://u:***@h");
        check("amqp://host/vh", "amqp://host/vh");
        check("garbage", "garbage");
        let mut config = AmqpMeshConfig::new("amqp://guest:hunter2@host/vh");
        config.failover_urls = vec!["amqp://guest:hunter3@other/vh".into()];
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("hunter3"), "{debug}");
        assert_eq!(config.redacted_node_url(1), "amqp://guest:***@other/vh");
    }

    #[test]
    fn nodes_in_order_on_one_vhost() {
        let mut c = AmqpMeshConfig::new("amqp://a:5672/mesh");
        c.failover_urls =
            vec!["amqp://b:5673/mesh".into(), "amqp://c:5674/mesh?heartbeat=2".into()];
        assert_eq!(field_of(&c), None);
        assert_eq!(
            c.node_urls(),
            ["amqp://a:5672/mesh", "amqp://b:5673/mesh", "amqp://c:5674/mesh?heartbeat=2"]
        );
        assert_eq!(c.parse_node_uri(1).expect("node 1").authority.port, 5673);
        assert_eq!(c.parse_node_uri(2).expect("node 2").query.heartbeat, Some(2));
        assert_eq!(c.parse_node_uri(0).expect("node 0").query.heartbeat, Some(5));
        assert!(c.parse_node_uri(3).is_err());
    }
}
