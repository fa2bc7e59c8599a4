//! Header rules of a proxy: hop-by-hop removal (RFC 9110 §7.6.1), forwarding headers
//! (X-Forwarded-*, RFC 7239 Forwarded), Via with loop detection, and smuggling checks.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The fixed hop-by-hop set of RFC 9110 §7.6.1 (plus the never-standard Proxy-Connection).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Every header name listed in any `Connection` field line (comma lists, any case).
pub fn connection_tokens(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether the `Connection` header asks for an upgrade.
pub fn wants_upgrade(h: &HeaderMap) -> bool {
    connection_tokens(h).iter().any(|t| t == "upgrade") && h.contains_key(header::UPGRADE)
}

/// Remove the hop-by-hop headers: the fixed set plus every header the `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    for t in connection_tokens(h) {
        if let Ok(name) = HeaderName::from_bytes(t.as_bytes()) {
            h.remove(name);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Why a request is refused before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// Content-Length and Transfer-Encoding together (a smuggling vector).
    #[error("Content-Length together with Transfer-Encoding")]
    LengthAndChunked,
    /// Several Content-Length values that differ.
    #[error("conflicting Content-Length values")]
    ConflictingLength,
    /// A Content-Length that is not a number.
    #[error("invalid Content-Length")]
    BadLength,
    /// Our own Via token is in the request: it went round in a loop.
    #[error("request loop detected (Via)")]
    Loop,
}

/// Refuse what must never be forwarded.
pub fn check_request(h: &HeaderMap, via_token: &str) -> Result<(), BadRequest> {
    let lengths: Vec<&HeaderValue> = h.get_all(header::CONTENT_LENGTH).iter().collect();
    if !lengths.is_empty() && h.contains_key(header::TRANSFER_ENCODING) {
        return Err(BadRequest::LengthAndChunked);
    }
    let mut seen: Option<u64> = None;
    for v in lengths {
        for part in v.to_str().map_err(|_| BadRequest::BadLength)?.split(',') {
            let p = part.trim();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadRequest::BadLength);
            }
            let n: u64 = p.parse().map_err(|_| BadRequest::BadLength)?;
            if seen.is_some_and(|s| s != n) {
                return Err(BadRequest::ConflictingLength);
            }
            seen = Some(n);
        }
    }
    if via_contains(h, via_token) {
        return Err(BadRequest::Loop);
    }
    Ok(())
}

fn via_contains(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| via_names(v, token))
}

/// Whether one `Via` field value lists a hop received by `token`.
pub fn via_names(v: &str, token: &str) -> bool {
    v.split(',').any(|hop| {
        hop.split_whitespace()
            .nth(1)
            .is_some_and(|by| by.eq_ignore_ascii_case(token))
    })
}

/// The Via entry of a proxy named `token`: `1.1 <token>` (made once, appended to every
/// message with [`add_via`]).
pub fn via_value(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("1.1 {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("1.1 trimtab"))
}

/// Append our Via entry ([`via_value`]).
pub fn add_via(h: &mut HeaderMap, via: &HeaderValue) {
    h.append(header::VIA, via.clone());
}

/// A client's address as the forwarding headers write it, made once per connection (formatting
/// an address per request showed in the HTTP profile).
#[derive(Debug, Clone)]
pub struct Client {
    /// The `X-Forwarded-For` entry: the address as it is.
    addr: HeaderValue,
    /// The `Forwarded` node: an IPv6 address bracketed and quoted (RFC 7239 §6).
    node: HeaderValue,
}

impl Client {
    /// The forwarding entries of `ip`.
    pub fn new(ip: IpAddr) -> Client {
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => format!("\"[{text}]\""),
        };
        let value = |s: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
                .expect("an address is a valid header value")
        };
        Client {
            addr: value(text),
            node: value(node),
        }
    }

    /// The address as `X-Forwarded-For` writes it.
    pub fn addr(&self) -> &[u8] {
        self.addr.as_bytes()
    }
}

/// A `Forwarded` token (RFC 7230 tchar) needs no quotes.
fn is_token(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// Add X-Forwarded-For/-Proto/-Host and Forwarded for a request from `client`. `host` is the
/// request's host (the Host field's value, or the request target's authority).
pub fn add_forwarded(h: &mut HeaderMap, client: &Client, proto: &str, host: Option<&HeaderValue>) {
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let addr = client.addr.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prev}, {addr}")).ok()
        }
        _ => Some(client.addr.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        h.insert(X_FORWARDED_HOST, host.clone());
    }
    let f = forwarded_value(client, proto, host.map(HeaderValue::as_bytes));
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(f)) {
        h.append(header::FORWARDED, v);
    }
}

/// The `Forwarded` element (RFC 7239) for this hop: `for=…;proto=…[;host=…]`.
pub fn forwarded_value(client: &Client, proto: &str, host: Option<&[u8]>) -> Vec<u8> {
    let node = client.node.as_bytes();
    let mut f = Vec::with_capacity(24 + node.len() + host.map_or(0, |v| 2 * v.len() + 2));
    f.extend_from_slice(b"for=");
    f.extend_from_slice(node);
    f.extend_from_slice(b";proto=");
    f.extend_from_slice(proto.as_bytes());
    if let Some(host) = host {
        f.extend_from_slice(b";host=");
        if is_token(host) {
            f.extend_from_slice(host);
        } else {
            f.push(b'"');
            for &b in host {
                if b == b'"' || b == b'\\' {
                    f.push(b'\\');
                }
                f.push(b);
            }
            f.push(b'"');
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_fixed_set_and_every_connection_named_header() {
        let mut h = map(&[
            ("Connection", "keep-alive, X-Secret"),
            ("connection", "X-Other"),
            ("x-secret", "1"),
            ("X-OTHER", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "close"),
            ("x-keep", "3"),
        ]);
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let t = "trimtab-x";
        assert_eq!(
            check_request(
                &map(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
                t
            ),
            Err(BadRequest::LengthAndChunked)
        );
        assert_eq!(
            check_request(&map(&[("content-length", "5"), ("content-length", "6")]), t),
            Err(BadRequest::ConflictingLength)
        );
        assert_eq!(
            check_request(&map(&[("content-length", "5, 6")]), t),
            Err(BadRequest::ConflictingLength)
        );
        assert_eq!(
            check_request(&map(&[("content-length", "+5")]), t),
            Err(BadRequest::BadLength)
        );
        assert_eq!(
            check_request(&map(&[("content-length", "5"), ("content-length", "5")]), t),
            Ok(())
        );
    }

    #[test]
    fn via_loop_is_detected() {
        let mut h = map(&[("via", "1.0 fred, 1.1 other")]);
        assert_eq!(check_request(&h, "trimtab-a"), Ok(()));
        add_via(&mut h, &via_value("trimtab-a"));
        assert_eq!(check_request(&h, "trimtab-a"), Err(BadRequest::Loop));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        add_forwarded(
            &mut h,
            &Client::new("::1".parse().unwrap()),
            "http",
            Some(&HeaderValue::from_static("example.com:8080")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=http;host=\"example.com:8080\""
        );
    }

    #[test]
    fn forwarded_headers_start_a_list_and_quote_what_is_no_token() {
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &Client::new("192.0.2.7".parse().unwrap()),
            "https",
            Some(&HeaderValue::from_static("a\"b\\c")),
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["forwarded"],
            r#"for=192.0.2.7;proto=https;host="a\"b\\c""#
        );
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &Client::new("10.1.2.3".parse().unwrap()),
            "http",
            None,
        );
        assert_eq!(h["forwarded"], "for=10.1.2.3;proto=http");
        assert!(!h.contains_key("x-forwarded-host"));
    }
}
