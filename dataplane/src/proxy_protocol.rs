//! The PROXY protocol (HAProxy's, versions 1 and 2): read from trusted load balancers in front
//! of the data plane, written to upstreams that want the client's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::ProxyVersion;

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header (RFC text: 107 bytes with CRLF).
const V1_MAX: usize = 107;

/// What a complete header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header took.
    pub len: usize,
    /// The original client (None for `UNKNOWN`/`LOCAL`: keep the connection's own address).
    pub source: Option<SocketAddr>,
}

/// Parsing a header from the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The bytes do not start a PROXY header.
    NotProxy,
    /// A header has started but is not complete.
    Incomplete,
    /// A complete header.
    Header(Header),
    /// A malformed header (the reason).
    Bad(&'static str),
}

/// Whether `b` starts (or could start, being short) with either version's header.
pub fn starts(b: &[u8]) -> bool {
    let v1 = b"PROXY ";
    let n = b.len().min(v1.len());
    let m = b.len().min(V2_SIGNATURE.len());
    !b.is_empty() && (b[..n] == v1[..n] || b[..m] == V2_SIGNATURE[..m])
}

/// Parse a header at the start of `b`.
pub fn parse(b: &[u8]) -> Parsed {
    if b.is_empty() || !starts(b) {
        return Parsed::NotProxy;
    }
    if b[0] == b'P' {
        parse_v1(b)
    } else {
        parse_v2(b)
    }
}

fn parse_v1(b: &[u8]) -> Parsed {
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_MAX {
            Parsed::Bad("PROXY v1 header longer than 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    if end + 2 > V1_MAX {
        return Parsed::Bad("PROXY v1 header longer than 107 bytes");
    }
    let Ok(line) = std::str::from_utf8(&b[..end]) else {
        return Parsed::Bad("PROXY v1 header is not text");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match parts.get(1).copied() {
        Some("UNKNOWN") => Parsed::Header(Header { len, source: None }),
        Some(fam @ ("TCP4" | "TCP6")) if parts.len() == 6 => {
            let src: Option<IpAddr> = parts[2].parse().ok();
            let dst: Option<IpAddr> = parts[3].parse().ok();
            let sport = parse_port(parts[4]);
            let dport = parse_port(parts[5]);
            match (src, dst, sport, dport) {
                (Some(s), Some(d), Some(sp), Some(_))
                    if s.is_ipv4() == (fam == "TCP4") && d.is_ipv4() == s.is_ipv4() =>
                {
                    Parsed::Header(Header {
                        len,
                        source: Some(SocketAddr::new(s, sp)),
                    })
                }
                _ => Parsed::Bad("PROXY v1 header has a bad address or port"),
            }
        }
        _ => Parsed::Bad("PROXY v1 header has an unknown protocol family"),
    }
}

fn parse_port(p: &str) -> Option<u16> {
    // Decimal without leading zeros (the spec's form); 0 is not a port.
    if p.is_empty() || p.len() > 5 || (p.len() > 1 && p.starts_with('0')) {
        return None;
    }
    p.parse().ok().filter(|n| *n > 0)
}

fn parse_v2(b: &[u8]) -> Parsed {
    if b.len() < 16 {
        return Parsed::Incomplete;
    }
    let ver_cmd = b[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Bad("PROXY v2 header has a bad version");
    }
    let len = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
    if b.len() < len {
        return Parsed::Incomplete;
    }
    let body = &b[16..len];
    match ver_cmd & 0x0f {
        0 => return Parsed::Header(Header { len, source: None }), // LOCAL
        1 => {}
        _ => return Parsed::Bad("PROXY v2 header has an unknown command"),
    }
    match b[13] {
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Parsed::Header(Header {
                len,
                source: Some(SocketAddr::new(IpAddr::V4(ip), port)),
            })
        }
        0x21 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Parsed::Header(Header {
                len,
                source: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port)),
            })
        }
        0x11 | 0x21 => Parsed::Bad("PROXY v2 address block is too short"),
        // UNSPEC or UNIX/UDP: accepted, the connection's own address stays.
        _ => Parsed::Header(Header { len, source: None }),
    }
}

/// The header announcing a connection from `src` to `dst`.
pub fn encode(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    // Mixed families are written as IPv6 (an IPv4 address maps into it).
    let (src_ip, dst_ip) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (IpAddr::V4(a), IpAddr::V4(b)),
        (a, b) => (IpAddr::V6(to_v6(a)), IpAddr::V6(to_v6(b))),
    };
    match version {
        ProxyVersion::V1 => {
            let fam = if src_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {src_ip} {dst_ip} {} {}\r\n",
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY
            match (src_ip, dst_ip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&to_v6(s).octets());
                    out.extend_from_slice(&to_v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn both_versions_round_trip() {
        for v in [ProxyVersion::V1, ProxyVersion::V2] {
            for (src, dst) in [
                ("203.0.113.7:51000", "127.0.0.1:8080"),
                ("[2001:db8::7]:51000", "[::1]:8080"),
            ] {
                let mut h = encode(v, sa(src), sa(dst));
                let len = h.len();
                h.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(
                    parse(&h),
                    Parsed::Header(Header {
                        len,
                        source: Some(sa(src))
                    }),
                    "{v:?} {src}"
                );
                for cut in 1..len {
                    assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "{v:?} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn other_bytes_are_not_proxy_and_bad_headers_are_named() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotProxy);
        assert_eq!(parse(b"PRI * HTTP/2.0"), Parsed::NotProxy);
        assert_eq!(parse(b"PROXY"), Parsed::Incomplete);
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header(Header {
                len: 15,
                source: None
            })
        );
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 80\r\n"),
            Parsed::Bad(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 ::1 5.6.7.8 1 80\r\n"),
            Parsed::Bad(_)
        ));
        assert!(matches!(parse(b"PROXY UDP4 x\r\n"), Parsed::Bad(_)));
        assert!(matches!(parse(&[b'P'; 200][..]), Parsed::NotProxy));
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend_from_slice(&[b'1'; 120]);
        assert!(matches!(parse(&long), Parsed::Bad(_)));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0, 0]);
        assert!(matches!(parse(&v2), Parsed::Bad(_)));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Parsed::Header(Header {
                len: 16,
                source: None
            })
        );
    }
}
