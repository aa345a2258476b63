//! Request and response header hygiene: hop-by-hop removal (RFC 9110 §7.6.1) and the forwarding
//! headers (`X-Forwarded-For/-Proto/-Host`, RFC 7239 `Forwarded`), trusted only from configured
//! proxies.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::OnceLock;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address = a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("bad address {ip:?} in CIDR {s:?}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in CIDR {s:?}"))?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

// Presence bits of the headers hygiene touches, found in one pass over the names: most requests
// carry none of them, and every `remove` of an absent name still costs a hash and a probe.
const H_CONNECTION: u16 = 1;
const H_KEEP_ALIVE: u16 = 1 << 1;
const H_PROXY_CONNECTION: u16 = 1 << 2;
const H_TRAILER: u16 = 1 << 3;
const H_TRANSFER_ENCODING: u16 = 1 << 4;
const H_TE: u16 = 1 << 5;
const H_UPGRADE: u16 = 1 << 6;
const H_XFF: u16 = 1 << 7;
const H_XFP: u16 = 1 << 8;
const H_XFH: u16 = 1 << 9;
const H_FORWARDED: u16 = 1 << 10;

fn presence(headers: &HeaderMap) -> u16 {
    let mut found = 0;
    for name in headers.keys() {
        found |= match name.as_str() {
            "connection" => H_CONNECTION,
            "keep-alive" => H_KEEP_ALIVE,
            "proxy-connection" => H_PROXY_CONNECTION,
            "trailer" => H_TRAILER,
            "transfer-encoding" => H_TRANSFER_ENCODING,
            "te" => H_TE,
            "upgrade" => H_UPGRADE,
            "x-forwarded-for" => H_XFF,
            "x-forwarded-proto" => H_XFP,
            "x-forwarded-host" => H_XFH,
            "forwarded" => H_FORWARDED,
            _ => 0,
        };
    }
    found
}

/// Remove hop-by-hop headers in place. With `upgrade`, keep `Upgrade` and send
/// `Connection: upgrade` (the one hop-by-hop exchange a proxy must forward).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let found = presence(headers);
    if found & H_CONNECTION != 0 {
        // Names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1). Collected first
        // because the map cannot be mutated while borrowed; a tiny fixed array avoids allocating.
        let mut named: [Option<HeaderName>; 8] = Default::default();
        let mut n = 0;
        for value in headers.get_all(header::CONNECTION) {
            let Ok(text) = value.to_str() else { continue };
            for token in text.split(',') {
                let token = token.trim();
                if token.is_empty()
                    || token.eq_ignore_ascii_case("close")
                    || token.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    if n < named.len() {
                        named[n] = Some(name);
                        n += 1;
                    }
                }
            }
        }
        for name in named.iter().flatten() {
            if upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if found & H_KEEP_ALIVE != 0 {
        headers.remove(&KEEP_ALIVE);
    }
    if found & H_PROXY_CONNECTION != 0 {
        headers.remove(&PROXY_CONNECTION);
    }
    if found & H_TRAILER != 0 {
        headers.remove(header::TRAILER);
    }
    if found & H_TRANSFER_ENCODING != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if found & H_TE != 0 {
        // TE: only "trailers" may pass (gRPC needs it end to end).
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|t| {
                t.split(',')
                    .any(|x| x.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if found & H_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// Per-connection inputs of the forwarding headers, computed once when the connection starts.
///
/// Kept small (it lives in every connection's state, idle ones included): the peer's address
/// as text inline, and the header values the hyper path needs built on its first request
/// only. The fast path ([`super::fast1`]) writes these bytes straight into the request head.
#[derive(Debug)]
pub struct ForwardInfo {
    /// The peer's canonical IP as text (`192.0.2.1`, `fd00::1`): `ip[..ip_len]`.
    ip: [u8; IP_TEXT_MAX],
    ip_len: u8,
    v6: bool,
    tls: bool,
    /// Peer is a trusted proxy: its forwarding headers are kept and appended to.
    pub trusted: bool,
    /// Header values for the hyper path, made on its first request.
    values: OnceLock<Box<HyperValues>>,
}

/// Longest IP text: eight groups of four hex digits and seven colons.
const IP_TEXT_MAX: usize = 39;

/// `a.b.c.d` into `out` (at least 15 bytes), as `Ipv4Addr`'s `Display` writes it; its length.
fn ipv4_text(octets: [u8; 4], out: &mut [u8]) -> usize {
    let mut n = 0;
    for (i, o) in octets.into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            out[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            out[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + o % 10;
        n += 1;
    }
    n
}

#[derive(Debug)]
struct HyperValues {
    peer_ip: HeaderValue,
    /// This hop's `Forwarded` element for the first host seen (host, value): a keep-alive
    /// connection nearly always asks for one host, so later requests reuse the value instead
    /// of building it. Set once, never locked.
    forwarded: OnceLock<(HeaderValue, HeaderValue)>,
    /// The first HTTP/2 `:authority` seen, as a `Host` value; same reasoning.
    authority: OnceLock<HeaderValue>,
}

impl ForwardInfo {
    pub fn new(peer: IpAddr, tls: bool, trusted: bool) -> ForwardInfo {
        use std::io::Write;
        let peer = peer.to_canonical();
        let mut ip = [0u8; IP_TEXT_MAX];
        let ip_len = match peer {
            // Once per connection: `write!` through `fmt` cost ~1,000 instructions, 6 % of a
            // new connection per request's user time (callgrind `close`).
            IpAddr::V4(v4) => ipv4_text(v4.octets(), &mut ip),
            IpAddr::V6(_) => {
                let mut cursor = &mut ip[..];
                write!(cursor, "{peer}").expect("an IP's text fits in 39 bytes");
                IP_TEXT_MAX - cursor.len()
            }
        } as u8;
        ForwardInfo {
            ip,
            ip_len,
            v6: peer.is_ipv6(),
            tls,
            trusted,
            values: OnceLock::new(),
        }
    }

    /// The peer's IP as an `X-Forwarded-For` element.
    pub fn peer_ip_bytes(&self) -> &[u8] {
        &self.ip[..usize::from(self.ip_len)]
    }

    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    fn values(&self) -> &HyperValues {
        self.values.get_or_init(|| {
            Box::new(HyperValues {
                peer_ip: HeaderValue::from_bytes(self.peer_ip_bytes())
                    .expect("an IP is a header value"),
                forwarded: OnceLock::new(),
                authority: OnceLock::new(),
            })
        })
    }

    /// The peer's IP as a header value.
    pub fn peer_ip(&self) -> HeaderValue {
        self.values().peer_ip.clone()
    }

    /// An HTTP/2 request's `:authority` as a `Host` value; the connection's first one is kept
    /// and shared (no allocation for the requests after it that ask for the same).
    pub fn authority_value(&self, authority: &str) -> Option<HeaderValue> {
        let cached = &self.values().authority;
        if let Some(v) = cached
            .get()
            .filter(|v| v.as_bytes() == authority.as_bytes())
        {
            return Some(v.clone());
        }
        let v = HeaderValue::from_str(authority).ok()?;
        let _ = cached.set(v.clone()); // kept if it is the first
        Some(v)
    }

    /// Write this hop's own `Forwarded` element (`for=..;proto=..[;host=".."]`) to `out`. A
    /// host that cannot sit in a quoted string is left out.
    pub(crate) fn write_own_forwarded(&self, host: Option<&[u8]>, out: &mut Vec<u8>) {
        // RFC 7239 §6: IPv6 nodes are quoted and bracketed.
        if self.v6 {
            out.extend_from_slice(b"for=\"[");
            out.extend_from_slice(self.peer_ip_bytes());
            out.extend_from_slice(b"]\"");
        } else {
            out.extend_from_slice(b"for=");
            out.extend_from_slice(self.peer_ip_bytes());
        }
        out.extend_from_slice(if self.tls {
            b";proto=https"
        } else {
            b";proto=http"
        });
        if let Some(host) = host.filter(|h| quotable(h)) {
            // `host` is a token or a quoted string; a host with a port has ':' and is quoted.
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host);
            out.push(b'"');
        }
    }

    /// This hop's own `Forwarded` element as a header value (the hyper path).
    pub(crate) fn own_forwarded(&self, host: Option<&[u8]>) -> Option<HeaderValue> {
        let host = host.filter(|h| quotable(h));
        let cache = &self.values().forwarded;
        if let (Some(h), Some((cached_host, value))) = (host, cache.get()) {
            if cached_host.as_bytes() == h {
                return Some(value.clone());
            }
        }
        let mut buf = Vec::with_capacity(64);
        self.write_own_forwarded(host, &mut buf);
        let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)).ok()?;
        if let Some(h) = host {
            // A copy of the host, not the request's own bytes, which would pin hyper's read
            // buffer for the connection's lifetime.
            if let Ok(h) = HeaderValue::from_bytes(h) {
                let _ = cache.set((h, value.clone()));
            }
        }
        Some(value)
    }
}

/// A host that can go in a quoted string as is.
fn quotable(host: &[u8]) -> bool {
    /// Visible ASCII other than `"`: one table load per byte instead of two range tests.
    static QUOTABLE: [bool; 256] = {
        let mut t = [false; 256];
        let mut b = 0x21;
        while b < 0x7f {
            t[b] = b != b'"' as usize;
            b += 1;
        }
        t
    };
    host.iter().all(|b| QUOTABLE[usize::from(*b)])
}

/// Whether `headers` carry none of the headers that hygiene removes or rewrites (hop-by-hop,
/// `Upgrade`, forwarding): such a request can go out as it is, with this hop's forwarding
/// headers written after it ([`write_forwarding`]) instead of inserted into its map.
pub fn is_plain(headers: &HeaderMap) -> bool {
    presence(headers) == 0
}

/// A trusted peer's own forwarding headers, which this hop keeps ([`write_forwarding`]).
pub(crate) struct Prior<'a> {
    /// Writes the peer's values of the named header (`x-forwarded-for`, `forwarded`), each
    /// followed by `, `: the earlier hops, before this one's element.
    pub values: &'a dyn Fn(&str, &mut Vec<u8>),
    /// The peer sent `X-Forwarded-Proto` / `X-Forwarded-Host`: passed on as they are, none
    /// written here.
    pub has_proto: bool,
    pub has_host: bool,
}

/// This hop's forwarding headers as HTTP/1 header lines, after a request head whose own
/// forwarding headers were left out, except a trusted peer's (`prior`): the same headers
/// [`set_forwarding`] makes in a header map.
pub(crate) fn write_forwarding(
    out: &mut Vec<u8>,
    info: &ForwardInfo,
    host: Option<&[u8]>,
    prior: Option<&Prior<'_>>,
) {
    // One reservation, and the constant text between the values in as few pieces as it
    // goes: every piece is a capacity check and a `memcpy` call (callgrind: 479 instructions
    // per request before, in both HTTP/1 paths).
    let ip = info.peer_ip_bytes();
    out.reserve(112 + 2 * ip.len() + 2 * host.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(p) = prior {
        (p.values)("x-forwarded-for", out);
    }
    out.extend_from_slice(ip);
    if !prior.is_some_and(|p| p.has_proto) {
        out.extend_from_slice(if info.tls {
            b"\r\nx-forwarded-proto: https"
        } else {
            b"\r\nx-forwarded-proto: http"
        });
    }
    if let (Some(host), false) = (host, prior.is_some_and(|p| p.has_host)) {
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
    }
    out.extend_from_slice(b"\r\nforwarded: ");
    if let Some(p) = prior {
        (p.values)("forwarded", out);
    }
    info.write_own_forwarded(host, out);
    out.extend_from_slice(b"\r\n");
}

/// Add this hop's forwarding headers. From an untrusted peer, incoming ones are dropped first:
/// a client must not be able to pick the address a backend logs or trusts.
pub fn set_forwarding(headers: &mut HeaderMap, info: &ForwardInfo, host: Option<&HeaderValue>) {
    let mut found = presence(headers);
    if !info.trusted {
        if found & H_XFF != 0 {
            headers.remove(&X_FORWARDED_FOR);
        }
        if found & H_XFP != 0 {
            headers.remove(&X_FORWARDED_PROTO);
        }
        if found & H_XFH != 0 {
            headers.remove(&X_FORWARDED_HOST);
        }
        if found & H_FORWARDED != 0 {
            headers.remove(header::FORWARDED);
        }
        found &= !(H_XFF | H_XFP | H_XFH | H_FORWARDED);
    }
    // X-Forwarded-For: one comma-joined list, previous hops first.
    let xff = if found & H_XFF != 0 {
        let mut buf = BytesMut::with_capacity(64);
        for v in headers.get_all(&X_FORWARDED_FOR) {
            buf.put_slice(v.as_bytes());
            buf.put_slice(b", ");
        }
        buf.put_slice(info.peer_ip_bytes());
        HeaderValue::from_maybe_shared(buf.freeze()).unwrap_or_else(|_| info.peer_ip())
    } else {
        info.peer_ip()
    };
    headers.insert(&X_FORWARDED_FOR, xff);
    if found & H_XFP == 0 {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(info.proto()));
    }
    if let Some(host) = host {
        if found & H_XFH == 0 {
            headers.insert(&X_FORWARDED_HOST, host.clone());
        }
    }
    // Forwarded: append this hop's element.
    let Some(own) = info.own_forwarded(host.map(HeaderValue::as_bytes)) else {
        return;
    };
    if found & H_FORWARDED == 0 {
        headers.insert(header::FORWARDED, own);
        return;
    }
    let mut buf = BytesMut::with_capacity(96);
    for v in headers.get_all(header::FORWARDED) {
        buf.put_slice(v.as_bytes());
        buf.put_slice(b", ");
    }
    buf.put_slice(own.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
        headers.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let h: Cidr = "::1".parse().unwrap();
        assert!(h.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("upgrade").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "1");
    }

    #[test]
    fn forwarding_untrusted_and_trusted() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        let host = HeaderValue::from_static("a.example");
        let info = ForwardInfo::new("192.0.2.1".parse().unwrap(), false, false);
        set_forwarding(&mut h, &info, Some(&host));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.1;proto=http;host=\"a.example\""
        );
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        let info = ForwardInfo::new("::1".parse().unwrap(), true, true);
        set_forwarding(&mut h, &info, None);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "6.6.6.6, ::1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("forwarded").unwrap(), "for=\"[::1]\";proto=https");
    }

    #[test]
    fn forwarded_element_is_cached_per_host() {
        let info = ForwardInfo::new("192.0.2.1".parse().unwrap(), false, false);
        let a = HeaderValue::from_static("a.example");
        let b = HeaderValue::from_static("b.example:8080");
        for (host, want) in [
            (Some(&a), "for=192.0.2.1;proto=http;host=\"a.example\""),
            (Some(&a), "for=192.0.2.1;proto=http;host=\"a.example\""),
            (Some(&b), "for=192.0.2.1;proto=http;host=\"b.example:8080\""),
            (None, "for=192.0.2.1;proto=http"),
            (Some(&a), "for=192.0.2.1;proto=http;host=\"a.example\""),
        ] {
            let mut h = HeaderMap::new();
            set_forwarding(&mut h, &info, host);
            assert_eq!(h.get("forwarded").unwrap(), want);
            assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.1");
            assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        }
        // A trusted peer's previous hops are kept, this hop appended.
        let info = ForwardInfo::new("10.0.0.1".parse().unwrap(), false, true);
        let mut h = HeaderMap::new();
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarding(&mut h, &info, Some(&a));
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=1.2.3.4, for=10.0.0.1;proto=http;host=\"a.example\""
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "a.example");
    }

    #[test]
    fn authority_value_shares_the_first_authority() {
        let info = ForwardInfo::new("192.0.2.1".parse().unwrap(), false, false);
        let first = info.authority_value("a.example").unwrap();
        let again = info.authority_value("a.example").unwrap();
        let other = info.authority_value("b.example").unwrap();
        let third = info.authority_value("a.example").unwrap();
        for (v, want) in [
            (&first, "a.example"),
            (&again, "a.example"),
            (&other, "b.example"),
        ] {
            assert_eq!(v, want);
        }
        assert_eq!(third, "a.example");
        // The repeats are the kept value's bytes, not copies.
        assert_eq!(again.as_bytes().as_ptr(), third.as_bytes().as_ptr());
        assert!(info.authority_value("bad\nhost").is_none());
    }

    #[test]
    fn hop_by_hop_absent_and_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, keep-alive"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("trailer", HeaderValue::from_static("x-t"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        for gone in [
            "keep-alive",
            "transfer-encoding",
            "proxy-connection",
            "trailer",
        ] {
            assert!(h.get(gone).is_none(), "{gone} kept");
        }
    }

    #[test]
    fn ipv4_text_matches_display() {
        let mut buf = [0u8; 15];
        for a in [0u8, 1, 9, 10, 99, 100, 199, 200, 255] {
            for o in 0..=255u8 {
                for octets in [[o, a, a, a], [a, o, a, a], [a, a, o, a], [a, a, a, o]] {
                    let n = ipv4_text(octets, &mut buf);
                    let want = std::net::Ipv4Addr::from(octets).to_string();
                    assert_eq!(&buf[..n], want.as_bytes());
                }
            }
        }
        let info = ForwardInfo::new("::ffff:10.20.30.40".parse().unwrap(), false, false);
        assert_eq!(info.peer_ip_bytes(), b"10.20.30.40");
        let info = ForwardInfo::new("2001:db8::7".parse().unwrap(), false, false);
        assert_eq!(info.peer_ip_bytes(), b"2001:db8::7");
    }
}
