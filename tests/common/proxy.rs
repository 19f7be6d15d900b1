//! Fault-injecting TCP proxy for integration tests: owns a loopback listener,
//! forwards every accepted connection to one target, and can stall, drop,
//! reset or delay those connections on command (to break replication links
//! between two `essd` processes). Plain std threads, usable from `#[test]`.
//!
//! Each connection has two pump threads (client→target and target→client)
//! that poll with short socket timeouts, so a mode change takes effect within
//! a few tens of milliseconds.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often the accept thread polls its nonblocking listener.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Read and write timeout of the pumps' sockets.
const IO_POLL: Duration = Duration::from_millis(20);
/// Sleep step while stalled or delaying a chunk.
const HOLD_POLL: Duration = Duration::from_millis(5);
/// How long the proxy waits for the target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `drop_all`, `reset` and `drop` wait for the pumps to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Size of each pump's forwarding buffer.
const CHUNK: usize = 64 * 1024;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Normal = 0,
    Stall = 1,
    Dropping = 2,
}

/// One proxied connection, as seen by the controller and its two pumps.
///
/// The sockets themselves are owned by the pumps; the controller only holds
/// weak references, so a socket is closed exactly when both pumps are done.
struct Conn {
    client: Weak<TcpStream>,
    upstream: Weak<TcpStream>,
    /// Set to make both pumps stop without touching the sockets further.
    abort: AtomicBool,
    /// Pumps still running; the last one out removes the entry.
    alive: AtomicUsize,
    /// This connection alone is stalled (see `FaultProxy::stall_oldest`).
    stalled: AtomicBool,
    /// This connection's own delay in nanoseconds, on top of the proxy's
    /// (see `FaultProxy::delay_oldest`).
    delay_nanos: AtomicU64,
}

impl Conn {
    /// The sockets that are still open.
    fn streams(&self) -> impl Iterator<Item = Arc<TcpStream>> {
        [self.client.upgrade(), self.upstream.upgrade()]
            .into_iter()
            .flatten()
    }
}

/// State shared by the handle, the accept thread and the pumps.
struct Shared {
    mode: AtomicU8,
    delay_nanos: AtomicU64,
    forward: AtomicU64,
    backward: AtomicU64,
    stopping: AtomicBool,
    conns: Mutex<Vec<Arc<Conn>>>,
}

impl Shared {
    fn mode(&self) -> Mode {
        match self.mode.load(SeqCst) {
            1 => Mode::Stall,
            2 => Mode::Dropping,
            _ => Mode::Normal,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, SeqCst);
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(SeqCst))
    }

    fn conns(&self) -> MutexGuard<'_, Vec<Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn snapshot(&self) -> Vec<Arc<Conn>> {
        self.conns().clone()
    }
}

/// A loopback TCP proxy in front of one target address, with fault injection.
///
/// Dropping it stops accepting and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards each accepted connection to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy listener");
        listener
            .set_nonblocking(true)
            .expect("make fault proxy listener nonblocking");
        let addr = listener.local_addr().expect("fault proxy listener address");
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(Mode::Normal as u8),
            delay_nanos: AtomicU64::new(0),
            forward: AtomicU64::new(0),
            backward: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fault-proxy-{}", addr.port()))
                .spawn(move || accept_loop(&listener, target, &shared))
                .expect("spawn fault proxy accept thread")
        };
        FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// The address clients connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Normal forwarding (undoes stall/drop/delay).
    pub fn heal(&self) {
        for conn in self.shared.snapshot() {
            conn.stalled.store(false, SeqCst);
            conn.delay_nanos.store(0, SeqCst);
        }
        self.shared.delay_nanos.store(0, SeqCst);
        self.shared.set_mode(Mode::Normal);
    }

    /// Stops forwarding in both directions but keeps connections open (a
    /// black hole): the pumps stop reading, so TCP backpressure builds, and
    /// a chunk already read is held. Everything is delivered on `heal()`.
    pub fn stall(&self) {
        self.shared.set_mode(Mode::Stall);
    }

    /// Shuts down (both ways) every current connection, and closes new ones
    /// as soon as they are accepted until `heal()`. Returns once the current
    /// connections are closed.
    pub fn drop_all(&self) {
        self.shared.set_mode(Mode::Dropping);
        close_all(&self.shared.snapshot());
    }

    /// Resets every current connection: both ends see an RST (SO_LINGER 0,
    /// then close). New connections are still accepted. Returns once the
    /// current connections are closed.
    pub fn reset(&self) {
        reset_all(&self.shared.snapshot());
    }

    /// Resets (RST) only the oldest open connection.
    pub fn reset_one(&self) {
        let oldest: Vec<Arc<Conn>> = self.shared.snapshot().into_iter().take(1).collect();
        reset_all(&oldest);
    }

    /// Stalls only the oldest open connection (both ways), as `stall` does
    /// for all; `heal` ends it. Other and new connections flow.
    pub fn stall_oldest(&self) {
        if let Some(conn) = self.shared.snapshot().first() {
            conn.stalled.store(true, SeqCst);
        }
    }

    /// Delays every forwarded chunk by `d` (counted from when it was read).
    pub fn delay(&self, d: Duration) {
        self.shared.delay_nanos.store(nanos(d), SeqCst);
    }

    /// Delays the chunks of the `n`-th oldest open connection alone (0:
    /// the oldest) by `d`, both ways, as `delay` does for all; `heal` ends
    /// it. The others flow: a message sent over it arrives after later
    /// ones sent over another.
    pub fn delay_nth(&self, n: usize, d: Duration) {
        if let Some(conn) = self.shared.snapshot().get(n) {
            conn.delay_nanos.store(nanos(d), SeqCst);
        }
    }

    /// Bytes written to the target (client→target) since start or `reset_counters`.
    pub fn bytes_forward(&self) -> u64 {
        self.shared.forward.load(SeqCst)
    }

    /// Bytes written to clients (target→client) since start or `reset_counters`.
    pub fn bytes_backward(&self) -> u64 {
        self.shared.backward.load(SeqCst)
    }

    /// Sets both byte counters back to zero.
    pub fn reset_counters(&self) {
        self.shared.forward.store(0, SeqCst);
        self.shared.backward.store(0, SeqCst);
    }

    /// Number of connections currently open through the proxy.
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }
}

impl Drop for FaultProxy {
    /// Stops the accept thread (closing the listener) and shuts down every
    /// connection.
    fn drop(&mut self) {
        self.shared.stopping.store(true, SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        close_all(&self.shared.snapshot());
    }
}

/// Waits (bounded) until every pump of `conns` has exited and so closed its
/// sockets.
fn wait_closed(conns: &[Arc<Conn>]) {
    let deadline = Instant::now() + CLOSE_WAIT;
    while conns.iter().any(|c| c.alive.load(SeqCst) > 0) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
}

/// Makes the socket's close send an RST instead of a FIN.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::linger>())
        .expect("size of linger fits socklen_t");
    // SAFETY: the fd belongs to `stream`, which is borrowed (so open) for the
    // whole call; the option value points to an initialised `libc::linger` of
    // exactly `len` bytes that outlives the call, and setsockopt only reads it.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast::<libc::c_void>(),
            len,
        )
    };
    // Failure only means the peer sees a FIN instead: nothing to do about it.
    let _ = rc;
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stopping.load(SeqCst) {
        match listener.accept() {
            Ok((client, _)) => handle(client, target, shared),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // WouldBlock, or a transient failure such as EMFILE: poll again.
            Err(_) => thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Connects one accepted client to the target and starts its two pumps.
fn handle(client: TcpStream, target: SocketAddr, shared: &Arc<Shared>) {
    if shared.mode() == Mode::Dropping {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(upstream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        return; // closing the client tells it the target is unreachable
    };
    for stream in [&client, &upstream] {
        // These only fail on a socket that is already broken; the pumps will
        // find out on their first read.
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(IO_POLL));
        let _ = stream.set_write_timeout(Some(IO_POLL));
    }
    let client = Arc::new(client);
    let upstream = Arc::new(upstream);
    let conn = Arc::new(Conn {
        client: Arc::downgrade(&client),
        upstream: Arc::downgrade(&upstream),
        abort: AtomicBool::new(false),
        alive: AtomicUsize::new(2),
        stalled: AtomicBool::new(false),
        delay_nanos: AtomicU64::new(0),
    });
    {
        // Checked under the lock, so a concurrent drop_all either sees this
        // connection in its snapshot or we see its mode here.
        let mut conns = shared.conns();
        if shared.mode() == Mode::Dropping || shared.stopping.load(SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        }
        conns.push(Arc::clone(&conn));
    }
    let port = client.peer_addr().map(|a| a.port()).unwrap_or(0);
    spawn_pump(
        format!("fault-proxy-fwd-{port}"),
        shared,
        &conn,
        Arc::clone(&client),
        Arc::clone(&upstream),
        Direction::Forward,
    );
    // The second pump takes this thread's own references, so the sockets
    // close as soon as both pumps are done.
    spawn_pump(
        format!("fault-proxy-back-{port}"),
        shared,
        &conn,
        upstream,
        client,
        Direction::Backward,
    );
}

#[derive(Clone, Copy)]
enum Direction {
    /// Client to target.
    Forward,
    /// Target to client.
    Backward,
}

/// Why a pump stopped.
enum Exit {
    /// The source closed its sending side.
    Eof,
    /// A socket error: the connection is broken.
    Failed,
    /// `abort` was set or the proxy is stopping: the controller handles the sockets.
    Aborted,
    /// The proxy is in dropping mode.
    Dropped,
}

fn spawn_pump(
    name: String,
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    src: Arc<TcpStream>,
    dst: Arc<TcpStream>,
    direction: Direction,
) {
    let shared = Arc::clone(shared);
    let conn = Arc::clone(conn);
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let counter = match direction {
                Direction::Forward => &shared.forward,
                Direction::Backward => &shared.backward,
            };
            match pump(&shared, &conn, &src, &dst, counter) {
                Exit::Eof => {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                Exit::Failed => {
                    // Pass the breakage on to both ends as a reset, unless the
                    // controller already owns the shutdown.
                    if !conn.abort.swap(true, SeqCst) {
                        set_linger_zero(&src);
                        set_linger_zero(&dst);
                    }
                }
                Exit::Dropped => {
                    let _ = src.shutdown(Shutdown::Both);
                    let _ = dst.shutdown(Shutdown::Both);
                }
                Exit::Aborted => {}
            }
            drop(src);
            drop(dst);
            // Out of the list before the count says it ended: a caller
            // that waited for the count must not still find it listed.
            let mut conns = shared.conns();
            if conn.alive.fetch_sub(1, SeqCst) == 1 {
                conns.retain(|c| !Arc::ptr_eq(c, &conn));
            }
        })
        .expect("spawn fault proxy pump thread");
}

/// Copies `src` to `dst` until EOF, an error, or the controller stops it.
fn pump(
    shared: &Shared,
    conn: &Conn,
    mut src: &TcpStream,
    mut dst: &TcpStream,
    counter: &AtomicU64,
) -> Exit {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if let Err(exit) = hold(shared, conn, None) {
            return exit;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => return Exit::Eof,
            Ok(n) => n,
            Err(e) if transient(&e) => continue,
            Err(_) => return Exit::Failed,
        };
        let read_at = Instant::now();
        let mut done = 0;
        while done < n {
            if let Err(exit) = hold(shared, conn, Some(read_at)) {
                return exit;
            }
            match dst.write(&buf[done..n]) {
                Ok(0) => return Exit::Failed,
                Ok(k) => {
                    done += k;
                    counter.fetch_add(k as u64, SeqCst);
                }
                Err(e) if transient(&e) => {}
                Err(_) => return Exit::Failed,
            }
        }
    }
}

/// Waits while stalled and, for a chunk read at `read_at`, until its delay
/// has passed; fails if the pump must stop instead.
fn hold(shared: &Shared, conn: &Conn, read_at: Option<Instant>) -> Result<(), Exit> {
    loop {
        if shared.stopping.load(SeqCst) || conn.abort.load(SeqCst) {
            return Err(Exit::Aborted);
        }
        match shared.mode() {
            Mode::Dropping => return Err(Exit::Dropped),
            Mode::Stall => thread::sleep(HOLD_POLL),
            Mode::Normal if conn.stalled.load(SeqCst) => thread::sleep(HOLD_POLL),
            Mode::Normal => {
                let Some(read_at) = read_at else {
                    return Ok(());
                };
                let own = Duration::from_nanos(conn.delay_nanos.load(SeqCst));
                let due = read_at + shared.delay() + own;
                let now = Instant::now();
                if now >= due {
                    return Ok(());
                }
                thread::sleep((due - now).min(HOLD_POLL));
            }
        }
    }
}

/// `d` in whole nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Socket errors that only mean "nothing happened within the poll interval".
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Resets (RST) `conns` and waits until they are closed.
fn reset_all(conns: &[Arc<Conn>]) {
    for conn in conns {
        for stream in conn.streams() {
            set_linger_zero(&stream);
        }
        conn.abort.store(true, SeqCst);
    }
    wait_closed(conns);
}

/// Shuts `conns` down both ways and waits until they are closed.
fn close_all(conns: &[Arc<Conn>]) {
    for conn in conns {
        conn.abort.store(true, SeqCst);
        for stream in conn.streams() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    wait_closed(conns);
}
