//! JWT verification with public keys (RS256, ES256), using throw-away keys in `fixtures/`.

use handler_core::auth::{AuthError, JwtAuthenticator, JwtConfig, JwtKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const RS_PRIVATE: &str = include_str!("fixtures/rs256-private.pem");
const RS_PUBLIC: &str = include_str!("fixtures/rs256-public.pem");
const ES_PRIVATE: &str = include_str!("fixtures/es256-private.pem");
const ES_PUBLIC: &str = include_str!("fixtures/es256-public.pem");

fn claims() -> serde_json::Value {
    json!({"sub": "u1", "username": "u1@x", "exp": jsonwebtoken::get_current_timestamp() + 60})
}

#[test]
fn rs256_and_es256_tokens_verify_with_their_public_keys() {
    let rs =
        JwtAuthenticator::new(JwtConfig::new(JwtKey::Rs256PublicPem(RS_PUBLIC.into()))).unwrap();
    let es =
        JwtAuthenticator::new(JwtConfig::new(JwtKey::Es256PublicPem(ES_PUBLIC.into()))).unwrap();
    let rs_token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims(),
        &EncodingKey::from_rsa_pem(RS_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    let es_token = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(),
        &EncodingKey::from_ec_pem(ES_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(rs.verify(&rs_token).unwrap().username, "u1@x");
    assert_eq!(es.verify(&es_token).unwrap().user_id.as_str(), "u1");
    // Each verifier takes only its own algorithm.
    assert_eq!(rs.verify(&es_token), Err(AuthError::AlgorithmNotAllowed));
    assert_eq!(es.verify(&rs_token), Err(AuthError::AlgorithmNotAllowed));
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    // The classic key-confusion attack: an HS256 token whose secret is the RSA public key.
    let rs =
        JwtAuthenticator::new(JwtConfig::new(JwtKey::Rs256PublicPem(RS_PUBLIC.into()))).unwrap();
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(RS_PUBLIC.as_bytes()),
    )
    .unwrap();
    assert_eq!(rs.verify(&forged), Err(AuthError::AlgorithmNotAllowed));
}

#[test]
fn a_bad_pem_is_a_config_error() {
    assert!(
        JwtAuthenticator::new(JwtConfig::new(JwtKey::Rs256PublicPem("not a pem".into()))).is_err()
    );
}
