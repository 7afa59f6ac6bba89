//! `OriginPolicy`: which browser origins may open a WebSocket (checked at the upgrade, 403
//! otherwise). Entries are parsed once, at construction, and an entry that cannot be
//! parsed is refused with its text: a policy that silently matches nothing is worse than a
//! gateway that does not start.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::error::WsError;

/// Allowed browser origins: a host matches an entry when it equals it or is a subdomain of
/// it on a dot boundary (`app.example.com` matches `example.com`, `evil-example.com` does
/// not). An entry with a leading dot (`.example.com`, as nuropb-gw configurations write
/// it) matches subdomains only, which is what nuropb-gw's suffix match made of it. An entry
/// with a port matches only that port, one with a scheme (`https://example.com`) only that
/// scheme. `*` allows every origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    allow_all: bool,
    entries: HashSet<OriginEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OriginEntry {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
    // `.example.com`: `host` is `example.com`, and `example.com` itself does not match.
    subdomains_only: bool,
}

/// The [`OriginPolicy`] in force, replaceable while the server runs (a configuration
/// reload): every upgrade reads the current one; upgrades already checked are not
/// re-checked. Cheap to clone; clones share the policy.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicyHandle(Arc<RwLock<Arc<OriginPolicy>>>);

impl OriginPolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: OriginPolicy) -> Self {
        OriginPolicyHandle(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The policy in force (the lock is held for the clone of an `Arc` only).
    pub fn current(&self) -> Arc<OriginPolicy> {
        // Poisoning cannot leave a half-written `Arc`: ignored.
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts `policy` in force for every upgrade from now on.
    pub fn set(&self, policy: OriginPolicy) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// [`OriginPolicy::allows`] of the policy in force.
    pub fn allows(&self, origin: &str) -> bool {
        self.current().allows(origin)
    }
}

impl From<OriginPolicy> for OriginPolicyHandle {
    fn from(policy: OriginPolicy) -> Self {
        OriginPolicyHandle::new(policy)
    }
}

impl OriginPolicy {
    /// Builds the policy from entries such as `example.com`, `.example.com`,
    /// `https://example.com`, `localhost:3000` or `*`. Empty entries (a trailing comma) are
    /// skipped; any other entry that is not a host with an optional scheme and port
    /// (`*.example.com`, `example.com:http`, `https://example.com/app`, `https://`) is an
    /// error naming it.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Self, WsError> {
        let mut policy = OriginPolicy::default();
        for raw in entries {
            let e = raw.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            if e == "*" {
                policy.allow_all = true;
                continue;
            }
            let entry = parse_entry(e).map_err(|reason| WsError::InvalidOrigin {
                entry: raw.as_ref().to_owned(),
                reason,
            })?;
            policy.entries.insert(entry);
        }
        Ok(policy)
    }

    /// Whether an `Origin` header value is allowed. Requests without `Origin` are not
    /// browser cross-origin requests and are decided by the caller (allowed, as nuropb-gw).
    pub fn allows(&self, origin: &str) -> bool {
        if self.allow_all {
            return true;
        }
        let Some((scheme, host, port)) = parse_origin(origin) else {
            return false;
        };
        let scheme = Some(scheme);
        self.entries.iter().any(|entry| {
            let allowed = &entry.host;
            let subdomain = host.len() > allowed.len()
                && host.ends_with(allowed.as_str())
                && host.as_bytes()[host.len() - allowed.len() - 1] == b'.';
            let host_ok = subdomain || (!entry.subdomains_only && host == *allowed);
            let port_ok = entry.port.is_none() || entry.port == port;
            let scheme_ok = entry.scheme.is_none() || entry.scheme == scheme;
            host_ok && port_ok && scheme_ok
        })
    }
}

/// One configured entry, strictly: what `allows` would silently never match is an error.
fn parse_entry(e: &str) -> Result<OriginEntry, &'static str> {
    let scheme = scheme_of(e);
    if scheme.as_deref().is_some_and(|s| s.is_empty() || !s.bytes().all(is_scheme_char)) {
        return Err("bad scheme");
    }
    let rest = e.find("://").map_or(e, |i| &e[i + 3..]);
    if rest.contains(['/', '?', '#']) {
        return Err("an origin has no path, query or fragment");
    }
    if rest.contains('@') {
        return Err("an origin has no user name");
    }
    if rest.contains('*') {
        return Err("no wildcards: `example.com` already allows its subdomains");
    }
    let (rest, subdomains_only) = match rest.strip_prefix('.') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (host, port) = parse_host_port(rest).ok_or("not a host with an optional port")?;
    let ipv6 = rest.starts_with('[');
    let host_ok = if ipv6 {
        !subdomains_only && host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        host.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !host_ok {
        return Err("bad host name");
    }
    Ok(OriginEntry { scheme, host, port, subdomains_only })
}

/// An `Origin` header value, strictly `scheme://host[:port]` (RFC 6454 serialization) →
/// (lowercase scheme, lowercase host, port); anything else (`null`, a path, userinfo, a
/// backslash, spaces, percent escapes) is `None`, so refused. Lenient parsing is what let
/// `https://evil.com\@example.com` pass for `example.com`: a browser (WHATWG URL parsing)
/// reads its host as `evil.com`, so no second opinion on what the host is may exist here.
fn parse_origin(origin: &str) -> Option<(String, String, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    if scheme.is_empty()
        || !scheme.as_bytes()[0].is_ascii_alphabetic()
        || !scheme.bytes().all(is_scheme_char)
    {
        return None;
    }
    // Only what a serialized origin can hold: host name characters, IPv6 brackets, a port.
    let allowed =
        |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']');
    if rest.is_empty() || !rest.bytes().all(allowed) {
        return None;
    }
    let (host, port) = parse_host_port(rest)?;
    let host_ok = if rest.starts_with('[') {
        host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        host.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    host_ok.then(|| (scheme.to_ascii_lowercase(), host, port))
}

fn is_scheme_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')
}

/// The lowercase scheme of `scheme://…`, if any.
fn scheme_of(s: &str) -> Option<String> {
    s.find("://").map(|i| s[..i].to_ascii_lowercase())
}

/// `scheme://host:port/path` or `host:port` → (lowercase host, port).
fn parse_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let rest = match s.find("://") {
        Some(i) => &s[i + 3..],
        None => s,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    // Drop userinfo, which has no place in an Origin but must not fool the match.
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        // IPv6 literal.
        let end = stripped.find(']')?;
        let host = &stripped[..end];
        let port = stripped[end + 1..].strip_prefix(':').map(str::parse::<u16>);
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p.parse::<u16>())),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => return None,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[test]
    fn a_handle_serves_the_policy_last_set_to_every_clone() {
        let handle = OriginPolicyHandle::new(OriginPolicy::new(&["one.example"]).unwrap());
        let clone = handle.clone();
        assert!(clone.allows("https://one.example") && !clone.allows("https://two.example"));
        handle.set(OriginPolicy::new(&["two.example"]).unwrap());
        assert!(!clone.allows("https://one.example") && clone.allows("https://two.example"));
    }

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::new(entries).unwrap()
    }

    #[test]
    fn origin_matching() {
        let policy = policy(&["example.com", "localhost:3000"]);
        for (origin, allowed) in [
            ("https://example.com", true),
            ("https://app.example.com", true),
            ("https://a.b.example.com", true),
            ("https://APP.Example.COM", true),
            ("https://example.com:8443", true),
            ("https://evil-example.com", false),
            ("https://example.com.evil.org", false),
            ("https://notexample.com", false),
            ("https://example.org", false),
            ("http://localhost:3000", true),
            ("http://localhost:3001", false),
            ("http://localhost", false),
            ("https://example.com@evil.org", false),
            ("null", false),
            ("", false),
            ("https://", false),
            // Only exactly `scheme://host[:port]`: browsers read the host of these
            // differently from a lenient parser (WHATWG gives `evil.com` for the first).
            ("https://evil.com\\@example.com", false),
            ("https://evil.com\\.example.com", false),
            ("https://example.com/", false),
            ("https://example.com/path", false),
            ("https://user@example.com", false),
            ("https://example.com:", false),
            ("https://example.com:99999", false),
            ("https://exa mple.com", false),
            ("https://example.com%2F@evil.org", false),
            ("https://example.com\nX-Forged: 1", false),
            ("example.com", false),
            ("//example.com", false),
            ("https://example..com", false),
            ("https://[::1]:3000", false),
        ] {
            assert_eq!(policy.allows(origin), allowed, "origin {origin:?}");
        }
        assert!(self::policy(&["*"]).allows("https://anything.test"));
        let https_only = self::policy(&["https://example.com"]);
        assert!(https_only.allows("https://app.example.com"));
        assert!(https_only.allows("HTTPS://example.com"));
        assert!(!https_only.allows("http://example.com"), "scheme pinned by the entry");
        assert!(!self::policy(&[]).allows("https://example.com"));
        assert!(!OriginPolicy::default().allows("https://example.com"));
        let v6 = self::policy(&["[::1]:3000"]);
        assert!(v6.allows("http://[::1]:3000"));
        assert!(!v6.allows("http://[::1]:3001"));
    }

    #[test]
    fn a_leading_dot_means_subdomains_only_as_in_nuropb_gw() {
        let policy = policy(&[".example.com", "https://.example.org:8443"]);
        for (origin, allowed) in [
            ("https://app.example.com", true),
            ("https://a.b.example.com", true),
            ("https://example.com", false),
            ("https://evil-example.com", false),
            ("https://app.example.org:8443", true),
            ("https://app.example.org", false),
            ("http://app.example.org:8443", false),
            ("https://example.org:8443", false),
        ] {
            assert_eq!(policy.allows(origin), allowed, "origin {origin:?}");
        }
    }

    #[test]
    fn entries_that_cannot_be_parsed_are_refused_by_name() {
        for (entry, reason) in [
            ("*.example.com", "no wildcards: `example.com` already allows its subdomains"),
            ("example.com:http", "not a host with an optional port"),
            ("https://example.com/app", "an origin has no path, query or fragment"),
            ("https://", "not a host with an optional port"),
            ("user@example.com", "an origin has no user name"),
            ("..example.com", "bad host name"),
            ("exa mple.com", "bad host name"),
            ("://example.com", "bad scheme"),
        ] {
            let err = OriginPolicy::new(&["example.org", entry]).unwrap_err();
            assert!(
                matches!(&err, WsError::InvalidOrigin { entry: e, reason: r } if e == entry && *r == reason),
                "{entry:?}: {err:?}"
            );
            assert!(err.to_string().contains(entry), "{err}");
        }
        // A trailing comma is not an entry.
        assert_eq!(OriginPolicy::new(&["example.com", " "]).unwrap(), policy(&["example.com"]));
        for entry in
            ["[::1]:3000", "127.0.0.1", "localhost", "example.com.", "xn--bcher-kva.example"]
        {
            assert!(OriginPolicy::new(&[entry]).is_ok(), "{entry:?}");
        }
    }
}
