//! The `ServiceMesh` adapter over RabbitMQ (lapin 4), byte-compatible with unmodified
//! Python nuropb 0.1.8 services (wire protocol `0.1.1`, spec `docs/NUROPB-WIRE.md`).
//!
//! [`AmqpMesh::start`] connects, declares the topology and returns the mesh together with
//! the channel on which events, control operations and stats requests reach the core.
//! The gateway is a requester (requests, commands, events), a subscriber (per-instance
//! events and control queues) and a NuroPb service of its own (`push_to_user`, `stats`, …).
//!
//! Code map, by floor from the top; a module uses only modules on lower floors:
//! - `mesh`: [`AmqpMesh`], the façade that builds the roles and starts the supervisor;
//! - `supervisor`: keeps one connection up, reconnects, drains;
//! - `link`: one connection, the topology it declares, and the tasks it runs;
//! - roles, each built from what it uses: `requester` (requests, commands, events,
//!   describe-driven encryption), `responses` (the response queue), `subscriber` (events
//!   and control queues), `service` (the gateway's own methods);
//! - pure parts: `config` ([`AmqpMeshConfig`], every limit with its default), `envelope`
//!   (AMQP properties and headers), `messages` (request, event and response builders),
//!   `guard` (checks before publishing), `control` (fan-out operations to and from the
//!   wire), `pending` (the correlation table), `publisher` (the publisher task: confirms,
//!   `basic.return`), `describe` (the cache of others' descriptions),
//!   `gateway_description` (ours), `delivery` (consumer helpers), `ids`, `link_state`
//!   (the link watch), `stats`, `error`.
//!
//! Architecture invariant: no lapin type appears in the public API; lapin deliveries are
//! turned into `handler_core` types in `responses`, `subscriber` and `service`, their
//! bodies read into the wire crate's types.
//!
//! Architecture invariant: calls handed to this adapter (`ServiceMesh::request` and
//! `command`) never reach the gateway's own service. They come from WebSocket clients,
//! and the gateway's methods (`push_to_all`, `disconnect_user`, `stats`, …) are for mesh
//! peers only, so the guard refuses any call whose `service` is
//! [`AmqpMeshConfig::service_name`] with `MeshError::Rejected` before anything is
//! published. Peers reach those methods through the service queue as before.
//!
//! Architecture invariant: no client reaches any gateway's methods, this deployment's or
//! another's on the same vhost. Every request and command this adapter publishes carries
//! the header `x-nuropb-gateway: <service_name>` (nuropb ignores unknown headers, spec §3),
//! and the gateway's own service answers such a call only for `nuropb_describe`; anything
//! else gets `NuropbAuthorizationError` (and a command is rejected).
//!
//! Several nodes: [`AmqpMeshConfig::failover_urls`] lists further nodes of the same
//! RabbitMQ cluster (one vhost, checked). The first connection goes to `url`; a lost
//! connection or a failed attempt moves on to the next node at once, and only a whole
//! failed round over the list waits for the backoff (see [`AmqpMeshConfig::node_urls`]).
//! [`AmqpMesh::start_unconnected`] returns without waiting for a broker at all; calls fail
//! at once with `MeshError::Unavailable` until the supervisor has connected. Every log
//! line and error names a node without its password.
//!
//! Queues are named per connection (`nuropb-<service_name>-<instance_id>-<token>-rq`,
//! `-eq`, `-cq`, with a fresh 8-hex token per connection), so a reconnect never waits for
//! the broker to let go of the previous connection's exclusive queues. Fan-out operations
//! travel on their own control queue, which refuses new operations when full
//! (`control_queue_max_length`) rather than drop accepted ones as the events queue does;
//! the peer that asked is then answered `NuropbOverloadedError` instead of `accepted`.
//!
//! Encryption (spec §10), with [`EncryptionMode::Auto`] or [`EncryptionMode::Required`]:
//! before a call, the target service's `nuropb_describe` is looked up (shared by
//! concurrent callers, bounded by `describe_timeout`) and cached.
//! - A method the description marks `requires_encryption` is sent encrypted with the
//!   service's public key, or not at all (`MeshError::Encryption` when the service
//!   publishes no key). Other methods are sent in plaintext.
//! - A description is used for `describe_ttl`, then refreshed in the background while the
//!   expired one stays in use; a refresh that fails (no answer in time, an error answer,
//!   garbage, connection lost) keeps the last known description, and is retried after
//!   `describe_negative_ttl`. So once a service has described itself, calls to its
//!   encrypted methods are never downgraded, however busy it gets.
//! - The stale description only decides *that* a method is encrypted. The key it is
//!   encrypted with comes from a lookup at most `encryption_key_ttl` old (default 30 s):
//!   an older key is looked up again first, the call waiting for it (at most
//!   `describe_timeout`, one lookup shared by concurrent callers), and if that lookup
//!   fails the call is refused with `MeshError::Encryption("public key of <service> could
//!   not be refreshed")` (a failure remembered for `describe_negative_ttl`), never sent
//!   under the old key. An encrypted request that gets no response in time drops its
//!   service's key at once, so the next encrypted call looks it up again.
//!
//! Why the key matters: nuropb services often generate a fresh RSA key at start, and a
//! nuropb 0.1.8 service handed a body it cannot decrypt rejects it twice and drops off
//! the mesh for good (spec §7.5). What remains after the rules above, because nuropb
//! gives a requester no way to learn which key will read a message:
//! - after a service restarts with a new key, calls encrypted within `encryption_key_ttl`
//!   of the last lookup (or until an encrypted call times out) still use the old key, and
//!   the first one kills the new instance;
//! - with several instances of a service, each with its own random key, `nuropb_describe`
//!   is answered by one instance and the encrypted call may be routed to another, which
//!   cannot read it and dies, whatever the TTL. nuropb's own requester has the same
//!   problem.
//!
//! So services with encrypted methods should keep their private key across restarts and
//! share one key across their instances (load `_private_key` from a secret, rather than
//! generate it at start). Then neither case arises, and `encryption_key_ttl` only bounds
//! how long a deliberate key rotation takes to reach the gateway.
//! - Only a service that has never described itself successfully since start (or was
//!   evicted from the cache of `describe_cache_capacity` services) has no description:
//!   for `describe_negative_ttl` after each failed lookup, `Auto` sends its calls in
//!   plaintext, even to methods that may require encryption, and `Required` refuses them
//!   with `MeshError::Encryption`. Each such failed lookup is logged at `warn` with the
//!   service name. An unroutable service or a lost connection fails the call itself.
//!
//! Shutdown: after the `shutdown` token fires, new calls fail at once, pending requests
//! may still receive their responses and published messages their broker confirmations
//! (a command is reported only once the broker has confirmed it), until nothing is
//! outstanding or `drain_timeout`; then the rest fails with `MeshError::Unavailable` and
//! the connection closes. [`AmqpMesh::closed`] resolves when all of it is done.
//!
//! In the layering (docs/ARCHITECTURE.md) this is an adapter: it depends on
//! `handler-core`, the wire crate and `mesh-crypto`; only the binary (or your program)
//! depends on it. The repository's `examples/mesh_peer.rs` embeds it and calls the
//! gateway's service as a Python peer would.
//!
//! Starting the mesh and handing it to the core. `no_run`: it needs a RabbitMQ broker,
//! which doc tests do not have (the crate's broker tests and `cargo xtask examples` run
//! this against a real one):
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use amqp_mesh::{AmqpMesh, AmqpMeshConfig};
//! use handler_core::{Coordinator, CoreConfig, JwtAuthenticator, JwtConfig, JwtKey};
//! use tokio_util::sync::CancellationToken;
//! use tokio_util::task::TaskTracker;
//!
//! let mut config = AmqpMeshConfig::new("amqp://guest:guest@127.0.0.1:5672/%2Fmy-vhost");
//! config.service_name = "my-gateway".to_owned();
//! let mesh_shutdown = CancellationToken::new();
//! let (mesh, inbound) = AmqpMesh::start(config, mesh_shutdown.clone()).await?;
//!
//! let auth = JwtAuthenticator::new(JwtConfig::new(JwtKey::Hs256Secret(b"secret".to_vec())))?;
//! let shutdown = CancellationToken::new();
//! let (coordinator, _handle) = Coordinator::new(
//!     CoreConfig::default(),
//!     Arc::new(auth),
//!     Arc::new(mesh.clone()),
//!     inbound,
//!     TaskTracker::new(),
//!     shutdown.clone(),
//! );
//! let routing = tokio::spawn(coordinator.run(Duration::from_secs(5)));
//! // ... serve clients with `_handle` (ws-adapter) ...
//! shutdown.cancel();
//! routing.await?;
//! // The mesh goes last, once in-flight calls are settled.
//! mesh_shutdown.cancel();
//! mesh.closed().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, unreachable_pub)]

// A module only uses modules on floors below its own (see the code map above and
// docs/ARCHITECTURE.md); rustfmt keeps this list alphabetical.
mod config;
mod control;
mod delivery;
mod describe;
mod envelope;
mod error;
mod gateway_description;
mod guard;
mod ids;
mod link;
mod link_state;
mod mesh;
mod messages;
mod pending;
mod publisher;
mod requester;
mod responses;
mod service;
mod stats;
mod subscriber;
mod supervisor;

pub use config::{AmqpMeshConfig, AmqpTlsConfig, ClientIdentity, EncryptionMode};
pub use error::{AmqpMeshError, BoxError};
pub use mesh::AmqpMesh;
pub use stats::AmqpStats;
