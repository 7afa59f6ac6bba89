//! Just enough HTTP/1.1 for a few fixed `GET` endpoints: find where a request head ends,
//! parse the request line, check the header lines (RFC 9112), and render responses that
//! always close the connection. Request bodies are never read.

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

/// Parses a complete request head (as delimited by [`head_end`]).
pub(crate) fn parse_head(head: &[u8]) -> Result<RequestHead<'_>, HeadError> {
    use HeadError::Malformed;
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // RFC 9112 §2.2: empty lines before the request line are ignored.
    let request_line = lines.by_ref().find(|l| !l.is_empty()).ok_or(Malformed("empty request"))?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed("bad request line"));
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return Err(Malformed("bad method"));
    }
    // Origin form only (`/path?query`): no absolute URLs, no `*`.
    if target.first() != Some(&b'/') || !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(Malformed("bad request target"));
    }
    match version {
        b"HTTP/1.1" | b"HTTP/1.0" => {}
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(HeadError::UnsupportedVersion);
        }
        _ => return Err(Malformed("bad HTTP version")),
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        check_header_line(line)?;
    }
    // Both are ASCII by now, so these conversions cannot fail.
    let method = std::str::from_utf8(method).map_err(|_| Malformed("bad method"))?;
    let target = std::str::from_utf8(target).map_err(|_| Malformed("bad request target"))?;
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Ok(RequestHead { method, path })
}

/// `name: value`, the name a token right before the colon (RFC 9112 §5.1: whitespace there
/// must be refused), the value without control characters other than tab.
fn check_header_line(line: &[u8]) -> Result<(), HeadError> {
    use HeadError::Malformed;
    if line.starts_with(b" ") || line.starts_with(b"\t") {
        return Err(Malformed("obsolete line folding"));
    }
    let colon =
        line.iter().position(|&b| b == b':').ok_or(Malformed("header line without a colon"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(Malformed("bad header name"));
    }
    if value.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err(Malformed("control character in a header value"));
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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
        check("GET / HTTP/1.1 extra\r\n\r\n", Err(Malformed("bad request line")));
        check("G(T / HTTP/1.1\r\n\r\n", Err(Malformed("bad method")));
        check("GET http://a/ HTTP/1.1\r\n\r\n", Err(Malformed("bad request target")));
        check("OPTIONS * HTTP/1.1\r\n\r\n", Err(Malformed("bad request target")));
        check("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Err(Malformed("bad request target")));
        check("GET / HTTP/2.0\r\n\r\n", Err(UnsupportedVersion));
        check("GET / HTTP/1.1x\r\n\r\n", Err(Malformed("bad HTTP version")));
        check("GET / http/1.1\r\n\r\n", Err(Malformed("bad HTTP version")));
        check("GET / HTTP/1.1\r\nNoColon\r\n\r\n", Err(Malformed("header line without a colon")));
        check("GET / HTTP/1.1\r\nHost : x\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\n: x\r\n\r\n", Err(Malformed("bad header name")));
        check("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", Err(Malformed("obsolete line folding")));
        check(
            "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            Err(Malformed("control character in a header value")),
        );
        check(
            "GET / HTTP/1.1\r\nA: \0\r\n\r\n",
            Err(Malformed("control character in a header value")),
        );
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
