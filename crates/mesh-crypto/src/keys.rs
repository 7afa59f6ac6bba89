//! Keys: the service's RSA key pair (PEM in and out) and the per-call Fernet session key.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use rand::RngCore as _;
use rand::rngs::OsRng;
use rsa::pkcs1::{DecodeRsaPrivateKey as _, DecodeRsaPublicKey as _};
use rsa::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use zeroize::Zeroizing;

use crate::error::CryptoError;

/// The smallest key `ServicePrivateKey::generate` makes. Python nuropb services use 2048
/// bits; parsed keys are not checked, so that we accept whatever a service publishes.
pub const MIN_GENERATED_RSA_BITS: usize = 2048;

/// Length of a Fernet key as text: 32 bytes in padded URL-safe base64.
const SESSION_KEY_TEXT_LEN: usize = 44;
const SESSION_KEY_LEN: usize = 32;

/// A service's RSA public key, as advertised in `nuropb_describe` (`public_key`, spec §6.4).
#[derive(Clone, PartialEq, Eq)]
pub struct ServicePublicKey {
    pub(crate) inner: RsaPublicKey,
}

impl ServicePublicKey {
    /// Parses a PEM `SubjectPublicKeyInfo` (`-----BEGIN PUBLIC KEY-----`), which is what
    /// nuropb publishes; a PKCS#1 `-----BEGIN RSA PUBLIC KEY-----` is accepted too.
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let pem = pem.trim();
        let parsed = if pem.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
            RsaPublicKey::from_pkcs1_pem(pem)
                .map_err(|e| CryptoError::InvalidPublicKey(Box::new(e)))
        } else {
            RsaPublicKey::from_public_key_pem(pem)
                .map_err(|e| CryptoError::InvalidPublicKey(Box::new(e)))
        };
        parsed.map(|inner| ServicePublicKey { inner })
    }

    /// Writes the key as PEM `SubjectPublicKeyInfo` with `\n` line endings, the form
    /// nuropb puts in `nuropb_describe`.
    pub fn to_pem(&self) -> Result<String, CryptoError> {
        self.inner
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| CryptoError::PemEncoding(Box::new(e)))
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        rsa::traits::PublicKeyParts::n(&self.inner).bits()
    }
}

impl fmt::Debug for ServicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServicePublicKey").field("bits", &self.bits()).finish_non_exhaustive()
    }
}

/// A service's RSA private key. Needed only to serve encrypted calls (and in tests).
#[derive(Clone)]
pub struct ServicePrivateKey {
    pub(crate) inner: RsaPrivateKey,
}

impl ServicePrivateKey {
    /// Parses a PEM PKCS#8 (`-----BEGIN PRIVATE KEY-----`, what Python's `cryptography`
    /// writes by default) or PKCS#1 (`-----BEGIN RSA PRIVATE KEY-----`) key. Encrypted
    /// PEM is not supported.
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let pem = pem.trim();
        let parsed = if pem.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
            RsaPrivateKey::from_pkcs1_pem(pem)
                .map_err(|e| CryptoError::InvalidPrivateKey(Box::new(e)))
        } else {
            RsaPrivateKey::from_pkcs8_pem(pem)
                .map_err(|e| CryptoError::InvalidPrivateKey(Box::new(e)))
        };
        parsed.map(|inner| ServicePrivateKey { inner })
    }

    /// Generates a fresh key with public exponent 65537, like nuropb's services do.
    /// `bits` must be at least [`MIN_GENERATED_RSA_BITS`].
    pub fn generate(bits: usize) -> Result<Self, CryptoError> {
        if bits < MIN_GENERATED_RSA_BITS {
            return Err(CryptoError::KeyTooSmall { bits, min: MIN_GENERATED_RSA_BITS });
        }
        RsaPrivateKey::new(&mut OsRng, bits)
            .map(|inner| ServicePrivateKey { inner })
            .map_err(|e| CryptoError::KeyGeneration(Box::new(e)))
    }

    /// The matching public key.
    pub fn public_key(&self) -> ServicePublicKey {
        ServicePublicKey { inner: self.inner.to_public_key() }
    }

    /// The matching public key as PEM `SubjectPublicKeyInfo`, for `nuropb_describe`.
    pub fn public_key_pem(&self) -> Result<String, CryptoError> {
        self.public_key().to_pem()
    }
}

impl fmt::Debug for ServicePrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material; the size is enough to tell keys apart in logs.
        f.debug_struct("ServicePrivateKey")
            .field("bits", &self.public_key().bits())
            .finish_non_exhaustive()
    }
}

/// The per-call symmetric key: a Fernet key, kept as the 44-character URL-safe base64
/// text that nuropb RSA-encrypts, together with its 32 decoded bytes.
///
/// Its `Debug` output never shows the key; memory is zeroed on drop.
#[derive(Clone)]
pub struct SessionKey {
    // Invariant: `text` is the padded URL-safe base64 encoding of `bytes`.
    text: Zeroizing<String>,
    bytes: Zeroizing<[u8; SESSION_KEY_LEN]>,
}

impl SessionKey {
    /// A new random key, as Python's `Fernet.generate_key()` makes them.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; SESSION_KEY_LEN]);
        OsRng.fill_bytes(bytes.as_mut());
        let text = Zeroizing::new(URL_SAFE.encode(bytes.as_ref()));
        SessionKey { text, bytes }
    }

    /// Parses a Fernet key from its text form (44 characters of padded URL-safe base64).
    pub fn from_text(text: &str) -> Result<Self, CryptoError> {
        if text.len() != SESSION_KEY_TEXT_LEN {
            return Err(CryptoError::InvalidSessionKey);
        }
        let decoded =
            Zeroizing::new(URL_SAFE.decode(text).map_err(|_| CryptoError::InvalidSessionKey)?);
        let mut bytes = Zeroizing::new([0u8; SESSION_KEY_LEN]);
        if decoded.len() != SESSION_KEY_LEN {
            return Err(CryptoError::InvalidSessionKey);
        }
        bytes.copy_from_slice(&decoded);
        Ok(SessionKey { text: Zeroizing::new(text.to_owned()), bytes })
    }

    /// The key text. Named so that every use stands out in review: this is a secret.
    pub fn expose_text(&self) -> &str {
        &self.text
    }

    /// HMAC-SHA256 key: the first half of the decoded key (Fernet spec).
    pub(crate) fn signing_key(&self) -> &[u8] {
        &self.bytes[..16]
    }

    /// AES-128 key: the second half of the decoded key (Fernet spec).
    pub(crate) fn encryption_key(&self) -> &[u8] {
        &self.bytes[16..]
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]
mod tests {
    use super::*;

    #[test]
    fn generated_session_key_has_fernet_shape() {
        let key = SessionKey::generate();
        assert_eq!(key.expose_text().len(), 44);
        assert!(key.expose_text().ends_with('='));
        let reparsed = SessionKey::from_text(key.expose_text()).unwrap();
        assert_eq!(reparsed.expose_text(), key.expose_text());
        assert_eq!(reparsed.signing_key(), key.signing_key());
        assert_eq!(reparsed.encryption_key(), key.encryption_key());
    }

    #[test]
    fn session_key_debug_hides_the_key() {
        let key = SessionKey::generate();
        let debug = format!("{key:?}");
        assert_eq!(debug, "SessionKey(<redacted>)");
        assert!(!debug.contains(key.expose_text()));
    }

    #[test]
    fn session_key_text_is_validated() {
        let check = |text: &str| {
            assert!(
                matches!(SessionKey::from_text(text), Err(CryptoError::InvalidSessionKey)),
                "accepted {text:?}"
            );
        };
        check("");
        check("short");
        // Standard alphabet instead of URL-safe.
        check("xl+JLpqZEmDKsLEWP1t7JQr17mITWoDmkLZnl1ZzNo8=");
        // Right length, but not base64.
        check("xl-JLpqZEmDKsLEWP1t7JQr17mITWoDmkLZnl1ZzNo8!");
        // 45 characters.
        check("xl-JLpqZEmDKsLEWP1t7JQr17mITWoDmkLZnl1ZzNo8==");
        // Multi-byte UTF-8 that happens to be 44 bytes long.
        check(&"é".repeat(22));
        assert!(SessionKey::from_text("xl-JLpqZEmDKsLEWP1t7JQr17mITWoDmkLZnl1ZzNo8=").is_ok());
    }

    #[test]
    fn generate_refuses_small_keys() {
        assert!(matches!(
            ServicePrivateKey::generate(1024),
            Err(CryptoError::KeyTooSmall { bits: 1024, min: 2048 })
        ));
    }
}
