//! Pipelined requests served inside one task.
//!
//! A connection (an NBD client, a peer link) starts each request it reads by
//! polling it once in place: a request whose I/O finishes at once answers
//! without any task or thread hop. A request that must wait joins the set
//! in flight, which the connection's own task polls again when it is woken.
//! [`Pipeline::finished`] hands over the answers of every request finished
//! by one wake-up (a batch of acknowledgements, several I/O completions),
//! so they leave in one vectored write ([`write_batch`]). While a large
//! request is still arriving, [`LowWater`] asks the socket to wake the
//! connection only once all of it is there, not for every piece.
//!
//! A connection starts the requests of one read inside a [`Batch`]: sends
//! they queue on other sockets (a mirrored write's frame on a peer link) go
//! out together when the batch ends, before any request does its slower
//! local part ([`Batch::local_turn`]), so the peer works while we do.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::io::AsyncWrite;

/// Most buffers one vectored write takes.
const MAX_SLICES: usize = 512;

/// Writes every byte of `parts`, in order, with as few vectored writes as
/// the writer allows, then empties `parts`.
pub async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    parts: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    std::future::poll_fn(|cx| poll_write_parts(&mut *writer, cx, parts, &mut first)).await
}

/// Writes `parts[*first..]` with vectored writes until all is written
/// (then empties `parts` and resets `first`: Ready) or the writer is full
/// (Pending; `first` and the front part record how far it got).
pub fn poll_write_parts<W: AsyncWrite + Unpin>(
    writer: &mut W,
    cx: &mut Context<'_>,
    parts: &mut Vec<Bytes>,
    first: &mut usize,
) -> Poll<io::Result<()>> {
    loop {
        while *first < parts.len() && parts[*first].is_empty() {
            *first += 1;
        }
        if *first == parts.len() {
            parts.clear();
            *first = 0;
            return Poll::Ready(Ok(()));
        }
        let slices: Vec<IoSlice<'_>> = parts[*first..]
            .iter()
            .take(MAX_SLICES)
            .map(|b| IoSlice::new(b))
            .collect();
        let polled = Pin::new(&mut *writer).poll_write_vectored(cx, &slices);
        drop(slices);
        let mut n = match polled {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                // Let go of the parts already sent: a queue that never runs
                // empty (a link always a little behind) would keep them all.
                parts.drain(..*first);
                *first = 0;
                return Poll::Pending;
            }
        };
        while n > 0 {
            let len = parts[*first].len();
            if n >= len {
                n -= len;
                *first += 1;
            } else {
                parts[*first].advance(n);
                n = 0;
            }
        }
    }
}

/// The read side of a connection whose socket can be told how many bytes
/// to gather before it wakes the reader (`SO_RCVLOWAT`; TCP honours it,
/// other streams do not have it).
pub trait ReadLowWater {
    /// The socket that takes a low-water mark, if any.
    fn low_water_socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl ReadLowWater for tokio::net::TcpStream {
    fn low_water_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl ReadLowWater for tokio::net::tcp::OwnedReadHalf {
    fn low_water_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_ref().as_fd())
    }
}

// Unix sockets wake their reader for any byte whatever the mark says.
impl ReadLowWater for tokio::net::UnixStream {}
impl ReadLowWater for tokio::net::unix::OwnedReadHalf {}
impl ReadLowWater for tokio::io::DuplexStream {}

/// Requests of at least this many bytes are read into a buffer of their own.
pub const LARGE_REQUEST: usize = 256 << 10;
/// Receive buffer growth step while requests are small.
pub const READ_CHUNK: usize = 256 << 10;
/// Spare room below which a receive buffer grows before the next read.
const MIN_SPARE: usize = 64 << 10;

/// Plans the reads of a request stream (NBD requests, peer-link frames)
/// into one growing receive buffer. Small requests are read many at a time.
/// A large one is read into an allocation made for it, and its read stops
/// where it ends; after it (and at the start), the next read takes only
/// the next header. A stream of large requests is then never copied:
/// reading on past a request's end would leave the start of the next one to
/// be copied into a new buffer, and growing a buffer in place (realloc)
/// copies all of it. A large request after small ones may have its first
/// bytes copied once.
#[derive(Debug)]
pub struct ReadPlan {
    header: usize,
    header_first: bool,
}

impl ReadPlan {
    /// A plan for a stream whose requests start with `header` bytes.
    pub fn new(header: usize) -> ReadPlan {
        ReadPlan {
            header,
            header_first: true,
        }
    }

    /// Notes the size of a request just taken from the buffer.
    pub fn took(&mut self, len: usize) {
        self.header_first = len >= LARGE_REQUEST;
    }

    /// Makes room in `buf` for the next read and returns how many bytes it
    /// may take; `need` is the size of the request at the front of `buf`
    /// (or of its header while that is all that is known).
    pub fn prepare(&self, buf: &mut BytesMut, need: usize) -> usize {
        let missing = need.saturating_sub(buf.len()).max(1);
        if need >= LARGE_REQUEST {
            if buf.capacity() - buf.len() < missing {
                // A new allocation for the request: only the bytes already
                // buffered are copied (`reserve` could realloc and copy the
                // whole old allocation).
                let mut own = BytesMut::with_capacity(buf.len() + missing);
                own.extend_from_slice(buf);
                *buf = own;
            }
            return missing;
        }
        if buf.capacity() - buf.len() < missing.max(MIN_SPARE) {
            buf.reserve(missing.max(READ_CHUNK));
        }
        if buf.is_empty() && self.header_first {
            self.header
        } else {
            usize::MAX
        }
    }
}

/// Requests missing fewer bytes than this wake the reader for any byte.
const LOW_WATER_MIN: usize = 64 << 10;
/// Highest low-water mark set (the kernel may wake the reader earlier when
/// its receive buffer is under pressure).
const LOW_WATER_MAX: usize = 1 << 20;

/// A connection's read low-water mark: while a large request is arriving,
/// its reader is woken once the rest of it is there instead of for every
/// segment (fewer wake-ups and reads).
#[derive(Debug)]
pub struct LowWater {
    current: usize,
}

impl Default for LowWater {
    fn default() -> Self {
        LowWater { current: 1 }
    }
}

impl LowWater {
    /// Sets the mark for a reader that needs `missing` more bytes before
    /// it can start its next request (0 or a few: wake for any byte).
    pub fn expect(&mut self, reader: &impl ReadLowWater, missing: usize) {
        let mark = if missing >= LOW_WATER_MIN {
            missing.min(LOW_WATER_MAX)
        } else {
            1
        };
        if mark == self.current {
            return;
        }
        let Some(socket) = reader.low_water_socket() else {
            return;
        };
        let value = mark as libc::c_int;
        // SAFETY: `socket` is an open descriptor borrowed for this call;
        // the option value is a c_int that lives across the call and its
        // size is passed with it.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            self.current = mark;
        }
    }
}

/// A sender whose queued bytes may wait for the end of a [`Batch`].
pub trait BatchSend: Send + Sync {
    /// Sends what is queued (without waiting for the socket).
    fn send_queued(&self);
}

thread_local! {
    /// The senders with bytes queued by the batch being started on this
    /// thread; `None` outside a batch.
    static BATCH: RefCell<Option<Vec<Arc<dyn BatchSend>>>> = const { RefCell::new(None) };
}

/// The requests of one read being started (see the module docs). Not held
/// across an await: it lives on the starting thread.
pub struct Batch(std::marker::PhantomData<*const ()>);

impl Batch {
    /// Begins starting a batch of requests on this thread.
    pub fn begin() -> Batch {
        BATCH.with(|b| *b.borrow_mut() = Some(Vec::new()));
        Batch(std::marker::PhantomData)
    }

    /// Leaves the sending of `sender`'s queued bytes to the end of the
    /// batch being started on this thread; false (the caller sends them)
    /// outside a batch.
    pub fn defer_send<S: BatchSend + 'static>(sender: &Arc<S>) -> bool {
        BATCH.with(|b| match b.borrow_mut().as_mut() {
            Some(senders) => {
                let same =
                    |s: &Arc<dyn BatchSend>| std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(sender));
                // Registered (and its Arc cloned) once per batch, however
                // many frames it queues.
                if !senders.iter().any(same) {
                    senders.push(sender.clone());
                }
                true
            }
            None => false,
        })
    }

    /// Whether the batch being started on this thread has sends deferred
    /// to its end (its requests send to a peer).
    pub fn deferring() -> bool {
        BATCH.with(|b| {
            b.borrow()
                .as_ref()
                .is_some_and(|senders| !senders.is_empty())
        })
    }

    /// Waits, if a batch is being started on this thread, until it ended:
    /// a request's local part runs after the batch's sends left.
    pub fn local_turn() -> impl Future<Output = ()> {
        let mut wait = BATCH.with(|b| b.borrow().is_some());
        std::future::poll_fn(move |cx| {
            if std::mem::take(&mut wait) {
                // The connection polls a request it just started again
                // anyway (see `Pipeline::start`); any other poller is
                // asked to.
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let senders = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
        for sender in senders {
            sender.send_queued();
        }
    }
}

/// A request in flight.
type Request<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The requests of one connection that are in flight.
///
/// The set also holds one future that never finishes (the anchor).
/// `FuturesUnordered` yields to the executor, waking its task, whenever
/// one poll has polled as many futures as the set holds; after a batch
/// the set usually holds just the requests it started, all waiting for
/// their peer or disk, so every batch ended with the connection's task
/// rescheduled, and the runtime woke another worker thread that took it
/// over. The anchor is never ready to poll, so such a sweep stops one
/// short of the count (a future that wakes itself still makes the set
/// yield).
pub struct Pipeline<'a, T> {
    in_flight: FuturesUnordered<Request<'a, T>>,
}

impl<'a, T: 'a> Default for Pipeline<'a, T> {
    fn default() -> Self {
        let mut in_flight = FuturesUnordered::new();
        let anchor: Request<'a, T> = Box::pin(std::future::pending());
        in_flight.push(anchor);
        // Its first poll, here: from now on it is never ready to poll.
        let _ = in_flight.poll_next_unpin(&mut Context::from_waker(Waker::noop()));
        Pipeline { in_flight }
    }
}

impl<'a, T> Pipeline<'a, T> {
    /// Number of requests in flight.
    pub fn len(&self) -> usize {
        // Less the anchor.
        self.in_flight.len() - 1
    }

    /// Whether no request is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a request: polls it once in place and returns its answer if
    /// it finished; otherwise it joins the requests in flight.
    pub fn start(&mut self, request: impl Future<Output = T> + Send + 'a) -> Option<T> {
        let mut request: Request<'a, T> = Box::pin(request);
        // The first poll uses a no-op waker; a request that must wait is
        // polled again by the set in flight, with the connection's waker.
        match request
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(answer) => Some(answer),
            Poll::Pending => {
                self.in_flight.push(request);
                None
            }
        }
    }

    /// Waits until at least one request in flight has finished, and passes
    /// the answer of every request finished by then to `take`. Pending
    /// forever while nothing is in flight.
    pub fn finished<'p, F>(
        &'p mut self,
        mut take: F,
    ) -> impl Future<Output = ()> + use<'a, 'p, T, F>
    where
        F: FnMut(T) + 'p,
    {
        std::future::poll_fn(move |cx| {
            let mut any = false;
            while let Poll::Ready(Some(answer)) = self.in_flight.poll_next_unpin(cx) {
                take(answer);
                any = true;
            }
            if any {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

impl<T> Pipeline<'_, T> {
    /// Ends a connection: writes `unsent`, lets every request in flight
    /// finish and writes their answers (`encode` turns one into bytes) for
    /// as long as the writer takes them. Returns whether it still does.
    pub async fn finish<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        mut unsent: Vec<Bytes>,
        mut encode: impl FnMut(T, &mut Vec<Bytes>),
    ) -> bool {
        let mut writable = write_batch(writer, &mut unsent).await.is_ok();
        while !self.is_empty() {
            self.finished(|answer| encode(answer, &mut unsent)).await;
            writable = writable && write_batch(writer, &mut unsent).await.is_ok();
            unsent.clear();
        }
        writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;

    #[derive(Default)]
    struct CountingSender(AtomicUsize);

    impl BatchSend for CountingSender {
        fn send_queued(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Reads a stream of requests (an 8-byte length, then that many bytes)
    /// the way a connection does and returns their payloads, or the index of
    /// the first large payload (starting the stream or following a large
    /// one) that was not read in place by reads of its own: whose bytes
    /// came with the request before it, or moved after its first read.
    async fn read_requests(stream: &[u8], plan_reads: bool) -> Result<Vec<Bytes>, usize> {
        const HEADER: usize = 8;
        let mut reader = stream;
        let mut plan = ReadPlan::new(HEADER);
        // A buffer that grew large before: room alone does not stop a read.
        let mut buf = BytesMut::with_capacity(4 << 20);
        let mut payloads = Vec::new();
        // Where the payload at the front of `buf` began to be read.
        let mut payload_at: Option<usize> = None;
        let mut after_large = true;
        loop {
            let need = loop {
                if buf.len() < HEADER {
                    break HEADER;
                }
                let len = u64::from_le_bytes(buf[..HEADER].try_into().unwrap()) as usize;
                if buf.len() < HEADER + len {
                    break HEADER + len;
                }
                buf.advance(HEADER);
                let payload = buf.split_to(len).freeze();
                if len >= LARGE_REQUEST
                    && after_large
                    && payload_at != Some(payload.as_ptr() as usize)
                {
                    return Err(payloads.len());
                }
                payload_at = None;
                after_large = len >= LARGE_REQUEST;
                plan.took(len);
                payloads.push(payload);
            };
            let limit = plan.prepare(&mut buf, need);
            let limit = if plan_reads { limit } else { usize::MAX };
            let n = tokio::io::AsyncReadExt::read_buf(&mut reader, &mut (&mut buf).limit(limit))
                .await
                .unwrap();
            if n == 0 {
                assert!(buf.is_empty(), "the stream ended inside a request");
                return Ok(payloads);
            }
            if payload_at.is_none() && buf.len() > HEADER {
                payload_at = Some(buf[HEADER..].as_ptr() as usize);
            }
        }
    }

    #[tokio::test]
    async fn a_large_request_is_read_into_a_buffer_of_its_own_and_never_copied() {
        let sizes = [
            1 << 20,
            300 << 10,
            2 << 20,
            1 << 20,
            100,
            0,
            4096,
            17,
            300 << 10,
            3,
        ];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..len).map(|b| (b % 251) as u8 ^ i as u8).collect();
            stream.extend_from_slice(&(len as u64).to_le_bytes());
            stream.extend_from_slice(&payload);
            expected.push(payload);
        }
        let payloads = read_requests(&stream, true)
            .await
            .expect("no payload moved");
        assert_eq!(payloads.len(), sizes.len());
        for (i, (got, want)) in payloads.iter().zip(&expected).enumerate() {
            assert!(got[..] == want[..], "payload {i} differs");
        }
        // Reading ahead as for small requests runs into the next request.
        assert!(read_requests(&stream, false).await.is_err());
    }

    #[test]
    fn reads_stop_at_the_end_of_a_large_request_and_take_only_the_next_header() {
        let mut plan = ReadPlan::new(28);
        let mut buf = BytesMut::new();
        assert_eq!(plan.prepare(&mut buf, 28), 28, "at the start: a header");
        assert!(buf.capacity() >= READ_CHUNK);
        buf.extend_from_slice(&[7; 28]);
        let need = 28 + (1 << 20);
        assert_eq!(plan.prepare(&mut buf, need), 1 << 20, "up to its end");
        assert!(buf.capacity() >= need);
        assert_eq!(&buf[..], &[7; 28], "the header moved with it");
        buf.clear();
        plan.took(1 << 20);
        assert_eq!(plan.prepare(&mut buf, 28), 28, "after it: the next header");
        plan.took(4096);
        assert_eq!(plan.prepare(&mut buf, 28), usize::MAX, "small: read ahead");
    }

    #[test]
    fn a_batch_sends_each_deferred_sender_once_when_it_ends() {
        let first = Arc::new(CountingSender::default());
        let second = Arc::new(CountingSender::default());
        let (a, b) = (&first, &second);
        assert!(!Batch::defer_send(a), "no batch: the caller sends");
        let batch = Batch::begin();
        assert!(!Batch::deferring(), "nothing queued yet");
        assert!(Batch::defer_send(a));
        assert!(Batch::deferring());
        assert!(Batch::defer_send(b));
        assert!(Batch::defer_send(a));
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        drop(batch);
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        assert!(!Batch::deferring());
        assert!(!Batch::defer_send(a));
    }

    /// Counts the wake-ups of a task.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn waiting_requests_do_not_make_the_connection_yield() {
        let mut pipeline = Pipeline::default();
        assert!(pipeline.is_empty());
        let mut senders = Vec::new();
        for _ in 0..32 {
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            senders.push(tx);
            assert_eq!(pipeline.start(async move { rx.await.unwrap() }), None);
        }
        assert_eq!(pipeline.len(), 32);
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut answers = Vec::new();
        {
            let mut finished = std::pin::pin!(pipeline.finished(|a| answers.push(a)));
            // Every request is polled once (they were just started) and
            // waits: nothing to report, and no reason to wake the task.
            assert!(finished.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            0,
            "the connection was woken"
        );
        for (i, tx) in senders.drain(..3).enumerate() {
            tx.send(i as u32).unwrap();
        }
        assert!(
            counter.0.load(Ordering::SeqCst) >= 1,
            "answers wake the connection"
        );
        {
            let mut finished = std::pin::pin!(pipeline.finished(|a| answers.push(a)));
            assert!(finished.as_mut().poll(&mut cx).is_ready());
        }
        answers.sort_unstable();
        assert_eq!(answers, vec![0, 1, 2]);
        assert_eq!(pipeline.len(), 29);
    }

    #[test]
    fn a_local_part_waits_for_the_end_of_its_batch_only() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut outside = std::pin::pin!(Batch::local_turn());
        assert!(outside.as_mut().poll(&mut cx).is_ready());
        let batch = Batch::begin();
        let mut inside = std::pin::pin!(Batch::local_turn());
        assert!(inside.as_mut().poll(&mut cx).is_pending());
        drop(batch);
        assert!(inside.as_mut().poll(&mut cx).is_ready());
        // A request started in a batch runs its local part when the
        // pipeline polls it again.
        let mut pipeline = Pipeline::default();
        let batch = Batch::begin();
        assert_eq!(
            pipeline.start(async {
                Batch::local_turn().await;
                7
            }),
            None
        );
        drop(batch);
        let mut answers = Vec::new();
        {
            let mut finished = std::pin::pin!(pipeline.finished(|a| answers.push(a)));
            assert!(finished.as_mut().poll(&mut cx).is_ready());
        }
        assert_eq!(answers, [7]);
    }

    #[tokio::test]
    async fn ready_requests_answer_in_place_and_waiting_ones_in_a_batch() {
        let mut pipeline = Pipeline::default();
        assert_eq!(pipeline.start(async { 1 }), Some(1));
        let (tx_a, rx_a) = tokio::sync::oneshot::channel::<u32>();
        let (tx_b, rx_b) = tokio::sync::oneshot::channel::<u32>();
        assert_eq!(pipeline.start(async { rx_a.await.unwrap() }), None);
        assert_eq!(pipeline.start(async { rx_b.await.unwrap() }), None);
        assert_eq!(pipeline.len(), 2);
        tx_a.send(2).unwrap();
        tx_b.send(3).unwrap();
        let mut answers = Vec::new();
        pipeline.finished(|a| answers.push(a)).await;
        answers.sort();
        assert_eq!(answers, vec![2, 3]);
        assert!(pipeline.is_empty());
        // Nothing in flight: never finishes.
        let nothing = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            pipeline.finished(|_| {}),
        )
        .await;
        assert!(nothing.is_err());
    }

    fn low_water_of(stream: &tokio::net::TcpStream) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the descriptor is open; value and len are valid for writes
        // of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        value
    }

    #[tokio::test]
    async fn a_tcp_reader_wakes_once_a_large_request_has_arrived() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        let mut mark = LowWater::default();
        mark.expect(&receiver, 100);
        assert_eq!(low_water_of(&receiver), 1);
        mark.expect(&receiver, 4 << 20);
        assert_eq!(low_water_of(&receiver), 1 << 20);
        mark.expect(&receiver, 300 << 10);
        assert_eq!(low_water_of(&receiver), 300 << 10);

        // Nothing to read yet (this also clears any readiness cached).
        let mut got = vec![0u8; 400 << 10];
        let nothing = receiver.try_read(&mut got).unwrap_err();
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
        // A third of the request: the reader is not woken.
        sender.write_all(&vec![7u8; 100 << 10]).await.unwrap();
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(200), receiver.readable()).await;
        assert!(early.is_err(), "woken with a third of the request");
        // The rest: woken, and all of it is there.
        sender.write_all(&vec![7u8; 200 << 10]).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), receiver.readable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(receiver.try_read(&mut got).unwrap(), 300 << 10);

        mark.expect(&receiver, 0);
        assert_eq!(low_water_of(&receiver), 1);
        // Streams without the option take the call and ignore it.
        let (duplex, _other) = tokio::io::duplex(64);
        LowWater::default().expect(&duplex, 1 << 20);
    }

    #[tokio::test]
    async fn a_batch_is_written_whole_and_in_order_across_short_writes() {
        // A pipe smaller than the batch forces partial vectored writes.
        let (mut writer, mut reader) = tokio::io::duplex(7);
        let mut parts: Vec<Bytes> = ["abc", "", "defghij", "k", "", "lmnopqrstuvwxyz"]
            .into_iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect();
        let read = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all)
                .await
                .unwrap();
            all
        });
        write_batch(&mut writer, &mut parts).await.unwrap();
        assert!(parts.is_empty());
        drop(writer);
        assert_eq!(read.await.unwrap(), b"abcdefghijklmnopqrstuvwxyz");
    }

    #[tokio::test]
    async fn finishing_writes_the_unsent_answers_then_those_in_flight() {
        let mut pipeline = Pipeline::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<&'static str>();
        assert_eq!(pipeline.start(async { rx.await.unwrap() }), None);
        let (mut writer, mut reader) = tokio::io::duplex(1024);
        tx.send("late").unwrap();
        let unsent = vec![Bytes::from_static(b"early,")];
        let writable = pipeline
            .finish(&mut writer, unsent, |answer, out| {
                out.push(Bytes::from_static(answer.as_bytes()))
            })
            .await;
        assert!(writable);
        assert!(pipeline.is_empty());
        drop(writer);
        let mut all = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut all)
            .await
            .unwrap();
        assert_eq!(all, b"early,late");
    }
}
