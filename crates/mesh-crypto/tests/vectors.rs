//! Decrypts the encrypted messages captured from Python nuropb 0.1.8 (spec §14, V22,
//! V23, V23b) with the capture run's throw-away service key, and checks our PEM output
//! against the key nuropb published in `nuropb_describe` (V13).

#![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

use mesh_crypto::{
    CryptoError, ServicePrivateKey, ServicePublicKey, decrypt_request, decrypt_response,
};
use serde_json::Value;

const VECTORS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/");

fn read_vector_file(name: &str) -> String {
    let path = format!("{VECTORS_DIR}{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read test vector file {path}: {e}. The NuroPb spec vectors are \
             committed under the repository's spec/vectors/."
        )
    })
}

fn private_key() -> ServicePrivateKey {
    ServicePrivateKey::from_pem(&read_vector_file("service_private_key.pem")).unwrap()
}

fn vector(id: &str) -> Value {
    let all: Value = serde_json::from_str(&read_vector_file("vectors.json")).unwrap();
    all["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("vector {id} not in vectors.json"))
        .clone()
}

/// The captured message bodies of a vector whose body is encrypted (not JSON).
fn encrypted_bodies(v: &Value) -> Vec<(String, Vec<u8>)> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["body"].as_str().unwrap().starts_with('{'))
        .map(|m| {
            assert_eq!(m["properties"]["headers"]["encrypted"], "yes");
            (
                m["properties"]["headers"]["nuropb_type"].as_str().unwrap().to_owned(),
                m["body"].as_str().unwrap().as_bytes().to_vec(),
            )
        })
        .collect()
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_else(|| panic!("{field} missing"))
}

/// Checks a vector with a decryption walk-through: every body unwraps (segment 1 is
/// always wrapped for the service, even in responses) to the recorded key and plaintext,
/// and the requester reads every response that used the request's key.
fn check_walk_through(id: &str) {
    let v = vector(id);
    let private = private_key();
    let bodies = encrypted_bodies(&v);
    let walk = v["decryption"].as_array().unwrap();
    assert_eq!(bodies.len(), walk.len(), "{id}: messages vs walk-through");

    let (request_type, request_body) = &bodies[0];
    assert_eq!(request_type, "request");
    let (_, request_key) = decrypt_request(&private, request_body).unwrap();

    for ((nuropb_type, body), expected) in bodies.iter().zip(walk) {
        assert_eq!(nuropb_type, str_field(expected, "nuropb_type"));
        let plaintext = str_field(expected, "plaintext").as_bytes();
        let key_text = str_field(expected, "segment1_decrypted_fernet_key");

        let dot = body.iter().position(|&b| b == b'.').unwrap();
        assert_eq!(Some(dot as u64), expected["segment1_rsa_oaep_sha256_b64_len"].as_u64());

        let (decrypted, key) = decrypt_request(&private, body).unwrap();
        assert_eq!(key.expose_text(), key_text, "{id} {nuropb_type}: key");
        assert_eq!(
            String::from_utf8(decrypted).unwrap(),
            str_field(expected, "plaintext"),
            "{id} {nuropb_type}: plaintext"
        );

        if nuropb_type == "response" {
            let as_requester = decrypt_response(&request_key, body);
            if key_text == request_key.expose_text() {
                assert_eq!(as_requester.unwrap(), plaintext, "{id}: response");
            } else {
                // nuropb's spurious second response uses a fresh key (spec §10 quirks).
                assert!(
                    matches!(as_requester, Err(CryptoError::TokenSignatureMismatch)),
                    "{id}: {as_requester:?}"
                );
            }
        }
    }
}

#[test]
fn v22_request_and_response_decrypt_to_the_captured_plaintext() {
    check_walk_through("V22");
}

#[test]
fn v23_first_response_decrypts_and_the_spurious_second_does_not() {
    check_walk_through("V23");
}

#[test]
fn v23b_request_and_first_response_decrypt_and_the_event_is_plaintext() {
    // V23b has no walk-through; check the decrypted JSON against the headers instead.
    let v = vector("V23b");
    let private = private_key();
    let messages = v["messages"].as_array().unwrap();
    let correlation_id = str_field(&messages[0]["properties"], "correlation_id");

    let bodies = encrypted_bodies(&v);
    let types: Vec<&str> = bodies.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, ["request", "response", "response"]);

    let (request, key) = decrypt_request(&private, &bodies[0].1).unwrap();
    let request: Value = serde_json::from_slice(&request).unwrap();
    assert_eq!(request["tag"], "request");
    assert_eq!(request["method"], "secret_with_event");
    assert_eq!(request["correlation_id"], correlation_id);

    let response: Value =
        serde_json::from_slice(&decrypt_response(&key, &bodies[1].1).unwrap()).unwrap();
    assert_eq!(response["tag"], "response");
    assert_eq!(response["correlation_id"], correlation_id);
    assert_eq!(response["error"], Value::Null);

    assert!(matches!(
        decrypt_response(&key, &bodies[2].1),
        Err(CryptoError::TokenSignatureMismatch)
    ));
    let (spurious, _) = decrypt_request(&private, &bodies[2].1).unwrap();
    let spurious: Value = serde_json::from_slice(&spurious).unwrap();
    assert_eq!(spurious["correlation_id"], correlation_id);

    // The event travels in plaintext despite `encrypted: yes` (spec §10 quirks).
    let event =
        messages.iter().find(|m| m["properties"]["headers"]["nuropb_type"] == "event").unwrap();
    assert_eq!(event["properties"]["headers"]["encrypted"], "yes");
    let event: Value = serde_json::from_str(str_field(event, "body")).unwrap();
    assert_eq!(event["tag"], "event");
}

#[test]
fn v13_describe_public_key_is_the_vector_key_and_our_pem_matches_byte_for_byte() {
    let v = vector("V13");
    let response = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["properties"]["headers"]["nuropb_type"] == "response")
        .unwrap();
    let response: Value = serde_json::from_str(str_field(response, "body")).unwrap();
    let published = str_field(&response["result"], "public_key");

    let parsed = ServicePublicKey::from_pem(published).unwrap();
    let private = private_key();
    assert_eq!(parsed, private.public_key());
    assert_eq!(parsed.bits(), 2048);
    assert_eq!(private.public_key_pem().unwrap(), published);
    assert_eq!(parsed.to_pem().unwrap(), published);
}

#[test]
fn vector_private_key_is_pkcs8_and_debug_shows_no_key_material() {
    let pem = read_vector_file("service_private_key.pem");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let debug = format!("{:?}", private_key());
    assert_eq!(debug, "ServicePrivateKey { bits: 2048, .. }");
}
