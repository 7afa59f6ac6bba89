//! NuroPb message encryption (spec §10), byte-compatible with Python nuropb 0.1.8.
//!
//! An encrypted body is `B64(RSA_OAEP_SHA256(K)) "." B64(FernetToken(K, payload))`, where
//! `K` is a Fernet key in its 44-character text form, `B64` is standard padded base64
//! (so the URL-safe Fernet token text is base64-encoded a second time) and RSA-OAEP uses
//! SHA-256 for both the hash and MGF1, with no label.
//!
//! - The requester makes a fresh `K` per call ([`encrypt_request`]) and keeps it, keyed by
//!   correlation id, to read the response ([`decrypt_response`]).
//! - The service unwraps `K` with its private key ([`decrypt_request`]) and encrypts its
//!   response with the same `K` ([`encrypt_response`]). nuropb wraps `K` for the
//!   service's *own* public key in the response's first segment; the requester never
//!   reads that segment.
//!
//! No I/O, no logging; every failure is a [`CryptoError`], never a panic.
//!
//! In the layering (docs/ARCHITECTURE.md) it depends on no other crate of the gateway;
//! `amqp-mesh` uses it for encrypted methods. RSA, PEM and Fernet types stay private:
//! keys are [`ServicePublicKey`], [`ServicePrivateKey`] and [`SessionKey`].
//!
//! A request and its response, both ways:
//!
//! ```
//! use mesh_crypto::{
//!     ServicePrivateKey, decrypt_request, decrypt_response, encrypt_request, encrypt_response,
//! };
//!
//! # let pem = std::fs::read_to_string(concat!(
//! #     env!("CARGO_MANIFEST_DIR"),
//! #     "/../../spec/vectors/service_private_key.pem"
//! # ))?;
//! // The service's key pair; `ServicePrivateKey::generate(2048)` makes a fresh one.
//! let service = ServicePrivateKey::from_pem(&pem)?;
//!
//! // Requester: encrypt for the service's public key, keep the session key.
//! let (body, session_key) = encrypt_request(&service.public_key(), br#"{"n":1}"#)?;
//!
//! // Service: decrypt, answer with the same session key.
//! let (request, key) = decrypt_request(&service, &body)?;
//! assert_eq!(request, br#"{"n":1}"#);
//! let response = encrypt_response(&key, &service.public_key(), br#"{"ok":true}"#)?;
//!
//! // Requester: read the answer.
//! assert_eq!(decrypt_response(&session_key, &response)?, br#"{"ok":true}"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs, unreachable_pub)]

mod error;
mod fernet;
mod keys;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rand::rngs::OsRng;
use rsa::Oaep;
use sha2::Sha256;
use zeroize::Zeroizing;

pub use error::CryptoError;
pub use keys::{MIN_GENERATED_RSA_BITS, ServicePrivateKey, ServicePublicKey, SessionKey};

/// Separates the wrapped key from the payload. Neither base64 alphabet contains it.
const SEPARATOR: u8 = b'.';

/// Requester side: encrypts a request or command body for the service that owns
/// `service_key`. Returns the body and the fresh session key, which the caller must keep
/// to decrypt the response.
pub fn encrypt_request(
    service_key: &ServicePublicKey,
    plaintext: &[u8],
) -> Result<(Vec<u8>, SessionKey), CryptoError> {
    let key = SessionKey::generate();
    let body = seal(&key, service_key, plaintext)?;
    Ok((body, key))
}

/// Requester side: decrypts the service's response with the session key that was used
/// for the request. The first segment (the key wrapped for the service itself) is not
/// read, as in nuropb; only the separator must be there.
pub fn decrypt_response(key: &SessionKey, body: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let (_wrapped_key, payload) = split(body)?;
    open(key, payload)
}

/// Service side: unwraps the session key with the service's private key and decrypts
/// the request. Keep the key to encrypt the response.
pub fn decrypt_request(
    private: &ServicePrivateKey,
    body: &[u8],
) -> Result<(Vec<u8>, SessionKey), CryptoError> {
    let (wrapped_key, payload) = split(body)?;
    let wrapped_key = STANDARD
        .decode(wrapped_key)
        .map_err(|_| CryptoError::MalformedBody("key segment is not base64"))?;
    // Blinded decryption: rsa 0.9's private-key operation is not constant-time
    // (RUSTSEC-2023-0071, "Marvin"), and blinding is the mitigation it offers.
    let key_text = Zeroizing::new(
        private
            .inner
            .decrypt_blinded(&mut OsRng, Oaep::new::<Sha256>(), &wrapped_key)
            .map_err(|_| CryptoError::KeyUnwrap)?,
    );
    let key_text = std::str::from_utf8(&key_text).map_err(|_| CryptoError::InvalidSessionKey)?;
    let key = SessionKey::from_text(key_text)?;
    let plaintext = open(&key, payload)?;
    Ok((plaintext, key))
}

/// Service side: encrypts a response with the request's session key. As nuropb does,
/// the first segment wraps the key for `own_public` (the responding service's own
/// public key), which the requester ignores.
pub fn encrypt_response(
    key: &SessionKey,
    own_public: &ServicePublicKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    seal(key, own_public, plaintext)
}

/// Builds `B64(RSA_OAEP(K)) "." B64(FernetToken(K, plaintext))`.
fn seal(
    key: &SessionKey,
    recipient: &ServicePublicKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let wrapped_key = recipient
        .inner
        .encrypt(&mut OsRng, Oaep::new::<Sha256>(), key.expose_text().as_bytes())
        .map_err(|e| CryptoError::KeyWrap(Box::new(e)))?;
    let token = fernet::encrypt(key, plaintext);

    let mut body = STANDARD.encode(wrapped_key).into_bytes();
    body.push(SEPARATOR);
    body.extend_from_slice(STANDARD.encode(token).as_bytes());
    Ok(body)
}

/// Decodes the second segment and decrypts the Fernet token in it.
fn open(key: &SessionKey, payload: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let token_text = STANDARD
        .decode(payload)
        .map_err(|_| CryptoError::MalformedBody("payload segment is not base64"))?;
    fernet::decrypt(key, &token_text)
}

/// Splits a body at the first separator, as nuropb's `payload.split(b".", 1)` does.
fn split(body: &[u8]) -> Result<(&[u8], &[u8]), CryptoError> {
    let at = body
        .iter()
        .position(|&b| b == SEPARATOR)
        .ok_or(CryptoError::MalformedBody("missing '.' separator"))?;
    Ok((&body[..at], &body[at + 1..]))
}
