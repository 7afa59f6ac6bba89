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
