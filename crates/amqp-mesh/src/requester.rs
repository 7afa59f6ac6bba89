//! The requester side (spec §13 items 1–8): requests with their responses, commands,
//! events, and the describe lookups that decide encryption.
//!
//! Every request and command published here is made on behalf of a WebSocket client
//! (client calls, and the describe lookups they trigger), and carries the
//! `x-nuropb-gateway` header (see `envelope`), so that other gateways refuse it their
//! privileged methods.

use std::sync::Arc;
use std::time::Duration;

use handler_core::{MeshCall, MeshError, MeshEvent, MeshResponse};
use mesh_crypto::{ServicePublicKey, SessionKey};
use nuropb_wire::mesh::{
    DESCRIBE_METHOD, EventBody, MeshHeaders, MessageType, RequestBody, error_name,
};
use nuropb_wire::pyjson::{from_python_json, to_python_json};
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::Value;
use tracing::{debug, warn};

use crate::config::EncryptionMode;
use crate::describe::{Described, Lookup, ServiceCrypto, parse_description};
use crate::envelope;
use crate::guard;
use crate::mesh::{LinkHandle, Shared};
use crate::pending::RawResponse;
use crate::publisher::{Mode, Outgoing, Published};
use crate::stats::bump;

/// AMQP expiration of describe requests, as `RMQAPI.describe_service` sends them (§6.4).
const DESCRIBE_TTL: Duration = Duration::from_secs(60);

/// A fresh correlation id: 32 lowercase hex, like nuropb's `uuid4().hex`.
pub(crate) fn new_correlation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The key an encrypted call is sealed with, and the description it came from (to drop
/// it if the call gets no response).
struct Sealing {
    key: ServicePublicKey,
    described: Arc<ServiceCrypto>,
}

impl Shared {
    /// A request, answered by its first response, or `MeshError::Timeout` after `timeout`
    /// (describe lookup included). Every await here is cancellation safe.
    pub(crate) async fn request(
        self: &Arc<Self>,
        call: MeshCall,
        timeout: Duration,
    ) -> Result<MeshResponse, MeshError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.guard_call(&call)?;
        let link = self.link()?;
        // Encoded (and size-checked) before the describe lookup, so that a call the guard
        // refuses publishes nothing at all.
        let encoded = self.encode_call(MessageType::Request, &call)?;
        let Ok(sealing) = tokio::time::timeout_at(deadline, self.encryption_key(&call)).await
        else {
            return Err(MeshError::Timeout(timeout));
        };
        let sealing = sealing?;
        let key = sealing.as_ref().map(|s| &s.key);
        let exchange = self.exchange(&link, &call, encoded, key, self.config.request_ttl);
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => {
                if let Some(sealing) = &sealing {
                    // Perhaps the service restarted with a new key and could not read this
                    // body (a nuropb service then drops off the mesh, §7.5): the next
                    // encrypted call fetches the key again rather than risk another.
                    warn!(service = %call.service, method = %call.method, trace_id = %call.trace_id, "no response to an encrypted call; the service's public key is dropped and fetched again before the next encrypted call");
                    self.describe.forget_key(&call.service, &sealing.described);
                }
                Err(MeshError::Timeout(timeout))
            }
        }
    }

    /// A command: published like a request, never answered. `Ok` means the broker
    /// confirmed it and routed it to a queue (see `publisher` for returns that arrive on
    /// another message's confirmation).
    pub(crate) async fn command(self: &Arc<Self>, call: MeshCall) -> Result<(), MeshError> {
        self.guard_call(&call)?;
        let link = self.link()?;
        let encoded = self.encode_call(MessageType::Command, &call)?;
        let sealing = self.encryption_key(&call).await?;
        let key = sealing.as_ref().map(|s| &s.key);
        // Nobody answers a command, so its session key is not kept.
        let (body, _session) = self.seal(encoded.json, key)?;
        let message = self.request_message(
            &link,
            MessageType::Command,
            &call,
            &encoded.correlation_id,
            body,
            key.is_some(),
            self.config.request_ttl,
        )?;
        match self.publish_bounded(&link, message).await? {
            Published::Routed => Ok(()),
            Published::Returned => Err(not_delivered(&call)),
            Published::Refused => {
                Err(MeshError::Unavailable("the broker refused the command".into()))
            }
        }
    }

    /// An event on the events exchange (§5.3): not mandatory, no expiration.
    pub(crate) async fn publish_event(&self, event: MeshEvent) -> Result<(), MeshError> {
        guard::check_event(&event, self.limits)
            .inspect_err(|_| bump(&self.counters.rejected_by_guard))?;
        let link = self.link()?;
        let target = event
            .target
            .map(|ids| ids.into_iter().map(|u| Value::String(u.into_string())).collect());
        let trace_id = event.trace_id.map(|t| t.into_string());
        let body = EventBody {
            tag: MessageType::Event,
            topic: event.topic,
            event: event.event,
            context: event.context,
            trace_id,
            correlation_id: Some(new_correlation_id()),
            target,
        };
        let message = self.event_message(&body)?;
        match self.publish_bounded(&link, message).await? {
            // Events are not mandatory: an event nobody subscribed to is not an error.
            Published::Routed | Published::Returned => Ok(()),
            Published::Refused => {
                Err(MeshError::Unavailable("the broker refused the event".into()))
            }
        }
    }

    /// Builds a §5.3 event ready to publish (not mandatory); the guard's size limit
    /// applies.
    pub(crate) fn event_message(&self, body: &EventBody) -> Result<Outgoing, MeshError> {
        let json = to_python_json(body)
            .map_err(|e| MeshError::Rejected(format!("event cannot be encoded: {e}")))?;
        guard::check_body_size(json.len(), self.limits)
            .inspect_err(|_| bump(&self.counters.rejected_by_guard))?;
        let headers = MeshHeaders::outgoing(MessageType::Event, body.trace_id.clone(), false);
        let correlation_id = body.correlation_id.clone().unwrap_or_default();
        let properties = envelope::properties(&headers, &correlation_id, "", None, None)
            .map_err(MeshError::Rejected)?;
        Ok(Outgoing {
            mode: Mode::Plain,
            exchange: self.config.events_exchange.clone(),
            routing_key: body.topic.clone(),
            body: json,
            properties,
        })
    }

    /// Publishes and waits for the broker at most `publish_timeout`.
    pub(crate) async fn publish_bounded(
        &self,
        link: &LinkHandle,
        message: Outgoing,
    ) -> Result<Published, MeshError> {
        let timeout = self.config.publish_timeout;
        tokio::time::timeout(timeout, link.publisher.publish(message)).await.unwrap_or_else(|_| {
            Err(MeshError::Unavailable(format!("publish not confirmed within {timeout:?}")))
        })
    }

    fn guard_call(&self, call: &MeshCall) -> Result<(), MeshError> {
        guard::check_call(call, self.limits, &self.config.service_name).inspect_err(|e| {
            bump(&self.counters.rejected_by_guard);
            debug!(service = %call.service, method = %call.method, trace_id = %call.trace_id, error = %e, "call rejected before publishing");
        })
    }

    /// Publishes one request and waits for its first response. Used for client calls and
    /// for describe lookups (which never encrypt, so this does not recurse).
    async fn exchange(
        &self,
        link: &LinkHandle,
        call: &MeshCall,
        encoded: Encoded,
        key: Option<&ServicePublicKey>,
        ttl: Duration,
    ) -> Result<MeshResponse, MeshError> {
        let Encoded { correlation_id, json } = encoded;
        let (body, session) = self.seal(json, key)?;
        let message = self.request_message(
            link,
            MessageType::Request,
            call,
            &correlation_id,
            body,
            key.is_some(),
            ttl,
        )?;
        // Registered before publishing so that even an instant response finds its caller;
        // the guard removes the entry however this future ends.
        let (_pending, response) =
            self.pending.register(correlation_id.clone(), link.generation)?;
        match link.publisher.publish(message).await? {
            Published::Routed => {}
            Published::Returned => {
                debug!(service = %call.service, method = %call.method, trace_id = %call.trace_id, "request returned: no queue bound for the service");
                return Err(not_delivered(call));
            }
            Published::Refused => {
                return Err(MeshError::Unavailable("the broker refused the request".into()));
            }
        }
        let raw = match response.await {
            Ok(Ok(raw)) => raw,
            // A return that lapin attached to another message's confirmation (see
            // `publisher`) arrives here, without our method name.
            Ok(Err(MeshError::NotDelivered { .. })) => return Err(not_delivered(call)),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(MeshError::Unavailable("connection lost".into())),
        };
        Ok(self.decode_response(raw, session.as_ref(), call))
    }

    /// The request or command body in Python's JSON bytes (§4, §5.1), under a fresh
    /// correlation id; refused when larger than `max_body_bytes`.
    fn encode_call(&self, tag: MessageType, call: &MeshCall) -> Result<Encoded, MeshError> {
        let correlation_id = new_correlation_id();
        let body = RequestBody {
            tag,
            service: call.service.clone(),
            method: call.method.clone(),
            params: call.params.clone(),
            correlation_id: correlation_id.clone(),
            context: call.context.clone(),
            trace_id: Some(call.trace_id.as_str().to_owned()),
        };
        let json = to_python_json(&body)
            .map_err(|e| MeshError::Rejected(format!("call cannot be encoded: {e}")))?;
        guard::check_body_size(json.len(), self.limits)
            .inspect_err(|_| bump(&self.counters.rejected_by_guard))?;
        Ok(Encoded { correlation_id, json })
    }

    /// Encrypts the body when there is a key (§10), and returns the session key to read
    /// the response with. The encrypted body is about 1.8 times larger and checked again.
    fn seal(
        &self,
        json: Vec<u8>,
        key: Option<&ServicePublicKey>,
    ) -> Result<(Vec<u8>, Option<SessionKey>), MeshError> {
        let Some(key) = key else {
            return Ok((json, None));
        };
        let (sealed, session) = mesh_crypto::encrypt_request(key, &json)
            .map_err(|e| MeshError::Encryption(format!("cannot encrypt the request: {e}")))?;
        guard::check_body_size(sealed.len(), self.limits)
            .inspect_err(|_| bump(&self.counters.rejected_by_guard))?;
        Ok((sealed, Some(session)))
    }

    /// A request or command as published on behalf of a client: `reply_to` is the
    /// connection's response queue, and the gateway marks it as relayed.
    #[allow(
        clippy::too_many_arguments,
        reason = "one call site per message type; a struct would only rename them"
    )]
    fn request_message(
        &self,
        link: &LinkHandle,
        tag: MessageType,
        call: &MeshCall,
        correlation_id: &str,
        body: Vec<u8>,
        encrypted: bool,
        ttl: Duration,
    ) -> Result<Outgoing, MeshError> {
        let headers =
            MeshHeaders::outgoing(tag, Some(call.trace_id.as_str().to_owned()), encrypted);
        let properties = envelope::properties(
            &headers,
            correlation_id,
            &link.response_queue,
            Some(ttl),
            Some(&self.config.service_name),
        )
        .map_err(MeshError::Rejected)?;
        let mode = match tag {
            MessageType::Request => Mode::Request,
            _ => Mode::Mandatory,
        };
        Ok(Outgoing {
            mode,
            exchange: self.config.rpc_exchange.clone(),
            routing_key: call.service.clone(),
            body,
            properties,
        })
    }

    /// Turns a raw response into the service's answer. A response that cannot be read
    /// becomes an error answer rather than a hang: the service did answer, badly.
    fn decode_response(
        &self,
        raw: RawResponse,
        session: Option<&SessionKey>,
        call: &MeshCall,
    ) -> MeshResponse {
        let malformed = |why: &str| {
            bump(&self.counters.garbage_rejected);
            warn!(service = %call.service, method = %call.method, trace_id = %call.trace_id, why, "malformed response");
            MeshResponse {
                result: Value::Null,
                error: Some(ErrorObject::new(
                    error_name::TRANSPORT,
                    format!("malformed response from {}.{}: {why}", call.service, call.method),
                )),
            }
        };
        let plain = match (raw.encrypted, session) {
            (false, _) => raw.body,
            (true, Some(session)) => match mesh_crypto::decrypt_response(session, &raw.body) {
                Ok(plain) => plain,
                Err(_) => return malformed("cannot decrypt the response"),
            },
            (true, None) => return malformed("encrypted response to a plaintext request"),
        };
        match from_python_json::<Value>(&plain) {
            Ok(Value::Object(body)) => response_from_body(body),
            Ok(_) => malformed("body is not a JSON object"),
            Err(_) => malformed("body is not JSON"),
        }
    }

    /// The public key to encrypt `call` with, if its method requires encryption (§10).
    ///
    /// Decided by the target service's description (see `describe`): a method the newest
    /// known description marks `requires_encryption` is always encrypted, or the call
    /// fails, however old that description is. The key itself comes from a description at
    /// most `encryption_key_ttl` old, looked up now if need be; if that lookup fails, the
    /// call fails too (`MeshError::Encryption`, or the lookup's own error when the service
    /// is unroutable or the connection is lost) rather than go out under an old key. Only
    /// a service that has never described itself successfully falls back, per
    /// `EncryptionMode`: plaintext (`Auto`) or refusal (`Required`).
    async fn encryption_key(
        self: &Arc<Self>,
        call: &MeshCall,
    ) -> Result<Option<Sealing>, MeshError> {
        let mode = self.config.encryption;
        if mode == EncryptionMode::Off || call.method == DESCRIBE_METHOD {
            return Ok(None);
        }
        let crypto = match self.describe.get(&call.service, self.describe_fetch(call)).await {
            Described::Known(crypto) => crypto,
            Described::Unknown => {
                return match mode {
                    EncryptionMode::Required => Err(MeshError::Encryption(format!(
                        "{} has not described itself, so whether {} requires encryption is unknown; not sent",
                        call.service, call.method
                    ))),
                    // Warned once per failed lookup (`fetch_description`), not per call.
                    EncryptionMode::Auto | EncryptionMode::Off => {
                        debug!(service = %call.service, method = %call.method, trace_id = %call.trace_id, "service not described; call sent in plaintext");
                        Ok(None)
                    }
                };
            }
            Described::Failed(error) => return Err(for_call(error, call)),
        };
        if !crypto.encrypted_methods.contains(&call.method) {
            return Ok(None);
        }
        // The service said the method requires encryption: never plaintext from here on,
        // unless a current description says otherwise. Only a current key will do.
        let max_age = self.config.encryption_key_ttl;
        let crypto =
            match self.describe.current(&call.service, max_age, self.describe_fetch(call)).await {
                Described::Known(crypto) => crypto,
                Described::Unknown => {
                    return Err(MeshError::Encryption(format!(
                        "public key of {} could not be refreshed",
                        call.service
                    )));
                }
                Described::Failed(error) => return Err(for_call(error, call)),
            };
        if !crypto.encrypted_methods.contains(&call.method) {
            debug!(service = %call.service, method = %call.method, "the current description no longer requires encryption");
            return Ok(None);
        }
        match &crypto.public_key {
            Some(key) => Ok(Some(Sealing { key: key.clone(), described: Arc::clone(&crypto) })),
            None => Err(MeshError::Encryption(format!(
                "{}.{} requires encryption but the service publishes no public key",
                call.service, call.method
            ))),
        }
    }

    /// The describe lookup of `call`'s service, for the cache to run when it needs one.
    fn describe_fetch(
        self: &Arc<Self>,
        call: &MeshCall,
    ) -> impl Fn(Lookup) -> futures::future::BoxFuture<'static, Described> + Send + 'static {
        let shared = Arc::clone(self);
        let service = call.service.clone();
        move |lookup| {
            let shared = Arc::clone(&shared);
            let service = service.clone();
            Box::pin(async move { shared.fetch_description(&service, lookup).await })
        }
    }

    /// One `nuropb_describe` call as `RMQAPI.describe_service` makes it (§6.4): params
    /// `{}`, context `{}`, a fresh trace id; bounded by `describe_timeout`. Runs in the
    /// caller's task for a first lookup and in a background task for a refresh, so it
    /// takes the live connection itself.
    async fn fetch_description(&self, service: &str, lookup: Lookup) -> Described {
        let link = match self.link() {
            Ok(link) => link,
            Err(error) => return Described::Failed(error),
        };
        let call = MeshCall {
            service: service.to_owned(),
            method: DESCRIBE_METHOD.to_owned(),
            params: JsonObject::new(),
            context: JsonObject::new(),
            trace_id: handler_core::TraceId::generate(),
        };
        let timeout = self.config.describe_timeout;
        let encoded = match self.encode_call(MessageType::Request, &call) {
            Ok(encoded) => encoded,
            // Cannot happen for an empty describe call; the call itself would fail alike.
            Err(error) => return Described::Failed(error),
        };
        let outcome =
            tokio::time::timeout(timeout, self.exchange(&link, &call, encoded, None, DESCRIBE_TTL))
                .await;
        let retry_in = self.config.describe_negative_ttl;
        let unknown = |why: String| {
            match (lookup, self.config.encryption) {
                (Lookup::Key, _) => warn!(
                    service,
                    why,
                    ?retry_in,
                    "refreshing the service's public key failed; calls to its encrypted methods are refused until a lookup succeeds"
                ),
                (Lookup::Refresh, _) => warn!(
                    service,
                    why,
                    ?retry_in,
                    "refreshing the service description failed; the last known one stays in use"
                ),
                (Lookup::First, EncryptionMode::Required) => warn!(
                    service,
                    why,
                    ?retry_in,
                    "service description unavailable; calls to the service are refused until a lookup succeeds (encryption: required)"
                ),
                (Lookup::First, EncryptionMode::Auto | EncryptionMode::Off) => warn!(
                    service,
                    why,
                    ?retry_in,
                    "service description unavailable; calls to the service go out UNENCRYPTED, even to methods that require encryption, until a lookup succeeds (encryption: auto)"
                ),
            }
            Described::Unknown
        };
        match outcome {
            Err(_) => unknown(format!("no answer within {timeout:?}")),
            Ok(Err(error @ (MeshError::NotDelivered { .. } | MeshError::Unavailable(_)))) => {
                match lookup {
                    Lookup::Refresh => {
                        warn!(service, error = %error, ?retry_in, "refreshing the service description failed; the last known one stays in use")
                    }
                    Lookup::Key => {
                        warn!(service, error = %error, "refreshing the service's public key failed")
                    }
                    Lookup::First => {}
                }
                Described::Failed(error)
            }
            Ok(Err(other)) => unknown(other.to_string()),
            Ok(Ok(MeshResponse { error: Some(error), .. })) => {
                unknown(format!("{}: {}", error.error, error.description))
            }
            Ok(Ok(MeshResponse { result, error: None })) => match parse_description(&result) {
                Ok(crypto) => Described::Known(Arc::new(crypto)),
                Err(why) => unknown(why),
            },
        }
    }
}

/// A call serialized under its correlation id, not yet encrypted.
struct Encoded {
    correlation_id: String,
    json: Vec<u8>,
}

/// A failed describe lookup's error as the call's own: an unroutable service is reported
/// under the call's method.
fn for_call(error: MeshError, call: &MeshCall) -> MeshError {
    match error {
        MeshError::NotDelivered { service, .. } => {
            MeshError::NotDelivered { service, method: call.method.clone() }
        }
        other => other,
    }
}

/// The local answer to an unroutable call (§6.2).
fn not_delivered(call: &MeshCall) -> MeshError {
    MeshError::NotDelivered { service: call.service.clone(), method: call.method.clone() }
}

/// `result` and `error` of a response body, read leniently: nuropb always sends an
/// `{"error", "description"}` object, but a foreign peer might not.
fn response_from_body(mut body: JsonObject) -> MeshResponse {
    let result = body.remove("result").unwrap_or(Value::Null);
    let error = match body.remove("error") {
        None | Some(Value::Null) => None,
        Some(Value::Object(error)) => {
            let text = |key: &str| match error.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            let name = text("error");
            Some(ErrorObject::new(
                if name.is_empty() { "NuropbException".to_owned() } else { name },
                text("description"),
            ))
        }
        Some(Value::String(description)) => Some(ErrorObject::new("NuropbException", description)),
        Some(other) => Some(ErrorObject::new("NuropbException", other.to_string())),
    };
    MeshResponse { result, error }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(v: Value) -> JsonObject {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn reads_responses_like_nuropb() {
        let check = |v: Value, result: Value, error: Option<(&str, &str)>| {
            let r = response_from_body(body(v));
            assert_eq!(r.result, result);
            assert_eq!(r.error, error.map(|(e, d)| ErrorObject::new(e, d)));
        };
        check(json!({"tag": "response", "result": 5, "error": null}), json!(5), None);
        check(
            json!({"result": null, "error": {"error": "NuropbHandlingError", "description": "Unknown method x"}}),
            Value::Null,
            Some(("NuropbHandlingError", "Unknown method x")),
        );
        check(json!({"error": "boom"}), Value::Null, Some(("NuropbException", "boom")));
        check(json!({"error": {"description": 3}}), Value::Null, Some(("NuropbException", "3")));
    }

    #[test]
    fn correlation_ids_are_uuid_hex() {
        let id = new_correlation_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}
