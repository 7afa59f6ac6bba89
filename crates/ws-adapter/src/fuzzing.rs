//! The upgrade checks as one function of untrusted bytes, for the `upgrade` fuzz target
//! (`fuzz/`, feature `fuzzing`). Not API: hidden, and compiled only with the feature.
//!
//! What it asserts, besides "no panic": a head that `handshake::classify` takes for an upgrade is
//! one tungstenite parses and answers (else the client would get a bare close instead of the
//! 400/426/431 RFC 6455 requires); an `Origin` the policy allows is exactly a scheme, a
//! host under the allowed domain and an optional port; no token found anywhere in the
//! head (header, `nuropb.token.` subprotocol entries, cookie, query) is accepted by a JWT
//! check whose secret the input cannot know; and `nuropb.v1` is taken as offered only when
//! an offered entry is exactly that (a head without any credentials takes the first-frame
//! route, which needs no property here: nothing of the head is trusted on it).

use tokio_tungstenite::tungstenite::handshake::machine::TryParse;
use tokio_tungstenite::tungstenite::handshake::server::{Request, create_response};

use handler_core::auth::{JwtAuthenticator, JwtConfig, JwtKey};

use crate::config::AuthSources;
use crate::handshake::{HeadKind, classify};
use crate::origin::OriginPolicy;
use crate::upgrade::{Found, PROTOCOL, TOKEN_PROTOCOL_PREFIX, find_token, offers_protocol};

/// The allowed origin of the fuzzed policy.
const ALLOWED: &str = "https://example.com";

/// Runs every upgrade check on `head` and panics when one of the properties above fails.
#[allow(clippy::panic, clippy::expect_used, reason = "a panic is how a fuzz target reports")]
pub fn upgrade(head: &[u8]) {
    // Plain HTTP goes to hyper, which answers whatever it gets.
    if classify(head) != Ok(HeadKind::Upgrade) {
        return;
    }
    let request = match Request::try_parse(head) {
        Ok(Some((_, request))) => request,
        other => panic!("classify passed a head tungstenite does not parse: {other:?}"),
    };
    if let Err(e) = create_response(&request) {
        panic!("classify passed a head tungstenite refuses: {e}");
    }
    let policy = OriginPolicy::new(&[ALLOWED]).expect("a valid entry");
    for origin in request.headers().get_all(http::header::ORIGIN) {
        let Ok(origin) = origin.to_str() else { continue };
        if policy.allows(origin) {
            assert!(is_allowed_shape(origin), "origin {origin:?} allowed for {ALLOWED}");
        }
    }
    let auth = AuthSources { query_param: Some("token".to_owned()), ..AuthSources::default() };
    let key = JwtKey::Hs256Secret(b"fuzz-secret-the-input-cannot-know".to_vec());
    let jwt = JwtAuthenticator::new(JwtConfig::new(key)).expect("an HS256 key");
    if let Found::Token(token) = find_token(request.headers(), request.uri().query(), &auth, 8192) {
        assert!(jwt.verify(&token).is_err(), "token {token:?} accepted");
    }
    let offers = request
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let mut exact = false;
    for offer in offers {
        exact |= offer == PROTOCOL;
        if let Some(token) = offer.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
            assert!(jwt.verify(token).is_err(), "subprotocol token {token:?} accepted");
        }
    }
    assert_eq!(offers_protocol(request.headers()), exact, "nuropb.v1 offered or not");
}

/// `https://` + (label `.`)* `example.com` + optional `:digits`, ASCII case-insensitive.
fn is_allowed_shape(origin: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    let Some(rest) = origin.strip_prefix("https://") else { return false };
    let (host, port) = rest.split_once(':').unwrap_or((rest, "0"));
    let host_ok = host == "example.com"
        || host.strip_suffix(".example.com").is_some_and(|sub| {
            sub.split('.').all(|label| {
                !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        });
    host_ok && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn head(extra: &str) -> Vec<u8> {
        format!(
            "GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn passes_well_formed_and_malformed_heads() {
        for h in [
            head(""),
            head("Origin: https://app.example.com\r\n"),
            head("Origin: https://evil.com\\@example.com\r\n"),
            head("Authorization: Bearer a.b.c\r\nCookie: Authorization=x.y.z\r\n"),
            head("Sec-WebSocket-Protocol: nuropb.v1, nuropb.token.a.b.c\r\n"),
            head("Sec-WebSocket-Protocol: x\r\nSec-WebSocket-Protocol: nuropb.token.\r\n"),
            b"POST / HTTP/1.1\r\n\r\n".to_vec(),
            b"\xff\xfe\r\n\r\n".to_vec(),
            Vec::new(),
        ] {
            upgrade(&h);
        }
    }

    #[test]
    fn allowed_shape() {
        for ok in ["https://example.com", "https://a.b.example.com:8443", "HTTPS://Example.COM"] {
            assert!(is_allowed_shape(ok), "{ok}");
        }
        for bad in [
            "http://example.com",
            "https://evil.com\\@example.com",
            "https://evilexample.com",
            "https://example.com:",
            "https://example.com/x",
            "https://.example.com",
        ] {
            assert!(!is_allowed_shape(bad), "{bad}");
        }
    }
}
