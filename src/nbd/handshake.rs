//! Fixed-newstyle negotiation: greeting, options, export selection.
//!
//! Unknown exports are refused with `NBD_REP_ERR_UNKNOWN` (there is no
//! default export); STARTTLS is answered `NBD_REP_ERR_UNSUP` until TLS is
//! configured; any malformed message ends this connection only.
//!
//! Once the server shuts down, every further option but `NBD_OPT_ABORT`
//! is answered `NBD_REP_ERR_SHUTDOWN` (an `NBD_OPT_EXPORT_NAME`, which has no
//! error reply, closes the connection), until the client aborts, closes, or
//! sends nothing for [`SHUTDOWN_LINGER`].

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::proto::{self, info, opt, rep, tflag};
use super::transmission::SHUTDOWN_LINGER;
use super::ProtocolError;
use crate::volume::server::StorageServer;
use crate::volume::store::FlushWatch;
use crate::volume::Volume;

/// Metadata context ID of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client negotiated, ready for the transmission phase.
#[derive(Debug)]
pub struct Session {
    /// The selected volume.
    pub volume: Arc<Volume>,
    /// Structured replies enabled.
    pub structured: bool,
    /// `base:allocation` selected.
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// This connection's view of the volume's failed syncs: its FLUSH
    /// fails if a write-back failed since its last one, whoever's flush
    /// the kernel reported it to.
    pub flushes: FlushWatch,
}

/// Settings that shape negotiation.
#[derive(Debug, Clone)]
pub struct NegotiationSettings {
    /// Preferred block size advertised (the track size).
    pub preferred_block: u32,
}

struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether base:allocation was selected for it.
    meta: Option<(String, bool)>,
}

/// Runs negotiation. `Ok(None)` means the client aborted or only asked
/// questions; `Ok(Some)` carries the session for the transmission phase.
pub async fn negotiate<S>(
    stream: &mut S,
    server: &StorageServer,
    settings: &NegotiationSettings,
) -> Result<Option<Session>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    negotiate_until(stream, server, settings, &CancellationToken::new()).await
}

/// [`negotiate`] for a server that shuts down when `shutdown` fires: from
/// then on options are refused with `NBD_REP_ERR_SHUTDOWN` (see the module
/// docs), and `Ok(None)` is returned once the client is done.
pub async fn negotiate_until<S>(
    stream: &mut S,
    server: &StorageServer,
    settings: &NegotiationSettings,
    shutdown: &CancellationToken,
) -> Result<Option<Session>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(proto::NBD_MAGIC);
    greeting.put_u64(proto::IHAVEOPT);
    greeting.put_u16(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let mut flags = [0u8; 4];
    if !read_full(stream, &mut flags, shutdown).await? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(flags);
    let known = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(ProtocolError::Handshake(format!(
            "unknown client flags 0x{client_flags:x}"
        )));
    }
    let mut st = State {
        no_zeroes: client_flags & proto::CLIENT_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };

    loop {
        let mut header = [0u8; 16];
        if !read_full(stream, &mut header, shutdown).await? {
            return Ok(None);
        }
        let h = proto::OptionHeader::decode(&header)?;
        if h.length > proto::MAX_OPTION_LEN {
            // Too large to buffer: say so if we can skip it (an ABORT is
            // acknowledged, its data ignored), else hang up.
            // EXPORT_NAME has no option reply (the client reads the export
            // size next): an export it cannot have ends the session.
            if h.length > 16 << 20 || h.option == opt::EXPORT_NAME {
                return Err(ProtocolError::Handshake(format!(
                    "option {} with {} bytes of data",
                    h.option, h.length
                )));
            }
            if !skip(stream, h.length as u64, shutdown).await? {
                return Ok(None);
            }
            if h.option == opt::ABORT {
                // The server SHOULD ignore ABORT's data and ACK it (proto.md).
                let _ = reply(stream, h.option, rep::ACK, &[]).await;
                return Ok(None);
            }
            reply(stream, h.option, rep::ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        if !read_full(stream, &mut data, shutdown).await? {
            return Ok(None);
        }
        if shutdown.is_cancelled() && h.option != opt::ABORT {
            if h.option == opt::EXPORT_NAME {
                return Err(ProtocolError::Handshake(
                    "EXPORT_NAME while the server shuts down".into(),
                ));
            }
            reply(
                stream,
                h.option,
                rep::ERR_SHUTDOWN,
                b"the server is shutting down",
            )
            .await?;
            continue;
        }
        match h.option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8(data).unwrap_or_default();
                let Some(volume) = server.lookup(&name) else {
                    // This option has no error reply: the spec says close.
                    return Err(ProtocolError::Handshake(format!(
                        "client asked for unknown export {name:?}"
                    )));
                };
                let session = make_session(volume.clone(), &st, &name);
                let mut out = BytesMut::with_capacity(10 + 124);
                out.put_u64(volume.size());
                out.put_u16(session.flags);
                if !st.no_zeroes {
                    out.put_bytes(0, 124);
                }
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Some(session));
            }
            opt::ABORT => {
                let _ = reply(stream, h.option, rep::ACK, &[]).await;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(stream, h.option, rep::ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for volume in server.volumes() {
                    let desc = volume.info().description.clone().unwrap_or_default();
                    let mut names = vec![volume.name().to_string()];
                    names.extend(volume.info().alias.clone());
                    for name in names {
                        let mut d = BytesMut::new();
                        d.put_u32(name.len() as u32);
                        d.put_slice(name.as_bytes());
                        d.put_slice(desc.as_bytes());
                        reply(stream, h.option, rep::SERVER, &d).await?;
                    }
                }
                reply(stream, h.option, rep::ACK, &[]).await?;
            }
            opt::STARTTLS => {
                reply(
                    stream,
                    h.option,
                    rep::ERR_UNSUP,
                    b"TLS is not configured on this server",
                )
                .await?;
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        stream,
                        h.option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                st.structured = true;
                reply(stream, h.option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(stream, h.option, &data, server, &mut st).await?;
            }
            opt::INFO | opt::GO => {
                let (name, requests) = match proto::decode_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(stream, h.option, rep::ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                let Some(volume) = server.lookup(&name) else {
                    let msg =
                        format!("no export named {name:?}; `nbdinfo --list` shows the exports");
                    reply(stream, h.option, rep::ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let session = make_session(volume.clone(), &st, &name);
                send_infos(stream, h.option, &session, &requests, settings).await?;
                reply(stream, h.option, rep::ACK, &[]).await?;
                if h.option == opt::GO {
                    return Ok(Some(session));
                }
            }
            other => {
                let msg = format!("option {other} is not supported");
                reply(stream, other, rep::ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

/// Fills `buf` from the client. Once `shutdown` has fired, gives up
/// (`Ok(false)`) when the client sends nothing for [`SHUTDOWN_LINGER`].
async fn read_full<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    shutdown: &CancellationToken,
) -> Result<bool, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        // `read` is cancel-safe: a shutdown between bytes loses none.
        tokio::select! {
            biased;
            n = stream.read(&mut buf[got..]) => match n? {
                0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
                n => got += n,
            },
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
            () = tokio::time::sleep(SHUTDOWN_LINGER), if shutdown.is_cancelled() => return Ok(false),
        }
    }
    Ok(true)
}

fn make_session(volume: Arc<Volume>, st: &State, name: &str) -> Session {
    let mut flags = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_FAST_ZERO
        | tflag::SEND_CACHE
        | tflag::CAN_MULTI_CONN;
    if st.structured {
        flags |= tflag::SEND_DF;
    }
    if !volume.writable() {
        flags |= tflag::READ_ONLY;
    }
    // A context selection only applies to the export it was made for.
    let base_allocation = matches!(&st.meta, Some((n, true)) if n == name);
    Session {
        flushes: volume.flush_watch(),
        volume,
        structured: st.structured,
        base_allocation: base_allocation && st.structured,
        flags,
    }
}

async fn send_infos<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    session: &Session,
    requests: &[u16],
    settings: &NegotiationSettings,
) -> Result<(), ProtocolError> {
    let v = &session.volume;
    let mut export = BytesMut::new();
    export.put_u16(info::EXPORT);
    export.put_u64(v.size());
    export.put_u16(session.flags);
    reply(stream, option, rep::INFO, &export).await?;
    // Block sizes are always sent; the spec allows it unrequested.
    let mut bs = BytesMut::new();
    bs.put_u16(info::BLOCK_SIZE);
    bs.put_u32(minimum_block(v.store().alignment() as u64, v.size()));
    bs.put_u32(settings.preferred_block.max(v.store().alignment() as u32));
    bs.put_u32(proto::MAX_PAYLOAD);
    reply(stream, option, rep::INFO, &bs).await?;
    if requests.contains(&info::NAME) {
        let mut d = BytesMut::new();
        d.put_u16(info::NAME);
        d.put_slice(v.name().as_bytes());
        reply(stream, option, rep::INFO, &d).await?;
    }
    if requests.contains(&info::DESCRIPTION) {
        if let Some(desc) = &v.info().description {
            let mut d = BytesMut::new();
            d.put_u16(info::DESCRIPTION);
            d.put_slice(desc.as_bytes());
            reply(stream, option, rep::INFO, &d).await?;
        }
    }
    Ok(())
}

/// The minimum block size advertised for an export of `size` bytes whose
/// store prefers requests aligned to `alignment` (a power of two): the
/// alignment, lowered until it divides the size. A client that honours the
/// minimum must still reach the export's last bytes (the store serves
/// unaligned requests with a read-modify-write).
fn minimum_block(alignment: u64, size: u64) -> u32 {
    // The largest power of two dividing the size (none for size 0).
    let size_align = size & size.wrapping_neg();
    let min = if size_align == 0 {
        alignment
    } else {
        alignment.min(size_align)
    };
    min.min(u64::from(u32::MAX)) as u32
}

async fn meta_context<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    data: &[u8],
    server: &StorageServer,
    st: &mut State,
) -> Result<(), ProtocolError> {
    if option == opt::SET_META_CONTEXT {
        // SET replaces every context selected before, also when it fails.
        st.meta = None;
    }
    if option == opt::SET_META_CONTEXT && !st.structured {
        return reply(
            stream,
            option,
            rep::ERR_INVALID,
            b"SET_META_CONTEXT needs structured replies first",
        )
        .await;
    }
    let (name, queries) = match proto::decode_meta_request(data) {
        Ok(r) => r,
        Err(e) => return reply(stream, option, rep::ERR_INVALID, e.to_string().as_bytes()).await,
    };
    if server.lookup(&name).is_none() {
        let msg = format!("no export named {name:?}");
        return reply(stream, option, rep::ERR_UNKNOWN, msg.as_bytes()).await;
    }
    // LIST with no queries lists everything; "base:" lists the base namespace.
    let matches = if option == opt::LIST_META_CONTEXT && queries.is_empty() {
        true
    } else {
        queries.iter().any(|q| {
            q == proto::BASE_ALLOCATION || (option == opt::LIST_META_CONTEXT && q == "base:")
        })
    };
    if matches {
        // Only SET assigns IDs: in a LIST reply the ID "is reserved and
        // SHOULD be set to zero" (proto.md).
        let id = if option == opt::SET_META_CONTEXT {
            BASE_ALLOCATION_ID
        } else {
            0
        };
        let mut d = BytesMut::new();
        d.put_u32(id);
        d.put_slice(proto::BASE_ALLOCATION.as_bytes());
        reply(stream, option, rep::META_CONTEXT, &d).await?;
    }
    if option == opt::SET_META_CONTEXT {
        st.meta = Some((name, matches));
    }
    reply(stream, option, rep::ACK, &[]).await
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), ProtocolError> {
    // An error reply's data is a message string: at most 4096 bytes (it
    // may quote a client's export name of that length).
    let data = if kind & (1 << 31) != 0 {
        proto::truncate_string(data)
    } else {
        data
    };
    let msg: Bytes = proto::option_reply(option, kind, data);
    stream.write_all(&msg).await?;
    stream.flush().await?;
    Ok(())
}

async fn skip<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut n: u64,
    shutdown: &CancellationToken,
) -> Result<bool, ProtocolError> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let want = n.min(sink.len() as u64) as usize;
        if !read_full(stream, &mut sink[..want], shutdown).await? {
            return Ok(false);
        }
        n -= want as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::minimum_block;

    #[test]
    fn the_minimum_block_divides_the_export_size() {
        assert_eq!(minimum_block(4096, 16 << 20), 4096);
        assert_eq!(minimum_block(1, 1_000_000), 1);
        assert_eq!(minimum_block(4096, 1_000_000), 64);
        assert_eq!(minimum_block(4096, 10_000), 16);
        assert_eq!(minimum_block(512, 4096 + 512), 512);
        assert_eq!(minimum_block(4096, 4097), 1);
    }
}
