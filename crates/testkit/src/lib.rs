//! Test support for everything that talks to RabbitMQ: one place for the fake nuropb
//! service ([`fake_service`]) and the broker plumbing ([`broker`]: the run's vhost from
//! `cargo xtask integration`, `rabbitmqctl`, raw peers, spies, a half-open proxy) and RabbitMQ nodes of a test's own ([`node`]).
//!
//! Only ever a dev-dependency (or a dependency of the `tests` crate): `cargo xtask
//! layering` fails if a library crate or the binary depends on it.

#![warn(unreachable_pub)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a failed test"
)]

pub mod broker;
pub mod fake_service;
pub mod node;

pub use broker::TestVhost;
pub use fake_service::{FakeService, ServiceOptions};
