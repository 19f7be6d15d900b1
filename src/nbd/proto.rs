//! NBD wire format: constants, header decoding and reply encoding.
//!
//! Everything here is pure (no I/O), so it is unit-tested and fuzzed
//! directly. Numbers follow the NBD protocol specification (`doc/proto.md`
//! of the NBD project); all integers are big-endian on the wire.

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle negotiation magic (also prefixes each option).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// Select an export, old-fashioned (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Success / end of list.
    pub const ACK: u32 = 1;
    /// One export (reply to LIST).
    pub const SERVER: u32 = 2;
    /// Export information (reply to INFO/GO).
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = (1 << 31) | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) | 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) | 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) | 6;
    /// Server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) | 7;
    /// Option data too large.
    pub const ERR_TOO_BIG: u32 = (1 << 31) | 9;
}

/// NBD_INFO_* types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// Flags field is meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF flag supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Multiple connections share one cache.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without punching holes.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes only if fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error with message.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// NBD error numbers.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status bits.
pub mod alloc {
    /// Unallocated.
    pub const HOLE: u32 = 1;
    /// Reads as zeroes.
    pub const ZERO: u32 = 2;
}

/// The one metadata context essd offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Largest READ/WRITE payload accepted (advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// A malformed message from the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Wrong magic number.
    #[error("bad magic 0x{0:x}")]
    BadMagic(u64),
    /// The message is shorter than its fields need.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A string is not valid UTF-8 or too long.
    #[error("invalid string in {0}")]
    BadString(&'static str),
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (payload length for WRITE).
    pub length: u32,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl Request {
    /// Decodes a 28-byte request header.
    pub fn decode(b: &[u8]) -> Result<Request, WireError> {
        if b.len() < REQUEST_LEN {
            return Err(WireError::Truncated("request header"));
        }
        let magic = be32(b);
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic.into()));
        }
        Ok(Request {
            flags: be16(&b[4..]),
            command: be16(&b[6..]),
            cookie: be64(&b[8..]),
            offset: be64(&b[16..]),
            length: be32(&b[24..]),
        })
    }

    /// Encodes the header (used by tests and tools).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// An option header: option number and data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte option header.
    pub fn decode(b: &[u8]) -> Result<OptionHeader, WireError> {
        if b.len() < 16 {
            return Err(WireError::Truncated("option header"));
        }
        let magic = be64(b);
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic(magic));
        }
        Ok(OptionHeader {
            option: be32(&b[8..]),
            length: be32(&b[12..]),
        })
    }
}

/// Reads a `u32 length + string` field at `*pos`.
fn take_string(data: &[u8], pos: &mut usize, what: &'static str) -> Result<String, WireError> {
    let len_bytes = data.get(*pos..*pos + 4).ok_or(WireError::Truncated(what))?;
    let len = be32(len_bytes) as usize;
    *pos += 4;
    if len > 4096 {
        return Err(WireError::BadString(what));
    }
    let raw = data
        .get(*pos..*pos + len)
        .ok_or(WireError::Truncated(what))?;
    *pos += len;
    String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadString(what))
}

/// Decodes NBD_OPT_INFO / NBD_OPT_GO data: export name and requested infos.
pub fn decode_info_request(data: &[u8]) -> Result<(String, Vec<u16>), WireError> {
    let mut pos = 0;
    let name = take_string(data, &mut pos, "export name")?;
    let count_bytes = data
        .get(pos..pos + 2)
        .ok_or(WireError::Truncated("information request count"))?;
    let count = be16(count_bytes) as usize;
    pos += 2;
    if data.len() != pos + count * 2 {
        return Err(WireError::Truncated("information requests"));
    }
    let requests = (0..count).map(|i| be16(&data[pos + 2 * i..])).collect();
    Ok((name, requests))
}

/// Decodes LIST/SET_META_CONTEXT data: export name and queries.
pub fn decode_meta_request(data: &[u8]) -> Result<(String, Vec<String>), WireError> {
    let mut pos = 0;
    let name = take_string(data, &mut pos, "export name")?;
    let count_bytes = data
        .get(pos..pos + 4)
        .ok_or(WireError::Truncated("query count"))?;
    let count = be32(count_bytes) as usize;
    pos += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(take_string(data, &mut pos, "meta context query")?);
    }
    if pos != data.len() {
        return Err(WireError::Truncated("meta context request"));
    }
    Ok((name, queries))
}

/// Encodes an option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// Encodes a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
    out.freeze()
}

/// Encodes a structured reply chunk header for a payload of `length` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(20 + 8);
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
    out
}

/// Longest string the protocol allows, in bytes.
pub const MAX_STRING: usize = 4096;

/// The longest prefix of `message` that is a string the protocol allows
/// ([`MAX_STRING`] bytes), cut at a character boundary.
pub fn truncate_string(message: &[u8]) -> &[u8] {
    if message.len() <= MAX_STRING {
        return message;
    }
    let mut end = MAX_STRING;
    // A UTF-8 continuation byte is 0b10xx_xxxx.
    while end > 0 && message[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    &message[..end]
}

/// Encodes a final structured error chunk with a message (cut to a string
/// the protocol allows).
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Bytes {
    let msg = truncate_string(message.as_bytes());
    let mut out = chunk_header(chunk::FLAG_DONE, chunk::ERROR, cookie, 6 + msg.len() as u32);
    out.put_u32(error);
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
    out.freeze()
}

/// Encodes a final block-status chunk from `(length, flags)` descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Bytes {
    let len = 4 + 8 * extents.len() as u32;
    let mut out = chunk_header(chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, len);
    out.reserve(len as usize);
    out.put_u32(context);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: cflag::FUA,
            command: cmd::WRITE,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 4096,
        };
        let wire = r.encode();
        assert_eq!(&wire[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&wire).unwrap(), r);
        let mut bad = wire;
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), Err(WireError::BadMagic(0x0060_9513)));
        assert_eq!(
            Request::decode(&wire[..27]),
            Err(WireError::Truncated("request header"))
        );
    }

    #[test]
    fn info_request_decoding() {
        let mut d = Vec::new();
        d.extend_from_slice(&8u32.to_be_bytes());
        d.extend_from_slice(b"000FCA31");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        let (name, reqs) = decode_info_request(&d).unwrap();
        assert_eq!(name, "000FCA31");
        assert_eq!(reqs, vec![info::NAME, info::BLOCK_SIZE]);
        assert!(decode_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(decode_info_request(&long).is_err());
        // A name length pointing past the end must not panic.
        assert!(decode_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn meta_request_decoding() {
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(b"x");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            decode_meta_request(&d).unwrap(),
            ("x".to_string(), vec![BASE_ALLOCATION.to_string()])
        );
        assert!(decode_meta_request(&d[..d.len() - 2]).is_err());
    }

    #[test]
    fn error_messages_are_cut_to_4096_bytes_at_a_character() {
        assert_eq!(truncate_string(b"short"), b"short");
        let long = "é".repeat(3000);
        let cut = truncate_string(long.as_bytes());
        assert_eq!(cut.len(), 4096);
        assert!(std::str::from_utf8(cut).is_ok());
        let odd = format!("x{long}");
        let cut = truncate_string(odd.as_bytes());
        assert_eq!(cut.len(), 4095);
        assert!(std::str::from_utf8(cut).is_ok());
    }

    #[test]
    fn a_structured_error_message_is_cut_to_4096_bytes_at_a_character() {
        // An error message is a string: valid UTF-8, at most 4096 bytes.
        let long = format!("x{}", "é".repeat(3000));
        let e = structured_error(3, errno::EIO, &long);
        let len = u16::from_be_bytes([e[24], e[25]]) as usize;
        assert_eq!(len, 4095);
        assert_eq!(e.len(), 20 + 6 + len);
        assert_eq!(&e[16..20], &(6 + len as u32).to_be_bytes());
        assert!(std::str::from_utf8(&e[26..]).is_ok());
    }

    #[test]
    fn reply_encodings() {
        assert_eq!(
            &simple_reply(7, errno::EIO)[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let e = structured_error(1, errno::EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]);
        let bs = block_status_chunk(2, 1, &[(4096, 0), (8192, 3)]);
        assert_eq!(bs.len(), 20 + 4 + 16);
        assert_eq!(&bs[16..20], &20u32.to_be_bytes());
        let o = option_reply(opt::GO, rep::ACK, &[]);
        assert_eq!(&o[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(o.len(), 20);
    }
}
