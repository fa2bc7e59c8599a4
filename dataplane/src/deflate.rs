//! permessage-deflate (RFC 7692) toward the client, beneath tokio-tungstenite.
//!
//! tungstenite has no permessage-deflate (it refuses frames with RSV1), so compression lives in
//! a stream wrapper under it: [`DeflateStream`] inflates the client's compressed frames into
//! plain frames before tungstenite reads them, and deflates the plain frames tungstenite writes
//! before they reach the client. The upstream leg stays uncompressed whatever the client
//! negotiated, so a service gets compression toward its clients without implementing it.
//!
//! - Negotiation ([`negotiate`]) accepts the first acceptable offer and honours
//!   `server_no_context_takeover`, `client_no_context_takeover`, `server_max_window_bits`
//!   (9–15; an offer that insists on 8 is declined: zlib cannot deflate with a 256-byte window)
//!   and `client_max_window_bits`.
//! - Inflation is bounded: a message that inflates past the maximum message size is reported to
//!   tungstenite as too big, which closes with 1009. Frames larger than that are never buffered.
//! - Frames that are not compressed pass through untouched; anything malformed (an unmasked
//!   client frame, RSV1 on a control or continuation frame, bad compressed data) is handed to
//!   tungstenite in a shape it rejects, so protocol errors close as tungstenite closes them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What was agreed with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Reset our compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message (so we reset our inflater).
    pub client_no_context_takeover: bool,
    /// Our LZ77 window, bits.
    pub server_max_window_bits: u8,
    /// The client's LZ77 window, bits.
    pub client_max_window_bits: u8,
}

fn parse_bits(v: Option<&str>) -> Result<Option<u8>, ()> {
    match v {
        None => Ok(None),
        Some(v) => {
            let v = v.trim().trim_matches('"');
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
                return Err(());
            }
            let n: u8 = v.parse().map_err(|_| ())?;
            if (8..=15).contains(&n) {
                Ok(Some(n))
            } else {
                Err(())
            }
        }
    }
}

/// The parameters a server agreed to, from its `Sec-WebSocket-Extensions` answer (the client's
/// side); `None` when it did not accept permessage-deflate or answered something malformed.
pub fn accepted(answer: &str) -> Option<DeflateParams> {
    let mut parts = answer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut p = DeflateParams {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    for param in parts {
        let (k, v) = param
            .split_once('=')
            .map_or((param, None), |(k, v)| (k.trim(), Some(v)));
        match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => p.server_no_context_takeover = true,
            "client_no_context_takeover" => p.client_no_context_takeover = true,
            "server_max_window_bits" => p.server_max_window_bits = parse_bits(v).ok()??,
            "client_max_window_bits" => p.client_max_window_bits = parse_bits(v).ok()??,
            _ => return None,
        }
    }
    Some(p)
}

/// Choose the first acceptable permessage-deflate offer in the client's
/// `Sec-WebSocket-Extensions` values; returns the agreed parameters and the response value.
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<(DeflateParams, String)> {
    for header in offers {
        for offer in header.split(',') {
            let mut parts = offer.split(';').map(str::trim);
            if !parts
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
            {
                continue;
            }
            if let Some(r) = accept_offer(parts) {
                return Some(r);
            }
        }
    }
    None
}

fn accept_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<(DeflateParams, String)> {
    let mut p = DeflateParams {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    let mut seen = [false; 4];
    let mut client_bits_offered = false;
    let mut server_bits_requested = None;
    for param in params.filter(|s| !s.is_empty()) {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim().to_ascii_lowercase(), Some(v)),
            None => (param.to_ascii_lowercase(), None),
        };
        let i = match name.as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None; // a parameter twice: invalid offer
        }
        match i {
            0 | 1 if value.is_some() => return None,
            0 => p.server_no_context_takeover = true,
            1 => p.client_no_context_takeover = true,
            2 => match parse_bits(value) {
                Ok(Some(8)) => return None, // zlib cannot deflate with a 256-byte window
                Ok(Some(n)) => server_bits_requested = Some(n),
                _ => return None,
            },
            _ => match parse_bits(value) {
                Ok(v) => {
                    client_bits_offered = true;
                    if let Some(n) = v {
                        p.client_max_window_bits = n;
                    }
                }
                Err(()) => return None,
            },
        }
    }
    if let Some(n) = server_bits_requested {
        p.server_max_window_bits = n;
    }
    let mut resp = String::from("permessage-deflate");
    if p.server_no_context_takeover {
        resp.push_str("; server_no_context_takeover");
    }
    if p.client_no_context_takeover {
        resp.push_str("; client_no_context_takeover");
    }
    if server_bits_requested.is_some() {
        resp.push_str(&format!(
            "; server_max_window_bits={}",
            p.server_max_window_bits
        ));
    }
    if client_bits_offered && p.client_max_window_bits < 15 {
        resp.push_str(&format!(
            "; client_max_window_bits={}",
            p.client_max_window_bits
        ));
    }
    Some((p, resp))
}

const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// Bytes written to the client before `poll_write` pushes back.
const WRITE_HIGH_WATER: usize = 256 << 10;

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    rsv23: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(a), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if b.len() < at + 4 {
            return None;
        }
        let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Some(Header {
        fin: b[0] & 0x80 != 0,
        rsv1: b[0] & 0x40 != 0,
        rsv23: b[0] & 0x30,
        opcode: b[0] & 0x0f,
        mask,
        len,
        header_len: at,
    })
}

/// Write a frame header: `first` is the first byte (FIN, RSV, opcode).
fn put_header(out: &mut BytesMut, first: u8, len: u64, mask: Option<[u8; 4]>) {
    out.extend_from_slice(&[first]);
    let m = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.extend_from_slice(&[m | len as u8]);
    } else if len <= u64::from(u16::MAX) {
        out.extend_from_slice(&[m | 126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[m | 127]);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// The client stream with permessage-deflate applied in both directions (or, with
/// [`DeflateStream::client`], a client's stream toward a server that agreed to it).
#[derive(Debug)]
pub struct DeflateStream<S> {
    inner: S,
    /// This end is the client: frames read are unmasked, frames written are masked.
    client_role: bool,
    params: DeflateParams,
    max_message: usize,
    // read side: raw client bytes in, plain frames out
    raw: BytesMut,
    plain: BytesMut,
    inflater: Decompress,
    in_compressed: bool,
    in_message_bytes: u64,
    scratch: Vec<u8>,
    // write side: tungstenite's frames in, compressed frames out
    pending: BytesMut,
    wire: BytesMut,
    deflater: Compress,
    out_compressed: bool,
    /// Bytes of message payload given to the deflater and bytes it produced (for the profile).
    pub stats: (u64, u64),
    eof: bool,
}

impl<S> DeflateStream<S> {
    /// Wrap the client stream with the agreed parameters.
    pub fn new(inner: S, params: DeflateParams, max_message: usize, level: u32) -> Self {
        DeflateStream {
            inner,
            client_role: false,
            params,
            max_message,
            raw: BytesMut::new(),
            plain: BytesMut::new(),
            inflater: Decompress::new_with_window_bits(false, 15),
            in_compressed: false,
            in_message_bytes: 0,
            scratch: Vec::new(),
            pending: BytesMut::new(),
            wire: BytesMut::new(),
            deflater: Compress::new_with_window_bits(
                Compression::new(level),
                false,
                params.server_max_window_bits.max(9),
            ),
            out_compressed: false,
            stats: (0, 0),
            eof: false,
        }
    }

    /// The client's side: `params` as the server answered them; inflates the server's
    /// compressed frames for a tungstenite client above, and compresses (and masks) what it
    /// writes.
    pub fn client(inner: S, params: DeflateParams, max_message: usize, level: u32) -> Self {
        let mut d = DeflateStream::new(inner, params, max_message, level);
        d.client_role = true;
        d.inflater = Decompress::new_with_window_bits(false, params.server_max_window_bits.max(9));
        d.deflater = Compress::new_with_window_bits(
            Compression::new(level),
            false,
            params.client_max_window_bits.max(9),
        );
        d
    }

    /// Bytes the client sent before the stream was wrapped (right behind its request head).
    pub fn with_prefix(mut self, prefix: &[u8]) -> Self {
        self.raw.extend_from_slice(prefix);
        self.translate_in();
        self
    }

    /// Hand tungstenite a header that it refuses: a frame too large for its limits (close 1009).
    fn too_big(&mut self) {
        self.plain.clear();
        put_header(
            &mut self.plain,
            0x82,
            self.max_message as u64 + 1,
            Some([0; 4]),
        );
        self.raw.clear();
    }

    /// Hand tungstenite a frame with RSV1 set, which it refuses as a protocol error (1002).
    fn malformed(&mut self) {
        self.plain.clear();
        put_header(&mut self.plain, 0xC2, 0, Some([0; 4]));
        self.raw.clear();
    }

    /// Turn every complete client frame in `raw` into plain frames in `plain`.
    fn translate_in(&mut self) {
        loop {
            let Some(h) = parse_header(&self.raw) else {
                return;
            };
            if h.len > self.max_message as u64 {
                self.too_big();
                return;
            }
            let total = h.header_len + h.len as usize;
            if self.raw.len() < total {
                self.raw.reserve(total - self.raw.len());
                return;
            }
            let frame = self.raw.split_to(total);
            // Frames toward a server are masked, frames toward a client are not.
            let well_masked = h.mask.is_some() != self.client_role;
            let compressed_start =
                h.opcode != 0 && h.opcode < 8 && h.rsv1 && h.rsv23 == 0 && well_masked;
            let compressed_cont = h.opcode == 0 && !h.rsv1 && self.in_compressed;
            if h.opcode != 0 && h.opcode < 8 {
                self.in_compressed = compressed_start;
                self.in_message_bytes = 0;
            }
            if !(compressed_start || compressed_cont) || !well_masked || h.rsv23 != 0 {
                // Control frames, uncompressed messages and anything malformed reach
                // tungstenite exactly as sent; it enforces the rest of RFC 6455.
                self.plain.extend_from_slice(&frame);
                continue;
            }
            // Unmask and inflate this frame's part of the compressed message.
            let mut payload = frame[h.header_len..].to_vec();
            if let Some(mask) = h.mask {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            if h.fin {
                payload.extend_from_slice(&TRAILER);
            }
            self.scratch.clear();
            let limit =
                self.max_message as u64 - self.in_message_bytes.min(self.max_message as u64);
            match inflate_bounded(&mut self.inflater, &payload, &mut self.scratch, limit) {
                Ok(true) => {}
                Ok(false) => {
                    self.too_big();
                    return;
                }
                Err(()) => {
                    self.malformed();
                    return;
                }
            }
            self.in_message_bytes += self.scratch.len() as u64;
            let first = (u8::from(h.fin) << 7) | h.opcode;
            let plain_mask = (!self.client_role).then_some([0; 4]);
            put_header(
                &mut self.plain,
                first,
                self.scratch.len() as u64,
                plain_mask,
            );
            self.plain.extend_from_slice(&self.scratch);
            if h.fin {
                self.in_compressed = false;
                let peer_resets = if self.client_role {
                    self.params.server_no_context_takeover
                } else {
                    self.params.client_no_context_takeover
                };
                if peer_resets {
                    self.inflater.reset(false);
                }
            }
        }
    }

    /// Turn every complete frame tungstenite wrote into wire frames (compressing data).
    fn translate_out(&mut self) -> io::Result<()> {
        loop {
            let Some(h) = parse_header(&self.pending) else {
                return Ok(());
            };
            let total = h.header_len + h.len as usize;
            if self.pending.len() < total {
                return Ok(());
            }
            let frame = self.pending.split_to(total);
            let is_control = h.opcode >= 8;
            if is_control {
                self.wire.extend_from_slice(&frame);
                continue;
            }
            let mut unmasked;
            let payload = match h.mask {
                // A client's frames come masked from tungstenite: compress the plain bytes.
                Some(mask) => {
                    unmasked = frame[h.header_len..].to_vec();
                    for (i, b) in unmasked.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                    &unmasked[..]
                }
                None => &frame[h.header_len..],
            };
            if h.opcode != 0 {
                self.out_compressed = true;
            }
            let mut out = Vec::with_capacity(payload.len() / 2 + 16);
            deflate_sync(&mut self.deflater, payload, &mut out)?;
            if h.fin && out.ends_with(&TRAILER) {
                out.truncate(out.len() - 4);
            }
            if h.fin && out.is_empty() {
                out.push(0x00); // an empty message compresses to one empty stored block
            }
            self.stats.0 += payload.len() as u64;
            self.stats.1 += out.len() as u64;
            let rsv1 = if h.opcode != 0 { 0x40 } else { 0 };
            let first = (u8::from(h.fin) << 7) | rsv1 | h.opcode;
            put_header(&mut self.wire, first, out.len() as u64, h.mask);
            if let Some(mask) = h.mask {
                for (i, b) in out.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            self.wire.extend_from_slice(&out);
            let we_reset = if self.client_role {
                self.params.client_no_context_takeover
            } else {
                self.params.server_no_context_takeover
            };
            if h.fin && we_reset {
                self.deflater.reset();
            }
        }
    }
}

/// Inflate `input` into `out`; `Ok(false)` as soon as the output exceeds `limit`, `Err` on
/// corrupt data.
fn inflate_bounded(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: u64,
) -> Result<bool, ()> {
    let mut pos = 0;
    loop {
        if out.len() as u64 > limit {
            return Ok(false);
        }
        if out.capacity() - out.len() < 4096 {
            out.reserve(16 << 10);
        }
        let (in0, out0) = (d.total_in(), out.len());
        let st = d
            .decompress_vec(&input[pos..], out, FlushDecompress::Sync)
            .map_err(|_| ())?;
        let consumed = (d.total_in() - in0) as usize;
        let produced = out.len() - out0;
        pos += consumed;
        let room_left = out.len() < out.capacity();
        if st == Status::StreamEnd || (pos >= input.len() && room_left) {
            return Ok(out.len() as u64 <= limit);
        }
        if consumed == 0 && produced == 0 && room_left {
            return Err(()); // no progress with input and room: corrupt stream
        }
    }
}

/// Deflate `input` with a sync flush (output ends at a byte boundary with 00 00 ff ff).
fn deflate_sync(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut pos = 0;
    loop {
        out.reserve(input.len() / 2 + 64);
        let before_in = c.total_in();
        c.compress_vec(&input[pos..], out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        pos += (c.total_in() - before_in) as usize;
        if pos >= input.len() && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeflateStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                // Bytes of an incomplete frame stay unseen; tungstenite sees the EOF.
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.translate_in();
        }
    }
}

impl<S: AsyncWrite + Unpin> DeflateStream<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wire.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wire))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wire.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeflateStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.wire.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        this.pending.extend_from_slice(buf);
        this.translate_out()?;
        // Push what we can now; the rest goes on the next write or flush.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.translate_out()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.translate_out()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_accepts_the_first_acceptable_offer() {
        let (p, r) = negotiate(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(r, "permessage-deflate");
        assert_eq!(p.server_max_window_bits, 15);
        let (p, r) = negotiate([
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10; server_no_context_takeover",
        ])
        .unwrap();
        assert_eq!(p.server_max_window_bits, 10);
        assert!(p.server_no_context_takeover);
        assert_eq!(
            r,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        let (p, r) =
            negotiate(["permessage-deflate; client_max_window_bits=9; client_no_context_takeover"])
                .unwrap();
        assert_eq!(p.client_max_window_bits, 9);
        assert_eq!(
            r,
            "permessage-deflate; client_no_context_takeover; client_max_window_bits=9"
        );
        assert!(negotiate(["permessage-deflate; bogus"]).is_none());
        assert!(negotiate(["permessage-deflate; server_max_window_bits=16"]).is_none());
        assert!(
            negotiate([
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
            ])
            .is_none()
        );
        assert!(negotiate(["x-webkit-deflate-frame"]).is_none());
    }

    #[test]
    fn deflate_then_inflate_round_trips_with_context_takeover() {
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut d = Decompress::new_with_window_bits(false, 15);
        for msg in [&b"hello hello hello hello"[..], b"hello again", b""] {
            let mut out = Vec::new();
            deflate_sync(&mut c, msg, &mut out).unwrap();
            // As sent: the trailer stripped (an empty message is the single byte 0x00) …
            if out.ends_with(&TRAILER) {
                out.truncate(out.len() - 4);
            }
            if out.is_empty() {
                out.push(0x00);
            }
            // … and as received: the trailer appended again.
            out.extend_from_slice(&TRAILER);
            let mut back = Vec::new();
            assert_eq!(inflate_bounded(&mut d, &out, &mut back, 1 << 20), Ok(true));
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn inflation_is_bounded() {
        let mut c = Compress::new_with_window_bits(Compression::new(9), false, 15);
        let big = vec![b'a'; 1 << 20];
        let mut out = Vec::new();
        deflate_sync(&mut c, &big, &mut out).unwrap();
        assert!(out.len() < 10_000);
        let mut d = Decompress::new_with_window_bits(false, 15);
        let mut back = Vec::new();
        assert_eq!(
            inflate_bounded(&mut d, &out, &mut back, 64 << 10),
            Ok(false)
        );
        assert!(back.len() < (1 << 20), "stopped early: {}", back.len());
    }

    #[test]
    fn a_server_answer_gives_the_client_its_parameters() {
        let p =
            accepted("permessage-deflate; server_no_context_takeover; client_max_window_bits=10")
                .unwrap();
        assert!(p.server_no_context_takeover && !p.client_no_context_takeover);
        assert_eq!(
            (p.server_max_window_bits, p.client_max_window_bits),
            (15, 10)
        );
        assert_eq!(accepted("x-webkit-deflate-frame"), None);
        assert_eq!(
            accepted("permessage-deflate; server_max_window_bits=99"),
            None
        );
        assert_eq!(accepted("permessage-deflate; unknown"), None);
    }

    /// A tungstenite client over the client role and a tungstenite server over the server
    /// role, through a pipe: messages both ways arrive intact, compressed on the wire.
    #[tokio::test]
    async fn client_and_server_roles_talk_to_each_other() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::protocol::Role;
        for offer in [
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ] {
            let (params, answer) = negotiate([offer]).unwrap();
            let client_params = accepted(&answer).unwrap();
            let (a, b) = tokio::io::duplex(1 << 16);
            let server = DeflateStream::new(b, params, 1 << 20, 6);
            let client = DeflateStream::client(a, client_params, 1 << 20, 6);
            let mut s = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
            let mut c = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let text = "{\"type\":\"message\",\"text\":\"hello hello hello hello\"}".repeat(20);
            for i in 0..5 {
                c.send(Message::text(format!("{i}{text}"))).await.unwrap();
                let got = s.next().await.unwrap().unwrap();
                assert_eq!(got, Message::text(format!("{i}{text}")));
                s.send(got).await.unwrap();
                assert_eq!(
                    c.next().await.unwrap().unwrap(),
                    Message::text(format!("{i}{text}"))
                );
            }
            let (raw, wire) = c.get_ref().stats;
            assert!(
                wire * 5 < raw,
                "{offer}: {wire} bytes on the wire for {raw}"
            );
            let (raw, wire) = s.get_ref().stats;
            assert!(
                wire * 5 < raw,
                "{offer}: {wire} bytes on the wire for {raw}"
            );
            c.close(None).await.unwrap();
            assert!(matches!(s.next().await, Some(Ok(Message::Close(_)))));
        }
    }
}
