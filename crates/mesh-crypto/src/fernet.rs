//! Fernet tokens, as Python's `cryptography.fernet.Fernet` writes and reads them.
//!
//! Token bytes: `0x80 | timestamp (u64 BE) | IV (16) | AES-128-CBC/PKCS7 ciphertext |
//! HMAC-SHA256 (32)` over everything before the HMAC; the token text is that in padded
//! URL-safe base64. See <https://github.com/fernet/spec/blob/master/Spec.md>.

use std::time::{SystemTime, UNIX_EPOCH};

use aes::Aes128;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockDecryptMut as _, BlockEncryptMut as _, KeyIvInit as _};
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use rand::rngs::OsRng;
use sha2::Sha256;

use crate::error::CryptoError;
use crate::keys::SessionKey;

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 0x80;
const TIMESTAMP_LEN: usize = 8;
const IV_LEN: usize = 16;
const HEADER_LEN: usize = 1 + TIMESTAMP_LEN + IV_LEN;
const MAC_LEN: usize = 32;
const BLOCK_LEN: usize = 16;

/// Encrypts `plaintext` into Fernet token text, with the current time and a random IV.
pub(crate) fn encrypt(key: &SessionKey, plaintext: &[u8]) -> String {
    // Python uses `int(time.time())`; a clock before 1970 is not worth an error path.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut iv = [0u8; IV_LEN];
    OsRng.fill_bytes(&mut iv);
    encrypt_at(key, plaintext, now, iv)
}

/// Encrypts with a given timestamp and IV; deterministic, so testable against the
/// Fernet spec's vectors.
pub(crate) fn encrypt_at(
    key: &SessionKey,
    plaintext: &[u8],
    timestamp: u64,
    iv: [u8; IV_LEN],
) -> String {
    let ciphertext = cbc::Encryptor::<Aes128>::new(key.encryption_key().into(), &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext);

    let mut token = Vec::with_capacity(HEADER_LEN + ciphertext.len() + MAC_LEN);
    token.push(VERSION);
    token.extend_from_slice(&timestamp.to_be_bytes());
    token.extend_from_slice(&iv);
    token.extend_from_slice(&ciphertext);
    let mut mac = hmac_for(key);
    mac.update(&token);
    token.extend_from_slice(&mac.finalize().into_bytes());
    URL_SAFE.encode(token)
}

/// Decrypts Fernet token text. The HMAC is checked (in constant time) before anything
/// is decrypted. The timestamp is not checked: nuropb calls `Fernet.decrypt` without a
/// TTL, and clocks across the mesh need not agree.
pub(crate) fn decrypt(key: &SessionKey, token_text: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let token = URL_SAFE
        .decode(token_text)
        .map_err(|_| CryptoError::MalformedToken("not url-safe base64"))?;
    if token.len() < HEADER_LEN + BLOCK_LEN + MAC_LEN {
        return Err(CryptoError::MalformedToken("too short"));
    }
    if token[0] != VERSION {
        return Err(CryptoError::MalformedToken("unknown version"));
    }
    let (signed, tag) = token.split_at(token.len() - MAC_LEN);
    let mut mac = hmac_for(key);
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| CryptoError::TokenSignatureMismatch)?;

    let (header, ciphertext) = signed.split_at(HEADER_LEN);
    if ciphertext.len() % BLOCK_LEN != 0 {
        return Err(CryptoError::InvalidCiphertext);
    }
    let iv = &header[1 + TIMESTAMP_LEN..];
    cbc::Decryptor::<Aes128>::new(key.encryption_key().into(), iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
        .map_err(|_| CryptoError::InvalidCiphertext)
}

fn hmac_for(key: &SessionKey) -> HmacSha256 {
    // HMAC (RFC 2104) zero-pads a key shorter than the hash block to the block size, so
    // padding the 16-byte signing key ourselves gives the same MAC and lets us use the
    // infallible fixed-size constructor instead of `new_from_slice`.
    let mut block = [0u8; 64];
    block[..key.signing_key().len()].copy_from_slice(key.signing_key());
    <HmacSha256 as hmac::digest::KeyInit>::new(&block.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    // From the Fernet spec's generate.json / verify.json
    // (https://github.com/fernet/spec): "hello" at 1985-10-26T01:20:00-07:00.
    const SPEC_KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    const SPEC_TOKEN: &str = "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
    const SPEC_TIME: u64 = 499_162_800;

    fn spec_iv() -> [u8; 16] {
        core::array::from_fn(|i| i as u8)
    }

    #[test]
    fn matches_fernet_spec_generate_vector() {
        let key = SessionKey::from_text(SPEC_KEY).unwrap();
        assert_eq!(encrypt_at(&key, b"hello", SPEC_TIME, spec_iv()), SPEC_TOKEN);
    }

    #[test]
    fn matches_fernet_spec_verify_vector() {
        let key = SessionKey::from_text(SPEC_KEY).unwrap();
        assert_eq!(decrypt(&key, SPEC_TOKEN.as_bytes()).unwrap(), b"hello");
    }

    #[test]
    fn round_trips_empty_and_block_sized_plaintexts() {
        let key = SessionKey::generate();
        for len in [0, 1, 15, 16, 17, 32, 1000] {
            let plaintext = vec![b'x'; len];
            let token = encrypt(&key, &plaintext);
            assert!(token.starts_with("gAAAAA"));
            assert_eq!(decrypt(&key, token.as_bytes()).unwrap(), plaintext);
        }
    }

    #[test]
    fn wrong_key_is_a_signature_mismatch() {
        let token = encrypt(&SessionKey::generate(), b"secret");
        assert!(matches!(
            decrypt(&SessionKey::generate(), token.as_bytes()),
            Err(CryptoError::TokenSignatureMismatch)
        ));
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let key = SessionKey::from_text(SPEC_KEY).unwrap();
        let raw = URL_SAFE.decode(SPEC_TOKEN).unwrap();
        for i in 0..raw.len() {
            let mut tampered = raw.clone();
            tampered[i] ^= 0x01;
            let text = URL_SAFE.encode(&tampered);
            let err = decrypt(&key, text.as_bytes()).unwrap_err();
            let expected = if i == 0 {
                matches!(err, CryptoError::MalformedToken(_))
            } else {
                matches!(err, CryptoError::TokenSignatureMismatch)
            };
            assert!(expected, "byte {i}: {err:?}");
        }
    }

    #[test]
    fn correctly_signed_bad_ciphertext_is_rejected() {
        // Sign a token whose ciphertext length is not a whole number of blocks, and one
        // whose padding is wrong; neither may panic. A fixed key keeps the padding case
        // deterministic (a random key would give valid padding one time in ~256).
        let key = SessionKey::from_text(SPEC_KEY).unwrap();
        let sign = |body: Vec<u8>| {
            let mut mac = hmac_for(&key);
            mac.update(&body);
            let mut token = body;
            token.extend_from_slice(&mac.finalize().into_bytes());
            URL_SAFE.encode(token)
        };
        let mut header = vec![VERSION];
        header.extend_from_slice(&[0; TIMESTAMP_LEN + IV_LEN]);

        let mut ragged = header.clone();
        ragged.extend_from_slice(&[7; 20]);
        let mut bad_padding = header;
        bad_padding.extend_from_slice(&[7; 16]);
        for body in [ragged, bad_padding] {
            assert!(matches!(
                decrypt(&key, sign(body).as_bytes()),
                Err(CryptoError::InvalidCiphertext)
            ));
        }
    }
}
