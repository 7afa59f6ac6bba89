//! Worked examples of nuropb-gateway's crates used as libraries. The code is in the
//! package's example targets (`examples/examples/`); this library is empty, because a
//! package needs a target of its own.
//!
//! - `embed`: the gateway inside your own tokio program (in-memory mesh, a custom
//!   `Authenticator`, the WebSocket adapter), with a client calling a method;
//! - `your_own_mesh`: a `ServiceMesh` adapter written outside the project's crates that
//!   forwards calls to an HTTP backend and pushes events in through `MeshInbound`;
//! - `mesh_peer`: a Rust mesh peer that pushes to one user and disconnects another through
//!   the gateway's NuroPb service over RabbitMQ, as a Python service would.
//!
//! Run them with `cargo run -p nuropb-gateway-examples --example <name>`, or all three
//! with `cargo xtask examples` (which gives `mesh_peer` a throw-away RabbitMQ vhost).
