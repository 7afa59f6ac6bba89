//! Authorization: the `Authenticator` port and its implementations. A token is checked
//! once, at the WebSocket upgrade (or the first-frame `auth`), and again on `refresh`; the
//! resulting [`Identity`] lives with the session.
//!
//! - [`JwtAuthenticator`]: JWTs verified with the keys of a [`KeySet`] (`keys`): static keys
//!   given at start, and keys from a JWKS that an adapter replaces while running.
//! - [`opaque::MeshAuthenticator`]: tokens that are not JWTs, checked by a NuroPb service
//!   method through the [`ServiceMesh`](crate::mesh::ServiceMesh) port, answers cached.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use crate::ids::UserId;

pub mod keys;
pub mod opaque;

pub use keys::{JwkKeys, JwksError, KeySet};

/// Who a session belongs to.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (the token's `sub`): sessions, targeted events and `disconnect_user` go by it.
    pub user_id: UserId,
    /// A display name (the configured username claim, `sub` when absent); sent in the hello.
    pub username: String,
    /// The raw bearer token, forwarded to services as `Authorization: Bearer <token>`.
    pub token: String,
    /// When the token stops being accepted (Unix seconds: its `exp` plus the configured
    /// leeway); the session is closed then unless the client refreshes it. `None`: never.
    pub expires_at: Option<u64>,
    /// The token's own expiry (Unix seconds, its `exp`), which the hello reports so a client
    /// knows when to refresh. `None`: the credential does not expire.
    pub token_expires_at: Option<u64>,
}

impl fmt::Debug for Identity {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("expires_at", &self.expires_at)
            .field("token_expires_at", &self.token_expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. Clients only ever see "unauthorized"; the detail is for logs.
/// No variant carries text from the token: whoever sent it controls every byte of it (the
/// header's `alg`, a claim), and a refusal is logged before anything is verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no credentials")]
    Missing,
    /// `exp` (plus the leeway) is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus the leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not verify with the configured key (or, for other authenticators,
    /// the credential is unknown).
    #[error("invalid token signature")]
    BadSignature,
    /// The header names an algorithm other than the configured key's (including `none`).
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    /// `aud` does not match [`JwtConfig::audience`].
    #[error("wrong token audience")]
    WrongAudience,
    /// `iss` does not match [`JwtConfig::issuer`].
    #[error("wrong token issuer")]
    WrongIssuer,
    /// `sub` is absent, empty or not a string.
    #[error("token has no usable subject")]
    MissingSubject,
    /// `iat` later than now (beyond the leeway): the issuer's clock or the token is wrong.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `exp - iat` over [`JwtConfig::max_lifetime_secs`], or no `iat` to tell.
    #[error("token lifetime over the limit or unknown")]
    LifetimeTooLong,
    /// What is wrong, in our words (fixed text, never the decoder's, which quotes input).
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The token names a `kid` that no key of the set has (also after a refresh).
    #[error("no key for the token's kid")]
    UnknownKey,
    /// The auth service refused the token (an error answer, or a result that is not a
    /// valid identity).
    #[error("auth service refused the token")]
    Refused,
    /// The auth service did not answer in time, or its answer could not be used.
    #[error("auth service failed")]
    ServiceFailed,
    /// The mesh (or the auth service's queue) is not there: the token could not be checked
    /// at all. The upgrade answers 503 rather than 401: the client did nothing wrong.
    #[error("auth service unavailable")]
    Unavailable,
}

impl AuthError {
    /// Whether the token was not judged at all because a dependency is down (so the client
    /// should retry later rather than get a new token).
    pub fn is_unavailable(&self) -> bool {
        match self {
            AuthError::Unavailable => true,
            AuthError::Missing
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::BadSignature
            | AuthError::AlgorithmNotAllowed
            | AuthError::WrongAudience
            | AuthError::WrongIssuer
            | AuthError::MissingSubject
            | AuthError::IssuedInFuture
            | AuthError::LifetimeTooLong
            | AuthError::Malformed(_)
            | AuthError::UnknownKey
            | AuthError::Refused
            | AuthError::ServiceFailed => false,
        }
    }
}

/// Checks a bearer token and says who it belongs to. Called on the upgrade path within the
/// handshake timeout (and holding a handshake slot), so an implementation that calls out
/// bounds its own wait.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait Authenticator: Send + Sync + 'static {
    /// The identity `token` belongs to (the bearer prefix already stripped), or why it is
    /// refused; a refusal is answered 401 at the upgrade (503 when
    /// [`AuthError::is_unavailable`]) and "unauthorized" on `refresh`.
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError>;
}

/// The key (or keys) that verify tokens.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 shared secret.
    Hs256Secret(Vec<u8>),
    /// RS256 public key, PEM.
    Rs256PublicPem(String),
    /// ES256 public key, PEM.
    Es256PublicPem(String),
    /// Every key of a [`KeySet`]: static keys fixed at start plus the keys of a JWKS that
    /// an adapter replaces while running. The token's `kid` and `alg` pick the key.
    Set(Arc<KeySet>),
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKey::Hs256Secret(_) => f.write_str("Hs256Secret(..)"),
            JwtKey::Rs256PublicPem(_) => f.write_str("Rs256PublicPem(..)"),
            JwtKey::Es256PublicPem(_) => f.write_str("Es256PublicPem(..)"),
            JwtKey::Set(set) => f.debug_tuple("Set").field(set).finish(),
        }
    }
}

/// JWT verification settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The key(s) that verify signatures; each key accepts exactly one algorithm.
    pub key: JwtKey,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (any of), when set.
    pub audience: Option<Vec<String>>,
    /// Claim holding the username (default `username`); `sub` is used when it is absent.
    pub username_claim: String,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`, in seconds (default 30).
    pub leeway_secs: u64,
    /// Longest accepted token lifetime, `exp - iat`, in seconds (default `None`: any). When
    /// set, tokens must carry `iat`: a stolen long-lived token is refused even before it
    /// expires. `iat` later than now plus the leeway is refused either way.
    pub max_lifetime_secs: Option<u64>,
}

impl JwtConfig {
    /// A configuration with `key` and the defaults of every other field.
    pub fn new(key: JwtKey) -> Self {
        JwtConfig {
            key,
            issuer: None,
            audience: None,
            username_claim: "username".to_owned(),
            leeway_secs: 30,
            max_lifetime_secs: None,
        }
    }
}

/// Invalid JWT configuration (bad PEM and the like).
#[derive(Debug, thiserror::Error)]
#[error("invalid jwt key")]
pub struct JwtConfigError(#[source] jsonwebtoken::errors::Error);

/// Verifies JWTs: the signature with the one key the header's `kid` and `alg` select (each
/// key accepts exactly one algorithm), `exp` (required), `nbf`, and `iss`/`aud` when
/// configured. `sub` becomes the user id.
///
/// A token naming a `kid` the set does not have asks the set for a refresh (when an adapter
/// refreshes it) and is checked once more after it, so a key published just now is accepted
/// at once. The refresh is the adapter's to bound and rate-limit ([`KeySet`]).
pub struct JwtAuthenticator {
    keys: Arc<KeySet>,
    // One per algorithm a key can have, identical but for `algorithms`.
    validations: Vec<(Algorithm, Validation)>,
    leeway_secs: u64,
    username_claim: String,
    max_lifetime_secs: Option<u64>,
}

impl JwtAuthenticator {
    /// Builds the decoding key(s) once; fails if a PEM key cannot be parsed.
    pub fn new(config: JwtConfig) -> Result<Self, JwtConfigError> {
        let keys = match config.key {
            JwtKey::Set(set) => set,
            key => Arc::new(KeySet::new(vec![key])?),
        };
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = config.leeway_secs;
        base.validate_exp = true;
        base.validate_nbf = true;
        base.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &config.issuer {
            base.set_issuer(&[iss]);
            base.required_spec_claims.insert("iss".to_owned());
        }
        match &config.audience {
            Some(aud) => {
                base.set_audience(aud);
                base.required_spec_claims.insert("aud".to_owned());
            }
            None => base.validate_aud = false,
        }
        // One algorithm per validation: the key decides it, never the token header (no alg
        // confusion, and `none` is not an algorithm jsonwebtoken knows).
        let validations = keys::ALGORITHMS
            .iter()
            .map(|&alg| {
                let mut v = base.clone();
                v.algorithms = vec![alg];
                (alg, v)
            })
            .collect();
        Ok(JwtAuthenticator {
            keys,
            validations,
            leeway_secs: config.leeway_secs,
            username_claim: config.username_claim,
            max_lifetime_secs: config.max_lifetime_secs,
        })
    }

    /// The key set this authenticator verifies with.
    pub fn key_set(&self) -> &Arc<KeySet> {
        &self.keys
    }

    /// Checks `token` with the keys the set has now, without waiting for a refresh.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| decode_error(&e))?;
        let data = self.keys.verify_with(header.kid.as_deref(), header.alg, |key| {
            let validation = self
                .validations
                .iter()
                .find(|(alg, _)| *alg == header.alg)
                .map(|(_, v)| v)
                .ok_or(AuthError::AlgorithmNotAllowed)?;
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, validation)
                .map_err(|e| decode_error(&e))
        })?;
        self.identity(token, data.claims)
    }

    fn identity(
        &self,
        token: &str,
        claims: serde_json::Map<String, Value>,
    ) -> Result<Identity, AuthError> {
        let user_id = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => s.clone(),
            _ => return Err(AuthError::MissingSubject),
        };
        let username = match claims.get(&self.username_claim) {
            Some(Value::String(s)) => s.clone(),
            _ => user_id.clone(),
        };
        // The last second the token is still accepted (its `exp` plus the clock-skew leeway).
        // `exp` may be a decimal (PyJWT writes `time.time() + n`); it is rounded up. A token
        // whose `exp` cannot be read has no expiry we could enforce, so it is refused.
        let exp = match claims.get("exp").and_then(Value::as_f64) {
            Some(e) if e.is_finite() && e >= 0.0 => e.ceil() as u64,
            _ => return Err(AuthError::Malformed("`exp` is not a number")),
        };
        self.check_issued_at(claims.get("iat"), exp)?;
        let expires_at = Some(exp.saturating_add(self.leeway_secs));
        Ok(Identity {
            user_id: UserId::new(user_id),
            username,
            token: token.to_owned(),
            expires_at,
            token_expires_at: Some(exp),
        })
    }
}

/// jsonwebtoken's error as ours: fixed text only (its own text may quote the token).
fn decode_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::AlgorithmNotAllowed
        }
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::MissingSubject,
        ErrorKind::MissingRequiredClaim(_) => AuthError::Malformed("a required claim is missing"),
        ErrorKind::InvalidToken => AuthError::Malformed("not a JWT"),
        ErrorKind::Base64(_) => AuthError::Malformed("a segment is not base64url"),
        ErrorKind::Json(_) => AuthError::Malformed("header or claims are not valid JSON"),
        ErrorKind::Utf8(_) => AuthError::Malformed("header or claims are not UTF-8"),
        // `e`'s text may quote the token (serde names an unknown `alg` verbatim).
        _ => AuthError::Malformed("cannot be decoded"),
    }
}

#[async_trait]
impl Authenticator for JwtAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        // Read before the check: a refresh that ends between the check and the request
        // counts, so the retry below never waits for one that already happened.
        let seen = self.keys.generation();
        match self.verify(token) {
            Err(AuthError::UnknownKey) if self.keys.is_refreshed() => {
                self.keys.refresh_and_wait(seen).await;
                self.verify(token)
            }
            checked => checked,
        }
    }
}

impl JwtAuthenticator {
    /// `iat` is not in the future, and `exp - iat` within `max_lifetime_secs` when set
    /// (which makes `iat` required). jsonwebtoken checks neither.
    fn check_issued_at(&self, iat: Option<&Value>, exp: u64) -> Result<(), AuthError> {
        let iat = match iat {
            None => None,
            Some(v) => match v.as_f64() {
                // Rounded down: a decimal `iat` (PyJWT) is never pushed into the future.
                Some(i) if i.is_finite() && i >= 0.0 => Some(i.floor() as u64),
                _ => return Err(AuthError::Malformed("`iat` is not a number")),
            },
        };
        let now = jsonwebtoken::get_current_timestamp();
        if iat.is_some_and(|i| i > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::IssuedInFuture);
        }
        if let Some(max) = self.max_lifetime_secs {
            match iat {
                Some(i) if exp.saturating_sub(i) <= max => {}
                _ => return Err(AuthError::LifetimeTooLong),
            }
        }
        Ok(())
    }
}

/// Extracts the bearer token from an `Authorization` header or cookie value the way
/// nuropb-gw 0.1.4 did: strip the first matching prefix among `Bearer :`, `Bearer:`,
/// `Bearer `, `Bearer` (case-sensitive), then trim.
pub fn strip_bearer(value: &str) -> &str {
    let value = value.trim();
    for prefix in ["Bearer :", "Bearer:", "Bearer ", "Bearer"] {
        if let Some(rest) = value.strip_prefix(prefix) {
            return rest.trim();
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-0123456789";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs_token(claims: Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret))
            .expect("encode")
    }

    fn hs_auth(config: impl FnOnce(&mut JwtConfig)) -> JwtAuthenticator {
        let mut c = JwtConfig::new(JwtKey::Hs256Secret(SECRET.to_vec()));
        c.leeway_secs = 0;
        config(&mut c);
        JwtAuthenticator::new(c).expect("config")
    }

    #[test]
    fn accepts_valid_hs256_and_maps_claims() {
        let auth = hs_auth(|_| {});
        let token = hs_token(
            json!({"sub": "alice-id", "username": "alice@example.com", "exp": now() + 60}),
            SECRET,
        );
        let id = auth.verify(&token).expect("valid");
        assert_eq!(id.user_id, UserId::new("alice-id"));
        assert_eq!(id.username, "alice@example.com");
        assert_eq!(id.token, token);
        assert!(id.expires_at.is_some_and(|e| e >= now() + 59));
    }

    #[test]
    fn username_claim_is_configurable_and_falls_back_to_sub() {
        let auth = hs_auth(|c| c.username_claim = "email".to_owned());
        let t = hs_token(json!({"sub": "u1", "email": "u1@x", "exp": now() + 60}), SECRET);
        assert_eq!(auth.verify(&t).expect("valid").username, "u1@x");
        let t = hs_token(json!({"sub": "u1", "exp": now() + 60}), SECRET);
        assert_eq!(auth.verify(&t).expect("valid").username, "u1");
    }

    #[test]
    fn rejections() {
        let auth = hs_auth(|c| {
            c.audience = Some(vec!["gateway".to_owned()]);
            c.issuer = Some("issuer-1".to_owned());
        });
        let good = json!({"sub": "u", "exp": now() + 60, "aud": "gateway", "iss": "issuer-1"});
        assert!(auth.verify(&hs_token(good.clone(), SECRET)).is_ok());

        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            c
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().expect("object").remove(k);
            c
        };
        let cases: Vec<(&str, String, AuthError)> = vec![
            ("expired", hs_token(with("exp", json!(now() - 120)), SECRET), AuthError::Expired),
            (
                "not yet valid",
                hs_token(with("nbf", json!(now() + 3600)), SECRET),
                AuthError::NotYetValid,
            ),
            ("wrong signature", hs_token(good.clone(), b"another-secret"), AuthError::BadSignature),
            (
                "wrong audience",
                hs_token(with("aud", json!("other")), SECRET),
                AuthError::WrongAudience,
            ),
            ("wrong issuer", hs_token(with("iss", json!("evil")), SECRET), AuthError::WrongIssuer),
            ("no sub", hs_token(without("sub"), SECRET), AuthError::MissingSubject),
            (
                "sub not a string",
                hs_token(with("sub", json!(42)), SECRET),
                AuthError::MissingSubject,
            ),
        ];
        for (name, token, expected) in cases {
            assert_eq!(auth.verify(&token), Err(expected), "case {name}");
        }
        // No `exp` at all is refused: tokens must expire.
        assert!(matches!(
            auth.verify(&hs_token(without("exp"), SECRET)),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(auth.verify("not-a-jwt"), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn alg_none_is_refused() {
        let auth = hs_auth(|_| {});
        use base64_like::encode_url;
        let header = encode_url(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = encode_url(format!(r#"{{"sub":"u","exp":{}}}"#, now() + 60).as_bytes());
        for token in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
            assert!(auth.verify(&token).is_err(), "alg none accepted: {token}");
        }
        // An HS384 token signed with the right secret is still refused (one algorithm only).
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "u", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("encode");
        assert_eq!(auth.verify(&t), Err(AuthError::AlgorithmNotAllowed));
    }

    /// Minimal URL-safe base64 without padding, so the test needs no extra crate.
    mod base64_like {
        pub(super) fn encode_url(input: &[u8]) -> String {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                let chars = chunk.len() + 1;
                for i in 0..chars {
                    out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
                }
            }
            out
        }
    }

    #[test]
    fn issued_at_and_lifetime_policy() {
        let any = hs_auth(|_| {});
        let capped = hs_auth(|c| c.max_lifetime_secs = Some(3600));
        let t = now();
        for (claims, any_expected, capped_expected) in [
            (json!({"sub": "u", "exp": t + 60, "iat": t}), Ok(()), Ok(())),
            (json!({"sub": "u", "exp": t + 60, "iat": t as f64 - 0.5}), Ok(()), Ok(())),
            (json!({"sub": "u", "exp": t + 3600, "iat": t}), Ok(()), Ok(())),
            (
                json!({"sub": "u", "exp": t + 3601, "iat": t}),
                Ok(()),
                Err(AuthError::LifetimeTooLong),
            ),
            (json!({"sub": "u", "exp": t + 60}), Ok(()), Err(AuthError::LifetimeTooLong)),
            (
                json!({"sub": "u", "exp": t + 600, "iat": t + 300}),
                Err(AuthError::IssuedInFuture),
                Err(AuthError::IssuedInFuture),
            ),
            (
                json!({"sub": "u", "exp": t + 60, "iat": "yesterday"}),
                Err(AuthError::Malformed("`iat` is not a number")),
                Err(AuthError::Malformed("`iat` is not a number")),
            ),
        ] {
            let token = hs_token(claims.clone(), SECRET);
            assert_eq!(any.verify(&token).map(|_| ()), any_expected, "{claims}");
            assert_eq!(capped.verify(&token).map(|_| ()), capped_expected, "{claims}");
        }
    }

    #[test]
    fn refusals_never_quote_the_token() {
        use base64_like::encode_url;
        let auth = hs_auth(|_| {});
        let forged = "HS256\nINFO session opened user.id=admin";
        let header = encode_url(format!(r#"{{"alg":"{forged}","typ":"JWT"}}"#).as_bytes());
        let claims = encode_url(br#"{"sub":"u\nadmin","exp":1}"#);
        for token in [format!("{header}.{claims}.sig"), format!("{header}.{claims}"), "a\nb".into()]
        {
            let e = auth.verify(&token).unwrap_err();
            let text = e.to_string();
            assert!(!text.contains('\n') && !text.contains("admin"), "{text:?}");
        }
    }

    #[test]
    fn the_token_expiry_and_the_session_expiry_differ_by_the_leeway() {
        let auth = hs_auth(|c| c.leeway_secs = 30);
        let exp = now() + 600;
        let t = hs_token(json!({"sub": "u", "exp": exp}), SECRET);
        let id = auth.verify(&t).expect("valid");
        assert_eq!(id.token_expires_at, Some(exp));
        assert_eq!(id.expires_at, Some(exp + 30));
    }

    #[test]
    fn decimal_exp_is_rounded_up_and_enforced() {
        let auth = hs_auth(|_| {});
        let exp = now() as f64 + 60.5;
        let t = hs_token(json!({"sub": "u", "exp": exp}), SECRET);
        let id = auth.verify(&t).expect("a decimal exp is valid");
        assert_eq!(id.expires_at, Some(exp.ceil() as u64));
    }

    #[test]
    fn bearer_prefix_stripping_matches_nuropb_gw() {
        for (input, expected) in [
            ("Bearer abc", "abc"),
            ("Bearer:abc", "abc"),
            ("Bearer :abc", "abc"),
            ("Bearerabc", "abc"),
            ("  Bearer   abc  ", "abc"),
            ("abc", "abc"),
            ("bearer abc", "bearer abc"),
        ] {
            assert_eq!(strip_bearer(input), expected, "input {input:?}");
        }
    }
}
