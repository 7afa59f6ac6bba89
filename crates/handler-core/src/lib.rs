//! The transport-agnostic core of nuropb-gateway: client sessions (`handler_manager`),
//! authorization (`auth`), the `ServiceMesh` port (`mesh`), request routing
//! (`mesh_manager`) and the `coordinator` that is the only place they meet. No sockets,
//! no AMQP, no WebSocket library here.

pub mod ids;
pub mod mesh;

pub use ids::{SessionId, TraceId, UserId};
pub use mesh::{MeshCall, MeshError, MeshEvent, MeshInbound, MeshResponse, ServiceMesh};
