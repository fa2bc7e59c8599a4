//! Tracks WebSocket frame headers in a byte stream that is forwarded unmodified (`zero_copy`).
//!
//! Only headers are parsed: payload bytes are skipped by count and never copied, except the
//! (at most 125 byte) payload of a close frame, unmasked into a fixed array so that the close
//! code and reason can be recorded. Nothing allocates.

/// What the tracker saw complete in a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEvent {
    /// A complete data message (text or binary, all fragments), with its payload size.
    Message(u64),
    /// A ping frame.
    Ping,
    /// A pong frame.
    Pong,
    /// A close frame.
    Close,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting a header: `have` bytes of `need` (2 until the length is known).
    Header { have: u8, need: u8 },
    /// Skipping `remaining` payload bytes of the current frame.
    Payload { remaining: u64 },
}

/// The frame-header state machine for one direction.
#[derive(Debug, Clone)]
pub struct FrameTracker {
    state: State,
    head: [u8; 14],
    /// The current frame is a control frame with this opcode.
    control: Option<u8>,
    /// A data message has started and its final frame has not arrived yet.
    in_message: bool,
    /// The current data frame is the message's last.
    fin: bool,
    mask: Option<[u8; 4]>,
    /// Offset into the current frame's payload (for unmasking the close payload).
    offset: u64,
    /// Bytes of the data message being assembled across fragments.
    message_bytes: u64,
    /// Allocated at the first close frame (every live connection holds a tracker per direction).
    close_payload: Option<Box<[u8; 125]>>,
    close_len: u8,
    close_seen: bool,
    /// The stream violated the framing (length > 2^63, control frame too long). Tracking stops.
    pub broken: bool,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            state: State::Header { have: 0, need: 2 },
            head: [0; 14],
            control: None,
            in_message: false,
            fin: false,
            mask: None,
            offset: 0,
            message_bytes: 0,
            close_payload: None,
            close_len: 0,
            close_seen: false,
            broken: false,
        }
    }
}

impl FrameTracker {
    /// True between frames: a frame may be inserted here without corrupting the stream.
    pub fn at_frame_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. }) && !self.broken
    }

    /// True between messages: at a frame boundary and not inside a fragmented message.
    pub fn at_message_boundary(&self) -> bool {
        self.at_frame_boundary() && !self.in_message
    }

    /// Payload bytes left in the current data frame, when the next bytes are payload that may
    /// be forwarded unseen (not a control frame: their payload is small and a close frame's is
    /// read for its code).
    pub fn opaque_payload_left(&self) -> Option<u64> {
        match self.state {
            State::Payload { remaining } if self.control.is_none() && !self.broken => {
                Some(remaining)
            }
            _ => None,
        }
    }

    /// Account for `n` payload bytes forwarded without being seen (splice). `n` must not exceed
    /// [`Self::opaque_payload_left`].
    pub fn skip_payload(&mut self, n: u64, on_event: impl FnMut(FrameEvent)) {
        let mut on_event = on_event;
        if let State::Payload { remaining } = self.state {
            let n = n.min(remaining);
            self.offset += n;
            if remaining == n {
                self.end_frame(&mut on_event);
            } else {
                self.state = State::Payload {
                    remaining: remaining - n,
                };
            }
        }
    }

    /// The code and reason of the last close frame seen, if any (1005 "no status" for a close
    /// frame without a code, as RFC 6455 §7.1.5 reports it).
    pub fn close(&self) -> Option<(u16, &[u8])> {
        if self.close_len >= 2
            && let Some(p) = &self.close_payload
        {
            let p = &p[..usize::from(self.close_len)];
            Some((u16::from_be_bytes([p[0], p[1]]), &p[2..]))
        } else if self.close_seen {
            Some((1005, &[]))
        } else {
            None
        }
    }

    /// Feed forwarded bytes; `on_event` is called for each completed frame or message.
    pub fn feed(&mut self, mut data: &[u8], mut on_event: impl FnMut(FrameEvent)) {
        while !data.is_empty() && !self.broken {
            match self.state {
                State::Header { have, need } => {
                    let take = usize::from(need - have).min(data.len());
                    self.head[usize::from(have)..usize::from(have) + take]
                        .copy_from_slice(&data[..take]);
                    data = &data[take..];
                    let have = have + take as u8;
                    if have < need {
                        self.state = State::Header { have, need };
                        continue;
                    }
                    if need == 2 {
                        let masked = self.head[1] & 0x80 != 0;
                        let len7 = self.head[1] & 0x7f;
                        let ext = match len7 {
                            126 => 2,
                            127 => 8,
                            _ => 0,
                        };
                        let full = 2 + ext + if masked { 4 } else { 0 };
                        if full > 2 {
                            self.state = State::Header { have, need: full };
                            continue;
                        }
                    }
                    self.start_frame(&mut on_event);
                }
                State::Payload { remaining } => {
                    let take = remaining.min(data.len() as u64) as usize;
                    if self.control == Some(0x8) {
                        let payload = self.close_payload.get_or_insert_with(|| Box::new([0; 125]));
                        for (i, b) in data[..take].iter().enumerate() {
                            let off = self.offset + i as u64;
                            if off < 125 {
                                let m = self.mask.map_or(0, |k| k[(off % 4) as usize]);
                                payload[off as usize] = b ^ m;
                            }
                        }
                    }
                    self.offset += take as u64;
                    data = &data[take..];
                    let remaining = remaining - take as u64;
                    if remaining == 0 {
                        self.end_frame(&mut on_event);
                    } else {
                        self.state = State::Payload { remaining };
                    }
                }
            }
        }
    }

    fn start_frame(&mut self, on_event: &mut impl FnMut(FrameEvent)) {
        let h = &self.head;
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let len7 = h[1] & 0x7f;
        let (len, mask_at) = match len7 {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                10,
            ),
            n => (u64::from(n), 2),
        };
        if len >> 63 != 0 || (opcode >= 8 && len > 125) {
            self.broken = true;
            return;
        }
        self.mask = masked.then(|| [h[mask_at], h[mask_at + 1], h[mask_at + 2], h[mask_at + 3]]);
        if opcode < 8 {
            // data frame (0 = continuation): part of the current message
            self.control = None;
            self.fin = fin;
            self.in_message = true;
            self.message_bytes += len;
        } else {
            // control frames may interleave a fragmented message and never change it
            self.control = Some(opcode);
        }
        self.offset = 0;
        if opcode == 0x8 {
            self.close_len = len.min(125) as u8;
            self.close_seen = true;
        }
        if len == 0 {
            self.end_frame(on_event);
        } else {
            self.state = State::Payload { remaining: len };
        }
    }

    fn end_frame(&mut self, on_event: &mut impl FnMut(FrameEvent)) {
        self.state = State::Header { have: 0, need: 2 };
        if let Some(c) = self.control.take() {
            on_event(match c {
                0x8 => FrameEvent::Close,
                0x9 => FrameEvent::Ping,
                _ => FrameEvent::Pong,
            });
            return;
        }
        if self.fin {
            on_event(FrameEvent::Message(self.message_bytes));
            self.message_bytes = 0;
            self.in_message = false;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A frame, masked with `mask` when given (the tests of other modules build theirs here).
    pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut v = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => v.push(m | n as u8),
            n if n < 65536 => {
                v.push(m | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(m | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                v.extend_from_slice(&k);
                v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => v.extend_from_slice(payload),
        }
        v
    }

    fn events(stream: &[u8], chunk: usize) -> (Vec<FrameEvent>, FrameTracker) {
        let mut t = FrameTracker::default();
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            t.feed(c, |e| out.push(e));
        }
        (out, t)
    }

    #[test]
    fn counts_messages_of_every_length_form_in_any_chunking() {
        let mut s = frame(true, 1, b"hi", None);
        s.extend(frame(true, 2, &vec![7; 300], Some([1, 2, 3, 4])));
        s.extend(frame(true, 2, &vec![9; 70_000], None));
        for chunk in [1, 3, 7, 64, 100_000] {
            let (ev, t) = events(&s, chunk);
            assert_eq!(
                ev,
                vec![
                    FrameEvent::Message(2),
                    FrameEvent::Message(300),
                    FrameEvent::Message(70_000)
                ],
                "chunk {chunk}"
            );
            assert!(t.at_message_boundary());
        }
    }

    #[test]
    fn fragments_make_one_message_and_control_frames_interleave() {
        let mut s = frame(false, 1, b"abc", None);
        s.extend(frame(true, 9, b"p", None));
        s.extend(frame(false, 0, b"de", None));
        let (ev, t) = events(&s, 2);
        assert_eq!(ev, vec![FrameEvent::Ping]);
        assert!(t.at_frame_boundary());
        assert!(!t.at_message_boundary());
        let mut s2 = s.clone();
        s2.extend(frame(true, 0, b"f", None));
        let (ev, t) = events(&s2, 5);
        assert_eq!(ev, vec![FrameEvent::Ping, FrameEvent::Message(6)]);
        assert!(t.at_message_boundary());
    }

    #[test]
    fn close_code_and_reason_are_unmasked() {
        let mut payload = 4001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye now");
        let s = frame(true, 8, &payload, Some([9, 8, 7, 6]));
        let (ev, t) = events(&s, 3);
        assert_eq!(ev, vec![FrameEvent::Close]);
        assert_eq!(t.close(), Some((4001, &b"bye now"[..])));
    }

    #[test]
    fn skipped_payload_completes_messages() {
        let f = frame(true, 2, &vec![3u8; 50_000], None);
        let mut t = FrameTracker::default();
        let mut ev = Vec::new();
        t.feed(&f[..100], |e| ev.push(e));
        let left = t.opaque_payload_left().unwrap();
        assert_eq!(left, 50_000 - (100 - 4));
        t.skip_payload(left - 10, |e| ev.push(e));
        assert!(ev.is_empty());
        t.feed(&f[f.len() - 10..], |e| ev.push(e));
        assert_eq!(ev, vec![FrameEvent::Message(50_000)]);
        assert!(t.at_message_boundary());
        assert_eq!(t.opaque_payload_left(), None);
    }

    #[test]
    fn oversized_control_frame_stops_tracking() {
        let mut s = vec![0x89, 126];
        s.extend_from_slice(&200u16.to_be_bytes());
        let (_, t) = events(&s, 10);
        assert!(t.broken);
        assert!(!t.at_frame_boundary());
    }
}
