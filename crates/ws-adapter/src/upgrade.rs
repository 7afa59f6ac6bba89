//! The HTTP upgrade checks: capacity (503), origin (403), credentials (401), sessions per
//! user (429). They run
//! before the 101 response, so a refused client never gets a WebSocket (nuropb-gw upgraded
//! first and then closed with 1005).

use http::{HeaderMap, StatusCode};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request};

use handler_core::CoordinatorHandle;
use handler_core::auth::{AuthError, Identity, strip_bearer};

use crate::config::AuthSources;
use crate::origin::OriginPolicy;
use crate::stats::WsStatsHandle;

/// The outcome of the checks: who connected, or the HTTP refusal to send.
#[allow(clippy::result_large_err, reason = "tungstenite's Callback fixes the error type")]
pub(crate) fn check_upgrade(
    request: &Request,
    have_capacity: bool,
    origins: &OriginPolicy,
    auth: &AuthSources,
    coordinator: &CoordinatorHandle,
    stats: &WsStatsHandle,
) -> Result<Identity, ErrorResponse> {
    if !have_capacity {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections"));
    }
    if coordinator.is_shutting_down() {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "gateway shutting down"));
    }
    let headers = request.headers();
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let allowed = origin.to_str().map(|o| origins.allows(o)).unwrap_or(false);
        if !allowed {
            tracing::info!(origin = ?origin, "upgrade refused: origin not allowed");
            return Err(refuse(StatusCode::FORBIDDEN, "Cross origin websockets not allowed"));
        }
    }
    let token = find_token(headers, request.uri().query(), auth).ok_or(AuthError::Missing);
    match token.and_then(|t| coordinator.authenticate(&t)) {
        // Asked here so the client gets a status it can act on; `open_session` enforces the
        // limit again under its lock (a race between two upgrades ends in a 1008 close).
        Ok(identity) if coordinator.session_limit_reached(&identity.user_id) => {
            stats.per_user_session_refused();
            // `?`: the id comes from a signed token, but it is still the client's text.
            tracing::info!(user.id = ?identity.user_id.as_str(), "upgrade refused: too many sessions");
            Err(refuse(StatusCode::TOO_MANY_REQUESTS, "too many sessions for this user"))
        }
        Ok(identity) => Ok(identity),
        Err(e) => {
            tracing::info!(reason = %e, "upgrade refused: not authenticated");
            Err(refuse(StatusCode::UNAUTHORIZED, "unauthorized"))
        }
    }
}

/// The bearer token: header first, then cookie, then query parameter (when enabled), as
/// nuropb-gw looked up header then cookie.
pub(crate) fn find_token(
    headers: &HeaderMap,
    query: Option<&str>,
    auth: &AuthSources,
) -> Option<String> {
    let from_header = headers
        .get(auth.header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(strip_bearer)
        .filter(|t| !t.is_empty());
    if let Some(t) = from_header {
        return Some(t.to_owned());
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
                        return Some(t.to_owned());
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
                return Some(percent_decode(v));
            }
        }
    }
    None
}

/// Decodes `%XX` escapes (cookie values written by `encodeURIComponent`, query strings).
/// Invalid escapes are kept as they are, bytes that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
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
        ] {
            assert_eq!(
                find_token(&headers(&hs), query, &auth).as_deref(),
                expected,
                "{hs:?} {query:?}"
            );
        }
        let no_cookie = AuthSources { cookie: None, ..AuthSources::default() };
        assert_eq!(
            find_token(&headers(&[("Cookie", "Authorization=def")]), None, &no_cookie),
            None
        );
        assert_eq!(find_token(&headers(&[]), Some("token=qqq"), &AuthSources::default()), None);
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
