//! The three routes: one request in, one response out. Paths are matched before methods
//! (an unknown path is 404 whatever the method), `GET` and `HEAD` are the only methods
//! (405 with `Allow` otherwise), and only origin-form targets are accepted (400 for
//! `http://host/path`, which hyper would otherwise take).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;

use crate::source::OpsSource;

/// The `Content-Type` of `/metrics`: `prometheus_client` writes OpenMetrics 1.0 text.
pub(crate) const METRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to `request`.
pub(crate) fn respond<B>(
    request: &Request<B>,
    source: &dyn OpsSource,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    enum Endpoint {
        Health,
        Ready,
        Metrics,
    }
    if request.uri().authority().is_some() || request.uri().scheme().is_some() {
        return text(StatusCode::BAD_REQUEST, "bad request: bad request target".to_owned());
    }
    let endpoint = match request.uri().path() {
        "/healthz" => Endpoint::Health,
        "/readyz" => Endpoint::Ready,
        "/metrics" => Endpoint::Metrics,
        _ => return text(StatusCode::NOT_FOUND, "not found".to_owned()),
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_owned());
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = match endpoint {
        Endpoint::Health => text(StatusCode::OK, "ok".to_owned()),
        Endpoint::Ready => match source.ready() {
            Ok(()) => text(StatusCode::OK, "ok".to_owned()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
        },
        Endpoint::Metrics => {
            let mut body = String::with_capacity(16 << 10);
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => with_type(StatusCode::OK, METRICS_CONTENT_TYPE, body),
                // Only a collector or label encoder of ours can fail; say so rather than
                // serve half a scrape.
                Err(_) => {
                    tracing::error!("metrics could not be encoded");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable".to_owned())
                }
            }
        }
    };
    if request.method() == Method::HEAD {
        // The same head as `GET` (its `Content-Length` included), no body.
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, TEXT, body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let length = body.len();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ready;
    impl OpsSource for Ready {
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn paths_before_methods_and_head_keeps_the_length() {
        let registry = Registry::default();
        let check = |method: &str, target: &str, status: u16| {
            let request =
                Request::builder().method(method).uri(target).body(()).unwrap_or_default();
            let response = respond(&request, &Ready, &registry);
            assert_eq!(response.status().as_u16(), status, "{method} {target}");
            response
        };
        check("GET", "/healthz", 200);
        check("GET", "/nope", 404);
        check("POST", "/nope", 404);
        let post = check("POST", "/readyz", 405);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        check("GET", "http://ops/healthz", 400);
        let head = check("HEAD", "/healthz", 200);
        assert_eq!(head.headers()[header::CONTENT_LENGTH], "2");
        let metrics = check("GET", "/metrics", 200);
        assert_eq!(metrics.headers()[header::CONTENT_TYPE], METRICS_CONTENT_TYPE);
    }
}
