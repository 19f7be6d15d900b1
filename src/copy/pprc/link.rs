//! Opening a peer link: the hello exchange and mutual authentication.
//!
//! Both ends send [`Message::Hello`] with their serial, the serial they
//! expect at the other end and a fresh random nonce, then prove they hold
//! the shared secret with [`Message::Auth`]:
//!
//! ```text
//! proof(sender) = HMAC-SHA256(secret, LABEL | sender role | sender serial
//!                                     | receiver serial | sender nonce
//!                                     | receiver nonce)
//! ```
//!
//! The role says whether the sender connected or accepted the link. Each
//! side binds its own role, serial and nonce first, so a proof cannot be
//! reflected back to its sender, nor relayed by a third party from one
//! accepting server to another (both would be accepting), and fresh nonces
//! make it useless on any other link. Proofs are compared in constant time. Until both proofs are
//! verified no other frame is accepted, so an unauthenticated peer can never
//! reach a volume.
//!
//! After the handshake, [`PeerLink`] is the primary's end: requests are
//! pipelined and matched to their acknowledgements by ID. Its sending side
//! (the outbox) queues frames in order; large ones are written by the task
//! that made them, the small ones of an NBD connection's batch (see
//! [`Batch`]) together when the batch ends, any others gathered by a writer
//! task into one `writev`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::wire::{Frame, Message, WireError, HEADER_LEN, NONCE_LEN, VERSION};
use crate::pipeline::{poll_write_parts, Batch, BatchSend, READ_CHUNK};
use crate::volume::id::Serial;

/// Domain-separation label of the proof.
const LABEL: &[u8] = b"essd-pprc-link-v2";

/// Why a link could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket error.
    #[error("peer link: {0}")]
    Io(#[from] std::io::Error),
    /// A malformed frame.
    #[error("peer link: {0}")]
    Wire(#[from] WireError),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {0}, this server {VERSION}")]
    Version(u16),
    /// The peer is not the server it was expected to be.
    #[error("peer identifies as {found}, expected {expected}")]
    WrongPeer {
        /// Serial expected.
        expected: String,
        /// Serial received.
        found: String,
    },
    /// The peer's proof does not match the shared secret.
    #[error("peer {0} failed authentication (shared secrets differ?)")]
    AuthFailed(String),
    /// The accepting peer closed the link instead of answering this
    /// side's proof with its own.
    #[error("peer {0} closed the link after this server's proof (shared secrets differ, or the peer stopped?)")]
    ProofRefused(String),
    /// An unexpected frame during the handshake.
    #[error("peer sent {0} during the handshake")]
    Unexpected(&'static str),
    /// A frame that does not answer what was asked.
    #[error("peer answered with {0}")]
    WrongAnswer(&'static str),
    /// The peer closed the link.
    #[error("peer closed the link")]
    Closed,
    /// The peer said goodbye, as a server does when it shuts down, and
    /// closed the link.
    #[error("peer server shut down")]
    PeerShutDown,
    /// The handshake took too long.
    #[error("peer link handshake timed out")]
    Timeout,
    /// A request got no answer in time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// Nothing arrived on an open link for this long (a primary sends a
    /// heartbeat every few seconds).
    #[error("no frame from the peer within {0:?}")]
    Silent(Duration),
}

/// What the handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The authenticated peer's serial.
    pub serial: String,
    /// The link's identity: the connecting side's hello nonce (unique per
    /// link, known to both ends).
    pub link_id: [u8; NONCE_LEN],
}

/// The length of the frame at the front of `buf`, or of a frame header
/// while its header is incomplete (or invalid: decoding reports that).
pub fn next_frame_len(buf: &[u8]) -> usize {
    match Frame::peek_header(buf) {
        Ok(Some(header)) => HEADER_LEN + header.length as usize,
        _ => HEADER_LEN,
    }
}

/// Makes room in `buf` for the rest of the next frame (and at least
/// [`READ_CHUNK`]), so a large frame arrives in one allocation instead of
/// growing the buffer (and copying it) as it comes.
fn reserve_frame(buf: &mut BytesMut) {
    let missing = next_frame_len(buf).saturating_sub(buf.len());
    let want = missing.max(READ_CHUNK);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

/// Reads one frame, buffering in `buf`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, LinkError> {
    loop {
        if let Some(frame) = Frame::decode(buf)? {
            return Ok(frame);
        }
        reserve_frame(buf);
        if reader.read_buf(buf).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

/// The largest payload of a handshake frame (a hello is 44 bytes, a
/// proof 32).
const MAX_HANDSHAKE_PAYLOAD: u32 = 64;

/// Reads one frame of the handshake. The peer is not authenticated yet: a
/// header announcing a longer frame than a handshake needs ends it before
/// any of that frame is buffered.
async fn read_handshake_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, LinkError> {
    loop {
        if Frame::peek_header(buf)?.is_some_and(|h| h.length > MAX_HANDSHAKE_PAYLOAD) {
            return Err(LinkError::Unexpected("a handshake frame too long"));
        }
        if let Some(frame) = Frame::decode(buf)? {
            return Ok(frame);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(LinkError::Closed);
        }
    }
}

/// Most timeouts a request waits for its answer on a link that keeps
/// answering the requests ahead of it (see [`PeerLink::answer_within`]).
pub const QUEUED_PATIENCE: u32 = 4;

/// Bytes queued on a link that the requesting task sends itself, at once,
/// instead of waking the writer task for them: a large write starts on its
/// way to the peer while the local copy is made. Small frames go when their
/// batch ends, or with the writer task, which gathers all queued at the
/// same moment into one write.
const DIRECT_BYTES: usize = 256 << 10;

/// The sending side of a link: frames queue here in order. The requesting
/// task sends them itself once [`DIRECT_BYTES`] are queued or its
/// [`Batch`] ends (never waiting: what the socket does not take at once
/// stays queued); the writer task sends the rest, waiting for the socket
/// when it is full.
struct Outbox<W> {
    state: std::sync::Mutex<OutboxState<W>>,
    /// Wakes the writer task: frames are queued.
    queued: tokio::sync::Notify,
}

impl<W> std::fmt::Debug for Outbox<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

struct OutboxState<W> {
    writer: W,
    /// Encoded frames; `parts[first..]` are not (wholly) sent yet.
    parts: Vec<bytes::Bytes>,
    first: usize,
    /// The socket was full: only the writer task (with its own waker) may
    /// write until it drained the queue. A socket wakes only the last
    /// waker that polled it, so a direct send (with a no-op waker) while
    /// the writer task waits would leave that task asleep.
    blocked: bool,
    /// The writer task ended (write error or the link closed).
    closed: bool,
}

impl<W: AsyncWrite + Unpin> OutboxState<W> {
    /// Writes queued parts until none are left (Ready) or the socket is
    /// full (Pending).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        poll_write_parts(&mut self.writer, cx, &mut self.parts, &mut self.first)
    }

    /// Bytes queued and not sent yet.
    fn queued_bytes(&self) -> usize {
        self.parts[self.first..].iter().map(|p| p.len()).sum()
    }

    /// Writes what the socket takes at once, never waiting; what is left
    /// stays queued for the writer task.
    fn send_direct(&mut self) {
        if self.blocked {
            return;
        }
        match self.poll_drain(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {}
            // The writer task waits for room, with its own waker.
            Poll::Pending => self.blocked = true,
            // The writer task meets the error again and ends.
            Poll::Ready(Err(_)) => {}
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> BatchSend for Outbox<W> {
    fn send_queued(&self) {
        let mut s = self.lock();
        if !s.closed {
            s.send_direct();
        }
        let left = !s.parts.is_empty();
        drop(s);
        if left {
            self.queued.notify_one();
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Outbox<W> {
    /// Starts the writer task of a link's sending side.
    fn spawn(writer: W) -> Arc<Self> {
        let outbox = Arc::new(Outbox {
            state: std::sync::Mutex::new(OutboxState {
                writer,
                parts: Vec::new(),
                first: 0,
                blocked: false,
                closed: false,
            }),
            queued: tokio::sync::Notify::new(),
        });
        let task = outbox.clone();
        tokio::spawn(async move {
            loop {
                task.queued.notified().await;
                let drained = std::future::poll_fn(|cx| {
                    let mut s = task.lock();
                    let r = s.poll_drain(cx);
                    // While this task waits for room, its waker is the one
                    // the socket keeps: no direct send may poll it with
                    // another until the queue is drained.
                    s.blocked = r.is_pending();
                    r.map(|r| r.map(|()| s.closed))
                })
                .await;
                match drained {
                    Ok(false) => {}
                    Ok(true) => {
                        let _ = std::future::poll_fn(|cx| {
                            Pin::new(&mut task.lock().writer).poll_shutdown(cx)
                        })
                        .await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!("peer link: write failed: {e}");
                        task.lock().closed = true;
                        return;
                    }
                }
            }
        });
        outbox
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState<W>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame and sends the queue at once if it is long enough.
    /// Inside a [`Batch`] the rest goes when the batch ends, else the
    /// writer task sends it.
    fn send(self: &Arc<Self>, frame: &Frame) -> Result<(), LinkError> {
        let mut s = self.lock();
        if s.closed {
            return Err(LinkError::Closed);
        }
        s.parts.extend(frame.encode());
        if s.queued_bytes() >= DIRECT_BYTES {
            s.send_direct();
        }
        let left = !s.parts.is_empty();
        drop(s);
        if left && !Batch::defer_send(self) {
            self.queued.notify_one();
        }
        Ok(())
    }

    /// Sends what is queued, then closes the socket; no frame may follow.
    fn close(&self) {
        self.lock().closed = true;
        self.queued.notify_one();
    }
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &Frame,
) -> Result<(), LinkError> {
    for part in frame.encode() {
        writer.write_all(&part).await?;
    }
    writer.flush().await?;
    Ok(())
}

/// Which end of a link made a proof: the side that connected or the side
/// that accepted. Bound into every proof, so a proof one accepting server
/// made can never pass as a connecting peer's at another (a relay between
/// two listeners that share the secret).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Connecting,
    Accepting,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Connecting => b"connecting",
            Role::Accepting => b"accepting",
        }
    }

    fn other(self) -> Role {
        match self {
            Role::Connecting => Role::Accepting,
            Role::Accepting => Role::Connecting,
        }
    }
}

fn proof(
    secret: &[u8],
    role: Role,
    sender: &[u8; 5],
    receiver: &[u8; 5],
    sender_nonce: &[u8],
    receiver_nonce: &[u8],
) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    for part in [
        LABEL,
        role.tag(),
        sender,
        receiver,
        sender_nonce,
        receiver_nonce,
    ] {
        mac.update(part);
    }
    mac
}

fn serial_bytes(s: &Serial) -> [u8; 5] {
    let mut out = [0u8; 5];
    out.copy_from_slice(s.as_str().as_bytes());
    out
}

/// Runs the hello and authentication exchange on a fresh link. `expected`
/// is the peer's serial when this side knows it (the connecting side);
/// the accepting side passes `None` and learns it. Frames that arrive after
/// the handshake stay in `buf`.
///
/// The connecting side proves itself first: the accepting side sends its
/// proof only once the other's has checked out, so a party without the
/// secret that opens a connection learns nothing it could attack offline.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    local: &Serial,
    expected: Option<&Serial>,
    secret: &[u8],
    limit: Duration,
) -> Result<PeerInfo, LinkError> {
    let exchange = exchange(stream, buf, local, expected, secret, |_| {});
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| LinkError::Timeout)?
}

/// The accepting side's [`handshake`], calling `authenticated` once the
/// connecting peer has proved itself and before this side's proof goes
/// out: the connecting side can send nothing on the link before that call
/// has returned.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    local: &Serial,
    secret: &[u8],
    limit: Duration,
    authenticated: impl FnOnce(&PeerInfo),
) -> Result<PeerInfo, LinkError> {
    let exchange = exchange(stream, buf, local, None, secret, authenticated);
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| LinkError::Timeout)?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    local: &Serial,
    expected: Option<&Serial>,
    secret: &[u8],
    authenticated: impl FnOnce(&PeerInfo),
) -> Result<PeerInfo, LinkError> {
    let me = serial_bytes(local);
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let hello = Message::Hello {
        version: VERSION,
        serial: me,
        peer: expected.map(serial_bytes).unwrap_or([b'?'; 5]),
        nonce,
    };
    write_frame(
        stream,
        &Frame {
            id: 0,
            message: hello,
        },
    )
    .await?;
    let Message::Hello {
        version,
        serial: theirs,
        peer: they_expect,
        nonce: their_nonce,
    } = read_handshake_frame(stream, buf).await?.message
    else {
        return Err(LinkError::Unexpected("another frame than hello"));
    };
    if version != VERSION {
        return Err(LinkError::Version(version));
    }
    let their_serial = String::from_utf8_lossy(&theirs).into_owned();
    if let Some(exp) = expected {
        if exp.as_str().as_bytes() != theirs {
            return Err(LinkError::WrongPeer {
                expected: exp.to_string(),
                found: their_serial,
            });
        }
    }
    // A peer claiming this server's own serial (and echoing its nonce)
    // would be sent the very proof it must return: a reflection.
    if theirs == me {
        return Err(LinkError::WrongPeer {
            expected: "another server than this one".into(),
            found: their_serial,
        });
    }
    if they_expect != me && they_expect != [b'?'; 5] {
        return Err(LinkError::WrongPeer {
            expected: String::from_utf8_lossy(&they_expect).into_owned(),
            found: local.to_string(),
        });
    }
    let role = if expected.is_some() {
        Role::Connecting
    } else {
        Role::Accepting
    };
    let mine = proof(secret, role, &me, &theirs, &nonce, &their_nonce)
        .finalize()
        .into_bytes();
    let mut out = [0u8; NONCE_LEN];
    out.copy_from_slice(&mine);
    let my_proof = Frame {
        id: 0,
        message: Message::Auth { proof: out },
    };
    if role == Role::Connecting {
        write_frame(stream, &my_proof).await?;
    }
    let answer = read_handshake_frame(stream, buf).await;
    let answer = match answer {
        Err(LinkError::Closed) if role == Role::Connecting => {
            return Err(LinkError::ProofRefused(their_serial));
        }
        Err(LinkError::Io(e))
            if role == Role::Connecting && e.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            return Err(LinkError::ProofRefused(their_serial));
        }
        other => other?,
    };
    let Message::Auth { proof: their_proof } = answer.message else {
        return Err(LinkError::Unexpected("another frame than auth"));
    };
    proof(secret, role.other(), &theirs, &me, &their_nonce, &nonce)
        .verify_slice(&their_proof)
        .map_err(|_| LinkError::AuthFailed(their_serial.clone()))?;
    let link_id = match role {
        Role::Connecting => nonce,
        Role::Accepting => their_nonce,
    };
    let peer = PeerInfo {
        serial: their_serial,
        link_id,
    };
    if role == Role::Accepting {
        authenticated(&peer);
        write_frame(stream, &my_proof).await?;
    }
    Ok(peer)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// The primary's end of an authenticated link: requests are pipelined and
/// their acknowledgements matched by request ID, in any order.
#[derive(Debug)]
pub struct PeerLink {
    /// Frames to send.
    outbox: Arc<Outbox<Box<dyn AsyncWrite + Unpin + Send>>>,
    pending: Pending,
    next_id: AtomicU64,
    peer: PeerInfo,
    open: Arc<std::sync::atomic::AtomicBool>,
    /// Whether the peer said goodbye (its server shuts down).
    farewell: Arc<std::sync::atomic::AtomicBool>,
    /// When the reader saw the link end.
    closed_at: Arc<Mutex<Option<std::time::SystemTime>>>,
    /// When the link opened, and how long after that (µs) the last
    /// answer to a request other than a heartbeat arrived.
    opened: std::time::Instant,
    answered_at: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl PeerLink {
    /// Connects to a peer's replication listener and authenticates.
    pub async fn connect(
        address: SocketAddr,
        local: &Serial,
        expected: &Serial,
        secret: &[u8],
        limit: Duration,
    ) -> Result<PeerLink, LinkError> {
        let stream = tokio::time::timeout(limit, TcpStream::connect(address))
            .await
            .map_err(|_| LinkError::Timeout)??;
        stream.set_nodelay(true)?;
        Self::open(stream, local, expected, secret, limit).await
    }

    /// Opens a link over an already connected byte stream (TCP here; a TLS
    /// stream wraps in the same way): hello, authentication, then the
    /// pipelined request channel.
    pub async fn open<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        mut stream: S,
        local: &Serial,
        expected: &Serial,
        secret: &[u8],
        limit: Duration,
    ) -> Result<PeerLink, LinkError> {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let peer = handshake(&mut stream, &mut buf, local, Some(expected), secret, limit).await?;
        let (mut read_half, write_half) = tokio::io::split(stream);
        let pending: Pending = Arc::default();
        let acks = pending.clone();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let still_open = open.clone();
        let farewell = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let said_goodbye = farewell.clone();
        let closed_at: Arc<Mutex<Option<std::time::SystemTime>>> = Arc::default();
        let closing = closed_at.clone();
        let opened = std::time::Instant::now();
        let answered_at = AtomicU64::new(0);
        // The writer task ends (after sending what is queued) when the
        // link is dropped, or when the reader ends: the peer said goodbye,
        // the link broke or the peer sent a malformed frame. Then the
        // socket closes, though the link may still be held, and the peer
        // learns at once that the link has ended.
        let outbox = Outbox::spawn(Box::new(write_half) as Box<dyn AsyncWrite + Unpin + Send>);
        let reader_outbox = outbox.clone();
        let reader = tokio::spawn(async move {
            loop {
                let read = match read_frame(&mut read_half, &mut buf).await {
                    Ok(Frame {
                        message: Message::Goodbye,
                        ..
                    }) => {
                        // The peer answered every request it read and
                        // reads no more: the rest will not be answered.
                        said_goodbye.store(true, Ordering::Release);
                        Err(LinkError::PeerShutDown)
                    }
                    other => other,
                };
                match read {
                    Ok(Frame { id, message }) => match message {
                        Message::Ack { .. } | Message::Reply { .. } | Message::Bitmap { .. } => {
                            let waiter = acks.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(message);
                            }
                        }
                        _ => tracing::warn!("peer link: ignoring an unexpected frame"),
                    },
                    Err(e) => {
                        tracing::info!("peer link closed: {e}");
                        // Under the waiters' lock: a request registers only
                        // while the link is open.
                        let mut waiters = acks.lock().unwrap_or_else(|p| p.into_inner());
                        *closing.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(std::time::SystemTime::now());
                        still_open.store(false, Ordering::Release);
                        // Dropping the waiters fails every outstanding request.
                        waiters.clear();
                        drop(waiters);
                        reader_outbox.close();
                        return;
                    }
                }
            }
        });
        Ok(PeerLink {
            outbox,
            pending,
            next_id: AtomicU64::new(1),
            peer,
            open,
            farewell,
            closed_at,
            opened,
            answered_at,
            reader,
        })
    }

    /// When the link ended, if it has.
    pub fn closed_at(&self) -> Option<std::time::SystemTime> {
        *self.closed_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the link is still open (its reader has seen no error).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// When the peer last answered a request other than a heartbeat on
    /// this link (the link's opening if it never has): a peer that answers
    /// heartbeats while a write hangs is not making progress.
    pub fn last_answer(&self) -> std::time::Instant {
        self.opened + Duration::from_micros(self.answered_at.load(Ordering::Acquire))
    }

    /// Waits for the answer to `request`, sent on this link: it fails
    /// once `timeout` has passed with no answer — unless the link has
    /// answered other requests (not heartbeats, which a secondary answers
    /// while a write hangs) since this one was sent, the last within
    /// `timeout`: the peer is working through those queued ahead of this
    /// one (a busy or slow link). Then it fails `timeout` after the link's
    /// last answer, and after [`QUEUED_PATIENCE`] timeouts in all. So a
    /// link that stalls fails its requests `timeout` after its last sign
    /// of life.
    pub async fn answer_within<F: Future>(
        &self,
        request: F,
        timeout: Duration,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        let sent = tokio::time::Instant::now();
        let limit = sent + timeout * QUEUED_PATIENCE;
        let mut deadline = sent + timeout;
        tokio::pin!(request);
        loop {
            match tokio::time::timeout_at(deadline, &mut request).await {
                Ok(answer) => return Ok(answer),
                Err(elapsed) => {
                    let last = tokio::time::Instant::from_std(self.last_answer());
                    let progress = last + timeout;
                    let now = tokio::time::Instant::now();
                    if last <= sent || progress <= now || deadline >= limit {
                        return Err(elapsed);
                    }
                    deadline = progress.min(limit);
                }
            }
        }
    }

    /// Requests sent over this link and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sends one request and waits for its acknowledgement: 0 on success,
    /// else the errno the peer reported.
    pub async fn request(&self, message: Message) -> Result<u32, LinkError> {
        match self.call(message).await? {
            Message::Ack { error } | Message::Reply { error, .. } => Ok(error),
            _ => Err(LinkError::WrongAnswer(
                "a bitmap instead of an acknowledgement",
            )),
        }
    }

    /// Sends a control request (JSON) and waits up to `limit` for its
    /// answer: `Ok(body)` if the peer accepted it, `Err(reason)` if it
    /// refused.
    pub async fn control(
        &self,
        request: &serde_json::Value,
        limit: Duration,
    ) -> Result<Result<Bytes, String>, LinkError> {
        let body = Bytes::from(request.to_string());
        let answer = tokio::time::timeout(limit, self.call(Message::Control { body }))
            .await
            .map_err(|_| LinkError::NoAnswer(limit))??;
        match answer {
            Message::Reply { error: 0, body } => Ok(Ok(body)),
            Message::Reply { body, .. } => Ok(Err(String::from_utf8_lossy(&body).into_owned())),
            _ => Err(LinkError::WrongAnswer(
                "an acknowledgement instead of a reply",
            )),
        }
    }

    /// Sends one request and returns the peer's answer (an
    /// acknowledgement, a reply or a bitmap).
    pub async fn call(&self, message: Message) -> Result<Message, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // The reader has ended: no answer would ever be delivered.
            if !self.open.load(Ordering::Acquire) {
                return Err(self.closed());
            }
            pending.insert(id, tx);
        }
        let progress = !matches!(message, Message::Heartbeat { .. });
        if self.outbox.send(&Frame { id, message }).is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(self.closed());
        }
        let answer = rx.await.map_err(|_| self.closed())?;
        if progress {
            let at = self.opened.elapsed().as_micros() as u64;
            self.answered_at.fetch_max(at, Ordering::AcqRel);
        }
        Ok(answer)
    }

    /// Whether the peer ended the link saying goodbye, as a server does
    /// when it shuts down.
    pub fn peer_shut_down(&self) -> bool {
        self.farewell.load(Ordering::Acquire)
    }

    /// Why a request got no answer on a link that ended.
    fn closed(&self) -> LinkError {
        if self.farewell.load(Ordering::Acquire) {
            LinkError::PeerShutDown
        } else {
            LinkError::Closed
        }
    }
}

impl PeerLink {
    /// Says goodbye (no acknowledgement) and closes the link.
    pub async fn close(&self) -> Result<(), LinkError> {
        self.outbox.send(&Frame {
            id: 0,
            message: Message::Goodbye,
        })
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.reader.abort();
        self.outbox.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    fn serial(s: &str) -> Serial {
        Serial::new(s).unwrap()
    }

    /// FCA31's handshake with FCB02 over `stream`, with the tests' secret.
    async fn connect_as_fca31(stream: &mut tokio::io::DuplexStream) -> Result<PeerInfo, LinkError> {
        let mut buf = BytesMut::new();
        let (me, them) = (serial("FCA31"), serial("FCB02"));
        handshake(stream, &mut buf, &me, Some(&them), b"s3cret", LIMIT).await
    }

    async fn pair(
        a_secret: &'static [u8],
        b_secret: &'static [u8],
        a_expects: &'static str,
    ) -> (Result<PeerInfo, LinkError>, Result<PeerInfo, LinkError>) {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let primary = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            handshake(
                &mut a,
                &mut buf,
                &serial("FCA31"),
                Some(&serial(a_expects)),
                a_secret,
                LIMIT,
            )
            .await
        });
        let secondary = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            handshake(&mut b, &mut buf, &serial("FCB02"), None, b_secret, LIMIT).await
        });
        (primary.await.unwrap(), secondary.await.unwrap())
    }

    #[tokio::test]
    async fn the_outbox_sends_every_frame_in_order_through_a_full_socket() {
        // A pipe far smaller than the frames: direct sends find it full
        // and leave the rest to the writer task, mixed with small frames.
        let (writer, mut reader) = tokio::io::duplex(4096);
        let outbox = Outbox::spawn(writer);
        let sizes: Vec<usize> = (0..60)
            .map(|i| [4096, 300 << 10, 17, 1 << 20][i % 4])
            .collect();
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| Frame {
                id: i as u64 + 1,
                message: Message::Write {
                    volume: super::super::wire::volume_name("1000"),
                    offset: i as u64,
                    fua: false,
                    copy: i % 2 == 0,
                    data: bytes::Bytes::from(vec![i as u8; len]),
                },
            })
            .collect();
        let expected = frames.clone();
        let read = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            loop {
                match read_frame(&mut reader, &mut buf).await {
                    Ok(frame) => got.push(frame),
                    Err(LinkError::Closed) => return got,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for frame in &frames {
            outbox.send(frame).unwrap();
        }
        outbox.close();
        assert!(matches!(outbox.send(&frames[0]), Err(LinkError::Closed)));
        assert_eq!(read.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_direct_send_leaves_the_writer_task_waiting_on_a_full_socket_alone() {
        // The writer task is draining a frame into a full pipe (waiting for
        // room with its own waker) when a large frame is queued: the
        // sending task must not write itself then. A socket keeps only the
        // last waker that polled it, so a write attempt with another waker
        // would leave the writer task asleep with frames queued.
        let (writer, mut reader) = tokio::io::duplex(4096);
        let outbox = Outbox::spawn(writer);
        let frame = write_frame_of;
        let frames = [frame(1, 64 << 10), frame(2, DIRECT_BYTES)];
        // Below DIRECT_BYTES and outside a batch: the writer task sends it.
        outbox.send(&frames[0]).unwrap();
        // This runtime has one thread: let the writer task fill the pipe
        // and wait for room.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        assert!(outbox.lock().queued_bytes() > 0, "the pipe should be full");
        outbox.send(&frames[1]).unwrap();
        let mut buf = BytesMut::new();
        for expected in &frames {
            let got = tokio::time::timeout(LIMIT, read_frame(&mut reader, &mut buf))
                .await
                .expect("every queued frame arrives")
                .unwrap();
            assert_eq!(&got, expected);
        }
    }

    #[tokio::test]
    async fn small_frames_of_a_batch_leave_together_when_it_ends() {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let (writer, mut reader) = tokio::io::duplex(1 << 20);
        let outbox = Outbox::spawn(writer);
        let frame = |id| Frame {
            id,
            message: Message::Heartbeat { unix_ms: id },
        };
        let batch = Batch::begin();
        outbox.send(&frame(1)).unwrap();
        outbox.send(&frame(2)).unwrap();
        let mut got = [0u8; 2 * (HEADER_LEN + 8)];
        // Queued until the batch ends (this task never yielded, so the
        // writer task cannot have sent them either).
        assert!(reader.read(&mut got).now_or_never().is_none());
        drop(batch);
        reader.read_exact(&mut got).now_or_never().unwrap().unwrap();
        let mut buf = BytesMut::from(&got[..]);
        for id in [1, 2] {
            assert_eq!(read_frame(&mut &[][..], &mut buf).await.unwrap(), frame(id));
        }
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ends() {
        let (a, b) = pair(b"s3cret", b"s3cret", "FCB02").await;
        assert_eq!(a.unwrap().serial, "FCB02");
        assert_eq!(b.unwrap().serial, "FCA31");
    }

    #[tokio::test]
    async fn different_secrets_fail_on_both_ends() {
        let (a, b) = pair(b"s3cret", b"other", "FCB02").await;
        assert!(
            matches!(a, Err(LinkError::ProofRefused(ref s)) if s == "FCB02"),
            "{a:?}"
        );
        assert!(
            matches!(b, Err(LinkError::AuthFailed(ref s)) if s == "FCA31"),
            "{b:?}"
        );
    }

    #[tokio::test]
    async fn wrong_peer_serial_is_refused() {
        let (a, _) = pair(b"s3cret", b"s3cret", "FCB09").await;
        assert_eq!(
            a.unwrap_err().to_string(),
            "peer identifies as FCB02, expected FCB09"
        );
    }

    #[tokio::test]
    async fn garbage_and_silence_end_the_handshake() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxx")
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let r = handshake(&mut a, &mut buf, &serial("FCA31"), None, b"k", LIMIT).await;
        assert!(
            matches!(r, Err(LinkError::Wire(WireError::BadMagic(_)))),
            "{r:?}"
        );

        let (mut a, _b) = tokio::io::duplex(1 << 16);
        let mut buf = BytesMut::new();
        let r = handshake(
            &mut a,
            &mut buf,
            &serial("FCA31"),
            None,
            b"k",
            Duration::from_millis(50),
        )
        .await;
        assert!(matches!(r, Err(LinkError::Timeout)), "{r:?}");
    }

    /// A connection that has not authenticated yet announces a hello of
    /// the largest payload a frame may have: the handshake ends at once,
    /// without buffering (or waiting for) what it announced.
    #[tokio::test]
    async fn an_oversized_handshake_frame_is_refused_before_it_is_buffered() {
        use super::super::wire::{MAGIC, MAX_PAYLOAD};
        use bytes::BufMut;
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut header = BytesMut::new();
        header.put_u32(MAGIC);
        header.put_u16(1); // hello
        header.put_u16(0);
        header.put_u64(0);
        header.put_u32(MAX_PAYLOAD);
        b.write_all(&header).await.unwrap();
        b.write_all(&vec![0u8; 60 << 10]).await.unwrap();
        let mut buf = BytesMut::new();
        let limit = Duration::from_secs(1);
        let r = handshake(&mut a, &mut buf, &serial("FCA31"), None, b"k", limit).await;
        assert!(
            matches!(r, Err(LinkError::Unexpected(_))),
            "{r:?} (buffer of {} bytes)",
            buf.capacity()
        );
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes buffered",
            buf.capacity()
        );
    }

    /// A peer without the secret: it answers the hello with the nonce it
    /// was sent, as serial `claim` expecting peer `of` (the sender's own
    /// serial for both when `None`), and echoes the proof it gets, if any.
    fn reflector(
        mut b: tokio::io::DuplexStream,
        claim: Option<[u8; 5]>,
        of: Option<[u8; 5]>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let hello = read_frame(&mut b, &mut buf).await.unwrap();
            let Message::Hello { serial, nonce, .. } = hello.message else {
                panic!("no hello")
            };
            let message = Message::Hello {
                version: VERSION,
                serial: claim.unwrap_or(serial),
                peer: of.unwrap_or(serial),
                nonce,
            };
            write_frame(&mut b, &Frame { id: 0, message })
                .await
                .unwrap();
            if let Ok(auth) = read_frame(&mut b, &mut buf).await {
                let _ = write_frame(&mut b, &auth).await;
            }
        })
    }

    #[tokio::test]
    async fn a_proof_reflected_to_the_accepting_side_is_rejected() {
        // Claiming the listener's own serial makes both proofs the same.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let attacker = reflector(b, None, None);
        let mut buf = BytesMut::new();
        let r = handshake(&mut a, &mut buf, &serial("FCB02"), None, b"s3cret", LIMIT).await;
        attacker.abort();
        assert!(
            matches!(r, Err(LinkError::WrongPeer { .. })),
            "authenticated without the secret: {r:?}"
        );
    }

    /// An attacker without the secret, with a connection to each of two
    /// servers that share it, answers each one's hello with the other's
    /// serial and nonce, to pass each proof on to the other server: an
    /// accepting side sends no proof before it has checked the other's, so
    /// there is nothing to pass on (nor to attack offline), and both
    /// handshakes end unauthenticated.
    #[tokio::test(start_paused = true)]
    async fn an_accepting_side_sends_no_proof_to_a_peer_that_has_not_proved_itself() {
        let listener = |name: &'static str| {
            let (mut ours, theirs) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let r = handshake(&mut ours, &mut buf, &serial(name), None, b"s3cret", LIMIT).await;
                drop(ours);
                r
            });
            (server, theirs)
        };
        let (a, mut to_a) = listener("FCA31");
        let (b, mut to_b) = listener("FCB02");
        let (mut from_a, mut from_b) = (BytesMut::new(), BytesMut::new());
        let hello_a = read_frame(&mut to_a, &mut from_a).await.unwrap();
        let hello_b = read_frame(&mut to_b, &mut from_b).await.unwrap();
        write_frame(&mut to_a, &hello_b).await.unwrap();
        write_frame(&mut to_b, &hello_a).await.unwrap();
        // What each server sends after the hellos: nothing, then the end
        // of the connection once its handshake time has run out.
        let after_a = read_frame(&mut to_a, &mut from_a).await;
        let after_b = read_frame(&mut to_b, &mut from_b).await;
        assert!(after_a.is_err(), "FCA31 sent {after_a:?}");
        assert!(after_b.is_err(), "FCB02 sent {after_b:?}");
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(matches!(a, Err(LinkError::Timeout)), "{a:?}");
        assert!(matches!(b, Err(LinkError::Timeout)), "{b:?}");
    }

    /// The accepting side calls back once the peer has proved itself and
    /// before its own proof goes out, so the connecting side cannot have
    /// finished (and sent requests) before the callback.
    #[tokio::test]
    async fn the_accepting_side_calls_back_before_the_connecting_side_is_through() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let (told, mut heard) = tokio::sync::oneshot::channel::<PeerInfo>();
        let primary = tokio::spawn(async move {
            let r = connect_as_fca31(&mut a).await;
            (r, heard.try_recv())
        });
        let mut buf = BytesMut::new();
        let r = accept(
            &mut b,
            &mut buf,
            &serial("FCB02"),
            b"s3cret",
            LIMIT,
            |peer| {
                let _ = told.send(peer.clone());
            },
        )
        .await
        .unwrap();
        let (connected, seen) = primary.await.unwrap();
        let connected = connected.unwrap();
        let seen = seen.expect("the connecting side was through before the callback");
        assert_eq!(seen.serial, "FCA31");
        assert_eq!(seen.link_id, connected.link_id);
        assert_eq!(r.link_id, connected.link_id);
    }

    /// A peer that authenticates, sends a malformed frame, then reads
    /// (never answering) until its end of the link closes.
    fn a_peer_sending_a_malformed_frame(
        mut b: tokio::io::DuplexStream,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            handshake(&mut b, &mut buf, &serial("FCB02"), None, b"s3cret", LIMIT)
                .await
                .unwrap();
            b.write_all(&[0u8; HEADER_LEN]).await.unwrap();
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut b, &mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
    }

    #[tokio::test]
    async fn a_request_on_a_link_whose_reader_ended_fails_at_once() {
        // The reader task ended (here: a malformed frame from the
        // peer) and cleared the waiters; a request registered after that
        // must not wait forever for an answer no one will deliver.
        let (a, b) = tokio::io::duplex(1 << 16);
        let peer = a_peer_sending_a_malformed_frame(b);
        let link = PeerLink::open(a, &serial("FCA31"), &serial("FCB02"), b"s3cret", LIMIT)
            .await
            .unwrap();
        while link.is_open() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            link.request(Message::Heartbeat { unix_ms: 1 }),
        )
        .await;
        assert!(
            matches!(r, Ok(Err(LinkError::Closed))),
            "a request on a link whose reader ended: {r:?}"
        );
        drop(link);
        peer.abort();
    }

    /// A malformed frame from the peer ends the link at both ends at once,
    /// though the link is still held (by a write waiting to learn whether
    /// the link has drained, say): the peer sees the socket close instead
    /// of waiting for its silence limit, so it can answer that the link
    /// drained.
    #[tokio::test]
    async fn a_malformed_frame_closes_the_socket_while_the_link_is_held() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let peer = a_peer_sending_a_malformed_frame(b);
        let link = PeerLink::open(a, &serial("FCA31"), &serial("FCB02"), b"s3cret", LIMIT)
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), peer).await;
        assert!(
            matches!(closed, Ok(Ok(()))),
            "the peer did not see the link close: {closed:?}"
        );
        assert!(!link.is_open());
    }

    /// Request `id`: a write of `len` bytes of `id`.
    fn write_frame_of(id: u64, len: usize) -> Frame {
        Frame {
            id,
            message: Message::Write {
                volume: super::super::wire::volume_name("1000"),
                offset: 0,
                fua: false,
                copy: false,
                data: bytes::Bytes::from(vec![id as u8; len]),
            },
        }
    }

    #[tokio::test]
    async fn sent_frames_are_released_while_the_queue_stays_busy() {
        // A link whose socket is always a little behind (the queue
        // never runs empty) must not keep every frame it has sent.
        use tokio::io::AsyncReadExt;
        let (writer, mut reader) = tokio::io::duplex(64 << 10);
        let outbox = Outbox::spawn(writer);
        const DATA: usize = 60 << 10;
        let frame = |id: u64| write_frame_of(id, DATA);
        let len = frame(0).encode().iter().map(|p| p.len()).sum::<usize>();
        for id in 0..3 {
            outbox.send(&frame(id)).unwrap();
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; len];
        let mut sent = 3u64;
        for _ in 0..400 {
            // One frame out of the pipe, one more in: the queue never empties.
            reader.read_exact(&mut got).await.unwrap();
            outbox.send(&frame(sent)).unwrap();
            sent += 1;
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert!(outbox.lock().queued_bytes() > 0, "the queue ran empty");
        }
        let s = outbox.lock();
        let kept: usize = s.parts[..s.first].iter().map(|p| p.len()).sum();
        let total: usize = s.parts.iter().map(|p| p.len()).sum();
        assert!(
            total < 8 * len,
            "{sent} frames of {len} bytes sent; the outbox still holds {total} bytes, {kept} of them already sent"
        );
    }

    #[tokio::test]
    async fn a_reflected_proof_is_rejected() {
        // A peer that answers with our own hello nonce and echoes our proof.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let attacker = reflector(b, Some(*b"FCB02"), Some(*b"FCA31"));
        let r = connect_as_fca31(&mut a).await;
        assert!(matches!(r, Err(LinkError::AuthFailed(_))), "{r:?}");
        attacker.await.unwrap();
    }
}
