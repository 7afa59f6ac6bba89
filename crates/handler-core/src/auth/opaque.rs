//! Opaque tokens checked by a NuroPb service method, the way nuropb-gw's
//! `authorise_from_token` worked: the token is sent through the [`ServiceMesh`] port as a
//! request to a configured `service.method` with params `{"token": "<token>"}`, and the
//! answer is cached for a bounded time in a bounded cache.
//!
//! The answer's `result` must be an object with `user_id` (a non-empty string of at most
//! 255 bytes), optionally `username` (a string; the user id when absent), and `expires_at`
//! (Unix seconds, a number in the future; the session is closed then unless refreshed).
//! Anything else, or an `error` in the answer, refuses the token. The cache is keyed by the
//! SHA-256 of the token (the token itself is never kept as a key nor logged; logs show the
//! first 8 hex digits of the hash), holds at most `cache_entries` answers (least recently
//! used evicted first) and keeps each at most `cache_ttl` and never past its `expires_at`.
//! Refusals are not cached.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{AuthError, Authenticator, Identity};
use crate::ids::{TraceId, UserId};
use crate::mesh::{MeshCall, MeshError, ServiceMesh};

/// Which tokens go to the auth service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpaqueRoute {
    /// Tokens that are not JWTs (not three dot-separated base64url segments whose first is
    /// a JSON header); JWTs go to the JWT authenticator.
    NonJwt,
    /// Every token.
    All,
}

/// Settings of the mesh token check.
#[derive(Debug, Clone)]
pub struct MeshAuthConfig {
    /// The service the check is sent to (e.g. `auth`).
    pub service: String,
    /// Its method (e.g. `authorise`).
    pub method: String,
    /// How long the gateway waits for the answer (default 2 s); then the token is refused.
    pub timeout: Duration,
    /// Longest time an answer is reused (default 60 s); never past the answer's expiry.
    /// Zero turns the cache off.
    pub cache_ttl: Duration,
    /// Most answers cached (default 10 000).
    pub cache_entries: NonZeroUsize,
    /// Which tokens are checked by the service (default [`OpaqueRoute::NonJwt`]).
    pub route: OpaqueRoute,
}

impl MeshAuthConfig {
    /// A configuration calling `service.method`, with the defaults of every other field.
    pub fn new(service: impl Into<String>, method: impl Into<String>) -> Self {
        MeshAuthConfig {
            service: service.into(),
            method: method.into(),
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(60),
            cache_entries: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            route: OpaqueRoute::NonJwt,
        }
    }
}

#[derive(Clone)]
struct Cached {
    user_id: UserId,
    username: String,
    expires_at: u64,
    until: Instant,
}

/// Checks opaque tokens with a mesh service (see the module doc) and hands JWTs (unless the
/// route is [`OpaqueRoute::All`]) to the JWT authenticator given.
pub struct MeshAuthenticator {
    mesh: Arc<dyn ServiceMesh>,
    jwt: Option<Arc<dyn Authenticator>>,
    config: MeshAuthConfig,
    // Held for a lookup or an insert only, never across `.await`.
    cache: Mutex<LruCache<[u8; 32], Cached>>,
}

impl MeshAuthenticator {
    /// The check through `mesh`; `jwt` takes the JWTs when the route is
    /// [`OpaqueRoute::NonJwt`] (without one, a JWT is refused).
    pub fn new(
        mesh: Arc<dyn ServiceMesh>,
        jwt: Option<Arc<dyn Authenticator>>,
        config: MeshAuthConfig,
    ) -> Self {
        let cache = Mutex::new(LruCache::new(config.cache_entries));
        MeshAuthenticator { mesh, jwt, config, cache }
    }

    /// How many answers are cached now.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn ask(&self, token: &str, hash: [u8; 32]) -> Result<Identity, AuthError> {
        let short = short_hash(&hash);
        if let Some(hit) = self.lookup(&hash) {
            return Ok(identity(token, &hit));
        }
        let mut params = serde_json::Map::new();
        params.insert("token".to_owned(), Value::String(token.to_owned()));
        let call = MeshCall {
            service: self.config.service.clone(),
            method: self.config.method.clone(),
            params,
            context: serde_json::Map::new(),
            trace_id: TraceId::generate(),
        };
        let answer = match self.mesh.request(call, self.config.timeout).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::info!(token.hash = %short, error = %e, "auth service call failed");
                return Err(match e {
                    MeshError::Unavailable(_) | MeshError::NotDelivered { .. } => {
                        AuthError::Unavailable
                    }
                    MeshError::Timeout(_)
                    | MeshError::Rejected(_)
                    | MeshError::Encryption(_)
                    | MeshError::ResponseTooLarge { .. } => AuthError::ServiceFailed,
                });
            }
        };
        if answer.error.is_some() {
            tracing::info!(token.hash = %short, "auth service refused the token");
            return Err(AuthError::Refused);
        }
        let now = unix_now();
        let Some(claims) = parse_answer(&answer.result, now) else {
            tracing::info!(token.hash = %short, "auth service answer is not a valid identity");
            return Err(AuthError::Refused);
        };
        let ttl = self.config.cache_ttl.min(Duration::from_secs(claims.expires_at - now));
        if !ttl.is_zero() {
            let entry = Cached { until: Instant::now() + ttl, ..claims.clone() };
            self.cache.lock().unwrap_or_else(|e| e.into_inner()).put(hash, entry);
        }
        Ok(identity(token, &claims))
    }

    fn lookup(&self, hash: &[u8; 32]) -> Option<Cached> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(hash) {
            Some(hit) if hit.until > Instant::now() && hit.expires_at > unix_now() => {
                Some(hit.clone())
            }
            Some(_) => {
                cache.pop(hash);
                None
            }
            None => None,
        }
    }
}

#[async_trait]
impl Authenticator for MeshAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if self.config.route == OpaqueRoute::NonJwt && looks_like_jwt(token) {
            return match &self.jwt {
                Some(jwt) => jwt.authenticate(token).await,
                None => Err(AuthError::AlgorithmNotAllowed),
            };
        }
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.ask(token, hash).await
    }
}

/// Whether `token` has a JWT's shape: three base64url segments, the first a JSON object.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    jsonwebtoken::decode_header(token).is_ok() || header.starts_with("eyJ")
}

/// The answer as an identity, or `None` when it is not one (see the module doc).
fn parse_answer(result: &Value, now: u64) -> Option<Cached> {
    let object = result.as_object()?;
    let user_id = match object.get("user_id")? {
        Value::String(s) if !s.is_empty() && s.len() <= 255 => s.clone(),
        _ => return None,
    };
    let username = match object.get("username") {
        None | Some(Value::Null) => user_id.clone(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return None,
    };
    let expires_at = object.get("expires_at")?.as_f64()?;
    if !expires_at.is_finite() || expires_at <= now as f64 {
        return None;
    }
    Some(Cached {
        user_id: UserId::new(user_id),
        username,
        // Rounded down: the gateway never keeps a session past what the service said.
        expires_at: expires_at.floor() as u64,
        until: Instant::now(),
    })
}

fn identity(token: &str, claims: &Cached) -> Identity {
    Identity {
        user_id: claims.user_id.clone(),
        username: claims.username.clone(),
        token: token.to_owned(),
        expires_at: Some(claims.expires_at),
        token_expires_at: Some(claims.expires_at),
    }
}

fn short_hash(hash: &[u8; 32]) -> String {
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
