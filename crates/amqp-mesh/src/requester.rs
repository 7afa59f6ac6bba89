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
use nuropb_wire::mesh::{DESCRIBE_METHOD, EventBody, MessageType, ResponseOutcome, error_name};
use nuropb_wire::pyjson::{PyJsonError, from_python_json};
use nuropb_wire::{ErrorObject, JsonObject};
use serde_json::Value;
use tracing::{debug, warn};

use crate::config::{AmqpMeshConfig, EncryptionMode};
use crate::describe::{DescribeCache, Described, Lookup, ServiceCrypto};
use crate::guard::{self, Limits};
use crate::ids::new_correlation_id;
use crate::link_state::{LinkHandle, LinkWatch};
use crate::messages::{self, CallRoute, Encoded};
use crate::pending::{PendingTable, RawResponse};
use crate::publisher::{Outgoing, Published, Routes};
use crate::stats::{Counters, bump};

/// AMQP expiration of describe requests, as `RMQAPI.describe_service` sends them (§6.4).
const DESCRIBE_TTL: Duration = Duration::from_secs(60);

/// The key an encrypted call is sealed with, and the description it came from (to drop
/// it if the call gets no response).
struct Sealing {
    key: ServicePublicKey,
    described: Arc<ServiceCrypto>,
}

/// The settings of [`AmqpMeshConfig`] the requester uses (see there for each).
#[derive(Debug, Clone)]
struct Settings {
    service_name: String,
    rpc_exchange: String,
    events_exchange: String,
    request_ttl: Duration,
    publish_timeout: Duration,
    encryption: EncryptionMode,
    encryption_key_ttl: Duration,
    describe_timeout: Duration,
    describe_negative_ttl: Duration,
}

/// The requester: publishes requests, commands and events on the live connection, and
/// keeps the describe cache that decides encryption. Responses reach it through
/// `pending`, filled by the response consumer.
#[derive(Debug)]
pub(crate) struct Requester {
    settings: Settings,
    limits: Limits,
    counters: Arc<Counters>,
    pending: Arc<PendingTable>,
    describe: DescribeCache,
    link: LinkWatch,
}

impl Requester {
    pub(crate) fn new(
        config: &AmqpMeshConfig,
        counters: Arc<Counters>,
        pending: Arc<PendingTable>,
        describe: DescribeCache,
        link: LinkWatch,
    ) -> Self {
        let settings = Settings {
            service_name: config.service_name.clone(),
            rpc_exchange: config.rpc_exchange.clone(),
            events_exchange: config.events_exchange.clone(),
            request_ttl: config.request_ttl,
            publish_timeout: config.publish_timeout,
            encryption: config.encryption,
            encryption_key_ttl: config.encryption_key_ttl,
            describe_timeout: config.describe_timeout,
            describe_negative_ttl: config.describe_negative_ttl,
        };
        Requester { settings, limits: Limits::of(config), counters, pending, describe, link }
    }

    /// A request, answered by its first response, or `MeshError::Timeout` after `timeout`
    /// (describe lookup included). Every await here is cancellation safe.
    pub(crate) async fn request(
        self: &Arc<Self>,
        mut call: MeshCall,
        timeout: Duration,
    ) -> Result<MeshResponse, MeshError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.guard_call(&call)?;
        let link = self.link.current()?;
        // Encoded (and size-checked) before the describe lookup, so that a call the guard
        // refuses publishes nothing at all.
        let encoded =
            messages::encode_call(MessageType::Request, &mut call, self.limits, &self.counters)?;
        let Ok(sealing) = tokio::time::timeout_at(deadline, self.encryption_key(&call)).await
        else {
            return Err(MeshError::Timeout(timeout));
        };
        let sealing = sealing?;
        let key = sealing.as_ref().map(|s| &s.key);
        let exchange = self.exchange(&link, &call, encoded, key, self.settings.request_ttl);
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
    pub(crate) async fn command(self: &Arc<Self>, mut call: MeshCall) -> Result<(), MeshError> {
        self.guard_call(&call)?;
        let link = self.link.current()?;
        let encoded =
            messages::encode_call(MessageType::Command, &mut call, self.limits, &self.counters)?;
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
            self.settings.request_ttl,
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
        let link = self.link.current()?;
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
        let message =
            messages::event(&body, &self.settings.events_exchange, self.limits, &self.counters)?;
        match self.publish_bounded(&link, message).await? {
            // Events are not mandatory: an event nobody subscribed to is not an error.
            Published::Routed | Published::Returned => Ok(()),
            Published::Refused => {
                Err(MeshError::Unavailable("the broker refused the event".into()))
            }
        }
    }

    /// Publishes and waits for the broker at most `publish_timeout`.
    async fn publish_bounded(
        &self,
        link: &LinkHandle,
        message: Outgoing,
    ) -> Result<Published, MeshError> {
        link.publisher.publish_within(message, self.settings.publish_timeout).await
    }

    fn guard_call(&self, call: &MeshCall) -> Result<(), MeshError> {
        guard::check_call(call, self.limits, &self.settings.service_name).inspect_err(|e| {
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
        let routes = &link.direct.routes;
        // A direct request that ends without a response (timed out, cancelled, failed) sends
        // its service back to the confirmed path: without confirms the broker refuses
        // silently (a full `reject-publish` queue, a queue on a node that is down), and the
        // next request then learns at once, as before, instead of waiting out its timeout.
        let mut back_to_confirmed = None;
        // A direct publish is kept until the request ends (see `Direct::publish`).
        let mut sending = None;
        if routes.is_routable(&call.service) {
            back_to_confirmed = Some(ForgetUnlessAnswered { routes, service: &call.service });
            sending = Some(link.direct.publish(message).await?);
        } else {
            self.publish_confirmed(link, call, message).await?;
            routes.routed(&call.service);
        }
        let raw = match response.await {
            Ok(Ok(raw)) => {
                // Answered: the service stays on the direct path.
                std::mem::forget(back_to_confirmed.take());
                if let Some(sending) = sending.take() {
                    sending.answered();
                }
                raw
            }
            // A return that lapin attached to another message's confirmation (see
            // `publisher`) arrives here, without our method name.
            Ok(Err(MeshError::NotDelivered { .. })) => return Err(not_delivered(call)),
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(MeshError::Unavailable("connection lost".into())),
        };
        Ok(self.decode_response(raw, session.as_ref(), call))
    }

    /// A request to a service not known routable on this connection: published with a
    /// confirm, so that an unroutable one is answered at once (`NotDelivered`).
    async fn publish_confirmed(
        &self,
        link: &LinkHandle,
        call: &MeshCall,
        message: Outgoing,
    ) -> Result<(), MeshError> {
        match link.publisher.publish(message).await? {
            Published::Routed => Ok(()),
            Published::Returned => {
                debug!(service = %call.service, method = %call.method, trace_id = %call.trace_id, "request returned: no queue bound for the service");
                Err(not_delivered(call))
            }
            Published::Refused => {
                Err(MeshError::Unavailable("the broker refused the request".into()))
            }
        }
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
        let route = CallRoute {
            exchange: &self.settings.rpc_exchange,
            reply_to: &link.response_queue,
            ttl,
            relayed_by: &self.settings.service_name,
        };
        messages::call(tag, call, correlation_id, body, encrypted, route)
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
        // Only `result` and `error` are read; anything but an object is refused as a
        // `Data` error (`ResponseOutcome`), so that an array is not read as a body.
        match from_python_json::<ResponseOutcome>(&plain) {
            Ok(ResponseOutcome { result, error }) => MeshResponse { result, error },
            Err(PyJsonError::Decode(e)) if e.classify() == serde_json::error::Category::Data => {
                malformed("body is not a JSON object")
            }
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
        let mode = self.settings.encryption;
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
        let max_age = self.settings.encryption_key_ttl;
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
        let requester = Arc::clone(self);
        let service = call.service.clone();
        move |lookup| {
            let requester = Arc::clone(&requester);
            let service = service.clone();
            Box::pin(async move { requester.fetch_description(&service, lookup).await })
        }
    }

    /// One `nuropb_describe` call as `RMQAPI.describe_service` makes it (§6.4): params
    /// `{}`, context `{}`, a fresh trace id; bounded by `describe_timeout`. Runs in the
    /// caller's task for a first lookup and in a background task for a refresh, so it
    /// takes the live connection itself.
    async fn fetch_description(&self, service: &str, lookup: Lookup) -> Described {
        let link = match self.link.current() {
            Ok(link) => link,
            Err(error) => return Described::Failed(error),
        };
        let mut call = MeshCall {
            service: service.to_owned(),
            method: DESCRIBE_METHOD.to_owned(),
            params: JsonObject::new(),
            context: JsonObject::new(),
            trace_id: handler_core::TraceId::generate(),
        };
        let timeout = self.settings.describe_timeout;
        let encoded = match messages::encode_call(
            MessageType::Request,
            &mut call,
            self.limits,
            &self.counters,
        ) {
            Ok(encoded) => encoded,
            // Cannot happen for an empty describe call; the call itself would fail alike.
            Err(error) => return Described::Failed(error),
        };
        let outcome =
            tokio::time::timeout(timeout, self.exchange(&link, &call, encoded, None, DESCRIBE_TTL))
                .await;
        let retry_in = self.settings.describe_negative_ttl;
        let unknown = |why: String| {
            match (lookup, self.settings.encryption) {
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
            Ok(Ok(MeshResponse { result, error: None })) => {
                match ServiceCrypto::from_result(result) {
                    Ok(crypto) => Described::Known(Arc::new(crypto)),
                    Err(why) => unknown(why),
                }
            }
        }
    }
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

/// Forgets that `service` is routable when dropped: see `request`. Defused with
/// `mem::forget` once the response arrived.
struct ForgetUnlessAnswered<'a> {
    routes: &'a Routes,
    service: &'a str,
}

impl Drop for ForgetUnlessAnswered<'_> {
    fn drop(&mut self) {
        self.routes.forget(self.service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_request_without_an_answer_sends_its_service_back_to_confirms() {
        let routes = Routes::default();
        routes.routed("svc");
        // Answered: defused, the service stays on the direct path.
        std::mem::forget(ForgetUnlessAnswered { routes: &routes, service: "svc" });
        assert!(routes.is_routable("svc"));
        // Timed out or cancelled (the future dropped before a response): forgotten.
        drop(ForgetUnlessAnswered { routes: &routes, service: "svc" });
        assert!(!routes.is_routable("svc"));
    }
}
