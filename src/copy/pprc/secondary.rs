//! The secondary end of a peer link: authenticates the connecting primary,
//! then applies the changes it mirrors and acknowledges each one with its
//! request ID (0 on success, else an NBD-style errno).
//!
//! Requests on a link are applied concurrently inside the link's task (a
//! [`Pipeline`], as for NBD connections), and the acknowledgements of the
//! requests one wake-up finished leave in one vectored write. The primary
//! only has requests in flight together that it may complete in
//! any order (overlapping host writes are the host's business, and the
//! primary holds a track's lock until the secondary has acknowledged a copy
//! of it). Only volumes that are secondaries of the connecting peer accept
//! mirrored changes ([`PeerRequests::accepts`]); any other volume answers
//! EPERM, so even an authenticated peer cannot write a volume that is not
//! the secondary of one of its pairs. Pair-management requests and bitmap
//! requests go to the [`PeerRequests`] handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::link::{accept, next_frame_len, write_frame, LinkError, PeerInfo};
use super::paths::HEARTBEAT;
use super::wire::{Frame, Message, HEADER_LEN, NONCE_LEN};
use crate::copy::flashcopy::Change;
use crate::nbd::{nbd_errno, proto::errno};
use crate::pipeline::{write_batch, LowWater, Pipeline, ReadLowWater, ReadPlan};
use crate::volume::id::Serial;
use crate::volume::server::StorageServer;
use crate::volume::Volume;

/// A boxed future, for the object-safe [`PeerRequests`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What an authenticated peer may ask of this server besides data changes.
pub trait PeerRequests: Send + Sync + 'static {
    /// Whether `volume` is a secondary of `peer` and accepts its changes.
    fn accepts(&self, peer: &str, volume: &str) -> bool;
    /// The errno for a change of `peer` that `volume` does not accept:
    /// EPERM, or ESHUTDOWN when its side of a pair with `peer` was
    /// suspended here.
    fn refusal(&self, _peer: &str, _volume: &str) -> u32 {
        errno::EPERM
    }
    /// Handles a pair-management request: `(0, JSON)` or `(errno, message)`.
    fn control(self: Arc<Self>, peer: String, body: Bytes) -> BoxFuture<(u32, Bytes)>;
    /// The out-of-sync bitmap of `volume` (a [`Message::Bitmap`]) or an errno.
    fn bitmap(self: Arc<Self>, peer: String, volume: String) -> BoxFuture<Result<Message, u32>>;
}

/// The links being served, and when the last link from each peer ended.
static SERVED: std::sync::Mutex<ServedLinks> = std::sync::Mutex::new(ServedLinks {
    links: Vec::new(),
    last_ended: Vec::new(),
});

struct ServedLinks {
    /// By link ID (chosen by the connecting peer, so not unique across
    /// peers), with its peer and a number of its own; the flag turns true
    /// once a link has ended and every request it carried has been applied.
    links: Vec<ServedLink>,
    /// Per peer, when its last served link ended.
    last_ended: Vec<(String, SystemTime)>,
}

type ServedLink = (
    u64,
    [u8; NONCE_LEN],
    String,
    tokio::sync::watch::Receiver<bool>,
);

/// Numbers the served links.
static NEXT_SERVED: AtomicU64 = AtomicU64::new(0);

fn served() -> std::sync::MutexGuard<'static, ServedLinks> {
    SERVED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the links `id` of `peer` have ended and applied everything
/// they carried (at once if this server serves none).
pub async fn link_drained(peer: &str, id: &[u8; NONCE_LEN]) {
    let watches: Vec<_> = served()
        .links
        .iter()
        .filter(|(_, l, p, _)| l == id && p == peer)
        .map(|(_, _, _, w)| w.clone())
        .collect();
    for mut watch in watches {
        let _ = watch.wait_for(|done| *done).await;
    }
}

/// Links from `peer` served now, and when the last of its links ended
/// (`None` if none has since this process started).
pub fn links_from(peer: &str) -> (usize, Option<SystemTime>) {
    let served = served();
    let open = served.links.iter().filter(|(_, _, p, _)| p == peer).count();
    let ended = served
        .last_ended
        .iter()
        .find(|(p, _)| p == peer)
        .map(|(_, at)| *at);
    (open, ended)
}

/// Registers a served link until it has drained.
struct Served {
    number: u64,
    peer: String,
    done: tokio::sync::watch::Sender<bool>,
}

impl Served {
    fn new(id: [u8; NONCE_LEN], peer: &str) -> Served {
        let (done, watch) = tokio::sync::watch::channel(false);
        let number = NEXT_SERVED.fetch_add(1, Ordering::Relaxed);
        served().links.push((number, id, peer.to_string(), watch));
        Served {
            number,
            peer: peer.to_string(),
            done,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.done.send(true);
        let mut served = served();
        served.links.retain(|(n, _, _, _)| *n != self.number);
        if !served.links.iter().any(|(_, _, p, _)| *p == self.peer) {
            let now = SystemTime::now();
            match served.last_ended.iter_mut().find(|(p, _)| *p == self.peer) {
                Some((_, at)) => *at = now,
                None => served.last_ended.push((self.peer.clone(), now)),
            }
        }
    }
}

/// Time a connecting peer has to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests of one link applied at the same time, at most.
const LINK_CONCURRENCY: usize = 128;

/// A link on which nothing arrived for this long is closed: its primary
/// sends a heartbeat every [`HEARTBEAT`], so the primary is gone or the
/// network between them is (a half-open connection would otherwise hold
/// the link, and its link-drained answer, forever).
pub const SILENCE_LIMIT: Duration = Duration::from_secs(5 * HEARTBEAT.as_secs());

/// How long a link closed by this server's shutdown waits for the
/// primary to close its end after the goodbye.
const GOODBYE_LINGER: Duration = Duration::from_secs(1);

/// Serves one incoming link until the peer says goodbye, the link fails,
/// or `stop` fires (this server shuts down): then nothing more is read,
/// the requests already received are applied and answered, and this end
/// says goodbye before it closes, so the primary learns that its peer shut
/// down rather than that the link broke. Returns the authenticated peer.
pub async fn serve_link<S: AsyncRead + AsyncWrite + ReadLowWater + Unpin + Send + 'static>(
    stream: S,
    server: Arc<StorageServer>,
    local: Serial,
    secret: Arc<[u8]>,
    requests: Arc<dyn PeerRequests>,
    stop: CancellationToken,
) -> Result<PeerInfo, LinkError> {
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(1 << 20);
    // Registered once the peer has proved itself, before this side's proof
    // lets it send requests: a question whether this link has drained,
    // asked over another link, must never find it missing while requests
    // may still come on it. Dropped (marking the link drained) only after
    // every request this link carried has been applied.
    let mut served = None;
    let peer = accept(
        &mut stream,
        &mut buf,
        &local,
        &secret,
        HANDSHAKE_TIMEOUT,
        |peer| served = Some(Served::new(peer.link_id, peer.serial.as_str())),
    )
    .await?;
    tracing::info!(peer = %peer.serial, "peer link authenticated");
    // Requests are applied inside this task, up to LINK_CONCURRENCY at a
    // time; the answers of the requests one wake-up finished go out in one
    // vectored write.
    let peer_serial = peer.serial.clone();
    let (server, requests, peer_serial) = (&server, &requests, &peer_serial);
    let mut running = Pipeline::default();
    let mut answers: Vec<Bytes> = Vec::new();
    let mut reading = true;
    // Cleared when this server shuts down: frames already read are still
    // served, no more are read.
    let mut listening = true;
    let mut low_water = LowWater::default();
    let mut plan = ReadPlan::new(HEADER_LEN);
    let mut heard = tokio::time::Instant::now();
    let result = 'link: loop {
        while reading && running.len() < LINK_CONCURRENCY {
            let buffered = buf.len();
            let frame = match Frame::decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    reading = listening;
                    break;
                }
                Err(e) => break 'link Err(e.into()),
            };
            plan.took(buffered - buf.len());
            match frame.message {
                Message::Goodbye => reading = false,
                Message::Hello { .. } | Message::Auth { .. } => {
                    break 'link Err(LinkError::Unexpected("a second handshake"));
                }
                message => {
                    let id = frame.id;
                    let request = async move {
                        let message = answer(server, requests, peer_serial, message).await;
                        Frame { id, message }
                    };
                    if let Some(done) = running.start(request) {
                        answers.extend(done.encode());
                    }
                }
            }
        }
        if !answers.is_empty() {
            if let Err(e) = write_batch(&mut stream, &mut answers).await {
                break Err(e.into());
            }
        }
        if !reading && running.is_empty() {
            break Ok(());
        }
        let may_read = reading && listening && running.len() < LINK_CONCURRENCY;
        let next = next_frame_len(&buf);
        let read_limit = plan.prepare(&mut buf, next);
        if may_read {
            low_water.expect(&stream, next.saturating_sub(buf.len()));
        } else {
            // Silence counts only while this end is listening.
            heard = tokio::time::Instant::now();
        }
        let mut room = (&mut buf).limit(read_limit);
        tokio::select! {
            biased;
            () = running.finished(|done| answers.extend(done.encode())) => {}
            () = stop.cancelled(), if listening => listening = false,
            // Reading is cancel-safe: bytes read stay in `buf`.
            read = stream.read_buf(&mut room), if may_read => match read {
                Ok(0) => reading = false,
                Ok(_) => heard = tokio::time::Instant::now(),
                Err(e) => break Err(e.into()),
            },
            () = tokio::time::sleep_until(heard + SILENCE_LIMIT), if may_read => {
                break Err(LinkError::Silent(SILENCE_LIMIT));
            }
        }
    };
    // Requests still being applied finish; their answers go out while the
    // link lasts.
    let writable = running
        .finish(&mut stream, answers, |done, out| out.extend(done.encode()))
        .await;
    drop(served);
    if writable {
        if !listening {
            let goodbye = Frame {
                id: 0,
                message: Message::Goodbye,
            };
            let _ = write_frame(&mut stream, &goodbye).await;
            let _ = stream.shutdown().await;
            // Closing with unread frames would reset the connection, and
            // the primary could lose the goodbye: read (and drop) what it
            // still sends until it closes its end, which it does on the
            // goodbye.
            let _ = tokio::time::timeout(GOODBYE_LINGER, async {
                while let Ok(n) = stream.read_buf(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    buf.clear();
                }
            })
            .await;
        } else {
            let _ = stream.shutdown().await;
        }
    }
    result.map(|()| peer)
}

/// Applies one request and builds its answer.
async fn answer(
    server: &StorageServer,
    requests: &Arc<dyn PeerRequests>,
    peer: &str,
    message: Message,
) -> Message {
    let ack = |error| Message::Ack { error };
    match message {
        Message::Heartbeat { .. } => ack(0),
        Message::Write {
            volume,
            offset,
            fua,
            copy,
            data,
        } => {
            let len = data.len() as u64;
            let change = Change::Write(data, fua);
            ack(match lookup(server, requests, peer, &volume) {
                Ok(v) => {
                    let code = apply_to(&v, offset, len, change).await;
                    if code == 0 && copy {
                        start_writeback(v, offset, len);
                    } else if code != 0 && fua {
                        v.forget_unwritten().await;
                    }
                    code
                }
                Err(code) => code,
            })
        }
        Message::Zero {
            volume,
            offset,
            len,
            punch,
        } => {
            let change = Change::Zero(punch, false, false);
            ack(apply(server, requests, peer, &volume, offset, len, change).await)
        }
        Message::Trim {
            volume,
            offset,
            len,
        } => ack(apply(server, requests, peer, &volume, offset, len, Change::Trim).await),
        Message::Flush { volume } => ack(match lookup(server, requests, peer, &volume) {
            Ok(v) => flush_for_primary(&v).await,
            Err(code) => code,
        }),
        Message::Control { body } => {
            if let Some(id) = drained_request(&body) {
                // The primary retries a request of a broken link on
                // another one only after the broken link's requests are
                // all applied, so a stale copy never lands last.
                link_drained(peer, &id).await;
                return Message::Reply {
                    error: 0,
                    body: Bytes::from_static(b"{}"),
                };
            }
            let (error, body) = requests.clone().control(peer.to_string(), body).await;
            Message::Reply { error, body }
        }
        Message::BitmapRequest { volume } => {
            let name = String::from_utf8_lossy(&volume).into_owned();
            match requests.clone().bitmap(peer.to_string(), name).await {
                Ok(bitmap) => bitmap,
                Err(error) => ack(error),
            }
        }
        Message::Hello { .. }
        | Message::Auth { .. }
        | Message::Goodbye
        | Message::Ack { .. }
        | Message::Reply { .. }
        | Message::Bitmap { .. }
        | Message::State { .. } => ack(errno::ENOTSUP),
    }
}

/// The link ID of a `{"op": "link-drained", "link": HEX}` request.
fn drained_request(body: &[u8]) -> Option<[u8; NONCE_LEN]> {
    let request: serde_json::Value = serde_json::from_slice(body).ok()?;
    if request.get("op")?.as_str()? != "link-drained" {
        return None;
    }
    let hex = request.get("link")?.as_str()?;
    let mut id = [0u8; NONCE_LEN];
    if hex.len() != NONCE_LEN * 2 {
        return None;
    }
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// The `link-drained` request for link `id`.
pub fn drained_body(id: &[u8; NONCE_LEN]) -> Bytes {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    Bytes::from(format!("{{\"op\":\"link-drained\",\"link\":\"{hex}\"}}"))
}

fn lookup(
    server: &StorageServer,
    requests: &Arc<dyn PeerRequests>,
    peer: &str,
    volume: &[u8; 8],
) -> Result<Arc<Volume>, u32> {
    let v = std::str::from_utf8(volume)
        .ok()
        .and_then(|id| server.lookup(id))
        .cloned()
        .ok_or(errno::EINVAL)?;
    if !requests.accepts(peer, v.name()) {
        return Err(requests.refusal(peer, v.name()));
    }
    Ok(v)
}

/// Most write-back starts in flight at once (each may block a thread of
/// the blocking pool while the disk is busy); past it, copies are left to
/// the closing flush.
const MAX_WRITEBACKS: usize = 8;
static WRITEBACKS: AtomicUsize = AtomicUsize::new(0);

/// Starts writing a copied range back to disk, without waiting for it:
/// the copy's closing flush then finds little left to do. Host writes are
/// left to the page cache (starting their write-back at once slows large
/// mirrored writes by about a fifth).
fn start_writeback(v: Arc<Volume>, offset: u64, len: u64) {
    if WRITEBACKS.fetch_add(1, Ordering::AcqRel) >= MAX_WRITEBACKS {
        WRITEBACKS.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    tokio::spawn(async move {
        if let Err(e) = v.store().start_writeback(offset, len).await {
            tracing::debug!(volume = %v.name(), "cannot start write-back: {e}");
        }
        WRITEBACKS.fetch_sub(1, Ordering::AcqRel);
    });
}

async fn apply(
    server: &StorageServer,
    requests: &Arc<dyn PeerRequests>,
    peer: &str,
    volume: &[u8; 8],
    offset: u64,
    len: u64,
    change: Change,
) -> u32 {
    match lookup(server, requests, peer, volume) {
        Ok(v) => apply_to(&v, offset, len, change).await,
        Err(code) => code,
    }
}

/// Flushes a secondary for its primary; the errno to answer. EIO also
/// when a flush of another party failed since the primary was last told
/// (the kernel reported the failed write-back to that flush only): the
/// primary then keeps the tracks recorded instead of clearing them as
/// durable here. After a failure the unwritten cached pages are dropped
/// ([`Volume::flush`] drops them after its own).
async fn flush_for_primary(v: &Volume) -> u32 {
    let flushed = v.flush().await;
    let untold = v.untold_flush_failure();
    match flushed {
        Err(e) => nbd_errno(&e),
        Ok(()) if untold => {
            v.forget_unwritten().await;
            errno::EIO
        }
        Ok(()) => 0,
    }
}

/// Applies a mirrored change to `v`; the errno to answer.
async fn apply_to(v: &Volume, offset: u64, len: u64, change: Change) -> u32 {
    match v.apply_mirrored(offset, len, change).await {
        Ok(()) => 0,
        Err(e) => nbd_errno(&e),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use std::collections::HashSet;
    use std::sync::RwLock;

    use super::*;

    /// A fixed set of secondary volume IDs that accept changes from any peer
    /// and answer no management requests (for tests of the data path).
    #[derive(Debug, Default)]
    struct Secondaries(RwLock<HashSet<String>>);

    impl Secondaries {
        /// Lets `volume` accept mirrored changes.
        fn insert(&self, volume: &str) {
            self.0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(volume.to_string());
        }

        /// Stops `volume` accepting mirrored changes.
        fn remove(&self, volume: &str) {
            self.0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(volume);
        }
    }

    impl PeerRequests for Secondaries {
        fn accepts(&self, _peer: &str, volume: &str) -> bool {
            self.0
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(volume)
        }
        fn control(self: Arc<Self>, _peer: String, _body: Bytes) -> BoxFuture<(u32, Bytes)> {
            Box::pin(async { (errno::ENOTSUP, Bytes::from_static(b"not supported")) })
        }
        fn bitmap(
            self: Arc<Self>,
            _peer: String,
            _volume: String,
        ) -> BoxFuture<Result<Message, u32>> {
            Box::pin(async { Err(errno::ENOTSUP) })
        }
    }
    use crate::copy::pprc::link::PeerLink;

    fn server(dir: &Path) -> Arc<StorageServer> {
        crate::volume::server::test_server(dir, &["v.img", "w.img"])
    }

    /// The secret both test servers share.
    const SECRET: &[u8] = b"shared";

    /// Serves `stream` as server FCB02.
    fn serve_as_fcb02<S: AsyncRead + AsyncWrite + ReadLowWater + Unpin + Send + 'static>(
        stream: S,
        server: Arc<StorageServer>,
        secondaries: Arc<dyn PeerRequests>,
    ) -> impl Future<Output = Result<PeerInfo, LinkError>> {
        let local = Serial::new("FCB02").unwrap();
        serve_link(
            stream,
            server,
            local,
            Arc::from(SECRET),
            secondaries,
            CancellationToken::new(),
        )
    }

    /// Opens a link from FCA31 to FCB02 over `stream`, proving `secret`.
    async fn open_as_fca31<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        stream: S,
        secret: &[u8],
    ) -> Result<PeerLink, LinkError> {
        let (me, them) = (Serial::new("FCA31").unwrap(), Serial::new("FCB02").unwrap());
        PeerLink::open(stream, &me, &them, secret, Duration::from_secs(5)).await
    }

    /// A connection to `addr`, as the primary's links make them.
    async fn tcp(addr: SocketAddr) -> tokio::net::TcpStream {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Accepts one connection and serves it as FCB02, whose volume
    /// 000FCB02 takes mirrored changes.
    async fn listen(
        server: Arc<StorageServer>,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Result<PeerInfo, LinkError>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secondaries = Arc::new(Secondaries::default());
        secondaries.insert("000FCB02");
        server.lookup("000FCB02").unwrap().set_secondary(true);
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve_as_fcb02(stream, server, secondaries).await
        });
        (addr, task)
    }

    use std::net::SocketAddr;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_stopped_by_a_shutdown_answers_what_it_read_then_says_goodbye() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let secondaries = Arc::new(Secondaries::default());
        secondaries.insert("000FCB02");
        srv.lookup("000FCB02").unwrap().set_secondary(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (srv2, stop2) = (srv.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let local = Serial::new("FCB02").unwrap();
            serve_link(stream, srv2, local, Arc::from(SECRET), secondaries, stop2).await
        });
        let link = Arc::new(open_as_fca31(tcp(addr).await, SECRET).await.unwrap());
        let vol = *b"000FCB02";
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let link = link.clone();
            tasks.push(tokio::spawn(async move {
                let write = Message::Write {
                    volume: vol,
                    offset: i * 65536,
                    fua: false,
                    copy: false,
                    data: Bytes::from(vec![i as u8 + 1; 65536]),
                };
                (i, link.request(write).await)
            }));
            if i == 31 {
                // Stop once the secondary is applying: the first write
                // is answered, the others may be in flight.
                while !tasks[0].is_finished() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                stop.cancel();
            }
        }
        // Every write is answered, or refused as sent to a server that
        // shut down; none is cut off (`Closed`).
        let mut acked = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (i, Ok(0)) => acked.push(i as usize),
                (_, Err(LinkError::PeerShutDown)) => {}
                (i, other) => panic!("write {i}: {other:?}"),
            }
        }
        assert_eq!(acked.first(), Some(&0), "the first write was answered");
        assert!(link.peer_shut_down());
        assert!(!link.is_open());
        assert_eq!(task.await.unwrap().unwrap().serial, "FCA31");
        let image = std::fs::read(dir.path().join("v.img")).unwrap();
        for i in acked {
            assert!(
                image[i * 65536..(i + 1) * 65536]
                    .iter()
                    .all(|&b| b == i as u8 + 1),
                "acknowledged block {i}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mirrored_writes_land_in_order_and_errors_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let (addr, task) = listen(srv.clone()).await;
        let stream = tcp(addr).await;
        let link = Arc::new(open_as_fca31(stream, SECRET).await.unwrap());
        assert_eq!(link.peer().serial, "FCB02");
        let vol = *b"000FCB02";
        // 64 pipelined writes from concurrent tasks.
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let link = link.clone();
            tasks.push(tokio::spawn(async move {
                link.request(Message::Write {
                    volume: vol,
                    offset: i * 65536,
                    fua: i % 8 == 0,
                    copy: false,
                    data: Bytes::from(vec![i as u8 + 1; 65536]),
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 0);
        }
        assert_eq!(
            link.request(Message::Flush { volume: vol }).await.unwrap(),
            0
        );
        assert_eq!(
            link.request(Message::Zero {
                volume: vol,
                offset: 0,
                len: 4096,
                punch: true
            })
            .await
            .unwrap(),
            0
        );
        assert_eq!(
            link.request(Message::Heartbeat { unix_ms: 1 })
                .await
                .unwrap(),
            0
        );
        // Past the end, and an unknown volume.
        let past = Message::Write {
            volume: vol,
            offset: 4 << 20,
            fua: false,
            copy: false,
            data: Bytes::from_static(b"x"),
        };
        assert_eq!(link.request(past).await.unwrap(), errno::ENOSPC);
        assert_eq!(
            link.request(Message::Flush {
                volume: *b"777FCB02"
            })
            .await
            .unwrap(),
            errno::EINVAL
        );
        // A volume that is not a secondary refuses mirrored changes.
        let other = Message::Write {
            volume: *b"001FCB02",
            offset: 0,
            fua: false,
            copy: false,
            data: Bytes::from_static(b"no"),
        };
        assert_eq!(link.request(other).await.unwrap(), errno::EPERM);
        assert!(std::fs::read(dir.path().join("w.img"))
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        let image = std::fs::read(dir.path().join("v.img")).unwrap();
        assert!(image[..4096].iter().all(|&b| b == 0));
        for i in 0..64usize {
            assert!(
                image[i * 65536 + 4096..(i + 1) * 65536]
                    .iter()
                    .all(|&b| b == i as u8 + 1),
                "block {i}"
            );
        }
        Arc::into_inner(link).unwrap().close().await.unwrap();
        assert_eq!(task.await.unwrap().unwrap().serial, "FCA31");
    }

    #[tokio::test]
    async fn a_peer_with_the_wrong_secret_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let (addr, task) = listen(srv).await;
        let stream = tcp(addr).await;
        let r = open_as_fca31(stream, b"guess").await;
        assert!(matches!(r, Err(LinkError::ProofRefused(_))), "{r:?}");
        assert!(matches!(task.await.unwrap(), Err(LinkError::AuthFailed(ref p)) if p == "FCA31"));
        let image = std::fs::read(dir.path().join("v.img")).unwrap();
        assert!(image.iter().all(|&b| b == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_primary_loses_its_link() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let (primary_end, secondary_end) = tokio::io::duplex(64 << 10);
        let secondaries = Arc::new(Secondaries::default());
        let task = tokio::spawn(serve_as_fcb02(secondary_end, srv, secondaries));
        let link = open_as_fca31(primary_end, SECRET).await.unwrap();
        // Heartbeats keep the link open well past the limit.
        for _ in 0..8 {
            tokio::time::sleep(HEARTBEAT).await;
            let beat = Message::Heartbeat { unix_ms: 1 };
            assert_eq!(link.request(beat).await.unwrap(), 0);
        }
        assert!(!task.is_finished());
        // Then silence: the secondary closes the link after the limit.
        let quiet = tokio::time::Instant::now();
        let ended = tokio::time::timeout(SILENCE_LIMIT * 3, task)
            .await
            .expect("the link outlived the silence limit")
            .unwrap();
        assert!(
            matches!(ended, Err(LinkError::Silent(limit)) if limit == SILENCE_LIMIT),
            "{ended:?}"
        );
        assert!(quiet.elapsed() >= SILENCE_LIMIT);
        assert!(quiet.elapsed() < SILENCE_LIMIT + HEARTBEAT);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!link.is_open());
    }

    /// Link IDs are the connecting peers' nonces: a link of another peer
    /// with the same ID neither ends this peer's link in the records (which
    /// count it as connected and answer whether it has drained) nor holds
    /// this peer's drained request.
    #[tokio::test]
    async fn another_peers_link_with_the_same_id_leaves_this_peers_link_alone() {
        let id = [0x5A; NONCE_LEN];
        let mine = Served::new(id, "ZZA01");
        let theirs = Served::new(id, "ZZC03");
        assert_eq!(links_from("ZZA01").0, 1);
        // Their open link does not hold a question about ours...
        drop(mine);
        tokio::time::timeout(Duration::from_secs(1), link_drained("ZZA01", &id))
            .await
            .expect("held by another peer's link");
        let mine = Served::new(id, "ZZA01");
        // ...and its end does not end ours.
        drop(theirs);
        assert_eq!(links_from("ZZA01").0, 1);
        let asked = tokio::spawn(async move { link_drained("ZZA01", &id).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!asked.is_finished());
        drop(mine);
        asked.await.unwrap();
        assert_eq!(links_from("ZZA01").0, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_request_waits_for_the_broken_link_to_finish() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secondaries: Arc<dyn PeerRequests> = Arc::new(Secondaries::default());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (srv, secondaries) = (srv.clone(), secondaries.clone());
                tokio::spawn(serve_as_fcb02(stream, srv, secondaries));
            }
        });
        let connect = || async {
            let stream = tcp(addr).await;
            open_as_fca31(stream, SECRET).await.unwrap()
        };
        let first = connect().await;
        let second = Arc::new(connect().await);
        assert_ne!(first.peer().link_id, second.peer().link_id);
        // A link this server never served counts as drained.
        let unknown = Message::Control {
            body: drained_body(&[7; NONCE_LEN]),
        };
        assert_eq!(second.request(unknown).await.unwrap(), 0);
        // The first link is alive: the question waits until it ends.
        let ask = {
            let second = second.clone();
            let id = first.peer().link_id;
            tokio::spawn(async move {
                second
                    .request(Message::Control {
                        body: drained_body(&id),
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ask.is_finished());
        first.close().await.unwrap();
        drop(first);
        let answer = tokio::time::timeout(Duration::from_secs(5), ask).await;
        assert_eq!(answer.unwrap().unwrap().unwrap(), 0);
    }

    /// A mirrored write that was accepted while the volume was a
    /// secondary, but waited at its gate while the volume took over (a
    /// failover flips it under the exclusive gate), is refused: landing
    /// after the failover it would overwrite, unrecorded, what hosts
    /// write to the volume that took over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mirrored_write_waiting_while_the_volume_takes_over_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let srv = server(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let secondaries = Arc::new(Secondaries::default());
        secondaries.insert("000FCB02");
        let v = srv.lookup("000FCB02").unwrap().clone();
        v.set_secondary(true);
        tokio::spawn({
            let (srv, secondaries) = (srv.clone(), secondaries.clone());
            async move {
                let (stream, _) = listener.accept().await.unwrap();
                serve_as_fcb02(stream, srv, secondaries).await
            }
        });
        let link = Arc::new(open_as_fca31(tcp(addr).await, SECRET).await.unwrap());
        let quiet = v.gate().write().await;
        let write = tokio::spawn({
            let link = link.clone();
            async move {
                link.request(Message::Write {
                    volume: *b"000FCB02",
                    offset: 0,
                    fua: true,
                    copy: false,
                    data: Bytes::from(vec![0xAB; 4096]),
                })
                .await
                .unwrap()
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!write.is_finished());
        // The failover, under the gate: no longer a secondary.
        secondaries.remove("000FCB02");
        v.set_secondary(false);
        drop(quiet);
        let answer = tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(answer, 0, "the stale mirrored write was applied");
        let image = std::fs::read(dir.path().join("v.img")).unwrap();
        assert!(image.iter().all(|&b| b == 0));
    }
}
