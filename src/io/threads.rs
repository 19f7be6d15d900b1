//! The portable engine: a small pool of blocking threads running
//! pread/pwritev2/fdatasync/fallocate. Used where io_uring is disabled or
//! refused, and selectable with `io_engine = "threads"`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use tokio::sync::oneshot;

use super::{Completion, EngineError, Op};

/// Worker threads started by default.
pub const DEFAULT_THREADS: usize = 8;

type Job = (Op, oneshot::Sender<Completion>);

/// Thread-pool engine. Dropping it closes the queue; workers finish the
/// jobs already queued and exit.
pub struct ThreadEngine {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl ThreadEngine {
    /// Starts `threads` workers.
    pub fn new(threads: usize) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let handle = thread::Builder::new()
                .name(format!("essd-io-{i}"))
                .spawn(move || worker(&rx))
                .map_err(EngineError::Setup)?;
            workers.push(handle);
        }
        tracing::debug!(threads, "thread-pool I/O engine started");
        Ok(ThreadEngine {
            queue: Mutex::new(Some(tx)),
            workers,
        })
    }

    /// Queues `op` and waits for a worker to finish it.
    pub async fn run(&self, op: Op) -> Completion {
        let (tx, rx) = oneshot::channel();
        let sender = self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(sender) = sender else {
            return shut_down(op);
        };
        if let Err(mpsc::SendError((op, _))) = sender.send((op, tx)) {
            return shut_down(op);
        }
        match rx.await {
            Ok(done) => done,
            Err(_) => unreachable!("an I/O worker dropped a job without completing it"),
        }
    }
}

fn shut_down(op: Op) -> Completion {
    Completion {
        result: Err(io::Error::other("I/O engine is shut down")),
        op,
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((mut op, reply)) = job else { return };
        let result = execute_blocking(&mut op);
        // The waiter may have gone away (connection closed); the buffers are
        // dropped here, after the syscall finished with them.
        let _ = reply.send(Completion { result, op });
    }
}

/// Executes one op with blocking syscalls on the calling thread.
pub fn execute_blocking(op: &mut Op) -> io::Result<usize> {
    let ret: isize = match op {
        Op::Read { file, offset, buf } => {
            let (ptr, len) = buf.spare_mut();
            // SAFETY: ptr/len describe the unfilled, owned part of `buf`,
            // which nothing else accesses during the call.
            let n =
                unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), len, *offset as libc::off_t) };
            if n > 0 {
                // SAFETY: the kernel initialized n bytes after the fill level.
                unsafe { buf.advance(n as usize) };
            }
            n
        }
        Op::Write {
            file,
            offset,
            buf,
            pos,
            dsync,
        } => {
            let data = &buf.as_slice()[*pos..];
            let iov = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            // SAFETY: iov points at `data`, borrowed for the whole call; the
            // kernel only reads from it.
            unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, *offset as libc::off_t, flags) }
        }
        Op::Sync { file, data_only } => {
            let fd = file.as_raw_fd();
            // SAFETY: plain syscalls on an fd owned by `file`.
            let r = unsafe {
                if *data_only {
                    libc::fdatasync(fd)
                } else {
                    libc::fsync(fd)
                }
            };
            r as isize
        }
        Op::Fallocate {
            file,
            mode,
            offset,
            len,
        } => {
            // SAFETY: plain syscall on an fd owned by `file`.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    *mode,
                    *offset as libc::off_t,
                    *len as libc::off_t,
                )
            };
            r as isize
        }
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}
