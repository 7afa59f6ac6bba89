//! The real client address behind a proxy: which peers are trusted proxies
//! ([`TrustedProxies`]), the PROXY protocol header (v2 binary, v1 text) read before anything
//! else on a connection ([`read_proxy_header`]), and `Forwarded` (RFC 7239) /
//! `X-Forwarded-For` in the HTTP head ([`forwarded_client`]).
//!
//! Trust is by hop: a header is believed only when the hop that delivered it (the TCP peer,
//! or the PROXY header's source when that is a trusted proxy itself) is trusted, and of a
//! forwarding list the rightmost entry that is not a trusted proxy is the client: everything
//! left of it was written by the client or by proxies nobody vouches for.
//! Parsing the PROXY header itself is the `ppp` crate's; this module only frames it (reads
//! exactly its bytes, bounded) so that nothing after it is consumed.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The proxies whose client-address headers are believed (`WsConfig::trusted_proxies`):
/// addresses and CIDR blocks. Empty by default: no header is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses entries such as `10.0.0.0/8`, `127.0.0.1` or `fd00::/8`; the error names the
    /// entry that is neither an address nor a CIDR block.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<TrustedProxies, String> {
        let nets = entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| format!("not an IP address or CIDR block: {entry:?}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is a trusted proxy. An IPv4-mapped IPv6 address counts as its IPv4
    /// address (a dual-stack listener reports IPv4 peers so).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

/// Most bytes of a PROXY header read (v2: 16 fixed bytes and up to this much in all,
/// addresses and TLVs; v1 is at most 107 bytes by its specification). Larger headers are
/// refused; proxies send well under it (HAProxy's TLVs with TLS details included).
pub(crate) const MAX_PROXY_HEADER: usize = 1024;

/// The v2 signature: the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's most bytes, CRLF included.
const V1_MAX: usize = 107;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyHeaderError {
    /// The peer closed, or the socket failed, before the header ended.
    #[error("connection closed before the PROXY header ended")]
    Closed,
    /// Neither signature: the peer does not speak the PROXY protocol.
    #[error("no PROXY protocol header")]
    Missing,
    /// Over [`MAX_PROXY_HEADER`] (v2) or 107 bytes without a line end (v1).
    #[error("PROXY header too large")]
    TooLarge,
    /// The header does not parse.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Reads exactly one PROXY header (v2 or v1) off `stream`, no byte further. `Some`: the
/// client's address; `None`: a header that names none (v2 `LOCAL`, e.g. the proxy's own
/// health check; v1 `UNKNOWN`; an unspecified or UNIX family), so the peer is the client.
/// The caller bounds the time.
pub(crate) async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // v1's shortest header ("PROXY UNKNOWN\r\n") is 15 bytes, so 12 can always be read.
    let mut buf = vec![0u8; V2_SIGNATURE.len()];
    read_exact(stream, &mut buf).await?;
    if buf == V2_SIGNATURE {
        buf.resize(16, 0);
        read_exact(stream, &mut buf[12..]).await?;
        let length = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if 16 + length > MAX_PROXY_HEADER {
            return Err(ProxyHeaderError::TooLarge);
        }
        buf.resize(16 + length, 0);
        read_exact(stream, &mut buf[16..]).await?;
        let header = ppp::v2::Header::try_from(buf.as_slice())
            .map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
        if header.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        return Ok(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: a line of at most 107 bytes. Read a byte at a time so that nothing after the
    // CRLF is taken (at most ~95 small reads, once per connection).
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::TooLarge);
        }
        read_exact(stream, &mut byte).await?;
        buf.push(byte[0]);
    }
    let header = ppp::v1::Header::try_from(buf.as_slice())
        .map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), ProxyHeaderError> {
    stream.read_exact(buf).await.map(|_| ()).map_err(|_| ProxyHeaderError::Closed)
}

/// The client named by the head's `Forwarded` (preferred: it is the standard) or else
/// `X-Forwarded-For` fields, given that they reached us through `hop`, a trusted proxy:
/// the rightmost entry that is not a trusted proxy (all trusted: the leftmost). `hop` when
/// neither field is there, or when an entry that would be chosen or passed over does not
/// parse as an address (`unknown`, an obfuscated `_name`, garbage): the chain is broken
/// there, and what the last trusted hop connected from is the best we know.
pub(crate) fn forwarded_client(head: &[u8], hop: IpAddr, trusted: &TrustedProxies) -> IpAddr {
    let mut fields = [httparse::EMPTY_HEADER; crate::handshake::MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    // The head was checked already (`handshake::classify`); one that does not parse here
    // has no forwarding fields to believe.
    if request.parse(head).is_err() {
        return hop;
    }
    let values = |name: &str| -> Vec<String> {
        let lines = request.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name));
        let joined = lines.filter_map(|h| std::str::from_utf8(h.value).ok());
        joined.flat_map(|v| v.split(',')).map(|v| v.trim().to_owned()).collect()
    };
    let forwarded: Vec<String> =
        values("forwarded").iter().filter_map(|e| forwarded_for(e)).collect();
    let chain = if forwarded.is_empty() { values("x-forwarded-for") } else { forwarded };
    if chain.is_empty() {
        return hop;
    }
    let mut client = hop;
    for entry in chain.iter().rev() {
        let Some(ip) = parse_node(entry) else {
            return client;
        };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// The `for=` value of one `Forwarded` element (`for=192.0.2.1;proto=https`), unquoted.
fn forwarded_for(element: &str) -> Option<String> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// An address from a forwarding entry: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    let bracketed = entry.strip_prefix('[')?.split(']').next()?;
    bracketed.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(entries).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn trusted_proxies_are_addresses_and_blocks() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1", "fd00::/8", "192.168.1.7/24"]);
        for (addr, expected) in [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("fd12::1", true),
            ("::ffff:10.9.9.9", true),
            ("192.168.1.200", true),
        ] {
            assert_eq!(t.contains(ip(addr)), expected, "{addr}");
        }
        assert_eq!(
            TrustedProxies::parse(&["10.0.0.0/8", "proxy.local"]).unwrap_err(),
            "not an IP address or CIDR block: \"proxy.local\""
        );
        assert!(TrustedProxies::default().is_empty());
    }

    fn head(fields: &str) -> Vec<u8> {
        format!("GET /ws HTTP/1.1\r\nHost: gw\r\n{fields}\r\n").into_bytes()
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = trusted(&["10.0.0.0/8"]);
        let hop = ip("10.0.0.1");
        for (fields, expected) in [
            ("", "10.0.0.1"),
            ("X-Forwarded-For: 203.0.113.9\r\n", "203.0.113.9"),
            // The client wrote the left part itself: only the proxies' entries count.
            ("X-Forwarded-For: 1.1.1.1, 203.0.113.9, 10.0.0.5\r\n", "203.0.113.9"),
            ("X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 203.0.113.9\r\n", "203.0.113.9"),
            ("X-Forwarded-For: 10.0.0.7, 10.0.0.5\r\n", "10.0.0.7"),
            ("X-Forwarded-For: garbage\r\n", "10.0.0.1"),
            ("X-Forwarded-For: 203.0.113.9, garbage\r\n", "10.0.0.1"),
            ("X-Forwarded-For: [2001:db8::1]:4711\r\n", "2001:db8::1"),
            // Forwarded wins over X-Forwarded-For.
            (
                "Forwarded: for=198.51.100.1;proto=https\r\nX-Forwarded-For: 203.0.113.9\r\n",
                "198.51.100.1",
            ),
            ("Forwarded: for=1.1.1.1, for=\"[2001:db8::2]:80\"\r\n", "2001:db8::2"),
            ("Forwarded: for=unknown\r\n", "10.0.0.1"),
            ("Forwarded: proto=https\r\nX-Forwarded-For: 203.0.113.9\r\n", "203.0.113.9"),
        ] {
            assert_eq!(forwarded_client(&head(fields), hop, &t), ip(expected), "{fields:?}");
        }
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut input = bytes;
        let result = read_proxy_header(&mut input).await;
        (result, input.to_vec())
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20 | command, family]);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[tokio::test]
    async fn proxy_v2_and_v1_headers_give_the_source_and_leave_the_rest() {
        // PROXY, TCP over IPv4: 127.0.0.77:5000 → 127.0.0.1:80.
        let mut bytes = v2(1, 0x11, &[127, 0, 0, 77, 127, 0, 0, 1, 0x13, 0x88, 0, 80]);
        bytes.extend_from_slice(b"GET /ws");
        let (result, rest) = read(&bytes).await;
        assert_eq!(result.unwrap(), Some("127.0.0.77:5000".parse().unwrap()));
        assert_eq!(rest, b"GET /ws");
        // LOCAL: the proxy speaks for itself.
        let (result, rest) = read(&v2(0, 0x00, &[])).await;
        assert_eq!(result.unwrap(), None);
        assert!(rest.is_empty());
        let (result, rest) = read(b"PROXY TCP4 127.0.0.78 127.0.0.1 5001 80\r\nGET").await;
        assert_eq!(result.unwrap(), Some("127.0.0.78:5001".parse().unwrap()));
        assert_eq!(rest, b"GET");
        let (result, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(result.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_proxy_headers_are_refused() {
        let (r, _) = read(b"GET /ws HTTP/1.1\r\n\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)), "{r:?}");
        let mut big = v2(1, 0x11, &[0; 12]);
        big[14..16].copy_from_slice(&2000u16.to_be_bytes());
        let (r, _) = read(&big).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLarge)), "{r:?}");
        let (r, _) = read(&v2(1, 0x11, &[127, 0, 0, 1])).await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
        let (r, _) = read(&v2(1, 0x11, &[127, 0])[..10]).await;
        assert!(matches!(r, Err(ProxyHeaderError::Closed)), "{r:?}");
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (r, _) = read(long.as_bytes()).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLarge)), "{r:?}");
        let (r, _) = read(b"PROXY TCP4 1.2.3 127.0.0.1 1 2\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
    }
}
