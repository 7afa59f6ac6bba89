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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::MockAuthenticator;
    use crate::mesh::{MeshResponse, MockServiceMesh};

    fn answer(result: Value) -> Result<MeshResponse, MeshError> {
        Ok(MeshResponse { result, error: None })
    }

    fn later() -> u64 {
        unix_now() + 600
    }

    fn check(mesh: MockServiceMesh, config: impl FnOnce(&mut MeshAuthConfig)) -> MeshAuthenticator {
        let mut c = MeshAuthConfig::new("auth", "authorise");
        config(&mut c);
        MeshAuthenticator::new(Arc::new(mesh), None, c)
    }

    #[tokio::test]
    async fn the_request_and_the_answer_contract() {
        let mut mesh = MockServiceMesh::new();
        mesh.expect_request().times(1).returning(|call, timeout| {
            assert_eq!((call.service.as_str(), call.method.as_str()), ("auth", "authorise"));
            assert_eq!(Value::Object(call.params), json!({"token": "opaque-1"}));
            assert_eq!(timeout, Duration::from_secs(2));
            answer(json!({"user_id": "u1", "username": "Una", "expires_at": later()}))
        });
        let auth = check(mesh, |_| {});
        let id = auth.authenticate("opaque-1").await.expect("accepted");
        assert_eq!(
            (id.user_id.as_str(), id.username.as_str(), id.token.as_str()),
            ("u1", "Una", "opaque-1")
        );
        assert_eq!(id.expires_at, Some(later()));
        // Cached: the mock allows one call only.
        assert_eq!(auth.authenticate("opaque-1").await.expect("cached").user_id.as_str(), "u1");
    }

    #[tokio::test]
    async fn anything_but_an_identity_is_refused() {
        for result in [
            json!(null),
            json!("u1"),
            json!({"username": "no id", "expires_at": later()}),
            json!({"user_id": "", "expires_at": later()}),
            json!({"user_id": 7, "expires_at": later()}),
            json!({"user_id": "x".repeat(256), "expires_at": later()}),
            json!({"user_id": "u1"}),
            json!({"user_id": "u1", "expires_at": unix_now() - 1}),
            json!({"user_id": "u1", "expires_at": "tomorrow"}),
            json!({"user_id": "u1", "username": 5, "expires_at": later()}),
        ] {
            let mut mesh = MockServiceMesh::new();
            let r = result.clone();
            mesh.expect_request().returning(move |_, _| answer(r.clone()));
            let auth = check(mesh, |_| {});
            assert_eq!(
                auth.authenticate("t").await.map(|_| ()),
                Err(AuthError::Refused),
                "{result}"
            );
            assert_eq!(auth.cached(), 0, "a refusal is not cached");
        }
    }

    #[tokio::test]
    async fn mesh_failures_map_to_unavailable_or_failed() {
        let unavailable = || MeshError::Unavailable("down".into());
        let not_delivered =
            || MeshError::NotDelivered { service: "auth".into(), method: "a".into() };
        let timeout = || MeshError::Timeout(Duration::from_secs(2));
        let error = || {
            Ok(MeshResponse {
                result: Value::Null,
                error: Some(nuropb_wire::ErrorObject::new("NuropbAuthorizationError", "no")),
            })
        };
        type Outcome = Box<dyn Fn() -> Result<MeshResponse, MeshError> + Send + Sync>;
        let cases: Vec<(Outcome, AuthError)> = vec![
            (Box::new(move || Err(unavailable())), AuthError::Unavailable),
            (Box::new(move || Err(not_delivered())), AuthError::Unavailable),
            (Box::new(move || Err(timeout())), AuthError::ServiceFailed),
            (Box::new(error), AuthError::Refused),
        ];
        for (outcome, expected) in cases {
            let mut mesh = MockServiceMesh::new();
            mesh.expect_request().returning(move |_, _| outcome());
            let auth = check(mesh, |_| {});
            let got = auth.authenticate("t").await.map(|_| ());
            assert_eq!(got, Err(expected.clone()));
            assert_eq!(expected.is_unavailable(), expected == AuthError::Unavailable);
        }
    }

    #[tokio::test]
    async fn the_cache_is_bounded_in_entries_and_by_the_answers_expiry() {
        let mut mesh = MockServiceMesh::new();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        mesh.expect_request().returning(move |call, _| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let token = call.params["token"].as_str().unwrap_or_default().to_owned();
            // `short` expires within the second: cached no longer than that.
            let expires_at = if token == "short" { unix_now() + 1 } else { later() };
            answer(json!({"user_id": token, "expires_at": expires_at}))
        });
        let auth =
            check(mesh, |c| c.cache_entries = NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN));
        for t in ["a", "b", "c"] {
            auth.authenticate(t).await.expect("accepted");
        }
        assert_eq!(auth.cached(), 2, "at most cache_entries answers");
        let asked = |n| assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), n);
        asked(3);
        auth.authenticate("c").await.expect("cached");
        asked(3);
        // `a` was the least recently used: evicted, asked again.
        auth.authenticate("a").await.expect("asked again");
        asked(4);
        let auth_ttl0 = {
            let mut mesh = MockServiceMesh::new();
            mesh.expect_request()
                .times(2)
                .returning(|_, _| answer(json!({"user_id": "z", "expires_at": later()})));
            check(mesh, |c| c.cache_ttl = Duration::ZERO)
        };
        auth_ttl0.authenticate("z").await.expect("accepted");
        auth_ttl0.authenticate("z").await.expect("asked again: no cache");
        assert_eq!(auth_ttl0.cached(), 0);
    }

    #[tokio::test]
    async fn jwts_go_to_the_jwt_check_unless_every_token_is_routed() {
        let jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln";
        let mut jwt = MockAuthenticator::new();
        jwt.expect_authenticate().times(1).returning(|_| Err(AuthError::Expired));
        let mut mesh = MockServiceMesh::new();
        mesh.expect_request()
            .times(1)
            .returning(|_, _| answer(json!({"user_id": "m", "expires_at": later()})));
        let mesh = Arc::new(mesh);
        let jwt: Arc<dyn Authenticator> = Arc::new(jwt);
        let split = MeshAuthenticator::new(
            mesh.clone(),
            Some(jwt),
            MeshAuthConfig::new("auth", "authorise"),
        );
        assert_eq!(split.authenticate(jwt_like).await.map(|_| ()), Err(AuthError::Expired));
        let mut config = MeshAuthConfig::new("auth", "authorise");
        config.route = OpaqueRoute::All;
        let all = MeshAuthenticator::new(mesh, None, config);
        assert_eq!(
            all.authenticate(jwt_like).await.expect("the service's answer").user_id.as_str(),
            "m"
        );
        assert!(looks_like_jwt(jwt_like));
        for opaque in ["opaque", "a.b", "a.b.c.d", "x.y.z"] {
            assert!(!looks_like_jwt(opaque), "{opaque}");
        }
    }
}
