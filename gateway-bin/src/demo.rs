//! The embedded demo: an in-memory mesh with a `demo` service, a periodic `demo.tick`
//! event, and a demo token, so a newcomer can connect without a broker.

use std::time::Duration;

use anyhow::{Context, Result};
use handler_core::in_memory::{InMemoryMesh, MethodCall};
use handler_core::{MeshEvent, MeshInbound};
use nuropb_wire::ErrorObject;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn number(call: &MethodCall, name: &str) -> Result<f64, ErrorObject> {
    call.params.get(name).and_then(Value::as_f64).ok_or_else(|| {
        ErrorObject::new("NuropbValidationError", format!("parameter `{name}` must be a number"))
    })
}

/// The demo service: `demo.echo`, `demo.add`, `demo.whoami`, `demo.sleep`, `demo.fail`.
pub fn demo_mesh() -> (InMemoryMesh, mpsc::Receiver<MeshInbound>) {
    InMemoryMesh::builder()
        .sync_method("demo", "echo", |c| Ok(Value::Object(c.params)))
        .sync_method("demo", "add", |c| {
            let (a, b) = (number(&c, "a")?, number(&c, "b")?);
            let sum = a + b;
            // Integers stay integers, like Python.
            Ok(if sum.fract() == 0.0 && sum.abs() < 9e15 { json!(sum as i64) } else { json!(sum) })
        })
        .sync_method("demo", "whoami", |c| {
            Ok(json!({"user_id": c.context.get("user_id"), "trace_id": c.trace_id}))
        })
        .method("demo", "sleep", |c| async move {
            let seconds = number(&c, "seconds")?.clamp(0.0, 30.0);
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            Ok(json!(format!("slept {seconds}")))
        })
        .sync_method("demo", "fail", |c| {
            let message = c.params.get("message").and_then(Value::as_str).unwrap_or("boom");
            Err(ErrorObject::new(
                "NuropbException",
                format!("Runtime exception calling demo.fail:ValueError: {message}"),
            ))
        })
        .build()
}

/// Publishes `demo.tick` every `every` until shutdown.
pub async fn tick(mesh: InMemoryMesh, every: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            // Both branches are cancel-safe.
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        n += 1;
        let event = MeshEvent {
            topic: "demo.tick".to_owned(),
            event: json!({"n": n}),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        if mesh.inject_event(event).await.is_err() {
            return;
        }
    }
}

/// A demo token valid for 24 hours.
pub fn demo_token(secret: &[u8]) -> Result<String> {
    let exp = jsonwebtoken::get_current_timestamp() + 24 * 3600;
    let claims = json!({"sub": "demo-user", "username": "demo", "exp": exp});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .context("cannot sign the demo token")
}

/// A random dev secret (hex), for in-memory mode without a configured one.
pub fn generate_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}
