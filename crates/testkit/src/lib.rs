//! Test support for everything that talks to RabbitMQ: one place for the fake nuropb
//! service ([`fake_service`]) and the broker plumbing ([`broker`]: the run's vhost from
//! `cargo xtask integration`, `rabbitmqctl`, raw peers, spies, a half-open proxy), RabbitMQ nodes and clusters of a test's own ([`node`]), a fake service that roams over a
//! cluster's nodes ([`roaming`]), and certificates made by the test ([`tls`]).
//!
//! Only ever a dev-dependency (or a dependency of the `tests` crate): `cargo xtask
//! layering` fails if a library crate or the binary depends on it.
//!
//! Every broker helper works in the run's vhost, named by `NUROPB_TEST_AMQP_URL`
//! ([`broker::URL_ENV`]), which `cargo xtask integration` creates and deletes; tests never
//! use the default vhost. A broker test, as the `amqp-mesh` crate's are written (`no_run`:
//! it needs RabbitMQ and that variable, which doc tests do not have):
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use nuropb_testkit::FakeService;
//! use nuropb_testkit::broker::{Peer, scenario};
//! use serde_json::json;
//!
//! scenario(|vhost| async move {
//!     let service = FakeService::start(&vhost.url, "orders", false).await;
//!     let mut peer = Peer::new(&vhost.url).await;
//!     let response = peer.call("orders", "echo", json!({"n": 1})).await;
//!     assert_eq!(response["result"], json!({"n": 1}));
//!     service.stop().await;
//! })
//! .await;
//! # }
//! ```

#![warn(missing_docs, unreachable_pub)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a failed test"
)]

pub mod broker;
pub mod fake_service;
pub mod node;
pub mod roaming;
pub mod tls;

pub use broker::TestVhost;
pub use fake_service::{FakeService, ServiceOptions};
