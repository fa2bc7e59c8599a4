//! Reading a TLS ClientHello without terminating TLS: the server name (SNI) routes the
//! connection and the first ALPN protocol goes into its profile. The hello may arrive in
//! several TCP segments and several TLS records; the parser says when it needs more.

/// The largest ClientHello accepted (records included); real ones are well under this.
pub const MAX_HELLO: usize = 16 << 10;

/// What the ClientHello said.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// The server name, lower case.
    pub sni: Option<String>,
    /// The first protocol offered by ALPN.
    pub alpn: Option<String>,
}

/// The result of parsing the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not complete yet.
    Incomplete,
    /// A complete ClientHello.
    Hello(Hello),
    /// Not a ClientHello, or a malformed one (the reason).
    Bad(&'static str),
}

/// Whether the first byte is a TLS handshake record.
pub fn starts(b: &[u8]) -> bool {
    b.first() == Some(&0x16)
}

/// Parse the ClientHello at the start of `b` (one or more handshake records).
pub fn parse(b: &[u8]) -> Parsed {
    // Gather the handshake message from consecutive handshake records.
    let mut msg = Vec::new();
    let mut at = 0;
    loop {
        if b.len() < at + 5 {
            return incomplete(b);
        }
        if b[at] != 0x16 {
            return Parsed::Bad("not a TLS handshake record");
        }
        if b[at + 1] != 3 {
            return Parsed::Bad("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([b[at + 3], b[at + 4]]));
        if len == 0 || len > 16384 + 2048 {
            return Parsed::Bad("bad TLS record length");
        }
        if b.len() < at + 5 + len {
            return incomplete(b);
        }
        msg.extend_from_slice(&b[at + 5..at + 5 + len]);
        at += 5 + len;
        if msg.len() >= 4 {
            if msg[0] != 1 {
                return Parsed::Bad("first handshake message is not a ClientHello");
            }
            let want =
                4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if want > MAX_HELLO {
                return Parsed::Bad("ClientHello too large");
            }
            if msg.len() >= want {
                return match hello(&msg[4..want]) {
                    Some(h) => Parsed::Hello(h),
                    None => Parsed::Bad("malformed ClientHello"),
                };
            }
        }
    }
}

fn incomplete(b: &[u8]) -> Parsed {
    if b.len() >= MAX_HELLO {
        Parsed::Bad("ClientHello too large")
    } else {
        Parsed::Incomplete
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn hello(body: &[u8]) -> Option<Hello> {
    let mut r = Reader(body);
    r.take(2)?; // legacy version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut out = Hello::default();
    if r.0.is_empty() {
        return Some(out); // no extensions
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            0 => {
                let mut list = Reader(Reader(data).vec16()?);
                while !list.0.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 {
                        let n = std::str::from_utf8(name).ok()?;
                        if n.is_empty()
                            || !n
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                        {
                            return None;
                        }
                        out.sni = Some(n.trim_end_matches('.').to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Reader(Reader(data).vec16()?);
                if let Some(p) = list.vec8() {
                    out.alpn = std::str::from_utf8(p).ok().map(str::to_owned);
                }
            }
            _ => {}
        }
    }
    Some(out)
}

/// A fatal `unrecognized_name` alert (sent when no service has the requested name).
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 112];
/// A fatal `decode_error` alert (a malformed ClientHello).
pub const ALERT_DECODE_ERROR: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 50];
/// A fatal `internal_error` alert (the upstream could not be reached).
pub const ALERT_INTERNAL_ERROR: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 80];

/// A ClientHello for tests: server name, ALPN list, split into records of `record` bytes.
pub fn client_hello(sni: Option<&str>, alpn: &[&str], record: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(n) = sni {
        let mut list = vec![0u8];
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n.as_bytes());
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(&data);
    }
    if !alpn.is_empty() {
        let mut list = Vec::new();
        for p in alpn {
            list.push(p.len() as u8);
            list.extend_from_slice(p.as_bytes());
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        exts.extend_from_slice(&16u16.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(&data);
    }
    // Padding extension, so the hello is a realistic size.
    exts.extend_from_slice(&21u16.to_be_bytes());
    exts.extend_from_slice(&200u16.to_be_bytes());
    exts.extend_from_slice(&[0u8; 200]);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut msg = vec![1, 0];
    msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
    msg.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in msg.chunks(record.max(1)) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_and_alpn_across_records_and_segments() {
        for record in [16, 100, 16384] {
            let h = client_hello(Some("DB.Example"), &["h2", "http/1.1"], record);
            let want = Parsed::Hello(Hello {
                sni: Some("db.example".into()),
                alpn: Some("h2".into()),
            });
            assert_eq!(parse(&h), want, "records of {record}");
            for cut in [1, 5, 6, h.len() / 2, h.len() - 1] {
                assert_eq!(parse(&h[..cut]), Parsed::Incomplete, "cut {cut}");
            }
        }
        assert_eq!(
            parse(&client_hello(None, &[], 1000)),
            Parsed::Hello(Hello::default())
        );
    }

    #[test]
    fn other_bytes_are_refused() {
        assert!(matches!(
            parse(b"\x16\x03\x01\x00\x05\x02\0\0\x01\0"),
            Parsed::Bad(_)
        ));
        assert!(matches!(parse(b"\x16\x09\x01\x00\x05"), Parsed::Bad(_)));
        let mut h = client_hello(Some("a.example"), &[], 16384);
        let n = h.len();
        h[n - 210] = 0xff; // a byte of the server name: not a host name any more
        assert!(matches!(parse(&h), Parsed::Bad(_)));
    }
}
