//! The embedded demo: an in-memory mesh with a `demo` service, a periodic `demo.tick`
//! event, a demo token, and the demo's HTTP routes on the WebSocket port (the page at `/`,
//! the client library at `/nuropb-gateway.js`, a fresh token at `/demo/token`), so a
//! newcomer can connect without a broker, from a terminal or a browser.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use handler_core::in_memory::{InMemoryMesh, MethodCall};
use handler_core::{MeshEvent, MeshInbound};
use nuropb_wire::ErrorObject;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use ws_adapter::{HttpRequest, HttpResponse, HttpRoutes, OriginPolicyHandle};

fn number(call: &MethodCall, name: &str) -> Result<f64, ErrorObject> {
    call.params.get(name).and_then(Value::as_f64).ok_or_else(|| {
        ErrorObject::new("NuropbValidationError", format!("parameter `{name}` must be a number"))
    })
}

/// The demo service: `demo.echo`, `demo.add`, `demo.whoami`, `demo.sleep`, `demo.fail`.
pub fn demo_mesh() -> (InMemoryMesh, mpsc::Receiver<MeshInbound>) {
    InMemoryMesh::builder()
        .sync_method("demo", "echo", |c| Ok(Value::Object(c.params)))
        .sync_method("demo", "add", |c| {
            let (a, b) = (number(&c, "a")?, number(&c, "b")?);
            let sum = a + b;
            // Integers stay integers, like Python.
            Ok(if sum.fract() == 0.0 && sum.abs() < 9e15 { json!(sum as i64) } else { json!(sum) })
        })
        .sync_method("demo", "whoami", |c| {
            Ok(json!({"user_id": c.context.get("user_id"), "trace_id": c.trace_id}))
        })
        .method("demo", "sleep", |c| async move {
            let seconds = number(&c, "seconds")?.clamp(0.0, 30.0);
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            Ok(json!(format!("slept {seconds}")))
        })
        .sync_method("demo", "fail", |c| {
            let message = c.params.get("message").and_then(Value::as_str).unwrap_or("boom");
            Err(ErrorObject::new(
                "NuropbException",
                format!("Runtime exception calling demo.fail:ValueError: {message}"),
            ))
        })
        .build()
}

/// Publishes `demo.tick` every `every` until shutdown.
pub async fn tick(mesh: InMemoryMesh, every: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(every);
    interval.tick().await;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            // Both branches are cancel-safe.
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        n += 1;
        let event = MeshEvent {
            topic: "demo.tick".to_owned(),
            event: json!({"n": n}),
            target: None,
            context: Default::default(),
            trace_id: None,
        };
        if mesh.inject_event(event).await.is_err() {
            return;
        }
    }
}

/// A demo token valid for 24 hours.
pub fn demo_token(secret: &[u8]) -> Result<String> {
    Ok(demo_token_for(secret, Duration::from_secs(24 * 3600), &TokenClaims::default())?.0)
}

/// Claims the gateway's JWT check asks for beyond `sub` and `exp` (`--jwt-issuer`,
/// `--jwt-audience`), so that the demo's tokens pass it.
#[derive(Debug, Clone, Default)]
pub struct TokenClaims {
    pub issuer: Option<String>,
    pub audience: Vec<String>,
}

/// A token for the demo user valid for `lifetime`, and its `exp` (seconds since the epoch).
pub fn demo_token_for(
    secret: &[u8],
    lifetime: Duration,
    extra: &TokenClaims,
) -> Result<(String, u64)> {
    let iat = jsonwebtoken::get_current_timestamp();
    let exp = iat + lifetime.as_secs();
    // `jti`: every call gives a new token, also within one second.
    let jti = uuid::Uuid::new_v4().simple().to_string();
    let mut claims =
        json!({"sub": "demo-user", "username": "demo", "iat": iat, "exp": exp, "jti": jti});
    if let Some(issuer) = &extra.issuer {
        claims["iss"] = json!(issuer);
    }
    if !extra.audience.is_empty() {
        claims["aud"] = json!(extra.audience);
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .context("cannot sign the demo token")?;
    Ok((token, exp))
}

/// Lifetime of a token from `/demo/token`: short, so that the page's refresh is exercised.
pub const PAGE_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// The client library as built from `clients/js` (committed; `cargo xtask js` fails when
/// it differs from a fresh build), so the gateway serves it on a machine without npm.
const LIBRARY_JS: &str = include_str!("../../clients/js/dist/nuropb-gateway.js");
const PAGE_HTML: &str = include_str!("demo/page.html");
const PAGE_JS: &str = include_str!("demo/page.js");
const PAGE_CSS: &str = include_str!("demo/page.css");
/// The page's icon, so that the browser does not ask for `/favicon.ico` (a 404 in its console).
const ICON_SVG: &str = include_str!("demo/favicon.svg");

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";
const JSON: &str = "application/json";
/// Static files: the browser asks again each time (no validators to revalidate with, and a
/// restarted gateway may serve a new page).
const STATIC_CACHE: &str = "no-cache";

/// The demo's HTTP routes, for `WsConfig::http_routes`, in demo mode only: `None` with a
/// real mesh, so none of them exists there (404, `/healthz` aside). `signing_secret` is the
/// HS256 secret the gateway verifies with; without one (a public-key setup) there is no
/// `/demo/token`.
pub fn http_routes(
    demo_mode: bool,
    signing_secret: Option<&str>,
    claims: TokenClaims,
    origins: OriginPolicyHandle,
) -> Option<Arc<dyn HttpRoutes>> {
    if !demo_mode {
        return None;
    }
    let routes = DemoRoutes {
        secret: signing_secret.map(|s| s.as_bytes().to_vec()),
        claims,
        origins,
        token_lifetime: PAGE_TOKEN_LIFETIME,
    };
    Some(Arc::new(routes))
}

/// `/`, `/demo.js`, `/demo.css`, `/demo.svg`, `/nuropb-gateway.js` and `/demo/token`.
struct DemoRoutes {
    secret: Option<Vec<u8>>,
    claims: TokenClaims,
    /// The origins allowed at the upgrade may also read the library and the token
    /// (CORS), so that a page served elsewhere can use the demo.
    origins: OriginPolicyHandle,
    token_lifetime: Duration,
}

impl fmt::Debug for DemoRoutes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("DemoRoutes")
            .field("token", &self.secret.is_some())
            .field("token_lifetime", &self.token_lifetime)
            .finish_non_exhaustive()
    }
}

impl HttpRoutes for DemoRoutes {
    fn respond(&self, request: &HttpRequest<'_>) -> Option<HttpResponse> {
        let response = match request.path() {
            "/" => HttpResponse::ok(HTML, PAGE_HTML.as_bytes())
                .cache_control(STATIC_CACHE)
                .header("content-security-policy", page_csp(request.header("host")))
                .header("referrer-policy", "no-referrer"),
            "/demo.js" => {
                HttpResponse::ok(JAVASCRIPT, PAGE_JS.as_bytes()).cache_control(STATIC_CACHE)
            }
            "/demo.css" => HttpResponse::ok(CSS, PAGE_CSS.as_bytes()).cache_control(STATIC_CACHE),
            "/demo.svg" => HttpResponse::ok(SVG, ICON_SVG.as_bytes()).cache_control(STATIC_CACHE),
            "/nuropb-gateway.js" => self.cors(
                request,
                HttpResponse::ok(JAVASCRIPT, LIBRARY_JS.as_bytes()).cache_control(STATIC_CACHE),
            ),
            "/demo/token" => {
                let secret = self.secret.as_deref()?;
                let response = match demo_token_for(secret, self.token_lifetime, &self.claims) {
                    Ok((token, expires_at)) => {
                        let body = json!({"token": token, "expires_at": expires_at});
                        HttpResponse::ok(JSON, Cow::Owned(body.to_string().into_bytes()))
                    }
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "cannot sign a demo token");
                        HttpResponse::new(500, JSON, &br#"{"error":"cannot sign a token"}"#[..])
                    }
                };
                self.cors(request, response)
            }
            _ => return None,
        };
        Some(response)
    }
}

impl DemoRoutes {
    /// Lets an allowed browser origin read `response` (no credentials: the token route
    /// needs none).
    fn cors(&self, request: &HttpRequest<'_>, response: HttpResponse) -> HttpResponse {
        let response = response.header("vary", "Origin");
        match request.header("origin") {
            Some(origin) if self.origins.allows(origin) => {
                response.header("access-control-allow-origin", origin.to_owned())
            }
            _ => response,
        }
    }
}

/// The page's policy: its own script and style only, WebSockets to this gateway only.
/// `'self'` covers `ws:`/`wss:` to the same host in CSP 3 browsers; the explicit entries
/// are for older ones, and only for a `Host` that is a plain host and port (it is the
/// client's input, echoed into a header).
fn page_csp(host: Option<&str>) -> String {
    let plain_host = |h: &&str| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
    };
    let sockets = match host.filter(plain_host) {
        Some(host) => format!(" ws://{host} wss://{host}"),
        None => String::new(),
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'{sockets}; \
         img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// A random dev secret (hex), for in-memory mode without a configured one.
pub fn generate_secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use handler_core::{JwtAuthenticator, JwtConfig, JwtKey};
    use ws_adapter::answer_http;

    use super::*;
    use ws_adapter::OriginPolicy;

    const SECRET: &str = "a-demo-secret-of-32-bytes-------";

    fn routes(demo_mode: bool, secret: Option<&str>) -> Option<Arc<dyn HttpRoutes>> {
        let origins = OriginPolicy::new(&["localhost"]).unwrap().into();
        http_routes(demo_mode, secret, TokenClaims::default(), origins)
    }

    fn get(
        routes: &Option<Arc<dyn HttpRoutes>>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        answer_http(routes.as_deref(), "GET", path, headers)
    }

    #[test]
    fn demo_routes_exist_in_demo_mode_only() {
        let real_mesh = routes(false, Some(SECRET));
        assert!(real_mesh.is_none());
        let demo = routes(true, Some(SECRET));
        for path in ["/", "/demo.js", "/demo.css", "/demo.svg", "/nuropb-gateway.js", "/demo/token"]
        {
            assert_eq!(get(&real_mesh, path, &[]).status(), 404, "{path}");
            assert_eq!(get(&demo, path, &[]).status(), 200, "{path}");
        }
        assert_eq!(get(&real_mesh, "/healthz", &[]).status(), 200);
        assert_eq!(get(&demo, "/healthz", &[]).status(), 200);
        assert_eq!(get(&demo, "/demo/other", &[]).status(), 404);
        // Without a secret to sign with, no token route; the page is still there.
        let unsigned = routes(true, None);
        assert_eq!(get(&unsigned, "/demo/token", &[]).status(), 404);
        assert_eq!(get(&unsigned, "/", &[]).status(), 200);
    }

    #[test]
    fn files_are_served_with_exact_types_and_the_page_with_its_policy() {
        let demo = routes(true, Some(SECRET));
        for (path, content_type, body) in [
            ("/", HTML, PAGE_HTML),
            ("/demo.js", JAVASCRIPT, PAGE_JS),
            ("/demo.css", CSS, PAGE_CSS),
            ("/demo.svg", SVG, ICON_SVG),
            ("/nuropb-gateway.js", JAVASCRIPT, LIBRARY_JS),
        ] {
            let answer = get(&demo, path, &[("host", "127.0.0.1:8080")]);
            assert_eq!(answer.content_type(), content_type, "{path}");
            assert_eq!(answer.body(), body.as_bytes(), "{path}");
            assert_eq!(answer.cache_control_value(), STATIC_CACHE, "{path}");
        }
        assert!(LIBRARY_JS.contains("export function connect("));
        assert!(PAGE_JS.contains(r#"from "/nuropb-gateway.js""#));
        // No inline script or style: the policy forbids them.
        assert!(!PAGE_HTML.contains("<script>") && !PAGE_HTML.contains("<style"));
        let page = get(&demo, "/", &[("host", "127.0.0.1:8080")]);
        let csp = page.header_value("content-security-policy").unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"),
            "{csp}"
        );
        assert!(
            csp.contains("connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;"),
            "{csp}"
        );
        // A Host that is not a plain host and port is not echoed into the policy.
        let odd = get(&demo, "/", &[("host", "x; script-src *")]);
        let csp = odd.header_value("content-security-policy").unwrap();
        assert!(csp.contains("connect-src 'self';") && !csp.contains('*'), "{csp}");
    }

    #[test]
    fn a_token_is_fresh_each_time_and_passes_the_gateways_check() {
        let demo = routes(true, Some(SECRET));
        let auth =
            JwtAuthenticator::new(JwtConfig::new(JwtKey::Hs256Secret(SECRET.as_bytes().to_vec())))
                .unwrap();
        let mut tokens = Vec::new();
        for _ in 0..2 {
            let answer = get(&demo, "/demo/token", &[]);
            assert_eq!(answer.content_type(), JSON);
            assert_eq!(answer.cache_control_value(), "no-store");
            let body: Value = serde_json::from_slice(answer.body()).unwrap();
            let token = body["token"].as_str().unwrap().to_owned();
            let expires_at = body["expires_at"].as_u64().unwrap();
            let now = jsonwebtoken::get_current_timestamp();
            assert!((now + 14 * 60..=now + 15 * 60).contains(&expires_at), "{expires_at}");
            let user = auth.verify(&token).unwrap();
            assert_eq!(user.user_id.as_str(), "demo-user");
            // The gateway's expiry is `exp` plus its leeway.
            assert!(user.expires_at.is_some_and(|e| e >= expires_at), "{:?}", user.expires_at);
            tokens.push(token);
        }
        assert_ne!(tokens[0], tokens[1]);
        let other =
            JwtAuthenticator::new(JwtConfig::new(JwtKey::Hs256Secret(b"other".to_vec()))).unwrap();
        assert!(other.verify(&tokens[0]).is_err());
    }

    #[test]
    fn allowed_origins_may_read_the_library_and_the_token() {
        let demo = routes(true, Some(SECRET));
        for path in ["/nuropb-gateway.js", "/demo/token"] {
            let allowed = get(&demo, path, &[("origin", "http://localhost:3000")]);
            assert_eq!(
                allowed.header_value("access-control-allow-origin"),
                Some("http://localhost:3000"),
                "{path}"
            );
            assert_eq!(allowed.header_value("vary"), Some("Origin"));
            let other = get(&demo, path, &[("origin", "https://evil.example")]);
            assert_eq!(other.header_value("access-control-allow-origin"), None, "{path}");
        }
        let page = get(&demo, "/", &[("origin", "http://localhost:3000")]);
        assert_eq!(page.header_value("access-control-allow-origin"), None);
    }
}
