//! The PPRC peer protocol's frames.
//!
//! A frame is a 20-byte header followed by `length` payload bytes, all
//! integers big-endian:
//!
//! ```text
//! magic u32 "EPPR" | kind u16 | flags u16 | request id u64 | length u32 | payload
//! ```
//!
//! Request IDs let a link pipeline many writes and match acknowledgements
//! arriving in any order. A decoder never trusts a length: the header's
//! length is checked against [`MAX_PAYLOAD`] before anything is buffered,
//! and every field read checks the bytes left. A malformed frame is an
//! error for that link only.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// `EPPR`.
pub const MAGIC: u32 = 0x4550_5052;
/// Protocol version sent in [`Message::Hello`].
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// Largest control request or reply body.
pub const MAX_CONTROL: usize = 1 << 20;
/// Largest payload: a 32 MiB write plus its fields.
pub const MAX_PAYLOAD: u32 = (32 << 20) + 64;
/// Bytes of a hello nonce and of an authentication proof.
pub const NONCE_LEN: usize = 32;

/// Frame kinds.
mod kind {
    pub const HELLO: u16 = 1;
    pub const AUTH: u16 = 2;
    pub const WRITE: u16 = 3;
    pub const ZERO: u16 = 4;
    pub const TRIM: u16 = 5;
    pub const FLUSH: u16 = 6;
    pub const ACK: u16 = 7;
    pub const BITMAP_REQUEST: u16 = 8;
    pub const BITMAP: u16 = 9;
    pub const STATE: u16 = 10;
    pub const HEARTBEAT: u16 = 11;
    pub const GOODBYE: u16 = 12;
    pub const CONTROL: u16 = 13;
    pub const REPLY: u16 = 14;
}

/// Frame flag: write with FUA / make durable before acknowledging.
pub const FLAG_FUA: u16 = 1;
/// Frame flag: zeroing may leave holes.
pub const FLAG_PUNCH: u16 = 2;
/// Frame flag: a write of an initial copy or resync (the secondary starts
/// writing it back to disk at once).
pub const FLAG_COPY: u16 = 4;

/// A malformed frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong magic number: not a PPRC link, or lost framing.
    #[error("bad frame magic 0x{0:08x}")]
    BadMagic(u32),
    /// The header announces more payload than any frame may carry.
    #[error("frame payload of {0} bytes exceeds the maximum {MAX_PAYLOAD}")]
    TooLarge(u32),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// Unknown flag bits for this kind.
    #[error("unknown flags 0x{flags:x} on frame kind {kind}")]
    BadFlags {
        /// Frame kind.
        kind: u16,
        /// Flags received.
        flags: u16,
    },
    /// The payload is shorter or longer than its fields.
    #[error("malformed payload of frame kind {kind}: {what}")]
    Malformed {
        /// Frame kind.
        kind: u16,
        /// What is wrong.
        what: &'static str,
    },
}

/// A volume named on the wire: its 8-character ID.
pub type VolumeName = [u8; 8];

/// The wire name of a volume ID (IDs are 8 ASCII characters).
pub fn volume_name(id: &str) -> VolumeName {
    let mut name = [0u8; 8];
    let bytes = id.as_bytes();
    let n = bytes.len().min(8);
    name[..n].copy_from_slice(&bytes[..n]);
    name
}

/// Pair states carried by [`Message::State`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PairState {
    /// Not in a pair.
    Simplex = 0,
    /// Initial copy or resync in progress.
    DuplexPending = 1,
    /// In sync.
    Duplex = 2,
    /// Mirroring stopped; changes recorded.
    Suspended = 3,
}

impl PairState {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => PairState::Simplex,
            1 => PairState::DuplexPending,
            2 => PairState::Duplex,
            3 => PairState::Suspended,
            _ => return None,
        })
    }
}

/// One peer-protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame each way: version, own serial, the serial expected at
    /// the other end, and a fresh nonce for the authentication proof.
    Hello {
        /// Protocol version.
        version: u16,
        /// Sender's serial.
        serial: [u8; 5],
        /// Serial the sender expects the receiver to have.
        peer: [u8; 5],
        /// Random bytes for this link.
        nonce: [u8; NONCE_LEN],
    },
    /// Proof of the shared secret over both hellos.
    Auth {
        /// The proof (a MAC over both nonces and serials).
        proof: [u8; NONCE_LEN],
    },
    /// Write data to the secondary.
    Write {
        /// Target volume.
        volume: VolumeName,
        /// Byte offset.
        offset: u64,
        /// Durable before acknowledging.
        fua: bool,
        /// Part of an initial copy or resync.
        copy: bool,
        /// The data.
        data: Bytes,
    },
    /// Zero a range.
    Zero {
        /// Target volume.
        volume: VolumeName,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Holes allowed.
        punch: bool,
    },
    /// Discard a range.
    Trim {
        /// Target volume.
        volume: VolumeName,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Barrier: acknowledged once every earlier write on the volume is durable.
    Flush {
        /// Target volume.
        volume: VolumeName,
    },
    /// Completion of the request with the frame's ID; `error` 0 is success.
    Ack {
        /// 0 or an errno.
        error: u32,
    },
    /// Ask for a volume's change-recording (out-of-sync) bitmap.
    BitmapRequest {
        /// Volume.
        volume: VolumeName,
    },
    /// A volume's bitmap.
    Bitmap {
        /// Volume.
        volume: VolumeName,
        /// Track size in bytes.
        track_size: u32,
        /// Number of tracks.
        tracks: u64,
        /// `ceil(tracks / 8)` bytes, bit `t` = track `t`.
        bits: Bytes,
    },
    /// A pair's state changed.
    State {
        /// Volume.
        volume: VolumeName,
        /// New state.
        state: PairState,
        /// Why (suspend reasons), as a small code.
        reason: u8,
    },
    /// Keep-alive with the sender's clock in milliseconds since the epoch.
    Heartbeat {
        /// Sender's time.
        unix_ms: u64,
    },
    /// Orderly close of the link.
    Goodbye,
    /// A pair-management request (JSON), answered by [`Message::Reply`].
    Control {
        /// The request body.
        body: Bytes,
    },
    /// The answer to a [`Message::Control`]: `error` 0 and a JSON body, or
    /// an errno and a message.
    Reply {
        /// 0 or an errno.
        error: u32,
        /// JSON body or error message.
        body: Bytes,
    },
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: u16,
    /// Flags (valid for the kind).
    pub flags: u16,
    /// Request ID.
    pub id: u64,
    /// Payload bytes that follow (at most [`MAX_PAYLOAD`]).
    pub length: u32,
}

/// A message with its request ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Request ID (acknowledgements carry the ID they answer).
    pub id: u64,
    /// The message.
    pub message: Message,
}

struct Reader<'a> {
    kind: u16,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed {
                kind: self.kind,
                what: "payload too short",
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn end(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                kind: self.kind,
                what: "trailing bytes",
            })
        }
    }
}

impl Frame {
    fn kind_and_flags(&self) -> (u16, u16) {
        match &self.message {
            Message::Hello { .. } => (kind::HELLO, 0),
            Message::Auth { .. } => (kind::AUTH, 0),
            Message::Write { fua, copy, .. } => (
                kind::WRITE,
                if *fua { FLAG_FUA } else { 0 } | if *copy { FLAG_COPY } else { 0 },
            ),
            Message::Zero { punch, .. } => (kind::ZERO, if *punch { FLAG_PUNCH } else { 0 }),
            Message::Trim { .. } => (kind::TRIM, 0),
            Message::Flush { .. } => (kind::FLUSH, 0),
            Message::Ack { .. } => (kind::ACK, 0),
            Message::BitmapRequest { .. } => (kind::BITMAP_REQUEST, 0),
            Message::Bitmap { .. } => (kind::BITMAP, 0),
            Message::State { .. } => (kind::STATE, 0),
            Message::Heartbeat { .. } => (kind::HEARTBEAT, 0),
            Message::Goodbye => (kind::GOODBYE, 0),
            Message::Control { .. } => (kind::CONTROL, 0),
            Message::Reply { .. } => (kind::REPLY, 0),
        }
    }

    /// Encodes the frame. Large data is appended as a separate `Bytes` so
    /// write payloads are not copied.
    pub fn encode(&self) -> Vec<Bytes> {
        let (kind, flags) = self.kind_and_flags();
        let mut p = BytesMut::new();
        let mut tail = None;
        match &self.message {
            Message::Hello {
                version,
                serial,
                peer,
                nonce,
            } => {
                p.put_u16(*version);
                p.put_slice(serial);
                p.put_slice(peer);
                p.put_slice(nonce);
            }
            Message::Auth { proof } => p.put_slice(proof),
            Message::Write {
                volume,
                offset,
                data,
                ..
            } => {
                p.put_slice(volume);
                p.put_u64(*offset);
                tail = Some(data.clone());
            }
            Message::Zero {
                volume,
                offset,
                len,
                ..
            }
            | Message::Trim {
                volume,
                offset,
                len,
            } => {
                p.put_slice(volume);
                p.put_u64(*offset);
                p.put_u64(*len);
            }
            Message::Flush { volume } | Message::BitmapRequest { volume } => p.put_slice(volume),
            Message::Ack { error } => p.put_u32(*error),
            Message::Bitmap {
                volume,
                track_size,
                tracks,
                bits,
            } => {
                p.put_slice(volume);
                p.put_u32(*track_size);
                p.put_u64(*tracks);
                tail = Some(bits.clone());
            }
            Message::State {
                volume,
                state,
                reason,
            } => {
                p.put_slice(volume);
                p.put_u8(*state as u8);
                p.put_u8(*reason);
            }
            Message::Heartbeat { unix_ms } => p.put_u64(*unix_ms),
            Message::Goodbye => {}
            Message::Control { body } => tail = Some(body.clone()),
            Message::Reply { error, body } => {
                p.put_u32(*error);
                tail = Some(body.clone());
            }
        }
        let length = p.len() + tail.as_ref().map_or(0, |t| t.len());
        let mut h = BytesMut::with_capacity(HEADER_LEN + p.len());
        h.put_u32(MAGIC);
        h.put_u16(kind);
        h.put_u16(flags);
        h.put_u64(self.id);
        h.put_u32(length as u32);
        h.extend_from_slice(&p);
        let mut out = vec![h.freeze()];
        out.extend(tail);
        out
    }

    /// Checks the header at the front of `buf` (`Ok(None)`: fewer than
    /// [`HEADER_LEN`] bytes) without consuming anything.
    pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, WireError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = &buf[..HEADER_LEN];
        let magic = h.get_u32();
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let kind = h.get_u16();
        let flags = h.get_u16();
        let id = h.get_u64();
        let length = h.get_u32();
        if length > MAX_PAYLOAD {
            return Err(WireError::TooLarge(length));
        }
        let allowed = match kind {
            kind::WRITE => FLAG_FUA | FLAG_COPY,
            kind::ZERO => FLAG_PUNCH,
            kind::HELLO..=kind::REPLY => 0,
            other => return Err(WireError::UnknownKind(other)),
        };
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags { kind, flags });
        }
        Ok(Some(Header {
            kind,
            flags,
            id,
            length,
        }))
    }

    /// Decodes a frame from its checked header and its whole payload.
    pub fn from_parts(header: Header, payload: Bytes) -> Result<Frame, WireError> {
        if payload.len() != header.length as usize {
            return Err(WireError::Malformed {
                kind: header.kind,
                what: "payload length differs from the header",
            });
        }
        let message = Self::decode_payload(header.kind, header.flags, payload)?;
        Ok(Frame {
            id: header.id,
            message,
        })
    }

    /// Decodes one frame from the front of `buf`. `Ok(None)` means more
    /// bytes are needed; on success the frame's bytes are consumed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some(header) = Self::peek_header(buf)? else {
            return Ok(None);
        };
        if buf.len() < HEADER_LEN + header.length as usize {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(header.length as usize).freeze();
        Self::from_parts(header, payload).map(Some)
    }

    fn decode_payload(kind: u16, flags: u16, payload: Bytes) -> Result<Message, WireError> {
        let mut r = Reader {
            kind,
            buf: &payload[..],
        };
        let message = match kind {
            kind::HELLO => Message::Hello {
                version: u16::from_be_bytes(r.array()?),
                serial: r.array()?,
                peer: r.array()?,
                nonce: r.array()?,
            },
            kind::AUTH => Message::Auth { proof: r.array()? },
            kind::WRITE => {
                let volume = r.array()?;
                let offset = r.u64()?;
                let at = payload.len() - r.buf.len();
                if at == payload.len() {
                    return Err(WireError::Malformed {
                        kind,
                        what: "write without data",
                    });
                }
                return Ok(Message::Write {
                    volume,
                    offset,
                    fua: flags & FLAG_FUA != 0,
                    copy: flags & FLAG_COPY != 0,
                    data: payload.slice(at..),
                });
            }
            kind::ZERO => Message::Zero {
                volume: r.array()?,
                offset: r.u64()?,
                len: r.u64()?,
                punch: flags & FLAG_PUNCH != 0,
            },
            kind::TRIM => Message::Trim {
                volume: r.array()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            kind::FLUSH => Message::Flush { volume: r.array()? },
            kind::ACK => Message::Ack { error: r.u32()? },
            kind::BITMAP_REQUEST => Message::BitmapRequest { volume: r.array()? },
            kind::BITMAP => {
                let volume = r.array()?;
                let track_size = r.u32()?;
                let tracks = r.u64()?;
                let at = payload.len() - r.buf.len();
                if (payload.len() - at) as u64 != tracks.div_ceil(8) {
                    return Err(WireError::Malformed {
                        kind,
                        what: "bitmap length does not match its track count",
                    });
                }
                return Ok(Message::Bitmap {
                    volume,
                    track_size,
                    tracks,
                    bits: payload.slice(at..),
                });
            }
            kind::STATE => Message::State {
                volume: r.array()?,
                state: PairState::from_u8(r.u8()?).ok_or(WireError::Malformed {
                    kind,
                    what: "unknown pair state",
                })?,
                reason: r.u8()?,
            },
            kind::HEARTBEAT => Message::Heartbeat { unix_ms: r.u64()? },
            kind::GOODBYE => Message::Goodbye,
            kind::CONTROL => {
                if payload.len() > MAX_CONTROL {
                    return Err(WireError::Malformed {
                        kind,
                        what: "control body too large",
                    });
                }
                return Ok(Message::Control { body: payload });
            }
            kind::REPLY => {
                let error = r.u32()?;
                let at = payload.len() - r.buf.len();
                if payload.len() - at > MAX_CONTROL {
                    return Err(WireError::Malformed {
                        kind,
                        what: "reply body too large",
                    });
                }
                return Ok(Message::Reply {
                    error,
                    body: payload.slice(at..),
                });
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        r.end()?;
        Ok(message)
    }
}

/// Decodes every complete frame at the front of `data` (fuzzing entry
/// point); returns how many there were.
pub fn count_frames(data: &[u8]) -> Result<usize, WireError> {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Some(frame) = Frame::decode(&mut buf)? {
        // Whatever decodes must encode back to the same bytes.
        let again: Vec<u8> = frame.encode().concat();
        let mut round = BytesMut::from(&again[..]);
        assert_eq!(Frame::decode(&mut round), Ok(Some(frame)));
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        let v = *b"000FCA31";
        vec![
            Message::Hello {
                version: VERSION,
                serial: *b"FCA31",
                peer: *b"FCB02",
                nonce: [7; NONCE_LEN],
            },
            Message::Auth {
                proof: [9; NONCE_LEN],
            },
            Message::Write {
                volume: v,
                offset: 1 << 33,
                fua: true,
                copy: true,
                data: Bytes::from(vec![5u8; 4096]),
            },
            Message::Zero {
                volume: v,
                offset: 4096,
                len: 1 << 20,
                punch: true,
            },
            Message::Trim {
                volume: v,
                offset: 0,
                len: 65536,
            },
            Message::Flush { volume: v },
            Message::Ack { error: 5 },
            Message::BitmapRequest { volume: v },
            Message::Bitmap {
                volume: v,
                track_size: 65536,
                tracks: 17,
                bits: Bytes::from_static(&[0xff, 0x00, 0x01]),
            },
            Message::State {
                volume: v,
                state: PairState::Suspended,
                reason: 2,
            },
            Message::Heartbeat {
                unix_ms: 1_795_000_000_000,
            },
            Message::Goodbye,
            Message::Control {
                body: Bytes::from_static(b"{\"op\":\"query\"}"),
            },
            Message::Reply {
                error: 0,
                body: Bytes::from_static(b"{}"),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_pipelined() {
        let mut stream = BytesMut::new();
        let frames: Vec<Frame> = all()
            .into_iter()
            .enumerate()
            .map(|(i, message)| Frame {
                id: i as u64 * 3,
                message,
            })
            .collect();
        for f in &frames {
            for part in f.encode() {
                stream.extend_from_slice(&part);
            }
        }
        // Byte by byte: incomplete frames ask for more, never fail.
        let whole = stream.clone();
        let mut partial = BytesMut::new();
        let mut decoded = Vec::new();
        for b in whole.iter() {
            partial.extend_from_slice(&[*b]);
            if let Some(f) = Frame::decode(&mut partial).unwrap() {
                decoded.push(f);
            }
        }
        assert_eq!(decoded, frames);
        assert_eq!(count_frames(&stream).unwrap(), frames.len());
    }

    #[test]
    fn rejects_bad_frames() {
        let frame = Frame {
            id: 1,
            message: Message::Flush {
                volume: *b"000FCA31",
            },
        };
        let good: Vec<u8> = frame.encode().concat();
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(
            Frame::decode(&mut BytesMut::from(&bad[..])),
            Err(WireError::BadMagic(0x0050_5052))
        );
        let mut huge = good.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Frame::decode(&mut BytesMut::from(&huge[..])),
            Err(WireError::TooLarge(u32::MAX))
        );
        let mut kind = good.clone();
        kind[4..6].copy_from_slice(&99u16.to_be_bytes());
        assert_eq!(
            Frame::decode(&mut BytesMut::from(&kind[..])),
            Err(WireError::UnknownKind(99))
        );
        let mut flags = good.clone();
        flags[6..8].copy_from_slice(&FLAG_FUA.to_be_bytes());
        assert!(matches!(
            Frame::decode(&mut BytesMut::from(&flags[..])),
            Err(WireError::BadFlags { .. })
        ));
        // A Flush payload one byte short, and one byte long.
        let mut short = good[..good.len() - 1].to_vec();
        short[16..20].copy_from_slice(&7u32.to_be_bytes());
        assert!(matches!(
            Frame::decode(&mut BytesMut::from(&short[..])),
            Err(WireError::Malformed { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        long[16..20].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            Frame::decode(&mut BytesMut::from(&long[..])),
            Err(WireError::Malformed { .. })
        ));
        // A bitmap whose bits do not match its track count.
        let bm = Frame {
            id: 2,
            message: Message::Bitmap {
                volume: *b"000FCA31",
                track_size: 4096,
                tracks: 100,
                bits: Bytes::from_static(&[1, 2]),
            },
        };
        let wire: Vec<u8> = bm.encode().concat();
        assert!(matches!(
            Frame::decode(&mut BytesMut::from(&wire[..])),
            Err(WireError::Malformed { .. })
        ));
    }
}
