//! The transmission phase: pipelined requests, out-of-order replies.
//!
//! One task serves a connection. It takes every complete request out of
//! its receive buffer and starts it in a [`Pipeline`]: a request whose I/O
//! finishes at once (a page-cache write, a cache hit) is answered without
//! any task or thread hop; one that must wait (a disk read, a mirrored
//! write waiting for the peer) stays in flight in the same task, at most
//! [`MAX_IN_FLIGHT`] of them, holding about [`MAX_IN_FLIGHT_BYTES`] with
//! the replies not yet written (when full, reading stops — backpressure,
//! not errors). The replies of everything one wake-up finished leave in one
//! vectored write. A batch of requests that send to a peer (mirrored
//! writes) ends after [`MIRRORED_BATCH`] of them; the rest of the read
//! starts once their local parts are done. While a large WRITE is still
//! arriving over TCP, the socket wakes the task only once all of it is
//! there ([`LowWater`]). On DISC, EOF or a malformed header reading stops;
//! requests in flight finish and their replies are written before the
//! connection closes.
//!
//! When the server shuts down, the requests it had received by then are
//! served; every request received later is answered `NBD_ESHUTDOWN` without
//! being carried out (the protocol's wording for "any subsequently received
//! requests"), until the client disconnects (as it must on `ESHUTDOWN`) or
//! sends nothing for [`SHUTDOWN_LINGER`] with nothing in flight. No request
//! the client sent before the connection closes is left unanswered. A
//! client that goes on sending regardless is cut off [`SHUTDOWN_GRACE`]
//! after the shutdown began: nothing more is read from it, and the whole
//! requests already read are still answered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::proto::{self, alloc, cflag, chunk, cmd, errno, Request};
use super::{nbd_errno, ProtocolError};
use crate::pipeline::{write_batch, Batch, LowWater, Pipeline, ReadLowWater, ReadPlan, READ_CHUNK};
use crate::volume::VolumeError;

/// Requests processed concurrently per connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Bytes the requests in flight on one connection may hold (write
/// payloads, read buffers) before no more start: 128 reads of 32 MiB
/// would otherwise hold 4 GiB. A request always starts when less is held,
/// so one over the budget still runs (alone).
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Requests one batch starts once they send to a peer (see
/// [`Batch`]). Each batch's local writes run after its sends, and replies
/// leave between batches: starting all of a deep queue (32 mirrored 4 KiB
/// writes) as one batch kept every reply until the last local write, and
/// the client, then the peer, sat idle meanwhile (docs/BENCHMARKS.md,
/// PPRC). Requests without a peer are started all at once.
pub const MIRRORED_BATCH: usize = 8;
/// Oversized WRITE payloads up to this size are read and discarded (the
/// request gets an error); larger ones close the connection.
const SKIP_LIMIT: u64 = 256 << 20;
/// Block-status descriptors per reply.
const MAX_EXTENTS: usize = 1024;
/// Once the server shuts down, how long a connection with nothing in flight
/// waits for more requests (to answer them `ESHUTDOWN`) before it closes.
pub const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);
/// Once the server shuts down, how long a connection reads requests at
/// most (to answer them `ESHUTDOWN`), however busy its client.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type Reply = Vec<Bytes>;

/// What a request carries besides its header.
enum Payload {
    None,
    Data(Bytes),
}

/// Result of looking at the front of the receive buffer.
enum Parsed {
    /// A whole request (header and payload) was taken from the buffer.
    Request(Request, Payload),
    /// At least this many bytes must be buffered before the next request.
    NeedMore(usize),
    /// An oversized WRITE: its header was taken; skip this many payload bytes.
    Skip(Request, u64),
}

/// The bytes one request in flight holds, counted in the connection's
/// total until it finishes.
struct Held {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Held {
    fn new(total: &Arc<AtomicU64>, bytes: u64) -> Held {
        total.fetch_add(bytes, Ordering::Relaxed);
        Held {
            bytes,
            total: total.clone(),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Looks at the front of `buf` and takes one request if it is complete.
fn parse(buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
    if buf.len() < proto::REQUEST_LEN {
        return Ok(Parsed::NeedMore(proto::REQUEST_LEN));
    }
    let req = Request::decode(&buf[..proto::REQUEST_LEN])?;
    if req.command != cmd::WRITE {
        buf.advance(proto::REQUEST_LEN);
        return Ok(Parsed::Request(req, Payload::None));
    }
    if req.length > proto::MAX_PAYLOAD {
        if u64::from(req.length) > SKIP_LIMIT {
            return Err(ProtocolError::Transmission(format!(
                "write payload of {} bytes exceeds {} and cannot be skipped",
                req.length, SKIP_LIMIT
            )));
        }
        buf.advance(proto::REQUEST_LEN);
        return Ok(Parsed::Skip(req, u64::from(req.length)));
    }
    let total = proto::REQUEST_LEN + req.length as usize;
    if buf.len() < total {
        return Ok(Parsed::NeedMore(total));
    }
    buf.advance(proto::REQUEST_LEN);
    let data = buf.split_to(req.length as usize).freeze();
    Ok(Parsed::Request(req, Payload::Data(data)))
}

/// Counts the complete requests at the front of a byte stream, the way the
/// transmission phase splits it (fuzzing entry point for the parser).
pub fn count_complete_requests(data: &[u8]) -> Result<usize, ProtocolError> {
    let mut buf = BytesMut::from(data);
    let mut n = 0;
    while let Parsed::Request(..) = parse(&mut buf)? {
        n += 1;
    }
    Ok(n)
}

/// Serves one negotiated connection until it ends.
pub async fn serve<R, W>(
    mut reader: R,
    mut writer: W,
    session: Session,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + ReadLowWater + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let mut low_water = LowWater::default();
    let mut in_flight = Pipeline::default();
    let held = Arc::new(AtomicU64::new(0));
    // Room for another request: more are read and started only then. The
    // replies not yet written count too (a read's buffer is in its reply).
    let room = |in_flight: &Pipeline<'_, Reply>, replies: &Reply| {
        let unsent: usize = replies.iter().map(Bytes::len).sum();
        in_flight.len() < MAX_IN_FLIGHT
            && held.load(Ordering::Relaxed) + (unsent as u64) < MAX_IN_FLIGHT_BYTES
    };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut plan = ReadPlan::new(proto::REQUEST_LEN);
    let mut replies: Reply = Vec::new();
    let mut skip: u64 = 0;
    // The error for an oversized write, sent once its payload is skipped
    // (clients match replies only to requests they finished sending).
    let mut skipped_reply: Option<Reply> = None;
    let mut reading = true;
    // Reading from the client has stopped for good (the shutdown's grace
    // ran out); the complete requests already buffered are still taken.
    let mut cut_off = false;
    // Shutting down: requests received from now on get ESHUTDOWN.
    let mut draining = false;
    // Bytes of `buf` that had been received when the shutdown began and
    // are not yet taken: the requests they complete are still served.
    let mut received_before: usize = 0;
    // The last time the client sent something or a request finished.
    let mut last_activity = Instant::now();
    // When reading stops at the latest once the shutdown began.
    let mut drain_deadline = Instant::now();
    let result: Result<(), ProtocolError> = 'conn: loop {
        if !draining && shutdown.is_cancelled() {
            draining = true;
            received_before = buf.len();
            last_activity = Instant::now();
            drain_deadline = last_activity + SHUTDOWN_GRACE;
        }
        // Start every complete request in the buffer, up to the limit.
        let mut need = 1;
        let batch = Batch::begin();
        let mut started = 0;
        // Requests left in the buffer for the next batch.
        let mut more = false;
        while reading && room(&in_flight, &replies) {
            if started >= MIRRORED_BATCH && Batch::deferring() {
                more = true;
                break;
            }
            if skip > 0 {
                let n = skip.min(buf.len() as u64);
                buf.advance(n as usize);
                received_before = received_before.saturating_sub(n as usize);
                skip -= n;
                if skip > 0 {
                    reading &= !cut_off;
                    break;
                }
            }
            if let Some(reply) = skipped_reply.take() {
                replies.extend(reply);
            }
            let buffered = buf.len();
            let parsed = parse(&mut buf);
            // Whether the request just taken (if any) arrived after the
            // shutdown began.
            let taken = buffered - buf.len();
            let late = draining && taken > received_before;
            received_before = received_before.saturating_sub(taken);
            match parsed {
                Err(e) => break 'conn Err(e),
                Ok(Parsed::NeedMore(n)) => {
                    need = n;
                    // Nothing more will come.
                    reading &= !cut_off;
                    break;
                }
                Ok(Parsed::Skip(req, len)) => {
                    skip = len;
                    // Skipped bytes are read in full buffers, not one
                    // header at a time (as after a large request).
                    plan.took(0);
                    // EINVAL, as for any request over the maximum block
                    // size (EOVERFLOW is only for a READ with DF).
                    let (code, msg) = if late {
                        (errno::ESHUTDOWN, "the server is shutting down".to_string())
                    } else {
                        let msg = format!(
                            "write of {} bytes exceeds the maximum {}",
                            req.length,
                            proto::MAX_PAYLOAD
                        );
                        (errno::EINVAL, msg)
                    };
                    skipped_reply = Some(error_reply(&session, req.cookie, code, &msg));
                }
                Ok(Parsed::Request(req, _)) if req.command == cmd::DISC => reading = false,
                Ok(Parsed::Request(req, payload)) => {
                    plan.took(match &payload {
                        Payload::Data(data) => data.len(),
                        Payload::None => 0,
                    });
                    if late {
                        let msg = "the server is shutting down";
                        replies.extend(error_reply(&session, req.cookie, errno::ESHUTDOWN, msg));
                    } else {
                        started += 1;
                        let bytes = match (&payload, req.command) {
                            (Payload::Data(data), _) => data.len() as u64,
                            (Payload::None, cmd::READ) if req.length <= proto::MAX_PAYLOAD => {
                                u64::from(req.length)
                            }
                            _ => 0,
                        };
                        let holding = Held::new(&held, bytes);
                        let request = handle(session.clone(), req, payload);
                        if let Some(reply) = in_flight.start(async move {
                            let _holding = holding;
                            request.await
                        }) {
                            replies.extend(reply);
                        }
                    }
                }
            }
        }
        drop(batch);
        // Stopped for want of room, perhaps with requests left in the
        // buffer: once the replies are written there may be room again,
        // and nothing else would wake the loop for them.
        let full = reading && !room(&in_flight, &replies);
        if !replies.is_empty() {
            if let Err(e) = write_batch(&mut writer, &mut replies).await {
                break Err(e.into());
            }
            // The client took replies: it is still there (and what it sent
            // meanwhile is read before it counts as silent).
            last_activity = Instant::now();
        }
        more |= full && room(&in_flight, &replies);
        if !reading && in_flight.is_empty() {
            break Ok(());
        }
        let want = need.saturating_sub(buf.len());
        let read_limit = plan.prepare(&mut buf, need);
        let may_read = reading && !cut_off && room(&in_flight, &replies);
        if may_read {
            low_water.expect(&reader, want);
        }
        let mut room = (&mut buf).limit(read_limit);
        // The timers below are made only when their branch is enabled.
        let silent_at = last_activity + SHUTDOWN_LINGER;
        tokio::select! {
            biased;
            // Noted at the top of the loop.
            _ = shutdown.cancelled(), if !draining => {}
            () = in_flight.finished(|reply| replies.extend(reply)) => last_activity = Instant::now(),
            // The next batch, after the local parts of this one (polled
            // just above).
            () = std::future::ready(()), if more => {}
            // Before reading: a client that never stops sending is cut off
            // (what it had sent whole is still answered).
            () = async move { tokio::time::sleep_until(drain_deadline).await },
                if draining && reading && !cut_off => cut_off = true,
            n = reader.read_buf(&mut room), if may_read => match n {
                Ok(0) if buf.is_empty() && skip == 0 => reading = false,
                Ok(0) => break Err(ProtocolError::Transmission("EOF inside a request".into())),
                Ok(_) => last_activity = Instant::now(),
                Err(e) => break Err(e.into()),
            },
            // After reading: a client counts as silent only with nothing
            // to read.
            () = async move { tokio::time::sleep_until(silent_at).await },
                if draining && in_flight.is_empty() => reading = false,
        }
    };
    // Requests in flight finish, and their replies go out while the client
    // still reads them (after a protocol error too).
    let writable = in_flight
        .finish(&mut writer, replies, |reply, out| out.extend(reply))
        .await;
    if writable {
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
    }
    result
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
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        // FUA is valid on every command (SEND_FUA is always advertised).
        _ => cflag::FUA,
    }
}

/// Executes one request and encodes its reply.
async fn handle(session: Arc<Session>, req: Request, payload: Payload) -> Reply {
    let s = &*session;
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
    let changes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if changes && s.flags & proto::tflag::READ_ONLY != 0 {
        // Told so at negotiation: the volume may have become writable
        // since (a PPRC failover), but this connection stays read-only.
        return fail(errno::EPERM, "the export was opened read-only".into());
    }
    let v = &s.volume;
    let len = u64::from(req.length);
    let outcome: Result<Option<Reply>, VolumeError> = match req.command {
        cmd::READ => {
            if req.length > proto::MAX_PAYLOAD {
                // A READ that may not be fragmented may get EOVERFLOW;
                // otherwise a request over the maximum block size gets
                // EINVAL (proto.md, "Block size constraints").
                let code = if req.flags & cflag::DF != 0 {
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
            Payload::None => unreachable!("writes always carry a payload"),
            Payload::Data(data) => {
                if data.is_empty() {
                    return fail(errno::EINVAL, "zero-length write".into());
                }
                v.write(req.offset, data, fua).await.map(|()| None)
            }
        },
        cmd::FLUSH => v.flush_for(&s.flushes).await.map(|()| None),
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
