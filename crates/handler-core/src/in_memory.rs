//! An in-memory `ServiceMesh`: Rust closures serve methods, events loop back to the core.
//! The embedded default of the binary and the mesh of the end-to-end tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use nuropb_wire::mesh::{DESCRIBE_METHOD, error_name};
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::mesh::{
    GatewayControl, MeshCall, MeshError, MeshEvent, MeshInbound, MeshResponse, ServiceMesh,
};

/// What a method receives.
#[derive(Debug, Clone)]
pub struct MethodCall {
    /// The keyword arguments of the call.
    pub params: JsonObject,
    /// The gateway's context: `user_id`, `Authorization` and `trace_id`.
    pub context: JsonObject,
    /// The call's trace id.
    pub trace_id: String,
}

/// A method: params and context in, result or nuropb error out.
pub type MethodFn =
    Arc<dyn Fn(MethodCall) -> BoxFuture<'static, Result<Value, ErrorObject>> + Send + Sync>;

/// Builds an [`InMemoryMesh`].
#[derive(Default)]
pub struct InMemoryMeshBuilder {
    services: HashMap<String, HashMap<String, MethodFn>>,
    inbound_capacity: Option<usize>,
}

impl InMemoryMeshBuilder {
    /// Adds an async method.
    pub fn method<F, Fut>(mut self, service: &str, method: &str, f: F) -> Self
    where
        F: Fn(MethodCall) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, ErrorObject>> + Send + 'static,
    {
        let f: MethodFn = Arc::new(move |c| Box::pin(f(c)));
        self.services.entry(service.to_owned()).or_default().insert(method.to_owned(), f);
        self
    }

    /// Adds a synchronous method.
    pub fn sync_method<F>(self, service: &str, method: &str, f: F) -> Self
    where
        F: Fn(MethodCall) -> Result<Value, ErrorObject> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        self.method(service, method, move |c| {
            let f = Arc::clone(&f);
            async move { f(c) }
        })
    }

    /// Capacity of the inbound channel to the core (default 1024).
    pub fn inbound_capacity(mut self, n: usize) -> Self {
        self.inbound_capacity = Some(n);
        self
    }

    /// The mesh and the inbound channel to hand to the coordinator.
    pub fn build(self) -> (InMemoryMesh, mpsc::Receiver<MeshInbound>) {
        let (tx, rx) = mpsc::channel(self.inbound_capacity.unwrap_or(1024));
        (InMemoryMesh { inner: Arc::new(Inner { services: self.services, inbound: tx }) }, rx)
    }
}

struct Inner {
    services: HashMap<String, HashMap<String, MethodFn>>,
    inbound: mpsc::Sender<MeshInbound>,
}

/// See the module docs. Cheap to clone; clones share the services and the inbound channel.
#[derive(Clone)]
pub struct InMemoryMesh {
    inner: Arc<Inner>,
}

impl InMemoryMesh {
    /// A builder with no services; add methods, then [`InMemoryMeshBuilder::build`].
    pub fn builder() -> InMemoryMeshBuilder {
        InMemoryMeshBuilder::default()
    }

    /// Delivers a mesh event to the core, as if a service had published it.
    pub async fn inject_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.inner
            .inbound
            .send(MeshInbound::Event(event))
            .await
            .map_err(|_| MeshError::Unavailable("core stopped".into()))
    }

    /// Delivers a control operation, as if a mesh peer had called the gateway.
    pub async fn inject_control(&self, op: GatewayControl) -> Result<(), MeshError> {
        self.inner
            .inbound
            .send(MeshInbound::Control { op, reply: None })
            .await
            .map_err(|_| MeshError::Unavailable("core stopped".into()))
    }

    fn describe(&self, service: &str) -> Value {
        let methods: JsonObject = self.inner.services[service]
            .keys()
            .map(|m| {
                (
                    m.clone(),
                    json!({
                        "description": null,
                        "requires_encryption": false,
                        "parameters": {"type": "object", "properties": [], "required": []},
                    }),
                )
            })
            .collect();
        json!({
            "service_name": service,
            "service_version": null,
            "description": "in-memory service",
            "warnings": [],
            "encrypted_methods": false,
            "public_key": null,
            "methods": methods,
        })
    }
}

#[async_trait]
impl ServiceMesh for InMemoryMesh {
    async fn request(&self, call: MeshCall, timeout: Duration) -> Result<MeshResponse, MeshError> {
        let Some(methods) = self.inner.services.get(&call.service) else {
            return Err(MeshError::NotDelivered { service: call.service, method: call.method });
        };
        if call.method == DESCRIBE_METHOD {
            return Ok(MeshResponse { result: self.describe(&call.service), error: None });
        }
        let Some(f) = methods.get(&call.method).filter(|_| !call.method.starts_with('_')) else {
            return Ok(MeshResponse {
                result: Value::Null,
                error: Some(ErrorObject::new(
                    error_name::HANDLING,
                    format!("Unknown method {}", call.method),
                )),
            });
        };
        let fut = f(MethodCall {
            params: call.params,
            context: call.context,
            trace_id: call.trace_id.into_string(),
        });
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(result)) => Ok(MeshResponse { result, error: None }),
            Ok(Err(error)) => Ok(MeshResponse { result: Value::Null, error: Some(error) }),
            Err(_) => Err(MeshError::Timeout(timeout)),
        }
    }

    async fn command(&self, call: MeshCall) -> Result<(), MeshError> {
        let Some(methods) = self.inner.services.get(&call.service) else {
            return Err(MeshError::NotDelivered { service: call.service, method: call.method });
        };
        if let Some(f) = methods.get(&call.method) {
            // Commands get no response; the method's outcome is dropped like nuropb does.
            let fut = f(MethodCall {
                params: call.params,
                context: call.context,
                trace_id: call.trace_id.into_string(),
            });
            let _ = fut.await;
        }
        Ok(())
    }

    async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        self.inject_event(event).await
    }

    fn is_connected(&self) -> bool {
        !self.inner.inbound.is_closed()
    }
}
