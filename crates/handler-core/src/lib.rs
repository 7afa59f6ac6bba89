//! The transport-agnostic core of nuropb-gateway: client sessions (`session_registry`),
//! authorization (`auth`), the `ServiceMesh` port (`mesh`), request routing
//! (`mesh_manager`), the client-visible errors (`error`) and the `coordinator` that is the
//! only place they meet. No sockets, no AMQP, no WebSocket library here.
//!
//! In the layering (docs/ARCHITECTURE.md) it sits on the wire crate and tokio's sync and
//! time parts; the adapters (`ws-adapter`, `amqp-mesh`, or your own) depend on it, never
//! the reverse. It defines the ports: [`ServiceMesh`] (implemented by mesh adapters, with
//! inbound traffic on a [`MeshInbound`] channel handed over at construction),
//! [`Authenticator`] (JWT built in: [`JwtAuthenticator`]) and [`ClientConnection`] (what
//! a transport gives the core for each session). The `in-memory` feature adds
//! [`in_memory::InMemoryMesh`], whose services are Rust closures.
//!
//! The worked examples in the repository's `examples/` put the pieces together: `embed`
//! (the gateway inside your program) and `your_own_mesh` (a `ServiceMesh` over HTTP).
//!
//! A call through the in-memory mesh, as the coordinator makes it:
//!
//! ```
//! # #[cfg(feature = "in-memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use handler_core::in_memory::InMemoryMesh;
//! use handler_core::{MeshCall, ServiceMesh, TraceId};
//! use serde_json::{Value, json};
//!
//! let (mesh, _inbound) = InMemoryMesh::builder()
//!     .sync_method("greeter", "hello", |call| {
//!         let name = call.params.get("name").and_then(Value::as_str).unwrap_or("world");
//!         Ok(json!(format!("hello, {name}")))
//!     })
//!     .build();
//! let call = MeshCall {
//!     service: "greeter".into(),
//!     method: "hello".into(),
//!     params: json!({"name": "alice"}).as_object().cloned().unwrap_or_default(),
//!     context: Default::default(),
//!     trace_id: TraceId::generate(),
//! };
//! let response = mesh.request(call, Duration::from_secs(1)).await?;
//! assert_eq!(response.result, json!("hello, alice"));
//! assert!(response.error.is_none());
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "in-memory"))]
//! # fn main() {}
//! ```

#![warn(missing_docs, unreachable_pub)]

pub mod auth;
pub mod connection;
pub mod coordinator;
pub mod error;
pub mod ids;
pub mod mesh;
pub mod mesh_manager;
pub mod metrics;
pub mod session_registry;
pub mod topic;

#[cfg(feature = "in-memory")]
pub mod in_memory;

pub use auth::{Authenticator, Identity, JwtAuthenticator, JwtConfig, JwtKey};
pub use connection::{ClientConnection, CloseCode, CloseReason, Outbound, SendError, SharedFrame};
pub use coordinator::{Coordinator, CoordinatorHandle, CoreConfig, LameDuckConfig};
pub use error::CoreError;
pub use ids::{SessionId, TraceId, UserId};
pub use mesh::{MeshCall, MeshError, MeshEvent, MeshInbound, MeshResponse, ServiceMesh};
pub use mesh_manager::MeshManagerConfig;
pub use metrics::{CallLabelConfig, CoreMetrics};
pub use session_registry::SessionRegistryConfig;
