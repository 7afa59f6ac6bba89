//! Just enough HTTP/1.1 for a few fixed `GET` endpoints: find where a request head ends,
//! parse it with `httparse` (RFC 9112), and render responses that always close the
//! connection. Request bodies are never read.

/// The `Allow` value of 405 responses.
pub(crate) const ALLOWED_METHODS: &str = "GET, HEAD";

/// Where the head in `buf` ends (just past the empty line), if it does. `from` is where the
/// previous call stopped looking (0 the first time): the terminator is at most 3 bytes
/// (`\n\r\n`; a bare `\n\n` is accepted too), so only its last 2 bytes are looked at again.
pub(crate) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    let mut i = start;
    while let Some(offset) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + offset;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// The parts of a request the endpoint looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHead<'a> {
    /// Case-sensitive, as HTTP methods are.
    pub(crate) method: &'a str,
    /// The target without its query string.
    pub(crate) path: &'a str,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not HTTP/1.x syntax (400).
    Malformed(&'static str),
    /// A well-formed version other than 1.0 and 1.1 (505).
    UnsupportedVersion,
}

/// Parses a complete request head (as delimited by [`head_end`]) with `httparse`, which
/// checks the request line and the header lines (RFC 9112: tokens, no whitespace before a
/// colon, no obsolete line folding, no control characters in values). What it leaves to us:
/// the origin form of the target, and telling another HTTP version (505) from garbage (400).
pub(crate) fn parse_head(head: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    use HeadError::Malformed;
    // A header line ends with `\n`, so there are never more headers than line ends: the
    // head's size stays the only limit on how many it may carry.
    let line_ends = head.iter().filter(|&&b| b == b'\n').count();
    let mut headers = vec![httparse::EMPTY_HEADER; line_ends];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // `head_end` found the empty line; httparse skips empty lines before the request
        // line (RFC 9112 §2.2), so only a head of empty lines, or nothing, gets here.
        Ok(httparse::Status::Partial) => return Err(Malformed("empty request")),
        Err(httparse::Error::Version) => return Err(version_error(head)),
        Err(e) => return Err(Malformed(describe(e))),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        // A complete parse always has both.
        return Err(Malformed("bad request line"));
    };
    // Origin form only (`/path?query`): no absolute URLs, no `*`; ASCII only, which
    // httparse does not require.
    if !is_origin_form(target.as_bytes()) {
        return Err(Malformed("bad request target"));
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Ok(RequestHead { method, path })
}

/// httparse only knows HTTP/1.0 and 1.1 and reports anything else in the version place as
/// one error. A well-formed `HTTP/d.d` after a valid target is another version (505);
/// everything else, the HTTP/2 preface (`PRI * HTTP/2.0`) included, is not HTTP/1.x (400).
fn version_error(head: &[u8]) -> HeadError {
    let request_line = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (_method, target, version) = (parts.next(), parts.next(), parts.next());
    if !target.is_some_and(is_origin_form) {
        return HeadError::Malformed("bad request target");
    }
    match version {
        Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor])
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            HeadError::UnsupportedVersion
        }
        _ => HeadError::Malformed("bad HTTP version"),
    }
}

fn is_origin_form(target: &[u8]) -> bool {
    target.first() == Some(&b'/') && target.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The reason given in a 400 for an httparse error.
fn describe(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Token => "bad request line",
        httparse::Error::NewLine => "bad line ending",
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::Version => "bad HTTP version",
        httparse::Error::Status => "bad request line",
        // Not reached: there is a header slot for every line.
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// The statuses the endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    ServiceUnavailable,
    VersionNotSupported,
}

impl Status {
    pub(crate) fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::HeadTooLarge => 431,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// A complete response. Every response closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: Status,
    pub(crate) content_type: &'static str,
    pub(crate) body: String,
}

impl Response {
    /// A `text/plain` response.
    pub(crate) fn text(status: Status, body: impl Into<String>) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }

    /// The bytes to send; `with_body` is false for `HEAD`, which gets the same headers.
    pub(crate) fn encode(&self, with_body: bool) -> Vec<u8> {
        let allow = if self.status == Status::MethodNotAllowed {
            format!("Allow: {ALLOWED_METHODS}\r\n")
        } else {
            String::new()
        };
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.body.len(),
        );
        let mut bytes = head.into_bytes();
        if with_body {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_a_head_however_it_arrives() {
        let check = |buf: &[u8], expected: Option<usize>| {
            assert_eq!(head_end(buf, 0), expected, "{:?}", String::from_utf8_lossy(buf));
            // Fed byte by byte, resuming where the last look stopped.
            let found = (1..=buf.len()).find_map(|len| head_end(&buf[..len], len - 1));
            assert_eq!(found, expected, "incremental {:?}", String::from_utf8_lossy(buf));
        };
        check(b"GET / HTTP/1.1\r\n\r\n", Some(18));
        check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", Some(27));
        check(b"GET / HTTP/1.1\n\n", Some(16));
        check(b"GET / HTTP/1.1\nHost: a\n\r\n", Some(25));
        check(b"GET / HTTP/1.1\r\nHost: a\r\n", None);
        check(b"GET / HTTP/1.1\r\n\r", None);
        check(b"", None);
    }

    #[test]
    fn parses_request_heads() {
        let check = |head: &str, expected: Result<(&str, &str), HeadError>| {
            let got = parse_head(head.as_bytes()).map(|h| (h.method, h.path));
            assert_eq!(got, expected, "{head:?}");
        };
        use HeadError::{Malformed, UnsupportedVersion};
        check("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Ok(("GET", "/metrics")));
        check("\r\nHEAD /healthz?verbose=1 HTTP/1.0\r\n\r\n", Ok(("HEAD", "/healthz")));
        check(
            "GET / HTTP/1.1\r\nX-Empty:\r\nX-Tab: a\tb\r\nX-Utf8: \u{e9}\r\n\r\n",
            Ok(("GET", "/")),
        );
        check("get /x HTTP/1.1\r\n\r\n", Ok(("get", "/x")));
        check("", Err(Malformed("empty request")));
        check("\r\n\r\n", Err(Malformed("empty request")));
        check("hello\r\n\r\n", Err(Malformed("bad request line")));
        check("GET  / HTTP/1.1\r\n\r\n", Err(Malformed("bad request line")));
        check("GET / HTTP/1.1 extra\r\n\r\n", Err(Malformed("bad line ending")));
        check("G(T / HTTP/1.1\r\n\r\n", Err(Malformed("bad request line")));
        check("GET http://a/ HTTP/1.1\r\n\r\n", Err(Malformed("bad request target")));
        check("OPTIONS * HTTP/1.1\r\n\r\n", Err(Malformed("bad request target")));
        check("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Err(Malformed("bad request target")));
        check("GET / HTTP/2.0\r\n\r\n", Err(UnsupportedVersion));
        check("GET / HTTP/3.0\r\nHost: x\r\n\r\n", Err(UnsupportedVersion));
        check("GET /caf\u{e9} HTTP/1.1\r\n\r\n", Err(Malformed("bad request target")));
        check("GET / HTTP/1.1\r\nA: \u{7f}\r\n\r\n", Err(Malformed("bad header value")));
        check("GET / HTTP/1.1x\r\n\r\n", Err(Malformed("bad line ending")));
        check("GET / http/1.1\r\n\r\n", Err(Malformed("bad HTTP version")));
        check("GET / HTTP/1.1\r\nNoColon\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\nHost : x\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\n: x\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", Err(Malformed("bad header value")));
        check("GET / HTTP/1.1\r\nA: \0\r\n\r\n", Err(Malformed("bad header value")));
    }

    #[test]
    fn responses_close_the_connection_and_head_keeps_the_length() {
        let r = Response::text(Status::MethodNotAllowed, "method not allowed\n");
        let full = String::from_utf8(r.encode(true)).unwrap_or_default();
        assert_eq!(
            full,
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 19\r\nCache-Control: no-store\r\nAllow: GET, HEAD\r\n\
             Connection: close\r\n\r\nmethod not allowed\n"
        );
        let head_only = String::from_utf8(r.encode(false)).unwrap_or_default();
        assert!(head_only.ends_with("Content-Length: 19\r\nCache-Control: no-store\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n"));
    }
}
