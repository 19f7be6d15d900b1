//! Connections of the management API's TCP listener, which anyone who can
//! reach the port can open before authenticating: at most
//! [`MAX_TCP_CONNECTIONS`] are served at once (further ones wait in the
//! kernel's backlog, not on the server's file descriptors, which the
//! volumes, peer links and NBD clients need), and each request head must
//! arrive within [`HEAD_TIMEOUT`] of the connection opening or of the last
//! answer, and an answer that cannot be written for as long (a client that
//! does not read) fails the connection, so that idle, trickling or stuck
//! connections do not hold those places.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Most TCP connections of the management API served at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Time a client has to send a request head (up to its blank line), from
/// the connection's opening or from the last bytes of the previous answer.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(15);

/// The end of an HTTP request head: a line end (CRLF, or LF alone, which
/// HTTP parsers accept) followed by a blank line ending in CRLF or in LF
/// alone. The last three bytes are `\n\r\n` or the last two `\n\n`.
const HEAD_END_CRLF: u32 = u32::from_be_bytes(*b"\0\n\r\n");
const HEAD_END_LF: u32 = u32::from_be_bytes(*b"\0\0\n\n");

/// The TCP listener of the management API, with the limits of this module.
pub struct ApiTcpListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    head_timeout: Duration,
}

impl ApiTcpListener {
    /// Wraps a bound listener.
    pub fn new(inner: TcpListener) -> Self {
        Self::with_limits(inner, MAX_TCP_CONNECTIONS, HEAD_TIMEOUT)
    }

    /// Wraps a bound listener with other limits (tests).
    pub fn with_limits(inner: TcpListener, connections: usize, head_timeout: Duration) -> Self {
        ApiTcpListener {
            inner,
            slots: Arc::new(Semaphore::new(connections)),
            head_timeout,
        }
    }
}

impl axum::serve::Listener for ApiTcpListener {
    type Io = ApiConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // A place first: until one is free, connections wait in the backlog.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = io.set_nodelay(true);
        (ApiConnection::new(io, slot, self.head_timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One accepted connection: reads fail with `TimedOut` once a request head
/// is overdue.
pub struct ApiConnection {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    head_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// A request head is awaited (not yet seen since the last answer).
    awaiting_head: bool,
    /// When a write that cannot go on fails; `None` while writes go on.
    write_deadline: Option<Pin<Box<Sleep>>>,
    /// The last four bytes read while awaiting a head.
    window: u32,
    /// A byte other than CR or LF read while awaiting a head: blank lines
    /// before a request line (which HTTP parsers skip) start no head.
    request_line: bool,
}

impl ApiConnection {
    fn new(io: TcpStream, slot: OwnedSemaphorePermit, head_timeout: Duration) -> Self {
        ApiConnection {
            io,
            _slot: slot,
            head_timeout,
            deadline: Box::pin(tokio::time::sleep(head_timeout)),
            awaiting_head: true,
            write_deadline: None,
            window: 0,
            request_line: false,
        }
    }

    /// The result of a write: progress ends the write deadline; a write
    /// that cannot go on starts it, and fails once it has passed.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                self.write_deadline = None;
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                let timeout = self.head_timeout;
                let deadline = self
                    .write_deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if deadline.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not read the answer within the time allowed",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }

    /// Notes bytes read: the end of a request head ends its deadline.
    fn saw(&mut self, bytes: &[u8]) {
        if !self.awaiting_head {
            return;
        }
        for &b in bytes {
            self.window = (self.window << 8) | u32::from(b);
            self.request_line |= b != b'\r' && b != b'\n';
            let ended =
                self.window & 0xFF_FFFF == HEAD_END_CRLF || self.window & 0xFFFF == HEAD_END_LF;
            if ended && self.request_line {
                self.awaiting_head = false;
                return;
            }
        }
    }

    /// Notes bytes of an answer written: the next head is awaited from now.
    fn wrote(&mut self, n: usize) {
        if n > 0 {
            self.awaiting_head = true;
            self.window = 0;
            self.request_line = false;
            let at = Instant::now() + self.head_timeout;
            self.deadline.as_mut().reset(at);
        }
    }
}

impl AsyncRead for ApiConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.awaiting_head && this.deadline.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request head within the time allowed",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for ApiConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.written(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.written(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(head_timeout: Duration) -> (ApiConnection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut api = ApiTcpListener::with_limits(listener, 1, head_timeout);
        let client = TcpStream::connect(addr).await.unwrap();
        let (conn, _) = axum::serve::Listener::accept(&mut api).await;
        (conn, client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_sent_in_time_fails_the_read() {
        let (mut conn, mut client) = pair(Duration::from_secs(15)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(n, 25);
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    /// Blank lines are no request head (HTTP parsers skip them and wait
    /// for one): a client that sends only those is still cut off.
    #[tokio::test(start_paused = true)]
    async fn blank_lines_do_not_end_the_head_deadline() {
        let (mut conn, mut client) = pair(Duration::from_secs(15)).await;
        client.write_all(b"\r\n\r\n\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 8);
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_head_has_no_deadline_until_the_answer() {
        let (mut conn, mut client) = pair(Duration::from_secs(15)).await;
        // The head's end split across two reads.
        client.write_all(b"GET / HTTP/1.1\r\n\r").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 17);
        client.write_all(b"\n").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        // A long operation: the read pending meanwhile does not time out.
        let waiting = tokio::time::timeout(Duration::from_secs(100), conn.read(&mut buf)).await;
        assert!(waiting.is_err(), "{waiting:?}");
        // After the answer, the next head is due again.
        conn.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    /// Heads whose lines end in LF alone, or mix LF and CRLF, end the
    /// deadline too.
    #[tokio::test(start_paused = true)]
    async fn a_head_with_bare_lf_line_ends_has_no_deadline_until_the_answer() {
        for head in [
            &b"GET / HTTP/1.1\n\n"[..],
            b"GET / HTTP/1.1\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\n",
        ] {
            let (mut conn, mut client) = pair(Duration::from_secs(15)).await;
            client.write_all(head).await.unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(conn.read(&mut buf).await.unwrap(), head.len());
            let waiting = tokio::time::timeout(Duration::from_secs(100), conn.read(&mut buf)).await;
            assert!(waiting.is_err(), "{head:?}: {waiting:?}");
        }
    }

    /// A client that sends requests and never reads the answers: once the
    /// socket buffers are full, the write fails after the time allowed
    /// instead of holding the connection's place forever.
    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_does_not_read_fails_the_write() {
        let (mut conn, _client) = pair(Duration::from_secs(15)).await;
        let answer = vec![b'x'; 1 << 20];
        let start = Instant::now();
        let e = loop {
            match conn.write(&answer).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed().as_secs(), 15);
    }
}
