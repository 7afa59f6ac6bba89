//! Plain HTTP on the WebSocket port, served by hyper: a head without any field of a
//! WebSocket handshake (see `handshake::classify`) is replayed to hyper's HTTP/1.1 server,
//! which answers `GET /healthz` itself (503 once the gateway is shutting down, so that a
//! load balancer probing this port stops sending clients during the lame-duck window) and
//! every other request from the embedder's [`HttpRoutes`] (404 when none answers).
//!
//! Bounded as an upgrade is: the head was read within `max_head_bytes` and
//! `handshake_timeout` before it gets here, the whole exchange (answer written included)
//! ends within what is left of `handshake_timeout`, one request per connection (no
//! keep-alive, so no idle connection waits for a second request), no request body (413),
//! and the connection holds its handshake slot while it is served. WebSocket sessions never
//! come here and pay nothing for it.
//!
//! No hyper or `http` type appears in the API: routes see an [`HttpRequest`] and answer an
//! [`HttpResponse`], both ours.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

/// The answer to every page that does not set its own: nothing may load or frame it.
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Plain HTTP routes the embedder serves on the WebSocket port next to the upgrades.
///
/// Called for `GET` and `HEAD` requests without a body, after the built-in `/healthz`
/// (which a route cannot replace); `None` → 404. Synchronous on purpose: a route answers
/// from memory (a page, a script, a token it signs), it does not call out.
pub trait HttpRoutes: Send + Sync + fmt::Debug + 'static {
    /// The answer to `request`, or `None` when no route has this path.
    fn respond(&self, request: &HttpRequest<'_>) -> Option<HttpResponse>;
}

/// A plain HTTP request as a route sees it: `GET` or `HEAD`, no body.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    parts: &'a http::request::Parts,
}

impl HttpRequest<'_> {
    /// `true` for `HEAD` (the answer's body is not sent; its length is), `false` for `GET`.
    pub fn is_head(&self) -> bool {
        self.parts.method == Method::HEAD
    }

    /// The path of the target, e.g. `/demo/token`.
    pub fn path(&self) -> &str {
        self.parts.uri.path()
    }

    /// The query of the target without `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }

    /// The first field named `name` (case-insensitive), when it is visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A route's answer. Every answer also gets `X-Content-Type-Options: nosniff`, and a
/// `Content-Security-Policy` of `default-src 'none'; frame-ancestors 'none'` unless it sets
/// its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    status: u16,
    content_type: &'static str,
    cache_control: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Cow<'static, [u8]>,
}

impl HttpResponse {
    /// A 200 answer with this exact `Content-Type` (e.g. `text/html; charset=utf-8`) and
    /// body, `Cache-Control: no-store` unless [`HttpResponse::cache_control`] says more.
    pub fn ok(content_type: &'static str, body: impl Into<Cow<'static, [u8]>>) -> Self {
        HttpResponse::new(200, content_type, body)
    }

    /// An answer with this status, `Content-Type` and body (`Cache-Control: no-store`).
    pub fn new(
        status: u16,
        content_type: &'static str,
        body: impl Into<Cow<'static, [u8]>>,
    ) -> Self {
        HttpResponse {
            status,
            content_type,
            cache_control: "no-store",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Replaces `Cache-Control` (default `no-store`).
    #[must_use]
    pub fn cache_control(mut self, value: &'static str) -> Self {
        self.cache_control = value;
        self
    }

    /// Adds a field. A name or value HTTP does not allow turns the answer into a 500
    /// (logged), never into a malformed response.
    #[must_use]
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The `Content-Type`.
    pub fn content_type(&self) -> &'static str {
        self.content_type
    }

    /// The `Cache-Control`.
    pub fn cache_control_value(&self) -> &'static str {
        self.cache_control
    }

    /// The value of the added field `name` (case-insensitive), if any.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// As hyper sends it, with the fields every answer gets.
    fn into_http(self) -> Result<http::Response<Full<Bytes>>, http::Error> {
        let status = StatusCode::from_u16(self.status)?;
        let mut builder = http::Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, self.content_type)
            .header(header::CACHE_CONTROL, self.cache_control)
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
        let mut own_csp = false;
        for (name, value) in self.headers {
            let name = HeaderName::try_from(name)?;
            own_csp |= name == header::CONTENT_SECURITY_POLICY;
            builder = builder.header(name, HeaderValue::try_from(value)?);
        }
        if !own_csp {
            builder = builder.header(header::CONTENT_SECURITY_POLICY, DEFAULT_CSP);
        }
        let body = match self.body {
            Cow::Borrowed(b) => Bytes::from_static(b),
            Cow::Owned(b) => Bytes::from(b),
        };
        builder.body(Full::new(body))
    }
}

fn text(status: u16, body: &'static str) -> HttpResponse {
    HttpResponse::new(status, "text/plain; charset=utf-8", body.as_bytes())
}

/// The answer to one request: the built-in checks and `/healthz`, then the routes.
pub(crate) fn dispatch(
    routes: Option<&dyn HttpRoutes>,
    parts: &http::request::Parts,
    shutting_down: bool,
) -> HttpResponse {
    // A body is never read: the routes take none, and reading it would be a way to hold
    // the connection. hyper closes the connection after this answer.
    let has_body = parts.headers.contains_key(header::TRANSFER_ENCODING)
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0));
    if has_body {
        return text(413, "a request body is not accepted here\n");
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return text(405, "only GET and HEAD are served here\n").header("allow", "GET, HEAD");
    }
    if parts.uri.path() == "/healthz" {
        if shutting_down {
            return text(503, "shutting down\n").header("retry-after", "1");
        }
        return text(200, "ok\n");
    }
    let request = HttpRequest { parts };
    match routes.and_then(|routes| routes.respond(&request)) {
        Some(response) => response,
        None => text(404, "not found\n"),
    }
}

/// The answer the WebSocket port gives to a body-less plain HTTP request, without a
/// socket: `/healthz`, then `routes`, else 404 (405 for a method other than `GET`/`HEAD`).
/// For testing routes. A method, target or field HTTP does not allow is answered 400.
pub fn answer_http(
    routes: Option<&dyn HttpRoutes>,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut builder = http::Request::builder().method(method).uri(target);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    match builder.body(()) {
        Ok(request) => dispatch(routes, &request.into_parts().0, false),
        Err(_) => text(400, "malformed request\n"),
    }
}

/// Serves one plain HTTP request on `stream` (its head replayed first) until `deadline`.
/// Best effort: a client that goes away or is too slow is not an error here.
/// `shutting_down` is asked at each request (the coordinator's state, in `serve`).
pub(crate) async fn serve<S, F>(
    stream: S,
    routes: Option<Arc<dyn HttpRoutes>>,
    shutting_down: F,
    deadline: Instant,
) where
    F: Fn() -> bool + Send + Sync + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (parts, _body) = request.into_parts();
        let response = dispatch(routes.as_deref(), &parts, shutting_down());
        let status = response.status;
        tracing::debug!(method = %parts.method, path = parts.uri.path(), status, "http request");
        let response = response.into_http().unwrap_or_else(|e| {
            let path = parts.uri.path();
            tracing::error!(error = %e, path, "a route's answer is not valid HTTP");
            let mut fallback = http::Response::new(Full::new(Bytes::from_static(b"")));
            *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            fallback
        });
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    // One request per connection: the deadline below bounds it, and no idle keep-alive
    // connection waits for a second one. The head is complete and within `max_head_bytes`
    // already, so hyper's own header timeout (which needs a timer) is not needed.
    builder.keep_alive(false).header_read_timeout(None).max_buf_size(64 << 10);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout_at(deadline, connection).await {
        Err(_) => tracing::debug!("http request timed out"),
        Ok(Err(e)) => tracing::debug!(error = %e, "http connection ended with an error"),
        Ok(Ok(())) => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::handshake::Prefixed;

    #[derive(Debug)]
    struct Page;

    impl HttpRoutes for Page {
        fn respond(&self, request: &HttpRequest<'_>) -> Option<HttpResponse> {
            match request.path() {
                "/" => Some(
                    HttpResponse::ok("text/html; charset=utf-8", &b"<p>hi</p>"[..])
                        .cache_control("no-cache")
                        .header("content-security-policy", "default-src 'self'"),
                ),
                "/echo" => Some(HttpResponse::ok(
                    "text/plain; charset=utf-8",
                    format!("{:?} {:?}", request.query(), request.header("x-a")).into_bytes(),
                )),
                "/bad-header" => Some(HttpResponse::ok("text/plain", &b""[..]).header("x", "a\nb")),
                _ => None,
            }
        }
    }

    /// Sends `request` (the head already read, as the accept path replays it), returns
    /// everything the server wrote until it closed.
    async fn exchange(routes: Option<Arc<dyn HttpRoutes>>, request: &str) -> String {
        exchange_while(routes, request, false).await
    }

    async fn exchange_while(
        routes: Option<Arc<dyn HttpRoutes>>,
        request: &str,
        shutting_down: bool,
    ) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let prefixed = Prefixed::new(request.as_bytes().to_vec(), server);
        let deadline = Instant::now() + Duration::from_secs(5);
        let served = tokio::spawn(serve(prefixed, routes, move || shutting_down, deadline));
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        served.await.unwrap();
        String::from_utf8(answer).unwrap()
    }

    fn status(answer: &str) -> u16 {
        answer.split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn field<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
        let head = answer.split("\r\n\r\n").next().unwrap();
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(answer: &str) -> &str {
        answer.split_once("\r\n\r\n").unwrap().1
    }

    #[tokio::test]
    async fn healthz_answers_503_once_shutting_down_and_the_routes_still_answer() {
        let page: Arc<dyn HttpRoutes> = Arc::new(Page);
        let request = "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";
        let answer = exchange_while(Some(Arc::clone(&page)), request, true).await;
        assert_eq!(status(&answer), 503, "{answer}");
        assert_eq!(body(&answer), "shutting down\n");
        assert_eq!(field(&answer, "retry-after"), Some("1"));
        let answer = exchange_while(Some(page), "GET / HTTP/1.1\r\nHost: gw\r\n\r\n", true).await;
        assert_eq!(status(&answer), 200, "{answer}");
    }

    #[tokio::test]
    async fn requests_are_dispatched_to_healthz_the_routes_or_404() {
        let page: Arc<dyn HttpRoutes> = Arc::new(Page);
        let check = |request: &'static str, expected: u16, expected_body: &'static str| {
            let page = Arc::clone(&page);
            async move {
                let answer = exchange(Some(page), request).await;
                assert_eq!(status(&answer), expected, "{request:?}: {answer}");
                assert_eq!(body(&answer), expected_body, "{request:?}: {answer}");
                assert_eq!(field(&answer, "x-content-type-options"), Some("nosniff"), "{answer}");
                // HTTP/1.0 closes by default; HTTP/1.1 is told so.
                if request.contains("HTTP/1.1\r\n") {
                    assert_eq!(field(&answer, "connection"), Some("close"), "{answer}");
                }
                answer
            }
        };
        let ok = check("GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", 200, "ok\n").await;
        assert_eq!(field(&ok, "content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(field(&ok, "cache-control"), Some("no-store"));
        assert_eq!(field(&ok, "content-security-policy"), Some(DEFAULT_CSP));
        // HEAD: the length of the body, not the body.
        let head = check("HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", 200, "").await;
        assert_eq!(field(&head, "content-length"), Some("3"));
        check("GET /healthz?x=1 HTTP/1.0\r\n\r\n", 200, "ok\n").await;
        let page_answer = check("GET / HTTP/1.1\r\nHost: gw\r\n\r\n", 200, "<p>hi</p>").await;
        assert_eq!(field(&page_answer, "content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(field(&page_answer, "cache-control"), Some("no-cache"));
        assert_eq!(field(&page_answer, "content-security-policy"), Some("default-src 'self'"));
        check("GET /echo?q=1 HTTP/1.1\r\nX-A: b\r\n\r\n", 200, r#"Some("q=1") Some("b")"#).await;
        check("GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n", 404, "not found\n").await;
        check("HEAD /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n", 404, "").await;
        let post = check(
            "POST / HTTP/1.1\r\nHost: gw\r\n\r\n",
            405,
            "only GET and HEAD are served here\n",
        );
        assert_eq!(field(&post.await, "allow"), Some("GET, HEAD"));
        check(
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            413,
            "a request body is not accepted here\n",
        )
        .await;
        check(
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            413,
            "a request body is not accepted here\n",
        )
        .await;
        check("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 200, "<p>hi</p>").await;
        let broken = exchange(Some(page), "GET /bad-header HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&broken), 500, "{broken}");
        // Without routes: /healthz still, everything else 404.
        assert_eq!(status(&exchange(None, "GET /healthz HTTP/1.1\r\n\r\n").await), 200);
        assert_eq!(status(&exchange(None, "GET / HTTP/1.1\r\n\r\n").await), 404);
    }

    #[test]
    fn answers_without_a_socket_are_the_same() {
        let page = Page;
        let check = |method: &str, target: &str, expected: u16| {
            let answer = answer_http(Some(&page), method, target, &[("x-a", "b")]);
            assert_eq!(answer.status(), expected, "{method} {target}");
            answer
        };
        assert_eq!(check("GET", "/healthz", 200).body(), b"ok\n");
        assert_eq!(check("GET", "/echo?q=2", 200).body(), br#"Some("q=2") Some("b")"#);
        check("HEAD", "/", 200);
        check("GET", "/nowhere", 404);
        check("DELETE", "/", 405);
        check("GET", "no path", 400);
    }

    #[tokio::test]
    async fn one_request_per_connection() {
        // A second request on the same connection is not answered: it is closed after one.
        let answer = exchange(
            None,
            "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n",
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_is_dropped_at_the_deadline() {
        // The answer does not fit the 8-byte pipe and the client never reads.
        let (mut client, server) = tokio::io::duplex(8);
        let started = Instant::now();
        let prefixed = Prefixed::new(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), server);
        serve(prefixed, None, || false, started + Duration::from_secs(3)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        // What was written is there; then the server side is gone.
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 8);
        assert!(client.write_all(b"x").await.is_err());
    }
}
