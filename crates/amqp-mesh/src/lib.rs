//! The `ServiceMesh` adapter over RabbitMQ (lapin 4), byte-compatible with unmodified
//! Python nuropb 0.1.8 services (wire protocol `0.1.1`, spec `nuropb-protocol.md`).
//!
//! [`AmqpMesh::start`] connects, declares the topology and returns the mesh together with
//! the channel on which events, control operations and stats requests reach the core.
//! The gateway is a requester (requests, commands, events), a subscriber (per-instance
//! events queue) and a NuroPb service of its own (`push_to_user`, `stats`, …).
//!
//! Code map:
//! - `config`: [`AmqpMeshConfig`], every limit with its default;
//! - `mesh`: [`AmqpMesh`] and the shared state; `supervisor`: reconnects; `link`: one
//!   connection, its topology and tasks;
//! - `requester`: requests/commands/events and describe-driven encryption; `pending`: the
//!   correlation table; `publisher`: the publisher task (confirms, `basic.return`);
//! - `consumers`: response and events queues; `service`: the gateway's own methods;
//!   `control`: the fan-out payload; `describe`: descriptions, ours and others';
//! - `envelope`: AMQP properties and headers; `guard`: checks before publishing.
//!
//! Architecture invariant: no lapin type appears in the public API; lapin deliveries are
//! turned into `handler_core` types in `consumers` and `service`.
//!
//! Architecture invariant: calls handed to this adapter (`ServiceMesh::request` and
//! `command`) never reach the gateway's own service. They come from WebSocket clients,
//! and the gateway's methods (`push_to_all`, `disconnect_user`, `stats`, …) are for mesh
//! peers only, so the guard refuses any call whose `service` is
//! [`AmqpMeshConfig::service_name`] with `MeshError::Rejected` before anything is
//! published. Peers reach those methods through the service queue as before.
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

mod config;
mod consumers;
mod control;
mod describe;
mod envelope;
mod error;
mod guard;
mod link;
mod mesh;
mod pending;
mod publisher;
mod requester;
mod service;
mod stats;
mod supervisor;

pub use config::{AmqpMeshConfig, EncryptionMode};
pub use error::{AmqpMeshError, BoxError};
pub use mesh::AmqpMesh;
pub use stats::AmqpStats;
