//! The transmission phase: pipelined requests, out-of-order replies.
//!
//! The reader parses requests from a buffer and spawns one task per request
//! (bounded by [`MAX_IN_FLIGHT`]: when full, reading stops — backpressure,
//! not errors). Each task sends its encoded reply to a writer task that
//! batches replies into vectored writes. On DISC, EOF, shutdown or a
//! malformed header the reader stops; in-flight requests finish and their
//! replies are written before the connection closes.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::proto::{self, alloc, cflag, chunk, cmd, errno, Request};
use super::{nbd_errno, ProtocolError};
use crate::volume::VolumeError;

/// Requests processed concurrently per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Oversized WRITE payloads up to this size are read and discarded (the
/// request gets an error); larger ones close the connection.
const SKIP_LIMIT: u64 = 256 << 20;
/// Block-status descriptors per reply.
const MAX_EXTENTS: usize = 1024;

type Reply = Vec<Bytes>;

/// Serves one negotiated connection until it ends.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    session: Session,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = BytesMut::with_capacity(256 << 10);
    let result = loop {
        let req = if shutdown.is_cancelled() {
            // Shutting down: serve the requests already received, read no more.
            Ok(parse_buffered(&mut buf)?)
        } else {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => continue,
                r = next_request(&mut reader, &mut buf) => r,
            }
        };
        let (req, payload) = match req {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if req.command == cmd::DISC {
            break Ok(());
        }
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        let session = session.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let reply = handle(&session, req, payload).await;
            let _ = tx.send(reply);
            drop(permit);
        });
    };
    // Let in-flight requests finish; the writer ends when every sender is gone.
    drop(tx);
    let written = writer_task.await;
    result?;
    match written {
        Ok(r) => r,
        Err(e) => Err(ProtocolError::Io(std::io::Error::other(e.to_string()))),
    }
}

/// What a request carries besides its header.
enum Payload {
    None,
    Data(Bytes),
    /// A WRITE whose payload exceeded the maximum and was discarded.
    Oversized,
}

/// Takes one complete request (with payload) from `buf` without reading;
/// `None` if the buffer holds no complete request.
fn parse_buffered(buf: &mut BytesMut) -> Result<Option<(Request, Payload)>, ProtocolError> {
    if buf.len() < proto::REQUEST_LEN {
        return Ok(None);
    }
    let req = Request::decode(&buf[..proto::REQUEST_LEN])?;
    let payload_len = if req.command == cmd::WRITE {
        req.length as usize
    } else {
        0
    };
    if req.length > proto::MAX_PAYLOAD && req.command == cmd::WRITE
        || buf.len() < proto::REQUEST_LEN + payload_len
    {
        return Ok(None);
    }
    buf.advance(proto::REQUEST_LEN);
    if req.command != cmd::WRITE {
        return Ok(Some((req, Payload::None)));
    }
    Ok(Some((
        req,
        Payload::Data(buf.split_to(payload_len).freeze()),
    )))
}

/// Counts the complete requests at the front of a byte stream, the way the
/// transmission phase splits it (fuzzing entry point for the parser).
pub fn count_complete_requests(data: &[u8]) -> Result<usize, ProtocolError> {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while parse_buffered(&mut buf)?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Reads the next request (with its payload). `Ok(None)` on clean EOF.
async fn next_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<(Request, Payload)>, ProtocolError> {
    if !fill(reader, buf, proto::REQUEST_LEN).await? {
        return Ok(None);
    }
    let req = Request::decode(&buf[..proto::REQUEST_LEN])?;
    buf.advance(proto::REQUEST_LEN);
    if req.command != cmd::WRITE {
        return Ok(Some((req, Payload::None)));
    }
    let len = req.length as usize;
    if req.length > proto::MAX_PAYLOAD {
        if u64::from(req.length) > SKIP_LIMIT {
            return Err(ProtocolError::Transmission(format!(
                "write payload of {} bytes exceeds {} and cannot be skipped",
                req.length, SKIP_LIMIT
            )));
        }
        let mut left = len;
        while left > 0 {
            if buf.is_empty() && !fill(reader, buf, 1).await? {
                return Err(ProtocolError::Transmission(
                    "EOF inside write payload".into(),
                ));
            }
            let n = left.min(buf.len());
            buf.advance(n);
            left -= n;
        }
        return Ok(Some((req, Payload::Oversized)));
    }
    if !fill(reader, buf, len).await? {
        return Err(ProtocolError::Transmission(
            "EOF inside write payload".into(),
        ));
    }
    let data = buf.split_to(len).freeze();
    Ok(Some((req, Payload::Data(data))))
}

/// Reads until `buf` holds at least `want` bytes; false on EOF before any
/// byte of a new message.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> Result<bool, ProtocolError> {
    while buf.len() < want {
        let need = want - buf.len();
        if buf.capacity() - buf.len() < need.max(64 << 10) {
            buf.reserve(need.max(256 << 10));
        }
        let n = reader.read_buf(buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(ProtocolError::Transmission("EOF inside a request".into()));
        }
    }
    Ok(true)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> Result<(), ProtocolError> {
    let mut pending: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        pending.extend(first);
        while pending.len() < 64 {
            match rx.try_recv() {
                Ok(more) => pending.extend(more),
                Err(_) => break,
            }
        }
        write_all_vectored(&mut writer, &mut pending).await?;
    }
    writer.flush().await?;
    let _ = writer.shutdown().await;
    Ok(())
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bufs: &mut Vec<Bytes>,
) -> Result<(), ProtocolError> {
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs[first..]
            .iter()
            .take(512)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = writer.write_vectored(&slices).await?;
        if n == 0 {
            return Err(ProtocolError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        while n > 0 {
            let len = bufs[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bufs[first].advance(n);
                n = 0;
            }
        }
        while first < bufs.len() && bufs[first].is_empty() {
            first += 1;
        }
    }
    bufs.clear();
    Ok(())
}

/// Allowed flags per command.
fn allowed_flags(command: u16, structured: bool) -> u16 {
    match command {
        cmd::READ => {
            if structured {
                cflag::DF | cflag::FUA
            } else {
                cflag::FUA
            }
        }
        cmd::WRITE | cmd::TRIM => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => 0,
    }
}

/// Executes one request and encodes its reply.
async fn handle(s: &Session, req: Request, payload: Payload) -> Reply {
    let fail = |err: u32, msg: String| error_reply(s, req.cookie, err, &msg);
    if req.flags & !allowed_flags(req.command, s.structured) != 0 {
        return fail(
            errno::EINVAL,
            format!(
                "unsupported flags 0x{:x} for command {}",
                req.flags, req.command
            ),
        );
    }
    let fua = req.flags & cflag::FUA != 0;
    let v = &s.volume;
    let len = u64::from(req.length);
    let outcome: Result<Option<Reply>, VolumeError> = match req.command {
        cmd::READ => {
            if req.length > proto::MAX_PAYLOAD {
                let code = if s.structured {
                    errno::EOVERFLOW
                } else {
                    errno::EINVAL
                };
                return fail(
                    code,
                    format!(
                        "read of {} bytes exceeds the maximum {}",
                        req.length,
                        proto::MAX_PAYLOAD
                    ),
                );
            }
            if req.length == 0 {
                return fail(errno::EINVAL, "zero-length read".into());
            }
            v.read(req.offset, req.length as usize)
                .await
                .map(|data| Some(read_reply(s, &req, data)))
        }
        cmd::WRITE => match payload {
            Payload::Oversized => {
                let code = if s.structured {
                    errno::EOVERFLOW
                } else {
                    errno::EINVAL
                };
                return fail(
                    code,
                    format!(
                        "write of {} bytes exceeds the maximum {}",
                        req.length,
                        proto::MAX_PAYLOAD
                    ),
                );
            }
            Payload::None => unreachable!("writes always carry a payload"),
            Payload::Data(data) => {
                if data.is_empty() {
                    return fail(errno::EINVAL, "zero-length write".into());
                }
                v.write(req.offset, data, fua).await.map(|()| None)
            }
        },
        cmd::FLUSH => v.flush().await.map(|()| None),
        cmd::TRIM => v.trim(req.offset, len, fua).await.map(|()| None),
        cmd::CACHE => v.cache(req.offset, len).await.map(|()| None),
        cmd::WRITE_ZEROES => {
            let may_punch = req.flags & cflag::NO_HOLE == 0;
            let fast = req.flags & cflag::FAST_ZERO != 0;
            v.write_zeroes(req.offset, len, may_punch, fast, fua)
                .await
                .map(|()| None)
        }
        cmd::BLOCK_STATUS => {
            if !s.base_allocation {
                return fail(errno::EINVAL, "no metadata context was negotiated".into());
            }
            if req.length == 0 {
                return fail(errno::EINVAL, "zero-length block status".into());
            }
            let max = if req.flags & cflag::REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            v.extents(req.offset, len, max).await.map(|extents| {
                let descriptors: Vec<(u32, u32)> = extents
                    .iter()
                    .map(|e| {
                        let flags = if e.hole { alloc::HOLE | alloc::ZERO } else { 0 };
                        (e.length as u32, flags)
                    })
                    .collect();
                Some(vec![proto::block_status_chunk(
                    req.cookie,
                    BASE_ALLOCATION_ID,
                    &descriptors,
                )])
            })
        }
        other => return fail(errno::EINVAL, format!("unknown command {other}")),
    };
    match outcome {
        Ok(Some(reply)) => reply,
        Ok(None) => ok_reply(s, req.cookie),
        Err(e) => fail(nbd_errno(&e), e.to_string()),
    }
}

fn read_reply(s: &Session, req: &Request, data: Bytes) -> Reply {
    if !s.structured {
        return vec![proto::simple_reply(req.cookie, 0), data];
    }
    let mut hdr = proto::chunk_header(
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        req.cookie,
        8 + data.len() as u32,
    );
    hdr.extend_from_slice(&req.offset.to_be_bytes());
    vec![hdr.freeze(), data]
}

fn ok_reply(s: &Session, cookie: u64) -> Reply {
    if s.structured {
        vec![proto::chunk_header(chunk::FLAG_DONE, chunk::NONE, cookie, 0).freeze()]
    } else {
        vec![proto::simple_reply(cookie, 0)]
    }
}

fn error_reply(s: &Session, cookie: u64, error: u32, message: &str) -> Reply {
    tracing::debug!(volume = s.volume.name(), error, "request failed: {message}");
    if s.structured {
        vec![proto::structured_error(cookie, error, message)]
    } else {
        vec![proto::simple_reply(cookie, error)]
    }
}
