//! The seam between the endpoint and what it reports about readiness: [`OpsSource`]. The
//! binary implements it over the core and the mesh adapter, so this crate never depends on
//! either. Metrics come in separately, as a `prometheus_client` registry.

/// What the operations endpoint asks of the gateway on every `/readyz` request, from the
/// connection's task: implementations read current state and return quickly (no I/O, no
/// waiting).
pub trait OpsSource: Send + Sync + 'static {
    /// `Ok` when the process should receive traffic; otherwise why not (sent in the 503
    /// body, so keep it short and free of secrets).
    fn ready(&self) -> Result<(), String>;
}
