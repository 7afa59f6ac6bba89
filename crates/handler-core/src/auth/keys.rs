//! The keys JWTs are verified with: a [`KeySet`] holds fixed keys (given at start, e.g.
//! `--jwt-secret`) and rotating keys (a JWKS that an adapter fetches and hands over with
//! [`KeySet::replace`]). No I/O here: fetching a JWKS is the adapter's; this module parses
//! it ([`JwkKeys::parse`]), picks the key for a token, and lets a token with an unknown
//! `kid` ask the adapter for a refresh ([`KeySet::refresh_wanted`]) and wait for it.
//!
//! Selection: a token with a `kid` is checked with the JWKS key of that `kid` only (its
//! algorithm must be the header's, else the token is refused: no algorithm confusion), then
//! with the fixed keys of the header's algorithm; a token without `kid` tries the keys of
//! the header's algorithm, at most [`MAX_KIDLESS_TRIES`] of them. Each key accepts exactly
//! one algorithm: a JWK's `alg`, or the one its type implies (RSA → RS256, EC P-256 →
//! ES256, P-384 → ES384, OKP Ed25519 → EdDSA); an `oct` key (HMAC) needs `alg`.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::{AuthError, JwtConfigError, JwtKey};

/// Every algorithm a key can have.
pub(crate) const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Most keys taken from one JWKS; a larger document is refused as a whole.
pub const MAX_KEYS: usize = 64;

/// Most keys a token without `kid` is tried against (each try is a signature check).
pub const MAX_KIDLESS_TRIES: usize = 4;

#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The usable keys of a JWKS document, ready to [`KeySet::replace`] the current ones.
#[derive(Clone)]
pub struct JwkKeys {
    keys: Vec<VerifyKey>,
    skipped: usize,
}

impl fmt::Debug for JwkKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwkKeys")
            .field("kids", &self.kids())
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// Why a JWKS document was not taken (the current keys stay).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not a JSON object with a `keys` array.
    #[error("not a JWKS document (a JSON object with a `keys` array)")]
    NotJwks,
    /// More than [`MAX_KEYS`] entries.
    #[error("more than {MAX_KEYS} keys")]
    TooManyKeys,
    /// No entry is a usable signature key: taking it would refuse every token.
    #[error("no usable signature key")]
    NoUsableKey,
}

impl JwkKeys {
    /// The signature keys of a JWKS document (RFC 7517). Entries that are not usable are
    /// skipped and counted: `use` other than `sig`, an algorithm not supported (see the
    /// module doc), a curve that does not match the algorithm, a second entry with the same
    /// `kid`, or key material that does not parse.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let doc: Value = serde_json::from_slice(json).map_err(|_| JwksError::NotJwks)?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::NotJwks);
        };
        if entries.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys);
        }
        let mut keys: Vec<VerifyKey> = Vec::with_capacity(entries.len());
        let mut skipped = 0;
        for entry in entries {
            match verify_key(entry) {
                Some(k) if k.kid.is_none() || !keys.iter().any(|o| o.kid == k.kid) => keys.push(k),
                _ => skipped += 1,
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(JwkKeys { keys, skipped })
    }

    /// These keys and those of `other` whose `kid` none of these has (several sources of
    /// one set: the first source's key wins a `kid`).
    pub fn merged(mut self, other: JwkKeys) -> Self {
        for key in other.keys {
            if key.kid.is_none() || !self.keys.iter().any(|k| k.kid == key.kid) {
                self.keys.push(key);
            } else {
                self.skipped += 1;
            }
        }
        self.skipped += other.skipped;
        self
    }

    /// How many keys were taken.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key was taken (never, from [`JwkKeys::parse`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many entries of the document were skipped as not usable.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The `kid`s of the keys taken (keys without one are not listed).
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().filter_map(|k| k.kid.as_deref()).collect()
    }
}

/// One JWK as a key, or `None` when it is not a usable signature key.
fn verify_key(entry: &Value) -> Option<VerifyKey> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)))
    {
        return None;
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(p) => {
            (p.curve == EllipticCurve::Ed25519).then_some(Algorithm::EdDSA)
        }
        AlgorithmParameters::OctetKey(_) => None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(named) => algorithm(named)?,
        None => implied?,
    };
    // The named algorithm must fit the key's type (and an EC key's curve).
    let fits = match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::OctetKey(_),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512,
        ) => true,
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::OctetKeyPair(_), _) => {
            implied == Some(alg)
        }
        _ => false,
    };
    if !fits {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(VerifyKey { kid: jwk.common.key_id.clone(), alg, key })
}

/// A JWK `alg` as a signature algorithm; `None` for the encryption ones.
fn algorithm(named: KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The keys tokens are verified with: fixed ones and a JWKS replaced while running.
///
/// Replacing the JWKS affects only the tokens checked afterwards: sessions are not checked
/// again, so a rotation drops none (each still ends at its own token's expiry).
pub struct KeySet {
    fixed: Vec<VerifyKey>,
    // Swapped whole by `replace`; read by cloning the `Arc` (the lock is held for that only).
    rotating: RwLock<Arc<Vec<VerifyKey>>>,
    // Counts finished refresh attempts (taken or failed), so a waiting token knows one ended.
    generation: watch::Sender<u64>,
    wanted: Notify,
    // `Some`: an adapter refreshes the set, and a token with an unknown `kid` waits this long
    // at most for it.
    refresh_wait: Option<Duration>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("fixed", &self.fixed.len())
            .field("rotating", &self.rotating_kids())
            .field("refresh_wait", &self.refresh_wait)
            .finish()
    }
}

impl KeySet {
    /// A set with these fixed keys (kept for the process's life) and no JWKS yet. Fails when
    /// a PEM does not parse (or a key is itself a set).
    pub fn new(fixed: Vec<JwtKey>) -> Result<Self, JwtConfigError> {
        let fixed = fixed
            .into_iter()
            .map(|key| {
                let (key, alg) = match key {
                    JwtKey::Hs256Secret(s) => (DecodingKey::from_secret(&s), Algorithm::HS256),
                    JwtKey::Rs256PublicPem(p) => (
                        DecodingKey::from_rsa_pem(p.as_bytes()).map_err(JwtConfigError)?,
                        Algorithm::RS256,
                    ),
                    JwtKey::Es256PublicPem(p) => (
                        DecodingKey::from_ec_pem(p.as_bytes()).map_err(JwtConfigError)?,
                        Algorithm::ES256,
                    ),
                    JwtKey::Set(_) => {
                        let kind = jsonwebtoken::errors::ErrorKind::InvalidKeyFormat;
                        return Err(JwtConfigError(kind.into()));
                    }
                };
                Ok(VerifyKey { kid: None, alg, key })
            })
            .collect::<Result<_, _>>()?;
        Ok(KeySet {
            fixed,
            rotating: RwLock::new(Arc::new(Vec::new())),
            generation: watch::Sender::new(0),
            wanted: Notify::new(),
            refresh_wait: None,
        })
    }

    /// Says that an adapter refreshes this set when asked ([`KeySet::refresh_wanted`]): a
    /// token with an unknown `kid` then asks and waits at most `wait` for the refresh.
    pub fn refreshed_within(mut self, wait: Duration) -> Self {
        self.refresh_wait = Some(wait);
        self
    }

    /// Takes `keys` as the JWKS keys in place of the current ones (the fixed keys stay), and
    /// wakes the tokens waiting for a refresh.
    pub fn replace(&self, keys: JwkKeys) {
        let keys = Arc::new(keys.keys);
        *self.rotating.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.generation.send_modify(|g| *g += 1);
    }

    /// A refresh ended without new keys (the fetch failed or the document was refused): the
    /// current keys stay, and the tokens waiting for the refresh are checked again now.
    pub fn refresh_failed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Completes when a token asked for a refresh (an unknown `kid`) since the last call.
    /// Requests made while nobody waits are kept as one, so concurrent tokens with unknown
    /// `kid`s share one refresh. The adapter bounds how often it fetches.
    pub async fn refresh_wanted(&self) {
        self.wanted.notified().await;
    }

    /// The `kid`s of the JWKS keys in use now.
    pub fn rotating_kids(&self) -> Vec<String> {
        self.rotating().iter().filter_map(|k| k.kid.clone()).collect()
    }

    pub(crate) fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    pub(crate) fn is_refreshed(&self) -> bool {
        self.refresh_wait.is_some()
    }

    /// Asks for a refresh and waits (at most `refresh_wait`) until one that started after
    /// `seen` ended.
    pub(crate) async fn refresh_and_wait(&self, seen: u64) {
        let mut generation = self.generation.subscribe();
        self.wanted.notify_one();
        let wait = self.refresh_wait.unwrap_or_default();
        // Timing out (or the sender gone) only means the token is checked with the keys
        // there are.
        let _ = tokio::time::timeout(wait, generation.wait_for(|g| *g > seen)).await;
    }

    fn rotating(&self) -> Arc<Vec<VerifyKey>> {
        Arc::clone(&self.rotating.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `check` with the key(s) selected for a token with `kid` and `alg` (see the
    /// module doc). `check` verifies the signature and claims with one key.
    pub(crate) fn verify_with<T>(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        check: impl Fn(&DecodingKey) -> Result<T, AuthError>,
    ) -> Result<T, AuthError> {
        let rotating = self.rotating();
        if let Some(kid) = kid
            && let Some(key) = rotating.iter().find(|k| k.kid.as_deref() == Some(kid))
        {
            if key.alg != alg {
                return Err(AuthError::AlgorithmNotAllowed);
            }
            return check(&key.key);
        }
        // A `kid` the JWKS does not have may still be a fixed key's token (they have no
        // `kid`; before JWKS the gateway never looked at it).
        let candidates: Vec<&VerifyKey> = match kid {
            Some(_) => self.fixed.iter().filter(|k| k.alg == alg).collect(),
            None => self
                .fixed
                .iter()
                .chain(rotating.iter())
                .filter(|k| k.alg == alg)
                .take(MAX_KIDLESS_TRIES)
                .collect(),
        };
        let uses_jwks = self.is_refreshed() || !rotating.is_empty();
        let mut outcome = Err(match (kid, uses_jwks) {
            (Some(_), true) => AuthError::UnknownKey,
            _ => AuthError::AlgorithmNotAllowed,
        });
        for key in candidates {
            match check(&key.key) {
                // Any other refusal means the signature verified (or the token is broken
                // whatever the key): this was the key.
                Err(AuthError::BadSignature) => {
                    if kid.is_none() || !uses_jwks {
                        outcome = Err(AuthError::BadSignature);
                    }
                }
                decided => return decided,
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::auth::{Authenticator, JwtAuthenticator, JwtConfig};

    const RS_PRIVATE: &str = include_str!("../../tests/fixtures/rs256-private.pem");
    const RS_PUBLIC: &str = include_str!("../../tests/fixtures/rs256-public.pem");
    const ES_PRIVATE: &str = include_str!("../../tests/fixtures/es256-private.pem");
    const ES_PUBLIC: &str = include_str!("../../tests/fixtures/es256-public.pem");
    const ED_PRIVATE: &str = include_str!("../../tests/fixtures/ed25519-private.pem");
    const ED_PUBLIC: &str = include_str!("../../tests/fixtures/ed25519-public.pem");
    const A: &[u8] = b"key-a-0123456789abcdef0123456789";
    const B: &[u8] = b"key-b-0123456789abcdef0123456789";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn oct(kid: &str, secret: &[u8]) -> Value {
        json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(secret)})
    }

    fn rsa_jwk(kid: &str) -> Value {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPublicKey::from_public_key_pem(RS_PUBLIC).expect("fixture");
        json!({"kty": "RSA", "kid": kid, "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())})
    }

    /// The last `n` bytes of a PEM public key's DER: the raw key (an EC point, an Ed25519 key).
    fn der_tail(pem: &str, n: usize) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body).expect("pem");
        der[der.len() - n..].to_vec()
    }

    fn ec_jwk(kid: &str) -> Value {
        // The uncompressed point: x and y, 32 bytes each, at the end.
        let xy = der_tail(ES_PUBLIC, 64);
        json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&xy[..32]), "y": b64(&xy[32..])})
    }

    fn ed_jwk(kid: &str) -> Value {
        json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(&der_tail(ED_PUBLIC, 32))})
    }

    fn jwks(keys: Vec<Value>) -> JwkKeys {
        JwkKeys::parse(json!({ "keys": keys }).to_string().as_bytes()).expect("a usable JWKS")
    }

    fn token(kid: Option<&str>, alg: Algorithm, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        jsonwebtoken::encode(&header, &json!({"sub": "u", "exp": exp}), key).expect("encode")
    }

    fn hs(kid: Option<&str>, secret: &[u8]) -> String {
        token(kid, Algorithm::HS256, &EncodingKey::from_secret(secret))
    }

    fn rs(kid: Option<&str>) -> String {
        let key = EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).expect("fixture");
        token(kid, Algorithm::RS256, &key)
    }

    fn authenticator(set: KeySet) -> (Arc<KeySet>, JwtAuthenticator) {
        let set = Arc::new(set);
        let mut config = JwtConfig::new(JwtKey::Set(Arc::clone(&set)));
        config.leeway_secs = 0;
        (set, JwtAuthenticator::new(config).expect("config"))
    }

    fn verdict(auth: &JwtAuthenticator, token: &str) -> Result<(), AuthError> {
        auth.verify(token).map(|_| ())
    }

    #[test]
    fn the_kid_selects_the_key_and_a_token_without_kid_tries_its_algorithms_keys() {
        let (set, auth) = authenticator(KeySet::new(vec![]).expect("empty"));
        set.replace(jwks(vec![oct("A", A), oct("B", B), rsa_jwk("R")]));
        for (name, token, expected) in [
            ("kid A, key A", hs(Some("A"), A), Ok(())),
            ("kid B, key B", hs(Some("B"), B), Ok(())),
            ("kid A, key B", hs(Some("A"), B), Err(AuthError::BadSignature)),
            ("kid C", hs(Some("C"), A), Err(AuthError::UnknownKey)),
            ("no kid, key B", hs(None, B), Ok(())),
            (
                "no kid, unknown key",
                hs(None, b"another-secret-0123456789abcdef"),
                Err(AuthError::BadSignature),
            ),
            ("kid R, RS256", rs(Some("R")), Ok(())),
            ("no kid, RS256", rs(None), Ok(())),
        ] {
            assert_eq!(verdict(&auth, &token), expected, "{name}");
        }
    }

    #[test]
    fn es256_and_eddsa_keys_from_a_jwks() {
        let (set, auth) = authenticator(KeySet::new(vec![]).expect("empty"));
        set.replace(jwks(vec![ec_jwk("E"), ed_jwk("D"), oct("A", A)]));
        let es = EncodingKey::from_ec_pem(ES_PRIVATE.as_bytes()).expect("fixture");
        let ed = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).expect("fixture");
        for (name, token, expected) in [
            ("ES256 kid E", token(Some("E"), Algorithm::ES256, &es), Ok(())),
            ("EdDSA kid D", token(Some("D"), Algorithm::EdDSA, &ed), Ok(())),
            ("EdDSA no kid", token(None, Algorithm::EdDSA, &ed), Ok(())),
            (
                "EdDSA under kid E",
                token(Some("E"), Algorithm::EdDSA, &ed),
                Err(AuthError::AlgorithmNotAllowed),
            ),
            (
                "ES256 under kid A",
                token(Some("A"), Algorithm::ES256, &es),
                Err(AuthError::AlgorithmNotAllowed),
            ),
        ] {
            assert_eq!(verdict(&auth, &token), expected, "{name}");
        }
    }

    #[test]
    fn no_algorithm_confusion() {
        // An RS256 token against HS keys, and HS256 tokens "signed" with the RSA public key
        // against the RSA key: refused before any signature check.
        let (set, auth) = authenticator(KeySet::new(vec![]).expect("empty"));
        set.replace(jwks(vec![oct("H", A)]));
        assert_eq!(verdict(&auth, &rs(Some("H"))), Err(AuthError::AlgorithmNotAllowed));
        assert_eq!(verdict(&auth, &rs(None)), Err(AuthError::AlgorithmNotAllowed));
        set.replace(jwks(vec![rsa_jwk("R")]));
        let forged = hs(Some("R"), RS_PUBLIC.as_bytes());
        assert_eq!(verdict(&auth, &forged), Err(AuthError::AlgorithmNotAllowed));
        let forged = hs(None, RS_PUBLIC.as_bytes());
        assert_eq!(verdict(&auth, &forged), Err(AuthError::AlgorithmNotAllowed));
        // A JWK whose `alg` does not fit its type is not taken at all.
        let wrong = json!({"kty": "oct", "kid": "X", "alg": "RS256", "k": b64(A)});
        assert_eq!(
            JwkKeys::parse(json!({"keys": [wrong]}).to_string().as_bytes()).map(|k| k.len()),
            Err(JwksError::NoUsableKey)
        );
    }

    #[test]
    fn fixed_keys_and_the_jwks_are_merged() {
        let (set, auth) =
            authenticator(KeySet::new(vec![JwtKey::Hs256Secret(A.to_vec())]).expect("key"));
        set.replace(jwks(vec![oct("B", B)]));
        assert_eq!(verdict(&auth, &hs(None, A)), Ok(()), "the fixed key, no kid");
        assert_eq!(verdict(&auth, &hs(Some("legacy"), A)), Ok(()), "the fixed key, any kid");
        assert_eq!(verdict(&auth, &hs(Some("B"), B)), Ok(()), "the JWKS key");
        assert_eq!(verdict(&auth, &hs(Some("B"), A)), Err(AuthError::BadSignature));
    }

    #[test]
    fn parsing_skips_what_is_not_a_usable_signature_key() {
        let keys = jwks(vec![
            oct("A", A),
            json!({"kty": "oct", "kid": "enc", "alg": "HS256", "use": "enc", "k": b64(A)}),
            json!({"kty": "oct", "kid": "no-alg", "k": b64(A)}),
            json!({"kty": "EC", "kid": "curve", "alg": "ES384", "crv": "P-256", "x": "AA", "y": "AA"}),
            json!({"kty": "oct", "kid": "oaep", "alg": "RSA-OAEP", "k": b64(A)}),
            json!({"kty": "what", "kid": "odd"}),
            oct("A", B),
            rsa_jwk("R"),
        ]);
        assert_eq!(keys.kids(), vec!["A", "R"]);
        assert_eq!(keys.skipped(), 6);
        for (doc, expected) in [
            (json!([]), JwksError::NotJwks),
            (json!({"keys": {}}), JwksError::NotJwks),
            (json!({"keys": []}), JwksError::NoUsableKey),
            (json!({"keys": vec![oct("A", A); MAX_KEYS + 1]}), JwksError::TooManyKeys),
        ] {
            assert_eq!(
                JwkKeys::parse(doc.to_string().as_bytes()).map(|k| k.len()),
                Err(expected),
                "{doc}"
            );
        }
        assert_eq!(JwkKeys::parse(b"not json").map(|k| k.len()), Err(JwksError::NotJwks));
    }

    #[tokio::test]
    async fn an_unknown_kid_is_checked_again_after_one_shared_refresh() {
        let (set, auth) = authenticator(
            KeySet::new(vec![]).expect("empty").refreshed_within(Duration::from_secs(5)),
        );
        set.replace(jwks(vec![oct("A", A)]));
        let auth = Arc::new(auth);
        // The adapter's side: one fetch per request it sees, publishing A and B.
        let fetches = Arc::new(AtomicUsize::new(0));
        let fetcher = {
            let (set, fetches) = (Arc::clone(&set), Arc::clone(&fetches));
            tokio::spawn(async move {
                for _ in 0..10 {
                    set.refresh_wanted().await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    fetches.fetch_add(1, Ordering::SeqCst);
                    set.replace(jwks(vec![oct("A", A), oct("B", B)]));
                }
            })
        };
        let tokens: Vec<_> = (0..16)
            .map(|_| {
                let auth = Arc::clone(&auth);
                tokio::spawn(async move { auth.authenticate(&hs(Some("B"), B)).await.map(|_| ()) })
            })
            .collect();
        for t in tokens {
            assert_eq!(t.await.expect("task"), Ok(()), "kid B accepted after the refresh");
        }
        let n = fetches.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "16 tokens made {n} fetches");
        // Still unknown after a refresh: refused, after waiting for that one refresh only.
        assert_eq!(
            auth.authenticate(&hs(Some("C"), A)).await.map(|_| ()),
            Err(AuthError::UnknownKey)
        );
        // A rotation that drops A refuses A's tokens from then on.
        set.replace(jwks(vec![oct("B", B)]));
        assert_eq!(verdict(&auth, &hs(Some("A"), A)), Err(AuthError::UnknownKey));
        fetcher.abort();
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_keys_and_wakes_the_waiting_token() {
        let (set, auth) = authenticator(
            KeySet::new(vec![]).expect("empty").refreshed_within(Duration::from_secs(30)),
        );
        set.replace(jwks(vec![oct("A", A)]));
        let failing = {
            let set = Arc::clone(&set);
            tokio::spawn(async move {
                set.refresh_wanted().await;
                set.refresh_failed();
            })
        };
        let started = tokio::time::Instant::now();
        assert_eq!(
            auth.authenticate(&hs(Some("B"), B)).await.map(|_| ()),
            Err(AuthError::UnknownKey)
        );
        assert!(started.elapsed() < Duration::from_secs(5), "waited for the whole refresh_wait");
        assert_eq!(verdict(&auth, &hs(Some("A"), A)), Ok(()));
        failing.await.expect("task");
    }
}
