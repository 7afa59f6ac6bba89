//! The one error type of this crate.

/// An error from parsing keys or from encrypting/decrypting a NuroPb body.
///
/// Sources from the RSA and PEM libraries are boxed so that no dependency type shows
/// in this crate's public API.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The text is not a PEM `SubjectPublicKeyInfo` (or PKCS#1) RSA public key.
    #[error("invalid service public key pem")]
    InvalidPublicKey(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The text is not a PEM PKCS#8 (or PKCS#1) RSA private key.
    #[error("invalid service private key pem")]
    InvalidPrivateKey(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// `ServicePrivateKey::generate` was asked for a key below the minimum size.
    #[error("rsa key size of {bits} bits is below the minimum of {min} bits")]
    KeyTooSmall {
        /// The size asked for, in bits.
        bits: usize,
        /// The smallest size generated ([`crate::MIN_GENERATED_RSA_BITS`]).
        min: usize,
    },

    /// The RSA library failed to generate a key.
    #[error("rsa key generation failed")]
    KeyGeneration(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// A public key could not be written as PEM.
    #[error("public key pem encoding failed")]
    PemEncoding(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The session key could not be RSA-encrypted (for example, the service key is too
    /// small for OAEP-SHA256 of 44 bytes).
    #[error("session key wrapping failed")]
    KeyWrap(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The first body segment did not RSA-decrypt with the service private key.
    ///
    /// Deliberately carries no detail: distinguishing OAEP failures helps an attacker.
    #[error("session key unwrapping failed")]
    KeyUnwrap,

    /// The text is not a Fernet key (44 characters of URL-safe base64 for 32 bytes).
    #[error("invalid session key")]
    InvalidSessionKey,

    /// The body is not `base64 "." base64`.
    #[error("malformed encrypted body: {0}")]
    MalformedBody(&'static str),

    /// The second segment does not have the shape of a Fernet token.
    #[error("malformed fernet token: {0}")]
    MalformedToken(&'static str),

    /// The Fernet token's HMAC does not match: tampered, or encrypted with another key.
    #[error("fernet token signature mismatch")]
    TokenSignatureMismatch,

    /// The token was correctly signed but its ciphertext does not decrypt (bad length or
    /// padding), which only the holder of the key can produce.
    #[error("fernet token ciphertext is invalid")]
    InvalidCiphertext,
}

impl CryptoError {
    /// True when the error comes from the message (or key text) we were given, false
    /// when it comes from our own keys or the RSA library: a caller rejects the message
    /// in the first case and reports a local fault in the second.
    pub fn is_bad_input(&self) -> bool {
        match self {
            CryptoError::KeyUnwrap
            | CryptoError::InvalidSessionKey
            | CryptoError::MalformedBody(_)
            | CryptoError::MalformedToken(_)
            | CryptoError::TokenSignatureMismatch
            | CryptoError::InvalidCiphertext
            | CryptoError::InvalidPublicKey(_)
            | CryptoError::InvalidPrivateKey(_) => true,
            CryptoError::KeyTooSmall { .. }
            | CryptoError::KeyGeneration(_)
            | CryptoError::PemEncoding(_)
            | CryptoError::KeyWrap(_) => false,
        }
    }
}
