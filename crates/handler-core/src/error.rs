//! `CoreError`: everything the core refuses, fails or closes a session for that a client
//! sees, and the one mapping from it to the wire error object and the close code.

use nuropb_wire::ErrorObject;
use nuropb_wire::client::ClientFrameError;
use nuropb_wire::mesh::error_name;

use crate::auth::AuthError;
use crate::connection::{CloseCode, CloseReason};
use crate::mesh::MeshError;

/// A client-visible failure of the core. Messages describe this level only; a cause from
/// another layer is the `#[source]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The frame failed validation in the wire crate (which names the error).
    #[error("bad client frame")]
    BadFrame(#[source] ClientFrameError),
    /// A call failed in the mesh before a service answered.
    #[error("call failed")]
    Mesh(#[source] MeshError),
    /// The session has the most requests in flight allowed
    /// (`MeshManagerConfig::max_in_flight_per_session`).
    #[error("too many requests in flight for this connection (limit {0})")]
    SessionLimit(usize),
    /// The gateway has the most requests in flight allowed
    /// (`MeshManagerConfig::max_in_flight_total`).
    #[error("gateway overloaded: too many requests in flight (limit {0})")]
    GatewayLimit(usize),
    /// The session's in-flight calls hold too many decoded bytes.
    #[error("too many request bytes in flight for this connection (limit {0} bytes)")]
    SessionBytesLimit(usize),
    /// All in-flight calls together hold too many decoded bytes.
    #[error("gateway overloaded: too many request bytes in flight (limit {0} bytes)")]
    GatewayBytesLimit(usize),
    /// No new sessions or calls: the gateway is draining (and, as a close, 1001).
    #[error("gateway shutting down")]
    ShuttingDown,
    /// The gateway's own service, for mesh peers only.
    #[error("service {0} cannot be called through the gateway")]
    Reserved(String),
    /// A method outside the clients' allow-list (`MeshManagerConfig::callable`), or a
    /// service's self-description when clients may not read it.
    #[error("{service}.{method} may not be called by clients")]
    NotCallable {
        /// The service the client named.
        service: String,
        /// The method the client named.
        method: String,
    },
    /// The session's token expired and was not refreshed (as a close, 4003).
    #[error("token expired")]
    TokenExpired,
    /// A `refresh` token was refused by the authenticator (the client only sees
    /// "unauthorized").
    #[error("refresh refused")]
    RefreshRefused(#[source] AuthError),
    /// A `refresh` token belongs to another user than the session's.
    #[error("the new token belongs to another user")]
    OtherUser,
    /// An `auth` frame within a session (the first-frame route ends with the hello).
    #[error("already authenticated; send `refresh` to replace the token")]
    AlreadyAuthenticated,
    /// The session is not (or no longer) registered.
    #[error("unknown session")]
    UnknownSession,
    /// The user already has the most sessions allowed (as a close, 1008).
    #[error("too many sessions for this user (limit {0})")]
    TooManySessions(usize),
    /// A subscription pattern outside `SessionRegistryConfig::subscribable`.
    #[error("topic pattern `{0}` is not open to subscription")]
    NotSubscribable(String),
    /// The session would hold more patterns than allowed.
    #[error("at most {0} subscriptions per session")]
    TooManySubscriptions(usize),
    /// The session's outbound queue was full (closed with 1013).
    #[error("outbound queue full: client too slow")]
    SlowClient,
    /// A mesh peer disconnected the user (`disconnect_user`, closed with 4001); the text is
    /// the peer's.
    #[error("{0}")]
    Kicked(String),
}

impl From<MeshError> for CoreError {
    fn from(e: MeshError) -> Self {
        CoreError::Mesh(e)
    }
}

impl From<ClientFrameError> for CoreError {
    fn from(e: ClientFrameError) -> Self {
        CoreError::BadFrame(e)
    }
}

impl CoreError {
    /// The NuroPb error object a client sees for this failure: the one mapping from core
    /// (and mesh) failures to client-visible errors.
    pub fn to_error_object(&self) -> ErrorObject {
        use error_name as n;
        let (name, description) = match self {
            // The wire crate names its own validation errors (and knows their trace id).
            CoreError::BadFrame(e) => return e.to_error_object(),
            CoreError::Mesh(e) => return mesh_error_object(e),
            CoreError::SessionLimit(_)
            | CoreError::GatewayLimit(_)
            | CoreError::SessionBytesLimit(_)
            | CoreError::GatewayBytesLimit(_)
            | CoreError::SlowClient => (n::OVERLOADED, self.to_string()),
            CoreError::ShuttingDown => (n::TRANSPORT, self.to_string()),
            CoreError::Reserved(_) | CoreError::NotCallable { .. } | CoreError::UnknownSession => {
                (n::AUTHORIZATION, self.to_string())
            }
            CoreError::Kicked(_) => (n::AUTHORIZATION, self.to_string()),
            CoreError::TooManySessions(_) => (n::OVERLOADED, self.to_string()),
            // Said while the session still lives (before the once-a-second sweep), so the
            // client learns how to keep it.
            CoreError::TokenExpired => {
                (n::AUTHORIZATION, "token expired; send `refresh` with a new token".to_owned())
            }
            // Like a refused upgrade: why (expired, bad signature, another user's token) is
            // for the logs, not for whoever holds the connection.
            CoreError::RefreshRefused(_) | CoreError::OtherUser => {
                (n::AUTHORIZATION, "unauthorized".to_owned())
            }
            CoreError::NotSubscribable(_)
            | CoreError::TooManySubscriptions(_)
            | CoreError::AlreadyAuthenticated => (n::VALIDATION, self.to_string()),
        };
        ErrorObject::new(name, description)
    }

    /// The close code when this failure ends the session; `None` when the session lives on
    /// and only the frame is refused.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            CoreError::ShuttingDown => Some(CloseCode::GoingAway),
            CoreError::TokenExpired => Some(CloseCode::TokenExpired),
            CoreError::SlowClient => Some(CloseCode::TryAgainLater),
            CoreError::Kicked(_) => Some(CloseCode::Kicked),
            CoreError::TooManySessions(_) => Some(CloseCode::PolicyViolation),
            CoreError::BadFrame(_)
            | CoreError::Mesh(_)
            | CoreError::SessionLimit(_)
            | CoreError::GatewayLimit(_)
            | CoreError::SessionBytesLimit(_)
            | CoreError::GatewayBytesLimit(_)
            | CoreError::Reserved(_)
            | CoreError::NotCallable { .. }
            | CoreError::RefreshRefused(_)
            | CoreError::OtherUser
            | CoreError::UnknownSession
            | CoreError::AlreadyAuthenticated
            | CoreError::NotSubscribable(_)
            | CoreError::TooManySubscriptions(_) => None,
        }
    }

    /// The close frame's reason for a failure that ends the session (see [`close_code`]).
    ///
    /// [`close_code`]: CoreError::close_code
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_code().map(|code| CloseReason::new(code, self.to_string()))
    }

    /// The close reason of a failure that always ends the session.
    pub(crate) fn closing(&self) -> CloseReason {
        // Every variant the core closes with has a close code; 1011 would only mean a wrong
        // call site, and the session still goes.
        self.close_reason()
            .unwrap_or_else(|| CloseReason::new(CloseCode::Internal, self.to_string()))
    }
}

// Here, not in `mesh.rs`: the port's types know nothing of the core's error model, which
// is built on them (imports run one way).
impl MeshError {
    /// The NuroPb error object a client sees for this failure (for adapters that answer a
    /// call themselves). The mapping is [`CoreError::to_error_object`]'s.
    pub fn to_error_object(&self) -> ErrorObject {
        mesh_error_object(self)
    }
}

/// The mesh half of [`CoreError::to_error_object`], kept apart so `MeshError` can offer it
/// to adapters without building a `CoreError`.
fn mesh_error_object(e: &MeshError) -> ErrorObject {
    use error_name as n;
    match e {
        // Exactly nuropb's text (§6.2), so clients of nuropb-gw see no difference.
        MeshError::NotDelivered { service, method } => ErrorObject::new(
            n::NOT_DELIVERED,
            format!("Service {service} not available. unable to call method {method}"),
        ),
        MeshError::Timeout(d) => ErrorObject::new(
            n::TIMEOUT,
            format!("no response from the service within {} ms", d.as_millis()),
        ),
        MeshError::Unavailable(why) => {
            ErrorObject::new(n::TRANSPORT, format!("mesh unavailable: {why}"))
        }
        MeshError::Rejected(why) => ErrorObject::new(n::VALIDATION, why.clone()),
        MeshError::Encryption(why) => {
            ErrorObject::new(n::TRANSPORT, format!("encryption failed: {why}"))
        }
        MeshError::ResponseTooLarge { .. } => ErrorObject::new(n::LIMIT_EXCEEDED, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[track_caller]
    fn check(error: CoreError, name: &str, description: &str, close: Option<u16>) {
        let object = error.to_error_object();
        assert_eq!((object.error.as_str(), object.description.as_str()), (name, description));
        assert_eq!(error.close_code().map(CloseCode::as_u16), close, "{error:?}");
        assert_eq!(error.close_reason().map(|r| r.code.as_u16()), close);
    }

    #[test]
    fn one_mapping_to_error_names_and_close_codes() {
        use error_name as n;
        check(
            CoreError::SessionLimit(2),
            n::OVERLOADED,
            "too many requests in flight for this connection (limit 2)",
            None,
        );
        check(
            CoreError::GatewayLimit(3),
            n::OVERLOADED,
            "gateway overloaded: too many requests in flight (limit 3)",
            None,
        );
        check(
            CoreError::SessionBytesLimit(4096),
            n::OVERLOADED,
            "too many request bytes in flight for this connection (limit 4096 bytes)",
            None,
        );
        check(
            CoreError::GatewayBytesLimit(8192),
            n::OVERLOADED,
            "gateway overloaded: too many request bytes in flight (limit 8192 bytes)",
            None,
        );
        check(CoreError::ShuttingDown, n::TRANSPORT, "gateway shutting down", Some(1001));
        check(
            CoreError::Reserved("gw".into()),
            n::AUTHORIZATION,
            "service gw cannot be called through the gateway",
            None,
        );
        check(
            CoreError::NotCallable { service: "orders".into(), method: "nuropb_describe".into() },
            n::AUTHORIZATION,
            "orders.nuropb_describe may not be called by clients",
            None,
        );
        check(
            CoreError::TokenExpired,
            n::AUTHORIZATION,
            "token expired; send `refresh` with a new token",
            Some(4003),
        );
        check(
            CoreError::RefreshRefused(AuthError::Expired),
            n::AUTHORIZATION,
            "unauthorized",
            None,
        );
        check(CoreError::OtherUser, n::AUTHORIZATION, "unauthorized", None);
        check(
            CoreError::AlreadyAuthenticated,
            n::VALIDATION,
            "already authenticated; send `refresh` to replace the token",
            None,
        );
        check(
            CoreError::NotSubscribable("x".into()),
            n::VALIDATION,
            "topic pattern `x` is not open to subscription",
            None,
        );
        check(
            CoreError::TooManySubscriptions(2),
            n::VALIDATION,
            "at most 2 subscriptions per session",
            None,
        );
        check(
            CoreError::SlowClient,
            n::OVERLOADED,
            "outbound queue full: client too slow",
            Some(1013),
        );
        check(CoreError::Kicked("bye".into()), n::AUTHORIZATION, "bye", Some(4001));
        check(
            MeshError::NotDelivered { service: "s".into(), method: "m".into() }.into(),
            n::NOT_DELIVERED,
            "Service s not available. unable to call method m",
            None,
        );
        check(
            MeshError::Timeout(Duration::from_secs(1)).into(),
            n::TIMEOUT,
            "no response from the service within 1000 ms",
            None,
        );
        check(
            MeshError::Unavailable("gateway shutting down".into()).into(),
            n::TRANSPORT,
            "mesh unavailable: gateway shutting down",
            None,
        );
        check(MeshError::Rejected("why".into()).into(), n::VALIDATION, "why", None);
        check(
            MeshError::Encryption("why".into()).into(),
            n::TRANSPORT,
            "encryption failed: why",
            None,
        );
        check(
            MeshError::ResponseTooLarge { bytes: 10, limit: 5 }.into(),
            n::LIMIT_EXCEEDED,
            "response of 10 bytes exceeds the limit of 5 bytes",
            None,
        );
    }

    #[test]
    fn the_wire_crate_names_decode_errors_with_the_constant() {
        let e = nuropb_wire::client::decode_client_message(
            b"not json",
            nuropb_wire::client::Encoding::Json,
            &Default::default(),
        )
        .expect_err("not a frame");
        assert_eq!(CoreError::from(e).to_error_object().error, error_name::DECODE);
    }

    #[test]
    fn close_reasons_keep_their_texts() {
        // The close frames clients have always seen.
        let reason = |e: CoreError| e.close_reason().map(|r| r.reason);
        assert_eq!(reason(CoreError::ShuttingDown).as_deref(), Some("gateway shutting down"));
        assert_eq!(reason(CoreError::TokenExpired).as_deref(), Some("token expired"));
        assert_eq!(
            reason(CoreError::SlowClient).as_deref(),
            Some("outbound queue full: client too slow")
        );
        assert_eq!(reason(CoreError::Kicked("kicked".into())).as_deref(), Some("kicked"));
        assert_eq!(reason(CoreError::UnknownSession), None);
    }
}
