//! The I/O engine: asynchronous backing-store I/O for the data path.
//!
//! * [`uring`] — the hot path: one io_uring per engine, operations pushed
//!   from tokio tasks, completions reaped inline when the kernel finished the
//!   operation during submission, otherwise delivered through an eventfd
//!   watched by a reaper task. No tokio worker waits for the disk.
//! * [`threads`] — the portable fallback: a small pool of blocking threads
//!   doing pread/pwrite, used when io_uring is unavailable or configured off.
//! * [`buf`] — buffers owned by in-flight operations.
//!
//! Both engines execute the same [`Op`]s and hand every buffer back in the
//! [`Completion`], so callers never lend memory the kernel may still write.
//! One exception to the hand-off: a buffered write of whole pages without
//! `RWF_DSYNC` (at most 1 MiB) is a copy into the page cache, and both
//! engines make it on the calling thread ([`Engine::write_buffered_at`]).

pub mod buf;
pub mod threads;
pub mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

pub use buf::{IoBuf, IoBuffer};

use crate::config::IoEngineChoice;

/// Page size assumed for page-cache writes done inline.
const PAGE: u64 = 4096;
/// Largest buffered write done on the calling thread.
const INLINE_WRITE_MAX: usize = 1 << 20;

/// One backing-store operation.
#[derive(Debug)]
pub enum Op {
    /// Read into the unfilled capacity of `buf` from `offset`.
    Read {
        /// File to read.
        file: Arc<File>,
        /// Byte offset of the first unfilled byte of `buf`.
        offset: u64,
        /// Destination; filled from its current length up to its capacity.
        buf: IoBuffer,
    },
    /// Write `buf[pos..]` at `offset`.
    Write {
        /// File to write.
        file: Arc<File>,
        /// Byte offset where `buf[pos]` goes.
        offset: u64,
        /// Source data.
        buf: IoBuf,
        /// Bytes of `buf` already written (for continuing short writes).
        pos: usize,
        /// Make the data durable before completing (`RWF_DSYNC`, for FUA).
        dsync: bool,
    },
    /// fsync / fdatasync.
    Sync {
        /// File to flush.
        file: Arc<File>,
        /// fdatasync instead of fsync.
        data_only: bool,
    },
    /// fallocate with `mode` (punch hole, zero range) over a byte range.
    Fallocate {
        /// File (or block device) to operate on.
        file: Arc<File>,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
}

/// The result of an [`Op`], with the op (and its buffers) handed back.
#[derive(Debug)]
pub struct Completion {
    /// Bytes transferred, or the OS error.
    pub result: io::Result<usize>,
    /// The operation as submitted (buffers included).
    pub op: Op,
}

/// Which engine is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Blocking thread pool.
    Threads,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Threads => "threads",
        })
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring was requested but the kernel refuses it.
    #[error("io_uring is unavailable: {0}")]
    UringUnavailable(String),
    /// Creating an OS resource failed.
    #[error("cannot start the I/O engine: {0}")]
    Setup(#[source] io::Error),
}

/// A running I/O engine; cheap to clone.
#[derive(Clone)]
pub enum Engine {
    /// io_uring engine.
    Uring(Arc<uring::UringEngine>),
    /// Thread-pool engine.
    Threads(Arc<threads::ThreadEngine>),
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Engine({})", self.kind())
    }
}

impl Engine {
    /// Starts the engine chosen by configuration. Must run inside a tokio
    /// runtime. `Auto` falls back to threads when io_uring is unavailable.
    pub fn start(choice: IoEngineChoice) -> Result<Engine, EngineError> {
        match choice {
            IoEngineChoice::Threads => Ok(Engine::Threads(Arc::new(threads::ThreadEngine::new(
                threads::DEFAULT_THREADS,
            )?))),
            IoEngineChoice::Uring => Ok(Engine::Uring(Arc::new(uring::UringEngine::new()?))),
            IoEngineChoice::Auto => match uring::UringEngine::new() {
                Ok(engine) => Ok(Engine::Uring(Arc::new(engine))),
                Err(e) => {
                    tracing::warn!("{e}; using the thread-pool engine");
                    Self::start(IoEngineChoice::Threads)
                }
            },
        }
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Threads(_) => EngineKind::Threads,
        }
    }

    /// Runs one operation to completion.
    pub async fn run(&self, op: Op) -> Completion {
        match self {
            Engine::Uring(e) => e.run(op).await,
            Engine::Threads(e) => e.run(op).await,
        }
    }

    /// Reads exactly `len` bytes at `offset` into a buffer aligned to
    /// `align`; bytes past end of file read as zeroes.
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        len: usize,
        align: usize,
    ) -> io::Result<IoBuffer> {
        let mut buf = IoBuffer::with_capacity(len, align);
        while buf.len() < len {
            let op = Op::Read {
                file: file.clone(),
                offset: offset + buf.len() as u64,
                buf,
            };
            let done = self.run(op).await;
            let Op::Read { buf: back, .. } = done.op else {
                unreachable!("engine returned a different op")
            };
            buf = back;
            match done.result {
                Ok(0) => buf.fill_zeroes(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    /// Writes all of `data` at `offset`; `dsync` makes it durable first.
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: IoBuf,
        dsync: bool,
    ) -> io::Result<()> {
        self.write_all(file, offset, data, dsync, false).await
    }

    /// Writes all of `data` at `offset`, through the engine or, `inline`,
    /// with blocking system calls on this thread.
    async fn write_all(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: IoBuf,
        dsync: bool,
        inline: bool,
    ) -> io::Result<()> {
        let total = data.as_slice().len();
        let mut buf = data;
        let mut pos = 0;
        while pos < total {
            let mut op = Op::Write {
                file: file.clone(),
                offset: offset + pos as u64,
                buf,
                pos,
                dsync,
            };
            let done = if inline {
                let result = threads::execute_blocking(&mut op);
                Completion { result, op }
            } else {
                self.run(op).await
            };
            let Op::Write { buf: back, .. } = done.op else {
                unreachable!("engine returned a different op")
            };
            buf = back;
            match done.result {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes shared bytes to a file opened without `O_DIRECT`.
    ///
    /// A small write that covers whole pages (no page has to be read first)
    /// and needs no `RWF_DSYNC` is a copy into the page cache: it is done
    /// right here on the calling thread. ext4 refuses non-blocking buffered
    /// writes, so io_uring would hand each one to a kernel worker thread
    /// (two context switches and a completion wake-up for a few
    /// microseconds of copying). Like any buffered writer, the call can
    /// still be held by dirty-page throttling.
    pub async fn write_buffered_at(
        &self,
        file: &Arc<File>,
        offset: u64,
        data: Bytes,
        dsync: bool,
    ) -> io::Result<()> {
        let whole_pages = offset % PAGE == 0 && data.len() as u64 % PAGE == 0;
        let inline = !dsync && whole_pages && data.len() <= INLINE_WRITE_MAX;
        self.write_all(file, offset, IoBuf::Shared(data), dsync, inline)
            .await
    }

    /// fdatasync (or fsync when `data_only` is false).
    pub async fn sync(&self, file: &Arc<File>, data_only: bool) -> io::Result<()> {
        let op = Op::Sync {
            file: file.clone(),
            data_only,
        };
        self.run(op).await.result.map(|_| ())
    }

    /// fallocate over a range.
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let op = Op::Fallocate {
            file: file.clone(),
            mode,
            offset,
            len,
        };
        self.run(op).await.result.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
