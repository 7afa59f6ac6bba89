//! Black-box tests of the public API: request/response round trips, tampering, and a
//! table of garbage bodies that must fail with an error, never a panic.

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use mesh_crypto::{
    CryptoError, ServicePrivateKey, ServicePublicKey, SessionKey, decrypt_request,
    decrypt_response, encrypt_request, encrypt_response,
};

const PRIVATE_KEY_PEM: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/service_private_key.pem");

/// The capture run's throw-away key; generating a 2048-bit key per test is slow in
/// debug builds.
fn service_key() -> ServicePrivateKey {
    let pem = std::fs::read_to_string(PRIVATE_KEY_PEM).unwrap_or_else(|e| {
        panic!(
            "cannot read {PRIVATE_KEY_PEM}: {e}. The NuroPb spec vectors are committed \
             under the repository's spec/vectors/."
        )
    });
    ServicePrivateKey::from_pem(&pem).unwrap()
}

const REQUEST: &[u8] = br#"{"tag": "request", "service": "capture-svc", "method": "secret", "params": {"name": "alice"}, "correlation_id": "c1", "context": {}, "trace_id": "t1"}"#;
const RESPONSE: &[u8] = br#"{"tag": "response", "result": "secret for alice", "error": null, "correlation_id": "c1", "trace_id": "t1", "context": {}, "warning": null, "reply_to": "q"}"#;

#[test]
fn request_and_response_round_trip() {
    let service = service_key();
    let (body, requester_key) = encrypt_request(&service.public_key(), REQUEST).unwrap();

    let (request, service_side_key) = decrypt_request(&service, &body).unwrap();
    assert_eq!(request, REQUEST);
    assert_eq!(service_side_key.expose_text(), requester_key.expose_text());

    let response_body =
        encrypt_response(&service_side_key, &service.public_key(), RESPONSE).unwrap();
    assert_eq!(decrypt_response(&requester_key, &response_body).unwrap(), RESPONSE);
    // As in nuropb, the response's segment 1 wraps the key for the service itself.
    let (response, key) = decrypt_request(&service, &response_body).unwrap();
    assert_eq!(response, RESPONSE);
    assert_eq!(key.expose_text(), requester_key.expose_text());
}

#[test]
fn body_has_the_nuropb_shape() {
    let service = service_key();
    let (body, key) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let body = String::from_utf8(body).unwrap();
    let (wrapped, payload) = body.split_once('.').unwrap();

    // 2048-bit RSA: 256 bytes, 344 base64 characters, standard alphabet.
    assert_eq!(wrapped.len(), 344);
    assert_eq!(STANDARD.decode(wrapped).unwrap().len(), 256);

    // Segment 2 is standard base64 of the URL-safe Fernet token text.
    let token_text = String::from_utf8(STANDARD.decode(payload).unwrap()).unwrap();
    assert!(token_text.starts_with("gAAAAA"), "{token_text}");
    let token = URL_SAFE.decode(&token_text).unwrap();
    assert_eq!(token[0], 0x80);
    // version + timestamp + IV + ciphertext (PKCS7-padded) + HMAC.
    let padded = (REQUEST.len() / 16 + 1) * 16;
    assert_eq!(token.len(), 1 + 8 + 16 + padded + 32);

    assert_eq!(key.expose_text().len(), 44);
}

#[test]
fn each_request_gets_a_fresh_key_and_iv() {
    let service = service_key().public_key();
    let (body1, key1) = encrypt_request(&service, REQUEST).unwrap();
    let (body2, key2) = encrypt_request(&service, REQUEST).unwrap();
    assert_ne!(key1.expose_text(), key2.expose_text());
    assert_ne!(body1, body2);
}

#[test]
fn response_with_another_key_is_rejected() {
    let service = service_key();
    let (_, requester_key) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let other = SessionKey::generate();
    let response_body = encrypt_response(&other, &service.public_key(), RESPONSE).unwrap();
    assert!(matches!(
        decrypt_response(&requester_key, &response_body),
        Err(CryptoError::TokenSignatureMismatch)
    ));
}

#[test]
fn tampered_token_is_rejected() {
    let service = service_key();
    let key = SessionKey::generate();
    let body = encrypt_response(&key, &service.public_key(), RESPONSE).unwrap();
    let body = String::from_utf8(body).unwrap();
    let (wrapped, payload) = body.split_once('.').unwrap();
    let token = URL_SAFE.decode(STANDARD.decode(payload).unwrap()).unwrap();

    // Flip one bit in the timestamp, the IV, the ciphertext and the HMAC in turn.
    for at in [3, 12, 40, token.len() - 1] {
        let mut tampered = token.clone();
        tampered[at] ^= 0x20;
        let tampered_body = format!("{wrapped}.{}", STANDARD.encode(URL_SAFE.encode(&tampered)));
        let result = decrypt_response(&key, tampered_body.as_bytes());
        assert!(
            matches!(result, Err(CryptoError::TokenSignatureMismatch)),
            "byte {at}: {result:?}"
        );
        let result = decrypt_request(&service, tampered_body.as_bytes());
        assert!(
            matches!(result, Err(CryptoError::TokenSignatureMismatch)),
            "byte {at}: {result:?}"
        );
    }
}

#[test]
fn tampered_wrapped_key_is_rejected() {
    let service = service_key();
    let (body, _) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let body = String::from_utf8(body).unwrap();
    let (wrapped, payload) = body.split_once('.').unwrap();
    let mut raw = STANDARD.decode(wrapped).unwrap();
    raw[100] ^= 0x01;
    let tampered = format!("{}.{payload}", STANDARD.encode(raw));
    assert!(matches!(decrypt_request(&service, tampered.as_bytes()), Err(CryptoError::KeyUnwrap)));
}

#[test]
fn wrapped_key_from_another_body_is_rejected() {
    // Segment 1 unwraps to a valid session key, but not the one the token was made with.
    let service = service_key();
    let (body, _) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let (other, _) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let body = String::from_utf8(body).unwrap();
    let other = String::from_utf8(other).unwrap();
    let (_, payload) = body.split_once('.').unwrap();
    let (other_wrapped, _) = other.split_once('.').unwrap();
    let spliced = format!("{other_wrapped}.{payload}");
    assert!(matches!(
        decrypt_request(&service, spliced.as_bytes()),
        Err(CryptoError::TokenSignatureMismatch)
    ));
}

/// A body with the given segments, each standard-base64-encoded.
fn body_of(segment1: &[u8], segment2: &[u8]) -> Vec<u8> {
    format!("{}.{}", STANDARD.encode(segment1), STANDARD.encode(segment2)).into_bytes()
}

#[test]
fn garbage_bodies_fail_cleanly() {
    let service = service_key();
    let key = SessionKey::generate();
    let (good, _) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    let good_text = String::from_utf8(good.clone()).unwrap();
    let (good_wrapped, good_payload) = good_text.split_once('.').unwrap();
    let good_token = STANDARD.decode(good_payload).unwrap();

    let check = |name: &str, body: &[u8], expected: fn(&CryptoError) -> bool| {
        for (side, result) in [
            ("response", decrypt_response(&key, body).map(|_| ())),
            ("request", decrypt_request(&service, body).map(|_| ())),
        ] {
            match result {
                Err(ref e) if expected(e) => assert!(e.is_bad_input(), "{name}: {e:?}"),
                other => panic!("{name} ({side}): unexpected {other:?}"),
            }
        }
    };

    fn malformed_body(e: &CryptoError) -> bool {
        matches!(e, CryptoError::MalformedBody(_))
    }
    fn malformed_token(e: &CryptoError) -> bool {
        matches!(e, CryptoError::MalformedToken(_))
    }
    fn any_input_error(e: &CryptoError) -> bool {
        e.is_bad_input()
    }

    check("empty", b"", malformed_body);
    check("no separator", good_wrapped.as_bytes(), malformed_body);
    check("separator only", b".", any_input_error);
    check("json body", br#"{"tag": "request"}"#, malformed_body);
    check("not utf-8", &[0xff, 0xfe, b'.', 0x80, 0x81], malformed_body);
    check("payload not base64", format!("{good_wrapped}.!!!!").as_bytes(), malformed_body);
    check(
        "payload missing its last character",
        format!("{good_wrapped}.{}", &good_payload[..good_payload.len() - 1]).as_bytes(),
        malformed_body,
    );
    check(
        "payload with url-safe characters",
        format!("{good_wrapped}.-_{good_payload}").as_bytes(),
        malformed_body,
    );
    // Python's lenient b64decode would skip the whitespace; nuropb never sends any.
    check(
        "payload with a line break",
        format!("{good_wrapped}.{}\n{}", &good_payload[..76], &good_payload[76..]).as_bytes(),
        malformed_body,
    );
    check("trailing newline", format!("{good_text}\n").as_bytes(), malformed_body);
    check("second separator", format!("{good_text}.").as_bytes(), malformed_body);
    check(
        "token is not base64 text",
        &body_of(&[0; 256], b"\x80\x00not base64 at all"),
        any_input_error,
    );
    check(
        "token with standard alphabet",
        &body_of(&[0; 256], STANDARD.encode(URL_SAFE.decode(&good_token).unwrap()).as_bytes()),
        any_input_error,
    );
    check(
        "token too short",
        &body_of(&[0; 256], URL_SAFE.encode([0x80; 40]).as_bytes()),
        any_input_error,
    );
    check(
        "token wrong version",
        &body_of(&[0; 256], URL_SAFE.encode([0x81; 100]).as_bytes()),
        any_input_error,
    );
    check("key segment wrong size", &body_of(b"short", &good_token), any_input_error);

    // The response side ignores segment 1, so these reach the token checks there.
    for (name, body) in [
        ("token too short", body_of(b"", URL_SAFE.encode([0x80; 40]).as_bytes())),
        ("token wrong version", body_of(b"", URL_SAFE.encode([0x81; 100]).as_bytes())),
        ("token empty", body_of(b"", b"")),
    ] {
        let result = decrypt_response(&key, &body);
        assert!(malformed_token(result.as_ref().unwrap_err()), "{name}: {result:?}");
    }
}

#[test]
fn every_truncation_of_a_body_fails_cleanly() {
    let service = service_key();
    let (body, key) = encrypt_request(&service.public_key(), REQUEST).unwrap();
    for len in 0..body.len() {
        assert!(decrypt_response(&key, &body[..len]).is_err(), "len {len}");
    }
    // RSA decryption is slow in debug builds; sample the request side.
    for len in (0..body.len()).step_by(29) {
        assert!(decrypt_request(&service, &body[..len]).is_err(), "len {len}");
    }
}

#[test]
fn garbage_pem_is_rejected() {
    for pem in [
        "",
        "not a pem",
        "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----\n",
        "-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n",
    ] {
        assert!(matches!(ServicePublicKey::from_pem(pem), Err(CryptoError::InvalidPublicKey(_))));
        assert!(matches!(ServicePrivateKey::from_pem(pem), Err(CryptoError::InvalidPrivateKey(_))));
    }
    // A private key is not a public key.
    let private_pem = std::fs::read_to_string(PRIVATE_KEY_PEM).unwrap();
    assert!(ServicePublicKey::from_pem(&private_pem).is_err());
}

#[test]
fn generated_key_round_trips_through_pem() {
    let service = ServicePrivateKey::generate(2048).unwrap();
    let pem = service.public_key_pem().unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let public = ServicePublicKey::from_pem(&pem).unwrap();
    assert_eq!(public, service.public_key());

    let (body, key) = encrypt_request(&public, REQUEST).unwrap();
    let (request, service_key) = decrypt_request(&service, &body).unwrap();
    assert_eq!(request, REQUEST);
    let response = encrypt_response(&service_key, &service.public_key(), RESPONSE).unwrap();
    assert_eq!(decrypt_response(&key, &response).unwrap(), RESPONSE);
}
