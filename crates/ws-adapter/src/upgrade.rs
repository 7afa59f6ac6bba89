//! The HTTP upgrade checks: capacity (503), origin (403), credentials (401), sessions per
//! user (429), and the subprotocol (`nuropb.v1`, selected whenever offered). They run
//! before the 101 response, so a refused client never gets a WebSocket (nuropb-gw upgraded
//! first and then closed with 1005).

use http::{HeaderMap, StatusCode};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request};

use handler_core::CoordinatorHandle;
use handler_core::auth::{AuthError, Identity, strip_bearer};

use crate::config::AuthSources;
use crate::origin::OriginPolicy;
use crate::stats::WsStatsHandle;

/// The subprotocol a client offers to speak this gateway's protocol; selected whenever it
/// is offered (a browser fails the connection when none of its offers is selected).
pub(crate) const PROTOCOL: &str = "nuropb.v1";

/// The prefix of the subprotocol entry that carries a bearer token (never selected, so
/// never echoed).
pub(crate) const TOKEN_PROTOCOL_PREFIX: &str = "nuropb.token.";

/// Who is connecting, as far as the upgrade can tell.
#[derive(Debug)]
pub(crate) enum Credentials {
    /// A token from the upgrade request, checked.
    Authenticated(Identity),
    /// No credentials at all, and the first-frame route is on: the connection gets a
    /// WebSocket and `auth_timeout` to send its `auth` frame.
    FirstFrame,
}

/// The outcome of the checks: who connected, or the HTTP refusal to send. `first_frame`:
/// whether an upgrade without any credentials may authenticate with its first frame.
/// Asynchronous because the authenticator may call out (a JWKS refresh, the mesh token
/// check); the caller bounds it by the handshake deadline. A token that could not be
/// checked at all (the mesh down) is answered 503, a refused one 401.
#[allow(clippy::result_large_err, reason = "tungstenite's Callback fixes the error type")]
#[allow(clippy::too_many_arguments, reason = "the checks' inputs, each a different limit")]
pub(crate) async fn check_upgrade(
    request: &Request,
    have_capacity: bool,
    origins: &OriginPolicy,
    auth: &AuthSources,
    first_frame: bool,
    coordinator: &CoordinatorHandle,
    stats: &WsStatsHandle,
) -> Result<Credentials, ErrorResponse> {
    if !have_capacity {
        stats.refused("capacity", "503");
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections"));
    }
    if coordinator.is_shutting_down() {
        stats.refused("shutting_down", "503");
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "gateway shutting down"));
    }
    let headers = request.headers();
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let allowed = origin.to_str().map(|o| origins.allows(o)).unwrap_or(false);
        if !allowed {
            tracing::info!(origin = ?origin, "upgrade refused: origin not allowed");
            stats.refused("origin", "403");
            return Err(refuse(StatusCode::FORBIDDEN, "Cross origin websockets not allowed"));
        }
    }
    let max_token_len = coordinator.client_limits().max_token_len;
    let token = match find_token(headers, request.uri().query(), auth, max_token_len) {
        Found::Token(t) => Ok(t),
        Found::Nothing if first_frame => return Ok(Credentials::FirstFrame),
        Found::Nothing => Err(AuthError::Missing),
        Found::TooLong => Err(AuthError::Malformed("subprotocol token too long")),
    };
    let checked = match token {
        Ok(t) => coordinator.authenticate(&t).await,
        Err(e) => Err(e),
    };
    match checked {
        // Asked here so the client gets a status it can act on; `open_session` enforces the
        // limit again under its lock (a race between two upgrades ends in a 1008 close).
        Ok(identity) if coordinator.session_limit_reached(&identity.user_id) => {
            stats.per_user_session_refused();
            stats.refused("sessions_per_user", "429");
            // `?`: the id comes from a signed token, but it is still the client's text.
            tracing::info!(user.id = ?identity.user_id.as_str(), "upgrade refused: too many sessions");
            Err(refuse(StatusCode::TOO_MANY_REQUESTS, "too many sessions for this user"))
        }
        Ok(identity) => Ok(Credentials::Authenticated(identity)),
        Err(e) if e.is_unavailable() => {
            tracing::warn!(reason = %e, "upgrade refused: the token could not be checked");
            stats.refused("auth_unavailable", "503");
            Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "authentication unavailable"))
        }
        Err(e) => {
            tracing::info!(reason = %e, "upgrade refused: not authenticated");
            stats.refused("unauthorized", "401");
            Err(refuse(StatusCode::UNAUTHORIZED, "unauthorized"))
        }
    }
}

/// What the credential lookup found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// A token, from the first source that has one.
    Token(String),
    /// No credentials in any source.
    Nothing,
    /// A subprotocol token over `max_token_len` (refused without being decoded).
    TooLong,
}

/// Whether the client offered [`PROTOCOL`] in `Sec-WebSocket-Protocol` (one header with a
/// comma-separated list, or several headers).
pub(crate) fn offers_protocol(headers: &HeaderMap) -> bool {
    offered_protocols(headers).any(|p| p == PROTOCOL)
}

fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The bearer token: header first, then the `nuropb.token.<jwt>` subprotocol entry, then
/// cookie, then query parameter (when enabled), as nuropb-gw looked up header then cookie.
/// A subprotocol token is bounded by `max_token_len`; the head's size bounds the rest.
pub(crate) fn find_token(
    headers: &HeaderMap,
    query: Option<&str>,
    auth: &AuthSources,
    max_token_len: usize,
) -> Found {
    let from_header = headers
        .get(auth.header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(strip_bearer)
        .filter(|t| !t.is_empty());
    if let Some(t) = from_header {
        return Found::Token(t.to_owned());
    }
    let from_protocol = offered_protocols(headers)
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .filter(|t| !t.is_empty());
    if let Some(t) = from_protocol {
        if t.len() > max_token_len {
            return Found::TooLong;
        }
        return Found::Token(t.to_owned());
    }
    if let Some(name) = &auth.cookie {
        for value in headers.get_all(http::header::COOKIE) {
            let Ok(value) = value.to_str() else { continue };
            for pair in value.split(';') {
                if let Some((k, v)) = pair.trim().split_once('=')
                    && k.trim() == name
                {
                    let v = v.trim().trim_matches('"');
                    let v = percent_decode(v);
                    let t = strip_bearer(&v);
                    if !t.is_empty() {
                        return Found::Token(t.to_owned());
                    }
                }
            }
        }
    }
    if let (Some(name), Some(query)) = (&auth.query_param, query) {
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=')
                && k == name
                && !v.is_empty()
            {
                return Found::Token(percent_decode(v));
            }
        }
    }
    Found::Nothing
}

/// Decodes `%XX` escapes (cookie values written by `encodeURIComponent`, query strings).
/// Invalid escapes are kept as they are, bytes that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

pub(crate) fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_owned()));
    *response.status_mut() = status;
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_sources_in_order() {
        let auth = AuthSources { query_param: Some("token".into()), ..AuthSources::default() };
        let find = |hs: &HeaderMap, query, auth: &AuthSources| match find_token(hs, query, auth, 16)
        {
            Found::Token(t) => Some(t),
            Found::Nothing => None,
            Found::TooLong => Some("<too long>".to_owned()),
        };
        for (hs, query, expected) in [
            (vec![("Authorization", "Bearer abc")], None, Some("abc")),
            (
                vec![("Authorization", "Bearer abc"), ("Cookie", "Authorization=def")],
                None,
                Some("abc"),
            ),
            (vec![("Cookie", "a=1; Authorization=def; b=2")], None, Some("def")),
            (vec![("Cookie", "Authorization=Bearer%20ghi")], None, Some("ghi")),
            (vec![], Some("x=1&token=qqq"), Some("qqq")),
            (vec![("Authorization", "Bearer ")], None, None),
            (vec![], None, None),
            // The subprotocol: after the header, before the cookie; one list or several.
            (vec![("Sec-WebSocket-Protocol", "nuropb.v1, nuropb.token.sp")], None, Some("sp")),
            (
                vec![
                    ("Sec-WebSocket-Protocol", "nuropb.v1"),
                    ("Sec-WebSocket-Protocol", "nuropb.token.sp"),
                ],
                None,
                Some("sp"),
            ),
            (
                vec![
                    ("Authorization", "Bearer abc"),
                    ("Sec-WebSocket-Protocol", "nuropb.token.sp"),
                ],
                None,
                Some("abc"),
            ),
            (
                vec![
                    ("Cookie", "Authorization=def"),
                    ("Sec-WebSocket-Protocol", "nuropb.token.sp"),
                ],
                None,
                Some("sp"),
            ),
            (vec![("Sec-WebSocket-Protocol", "nuropb.v1, nuropb.token.")], None, None),
            (vec![("Sec-WebSocket-Protocol", "nuropb.v1")], Some("token=qqq"), Some("qqq")),
            (
                vec![("Sec-WebSocket-Protocol", "nuropb.token.0123456789abcdefX")],
                None,
                Some("<too long>"),
            ),
        ] {
            assert_eq!(find(&headers(&hs), query, &auth).as_deref(), expected, "{hs:?} {query:?}");
        }
        let no_cookie = AuthSources { cookie: None, ..AuthSources::default() };
        assert_eq!(find(&headers(&[("Cookie", "Authorization=def")]), None, &no_cookie), None);
        assert_eq!(find(&headers(&[]), Some("token=qqq"), &AuthSources::default()), None);
    }

    #[test]
    fn the_protocol_is_found_in_any_offer() {
        for (hs, offered) in [
            (vec![("Sec-WebSocket-Protocol", "nuropb.v1")], true),
            (vec![("Sec-WebSocket-Protocol", "x, nuropb.v1 ,nuropb.token.t")], true),
            (vec![("Sec-WebSocket-Protocol", "x"), ("Sec-WebSocket-Protocol", "nuropb.v1")], true),
            (vec![("Sec-WebSocket-Protocol", "nuropb.v10, nuropb.token.nuropb.v1")], false),
            (vec![], false),
        ] {
            assert_eq!(offers_protocol(&headers(&hs)), offered, "{hs:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41%"), "A%");
        assert_eq!(percent_decode("%ff"), "\u{fffd}");
        assert_eq!(percent_decode("Bearer%20a%2Eb"), "Bearer a.b");
    }
}
