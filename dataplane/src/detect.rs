//! Protocol detection on a shared port, from a connection's first bytes.
//!
//! In order: a PROXY protocol header (accepted only from the listener's trusted sources, then
//! detection goes on behind it), a TLS ClientHello (routed by SNI, passed through), the
//! HTTP/2 preface (h2c prior knowledge), an HTTP/1.1 request line (hyper serves it, including
//! WebSocket, Upgrade, `Upgrade: h2c` and CONNECT). Anything else goes to the listener's
//! `tcp_service`. A client that sends nothing for the listener's `detect_timeout` (a
//! server-speaks-first protocol) also goes to the `tcp_service`, so it is never stalled for
//! longer than that; with no `tcp_service` it is left to the HTTP server's head timeout.
//! Detection never reads past what it needs to decide: the bytes read are handed on as the
//! head of the chosen path, and the rest stays in the socket (for splice).

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{Config, Listener};
use crate::{h2c, proxy_protocol, tls};

/// What the connection turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// HTTP/1.1 (and everything reached from it).
    Http1,
    /// HTTP/2 with prior knowledge.
    H2,
    /// TLS, to pass through to the service that has this server name.
    Tls {
        /// The service.
        service: String,
        /// The `sni` pattern that matched (the route in profiles).
        pattern: String,
        /// The first ALPN protocol offered.
        alpn: Option<String>,
    },
    /// Raw TCP to the listener's `tcp_service`.
    Tcp {
        /// The service.
        service: String,
    },
}

/// A detected connection.
#[derive(Debug)]
pub struct Detected {
    /// What it is.
    pub kind: Kind,
    /// The bytes read while detecting (after any PROXY header), to be handed on first.
    pub head: Vec<u8>,
    /// The client: from the PROXY header when there was one, else the socket's peer.
    pub peer: SocketAddr,
    /// Whether a PROXY protocol header came first.
    pub proxied: bool,
}

/// Why a connection was refused during detection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The client closed before sending anything decisive.
    #[error("client closed during protocol detection")]
    Closed,
    /// A PROXY header from a source the listener does not trust.
    #[error("PROXY protocol header from an untrusted source")]
    UntrustedProxy,
    /// A malformed PROXY header.
    #[error("{0}")]
    BadProxy(&'static str),
    /// A malformed ClientHello.
    #[error("{0}")]
    BadHello(&'static str),
    /// No service has the ClientHello's server name.
    #[error("no service for TLS server name {0:?}")]
    UnknownSni(Option<String>),
    /// Bytes that are no protocol this listener serves.
    #[error("not a protocol this listener serves")]
    Unrecognized,
    /// Reading failed.
    #[error("read failed: {0}")]
    Io(String),
}

impl Refused {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refused::Closed => "closed",
            Refused::UntrustedProxy => "untrusted_proxy",
            Refused::BadProxy(_) => "bad_proxy",
            Refused::BadHello(_) => "bad_client_hello",
            Refused::UnknownSni(_) => "unknown_sni",
            Refused::Unrecognized => "unrecognized",
            Refused::Io(_) => "io",
        }
    }
}

enum Step {
    More,
    Done(Kind),
    Refuse(Refused),
}

/// Whether `b` is, or could still become, an HTTP/1.1 request line's method and space.
fn http_method(b: &[u8]) -> Option<bool> {
    let token = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    if token == b.len() {
        return (token <= 16).then_some(false); // could still be one
    }
    (token > 0 && b[token] == b' ').then_some(true)
}

/// Decide from the bytes so far (no PROXY header among them).
fn classify(b: &[u8], l: &Listener, config: &Config, timed_out: bool) -> Step {
    let fallback = || match &l.tcp_service {
        Some(s) => Step::Done(Kind::Tcp { service: s.clone() }),
        None if l.http => Step::Done(Kind::Http1), // hyper answers 400 or times out
        None => Step::Refuse(Refused::Unrecognized),
    };
    if b.is_empty() {
        return if timed_out { fallback() } else { Step::More };
    }
    if tls::starts(b) && config.has_sni() {
        return match tls::parse(b) {
            tls::Parsed::Incomplete if !timed_out => Step::More,
            tls::Parsed::Incomplete => Step::Refuse(Refused::BadHello("ClientHello incomplete")),
            tls::Parsed::Bad(r) => Step::Refuse(Refused::BadHello(r)),
            tls::Parsed::Hello(h) => match h.sni.as_deref().and_then(|n| config.sni_service(n)) {
                Some((s, pattern)) => Step::Done(Kind::Tls {
                    service: s.name.clone(),
                    pattern: pattern.to_string(),
                    alpn: h.alpn,
                }),
                None => Step::Refuse(Refused::UnknownSni(h.sni)),
            },
        };
    }
    if l.http {
        if h2c::could_be_preface(b) {
            if b.len() >= h2c::PREFACE.len() {
                return Step::Done(Kind::H2);
            }
            if !timed_out {
                return Step::More;
            }
        }
        match http_method(b) {
            Some(true) => return Step::Done(Kind::Http1),
            Some(false) if !timed_out => return Step::More,
            _ => {}
        }
    }
    fallback()
}

/// Detect what `stream` carries, reading at most what the decision needs.
pub async fn detect(
    stream: &mut TcpStream,
    peer: SocketAddr,
    l: &Listener,
    config: &Config,
) -> Result<Detected, Refused> {
    // A listener that serves only raw TCP has nothing to wait for.
    if !l.http && !config.has_sni() && l.proxy_trusted.is_empty() {
        let service = l.tcp_service.clone().ok_or(Refused::Unrecognized)?;
        return Ok(Detected {
            kind: Kind::Tcp { service },
            head: Vec::new(),
            peer,
            proxied: false,
        });
    }
    let deadline = tokio::time::Instant::now() + l.detect_timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut peer = peer;
    let mut proxy_allowed = true;
    let mut proxied = false;
    let mut timed_out = false;
    loop {
        if proxy_allowed && proxy_protocol::starts(&buf) {
            match proxy_protocol::parse(&buf) {
                proxy_protocol::Parsed::Header(h) => {
                    if !l.trusts(peer.ip()) {
                        return Err(Refused::UntrustedProxy);
                    }
                    if let Some(src) = h.source {
                        peer = src;
                    }
                    proxied = true;
                    buf.drain(..h.len);
                    proxy_allowed = false;
                    continue;
                }
                proxy_protocol::Parsed::Bad(r) => {
                    return Err(if l.trusts(peer.ip()) {
                        Refused::BadProxy(r)
                    } else {
                        Refused::UntrustedProxy
                    });
                }
                proxy_protocol::Parsed::Incomplete if !timed_out => {}
                proxy_protocol::Parsed::Incomplete | proxy_protocol::Parsed::NotProxy => {
                    proxy_allowed = false;
                    continue;
                }
            }
        } else {
            if !buf.is_empty() {
                proxy_allowed = false;
            }
            match classify(&buf, l, config, timed_out) {
                Step::Done(kind) => {
                    return Ok(Detected {
                        kind,
                        head: buf,
                        peer,
                        proxied,
                    });
                }
                Step::Refuse(r) => return Err(r),
                Step::More => {}
            }
        }
        if timed_out {
            // classify decides once timed out; a PROXY prefix that never completed is refused
            return Err(Refused::BadProxy("PROXY header incomplete"));
        }
        let room = if buf.len() < 512 { 512 } else { 4096 };
        let mut chunk = vec![0u8; room];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return if buf.is_empty() {
                    Err(Refused::Closed)
                } else {
                    // Half-closed after a partial head: let the fallback path see it.
                    match classify(&buf, l, config, true) {
                        Step::Done(kind) => Ok(Detected {
                            kind,
                            head: buf,
                            peer,
                            proxied,
                        }),
                        Step::Refuse(r) => Err(r),
                        Step::More => Err(Refused::Closed),
                    }
                };
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(Refused::Io(e.to_string())),
            Err(_) => timed_out = true,
        }
        if buf.len() > tls::MAX_HELLO + 1024 {
            timed_out = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml(
            r#"
[services.web]
upstreams = ["127.0.0.1:1"]
[services.db]
upstreams = ["127.0.0.1:2"]
sni = ["db.example", "*.db.example"]
[services.redis]
upstreams = ["127.0.0.1:3"]
[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
tcp_service = "redis"
proxy_protocol_from = ["127.0.0.0/8"]
"#,
        )
        .unwrap()
    }

    fn kind(b: &[u8], timed_out: bool) -> Option<Kind> {
        let c = config();
        let l = c.listener("edge").unwrap().clone();
        match classify(b, &l, &c, timed_out) {
            Step::Done(k) => Some(k),
            Step::More => None,
            Step::Refuse(r) => panic!("refused: {r}"),
        }
    }

    #[test]
    fn first_bytes_decide() {
        assert_eq!(kind(b"GET / HTTP/1.1\r\n", false), Some(Kind::Http1));
        assert_eq!(kind(b"GE", false), None);
        assert_eq!(
            kind(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false),
            Some(Kind::H2)
        );
        assert_eq!(kind(b"PRI * HT", false), None);
        let redis = Some(Kind::Tcp {
            service: "redis".into(),
        });
        assert_eq!(kind(b"*1\r\n$4\r\nPING\r\n", false), redis);
        assert_eq!(kind(b"", true), redis);
        assert_eq!(kind(b"PING", true), redis);
        let hello = tls::client_hello(Some("x.db.example"), &["h2"], 100);
        assert_eq!(
            kind(&hello, false),
            Some(Kind::Tls {
                service: "db".into(),
                pattern: "*.db.example".into(),
                alpn: Some("h2".into()),
            })
        );
        assert_eq!(kind(&hello[..50], false), None);
    }
}
