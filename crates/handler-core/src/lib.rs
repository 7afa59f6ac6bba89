//! The transport-agnostic core of nuropb-gateway: client sessions (`session_registry`),
//! authorization (`auth`), the `ServiceMesh` port (`mesh`), request routing
//! (`mesh_manager`), the client-visible errors (`error`) and the `coordinator` that is the
//! only place they meet. No sockets, no AMQP, no WebSocket library here.

#![warn(unreachable_pub)]

pub mod auth;
pub mod connection;
pub mod coordinator;
pub mod error;
pub mod ids;
pub mod mesh;
pub mod mesh_manager;
pub mod session_registry;
pub mod topic;

#[cfg(feature = "in-memory")]
pub mod in_memory;

pub use auth::{Authenticator, Identity, JwtAuthenticator, JwtConfig, JwtKey};
pub use connection::{ClientConnection, CloseCode, CloseReason, Outbound, SendError, SharedFrame};
pub use coordinator::{Coordinator, CoordinatorHandle, CoreConfig};
pub use error::CoreError;
pub use ids::{SessionId, TraceId, UserId};
pub use mesh::{MeshCall, MeshError, MeshEvent, MeshInbound, MeshResponse, ServiceMesh};
pub use mesh_manager::ServiceMeshManager;
pub use session_registry::{SessionHandle, SessionRegistry};
