//! Backing stores: the regular file or block device behind a volume, and
//! every byte-level operation on it, routed through the I/O engine.
//!
//! With `direct_io` the store opens the backing with `O_DIRECT`, copies
//! payloads into aligned bounce buffers, and turns unaligned writes into an
//! aligned read-modify-write under an exclusive lock (aligned writes share
//! the lock, so an RMW never races another write to its edge blocks).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::RwLock;

use crate::io::{Engine, IoBuf, IoBuffer};

/// Largest single zero-fill write when the file system cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;
/// The block of direct I/O on a regular file.
const DIRECT_FILE_BLOCK: u64 = 4096;

/// Regular file or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// A regular file (sparse-capable).
    File,
    /// A raw block device.
    BlockDevice,
}

/// One run of the allocation map: `length` bytes that are all data or all hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in this run.
    pub length: u64,
    /// True if the run is unallocated (reads as zeroes).
    pub hole: bool,
}

/// Why a backing could not be opened or checked.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// An OS call failed.
    #[error("{path}: {what}: {source}")]
    Os {
        /// Backing path.
        path: PathBuf,
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing exists but does not fit the configuration.
    #[error("{path}: {message}")]
    Mismatch {
        /// Backing path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What [`BackingStore::probe`] found without creating anything.
#[derive(Debug)]
pub struct Probe {
    /// Kind of backing (a missing path will become a file).
    pub kind: BackingKind,
    /// Whether the file must be created.
    pub missing: bool,
    /// Size the volume will export.
    pub size: u64,
    /// The opened backing, when it already exists.
    file: Option<File>,
}

/// An open backing store.
#[derive(Debug)]
pub struct BackingStore {
    file: Arc<File>,
    path: PathBuf,
    kind: BackingKind,
    size: u64,
    /// Alignment required by O_DIRECT, or None for buffered I/O.
    direct_align: Option<usize>,
    /// The unit a device discards and zeroes in place: its logical block
    /// size (also with buffered I/O); 1 for a file.
    device_block: u64,
    /// Shared by aligned writes, exclusive for read-modify-write and for a
    /// trim of part of a block (direct only).
    rmw: RwLock<()>,
    engine: Engine,
    /// Set once a discard was refused as unsupported: trims change nothing.
    discard_refused: AtomicBool,
    /// Flushes (and FUA writes) that failed. The kernel reports a failed
    /// write-back to one sync of the file only, whoever asked for it (and
    /// leaves its pages cached, clean), so every party that relies on its
    /// own flushes compares this count ([`FlushWatch`]).
    failed_flushes: AtomicU64,
    /// Held across a sync and the count of its failure, exclusively by a
    /// flush, shared by FUA writes (each syncs its own range): a flush
    /// that ends finds counted the failure of any sync that took the
    /// kernel's report before it.
    flush_turn: RwLock<()>,
    /// FUA writes whose sync is under way (see [`BackingStore::write`]).
    fua_syncs: std::sync::Mutex<FuaSyncs>,
    /// Told whenever a FUA write's sync ends.
    fua_synced: tokio::sync::Notify,
}

/// Tickets of the FUA writes syncing now, and the next ticket.
#[derive(Debug, Default)]
struct FuaSyncs {
    next: u64,
    running: std::collections::BTreeSet<u64>,
}

/// A FUA write's place among those syncing; given up when dropped.
struct FuaTicket<'a> {
    store: &'a BackingStore,
    ticket: u64,
}

impl<'a> FuaTicket<'a> {
    fn take(store: &'a BackingStore) -> Self {
        let mut syncs = store.fua_syncs.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = syncs.next;
        syncs.next += 1;
        syncs.running.insert(ticket);
        FuaTicket { store, ticket }
    }

    /// Ends this sync; returns the ticket after every sync that ran
    /// beside it (all of them started before it ended).
    fn end(self) -> u64 {
        self.store
            .fua_syncs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next
        // `self` drops here: the ticket is given up.
    }
}

impl Drop for FuaTicket<'_> {
    fn drop(&mut self) {
        self.store
            .fua_syncs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .remove(&self.ticket);
        self.store.fua_synced.notify_waiters();
    }
}

fn os<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> OpenError + 'a {
    move |source| OpenError::Os {
        path: path.to_path_buf(),
        what,
        source,
    }
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_read_bad!(blk_sector_size, 0x1268, libc::c_int);

fn open_flags(read_only: bool, direct: bool, block: bool) -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!read_only);
    let mut custom = libc::O_CLOEXEC;
    if direct {
        custom |= libc::O_DIRECT;
    }
    if block {
        // Exclusive open: fails with EBUSY if mounted or held by another user.
        custom |= libc::O_EXCL;
    }
    opts.custom_flags(custom);
    opts
}

/// One party's view of a store's failed syncs (see
/// [`BackingStore::flush_for`]): a host's flushes, a PPRC pair's cleaner, a
/// FlashCopy's commits each learn of every failure once.
#[derive(Debug)]
pub struct FlushWatch {
    /// The count of failed syncs at this party's last flush.
    seen: AtomicU64,
    /// Whether a failure, once seen, fails every later flush too.
    sticky: bool,
    broken: AtomicBool,
}

impl FlushWatch {
    /// Watches `store` from now on (earlier failures are not this
    /// party's). A `sticky` watch fails every flush after the first
    /// failure it sees: for a party whose later flushes cannot make up
    /// for writes lost before (a FlashCopy target's copies of T0).
    pub fn new(store: &BackingStore, sticky: bool) -> Self {
        FlushWatch {
            seen: AtomicU64::new(store.failed_flushes()),
            sticky,
            broken: AtomicBool::new(false),
        }
    }

    /// Whether this (sticky) watch has seen a failure: its flushes fail.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Takes the failures of `store` so far as seen, and returns whether
    /// there were any this party had not seen: for a party whose next
    /// step makes up for them (a PPRC pair's copy of every recorded track
    /// from what the disk holds).
    pub fn catch_up(&self, store: &BackingStore) -> bool {
        self.see(store.failed_flushes())
    }

    /// Takes `failed` failed syncs as seen; whether any were new. Flushes
    /// of one party may end out of order: the count seen only grows.
    fn see(&self, failed: u64) -> bool {
        self.seen.fetch_max(failed, Ordering::AcqRel) < failed
    }
}

impl BackingStore {
    /// Checks a backing path against the configured size without creating
    /// anything. Opens (and holds) existing backings, so a block device in
    /// use or a file served by another process is refused here; a file
    /// that a crash left grown by a direct-I/O block is cut back.
    pub fn probe(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
        direct: bool,
    ) -> Result<Probe, OpenError> {
        let open_device = || {
            retry_while_busy(libc::EBUSY, || {
                open_flags(read_only, direct, true).open(path)
            })
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => OpenError::Mismatch {
                    path: path.to_path_buf(),
                    message:
                        "block device is in use (mounted, or opened exclusively by another program)"
                            .into(),
                },
                _ => os(path, "cannot open block device")(e),
            })
        };
        let (size, grown_tail) = match examine(path, size, read_only, direct, open_device)? {
            Found::Missing { size } => {
                return Ok(Probe {
                    kind: BackingKind::File,
                    missing: true,
                    size,
                    file: None,
                })
            }
            Found::Device { size, file } => {
                return Ok(Probe {
                    kind: BackingKind::BlockDevice,
                    missing: false,
                    size,
                    file: Some(file),
                })
            }
            Found::File { size, grown_tail } => (size, grown_tail),
        };
        let file = open_flags(read_only, direct, false)
            .open(path)
            .map_err(os(path, "cannot open backing file"))?;
        lock_exclusive(&file, path)?;
        if grown_tail {
            file.set_len(size)
                .and_then(|()| file.sync_all())
                .map_err(os(path, "cannot cut back the last block"))?;
            tracing::warn!(
                path = %path.display(),
                size,
                "backing file had grown to the end of its last direct-I/O block (a write \
                 interrupted by a crash); cut back to the volume's size"
            );
        }
        Ok(Probe {
            kind: BackingKind::File,
            missing: false,
            size,
            file: Some(file),
        })
    }

    /// Checks a backing path against the configured size as
    /// [`BackingStore::probe`] does, but changes, locks and holds nothing:
    /// safe beside the server that serves it (a block device is opened
    /// for its size only, not exclusively).
    pub fn check(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
        direct: bool,
    ) -> Result<(), OpenError> {
        let open_device = || File::open(path).map_err(os(path, "cannot open block device"));
        examine(path, size, read_only, direct, open_device).map(drop)
    }

    /// Opens (creating a missing file sparse at its size) a probed backing.
    pub fn open(
        path: &Path,
        probe: Probe,
        read_only: bool,
        direct: bool,
        engine: Engine,
    ) -> Result<Self, OpenError> {
        let file = match probe.file {
            Some(file) => file,
            None => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(os(path, "cannot create directory"))?;
                }
                let file = open_flags(read_only, direct, false)
                    .create_new(true)
                    .open(path)
                    .map_err(os(path, "cannot create backing file"))?;
                file.set_len(probe.size)
                    .map_err(os(path, "cannot size backing file"))?;
                lock_exclusive(&file, path)?;
                tracing::info!(path = %path.display(), size = probe.size, "created sparse backing file");
                file
            }
        };
        let device_block = match probe.kind {
            BackingKind::File => 1,
            BackingKind::BlockDevice => {
                let mut sector: libc::c_int = 0;
                // SAFETY: BLKSSZGET writes one int through the pointer.
                unsafe { blk_sector_size(file.as_raw_fd(), &mut sector) }
                    .map_err(|e| os(path, "BLKSSZGET")(e.into()))?;
                sector.max(512) as u64
            }
        };
        let direct_align = direct.then_some(match probe.kind {
            BackingKind::File => DIRECT_FILE_BLOCK as usize,
            BackingKind::BlockDevice => device_block as usize,
        });
        // Known at once for a device; a file's is learnt at its first trim.
        let discard_refused = probe.kind == BackingKind::BlockDevice && !device_zeroes(&file);
        Ok(BackingStore {
            file: Arc::new(file),
            path: path.to_path_buf(),
            kind: probe.kind,
            size: probe.size,
            direct_align,
            device_block,
            rmw: RwLock::new(()),
            engine,
            discard_refused: AtomicBool::new(discard_refused),
            failed_flushes: AtomicU64::new(0),
            flush_turn: RwLock::new(()),
            fua_syncs: std::sync::Mutex::default(),
            fua_synced: tokio::sync::Notify::new(),
        })
    }

    /// Exported size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// File or block device.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Backing path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Required request alignment (1 for buffered I/O).
    pub fn alignment(&self) -> usize {
        self.direct_align.unwrap_or(1)
    }

    /// Reads `len` bytes at `offset` (range already checked).
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let Some(align) = self.direct_align else {
            return Ok(self
                .engine
                .read_at(&self.file, offset, len, 1)
                .await?
                .freeze());
        };
        let (start, end) = widen(offset, len, align);
        let buf = self
            .engine
            .read_at(&self.file, start, (end - start) as usize, align)
            .await?;
        let skip = (offset - start) as usize;
        Ok(buf.freeze().slice(skip..skip + len))
    }

    /// Writes `data` at `offset`; `fua` makes it durable before returning.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        if !fua {
            return self.write_unsynced(offset, data, false).await;
        }
        // A FUA write syncs, and may take the report of another write's
        // failed write-back: counted as a failed flush. And another FUA
        // write syncing meanwhile may have taken the report of this one's:
        // once every one that ran beside it has ended (and counted its
        // failure), a failure counted since it began fails it too.
        let (before, overlapped) = {
            let _turn = self.flush_turn.read().await;
            let before = self.failed_flushes();
            let ticket = FuaTicket::take(self);
            let written = self.write_unsynced(offset, data, true).await;
            if let Err(e) = written {
                self.failed_flushes.fetch_add(1, Ordering::AcqRel);
                return Err(e);
            }
            (before, ticket.end())
        };
        loop {
            let ended = self.fua_synced.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let all_ended = self
                .fua_syncs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .running
                .range(..overlapped)
                .next()
                .is_none();
            if all_ended {
                break;
            }
            ended.await;
        }
        if self.failed_flushes() != before {
            return Err(io::Error::other(format!(
                "{}: a write-back failed while this write was made durable (reported to \
                 another sync): it may not be on the disk",
                self.path.display()
            )));
        }
        Ok(())
    }

    async fn write_unsynced(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let Some(align) = self.direct_align else {
            return self
                .engine
                .write_buffered_at(&self.file, offset, data, fua)
                .await;
        };
        let a = align as u64;
        if offset % a == 0 && data.len() as u64 % a == 0 {
            let _shared = self.rmw.read().await;
            let buf = IoBuf::Owned(IoBuffer::copy_from(&data, align));
            return self.engine.write_at(&self.file, offset, buf, fua).await;
        }
        let _exclusive = self.rmw.write().await;
        let (start, end) = widen(offset, data.len(), align);
        let mut buf = self
            .engine
            .read_at(&self.file, start, (end - start) as usize, align)
            .await?;
        let skip = (offset - start) as usize;
        buf.as_mut_slice()[skip..skip + data.len()].copy_from_slice(&data);
        self.engine
            .write_at(&self.file, start, IoBuf::Owned(buf), fua)
            .await?;
        if self.kind == BackingKind::File && end > self.size {
            // The whole last block went out and grew the file past the
            // volume's end: cut it back (still holding `rmw`, the only way
            // to write that block), or the next start refuses the file.
            let (file, size) = (self.file.clone(), self.size);
            blocking(move || file.set_len(size)).await?;
            if fua {
                // Under the FUA write's shared turn: sync without it.
                self.engine.sync(&self.file, true).await?;
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync). Flushes run one
    /// at a time, each failure counted ([`Self::failed_flushes`]).
    pub async fn flush(&self) -> io::Result<()> {
        self.counted_flush().await.0
    }

    /// A flush, and the count of failed syncs right after it.
    async fn counted_flush(&self) -> (io::Result<()>, u64) {
        let _turn = self.flush_turn.write().await;
        let synced = self.engine.sync(&self.file, true).await;
        if synced.is_err() {
            self.failed_flushes.fetch_add(1, Ordering::AcqRel);
        }
        (synced, self.failed_flushes.load(Ordering::Acquire))
    }

    /// A flush for the party `watch`: it fails also when a sync of another
    /// party failed since this party's last flush, for that failure may
    /// have been the write-back of this party's writes (the kernel reports
    /// it once, and then a flush succeeds though the disk lacks them).
    pub async fn flush_for(&self, watch: &FlushWatch) -> io::Result<()> {
        let (synced, failed) = self.counted_flush().await;
        let missed = watch.see(failed);
        if missed && watch.sticky {
            watch.broken.store(true, Ordering::Release);
        }
        match synced {
            Ok(()) if watch.broken.load(Ordering::Acquire) => Err(io::Error::other(format!(
                "{}: a write-back failed earlier; what was written before it may not be \
                 on the disk",
                self.path.display()
            ))),
            Ok(()) if missed => Err(io::Error::other(format!(
                "{}: a write-back failed, reported to another flush; what was written \
                 before it may not be on the disk",
                self.path.display()
            ))),
            other => other,
        }
    }

    /// How many flushes failed since the store was opened, whoever asked
    /// for them.
    pub fn failed_flushes(&self) -> u64 {
        self.failed_flushes.load(Ordering::Acquire)
    }

    /// The part of `[offset, offset + len)` a trim discards: all of it in
    /// a file, the whole logical blocks inside it on a device.
    fn discard_span(&self, offset: u64, len: u64) -> (u64, u64) {
        match self.kind {
            BackingKind::File => (offset, offset + len),
            // Devices only discard whole logical blocks: shrink inwards.
            BackingKind::BlockDevice => {
                let a = self.device_block;
                (offset.div_ceil(a) * a, (offset + len) / a * a)
            }
        }
    }

    /// The range a completed [`Self::trim`] of `[offset, offset + len)`
    /// left reading zeroes, or `None` if it changed nothing (the backing
    /// cannot discard, or the range holds no whole block). A discard is a
    /// hole punched in a file, or a zeroing on a device (the kernel's
    /// `PUNCH_HOLE` on a block device), so the range then reads zeroes.
    pub fn discarded(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let (start, end) = self.discard_span(offset, len);
        (end > start && !self.discard_refused.load(Ordering::Acquire)).then_some((start, end))
    }

    /// Makes this store refuse discards, as a backing that cannot discard
    /// does (for tests).
    #[cfg(test)]
    pub(crate) fn refuse_discards(&self) {
        self.discard_refused.store(true, Ordering::Release);
    }

    /// Discards a range; advisory, so unsupported discards succeed silently
    /// ([`Self::discarded`] tells what a trim changed).
    pub async fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = self.discard_span(offset, len);
        if end <= start || self.discard_refused.load(Ordering::Acquire) {
            return Ok(());
        }
        // With direct I/O, a hole punched in part of a block zeroes that
        // part in place; a read-modify-write of the block for a write
        // beside it, running meanwhile, would put the old bytes back over
        // the zeroes (which `discarded` reports). Such a punch waits for
        // read-modify-writes, as one does.
        let _partial = match self.direct_align {
            Some(a) if start % a as u64 != 0 || end % a as u64 != 0 => Some(self.rmw.write().await),
            _ => None,
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self
            .engine
            .fallocate(&self.file, mode, start, end - start)
            .await
        {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                self.discard_refused.store(true, Ordering::Release);
                Ok(())
            }
            other => other,
        }
    }

    /// Zeroes a range. `may_punch` allows leaving holes; `fast_only` fails
    /// with `EOPNOTSUPP` instead of falling back to writing zero buffers.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        // Unaligned head and tail are written as data: a device cannot
        // fallocate part of a block, and with direct I/O a part of a block
        // zeroed beside a concurrent unaligned write (a read-modify-write of
        // that block, serialised by `rmw`) would be overwritten by it.
        let a = match self.kind {
            BackingKind::File => self.alignment() as u64,
            BackingKind::BlockDevice => self.device_block,
        };
        let mut may_punch = may_punch;
        if self.kind == BackingKind::BlockDevice {
            // On a block device only PUNCH_HOLE zeroes without falling back
            // to writes, and it may unmap (deprovision a thin device), which
            // NO_HOLE forbids. On a device that cannot zero in place, it
            // drops the range's cached pages (dirty ones too) before it
            // fails: it must not be tried there. Then a fast request is not
            // fast, and nothing is changed; another writes zeroes.
            let cannot_punch = self.discard_refused.load(Ordering::Acquire);
            if fast_only && (!may_punch || cannot_punch) {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            may_punch &= !cannot_punch;
        }
        let end = offset + len;
        let mid_start = offset.div_ceil(a) * a;
        if mid_start >= end {
            return self.write_zero_bytes(offset, len).await;
        }
        let mid_end = end / a * a;
        // The aligned middle first: a fast-only request refused there has
        // not changed the head yet.
        if mid_end > mid_start {
            let mode = if may_punch {
                // On block devices PUNCH_HOLE zeroes without falling back to writes.
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            match self
                .engine
                .fallocate(&self.file, mode, mid_start, mid_end - mid_start)
                .await
            {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && !fast_only => {
                    self.write_zero_bytes(mid_start, mid_end - mid_start)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        if mid_start > offset {
            self.write_zero_bytes(offset, mid_start - offset).await?;
        }
        if end > mid_end {
            self.write_zero_bytes(mid_end, end - mid_end).await?;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let zeroes = Bytes::from(vec![0u8; n as usize]);
            self.write(offset + done, zeroes, false).await?;
            done += n;
        }
        Ok(())
    }

    /// Starts writing a range's dirty pages back to disk without waiting
    /// (sync_file_range), so a later flush has less left to do.
    pub async fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.kind != BackingKind::File || self.direct_align.is_some() {
            return Ok(());
        }
        let file = self.file.clone();
        blocking(move || {
            // SAFETY: plain syscall on an fd owned by `file`.
            let r = unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    offset as libc::off64_t,
                    len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .await
    }

    /// Offset of the first data at or after `offset` (the size if none);
    /// block devices are all data.
    pub async fn next_data(&self, offset: u64) -> io::Result<u64> {
        if self.kind == BackingKind::BlockDevice {
            return Ok(offset);
        }
        let file = self.file.clone();
        let size = self.size;
        blocking(move || {
            Ok(lseek(&file, offset, libc::SEEK_DATA)?
                .unwrap_or(size)
                .min(size))
        })
        .await
    }

    /// Asks the kernel to prefetch a range into the page cache.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.advise(offset, len, libc::POSIX_FADV_WILLNEED).await
    }

    /// After a failed write-back (flush or FUA write): the failed pages stay
    /// cached, marked clean, with data the disk does not hold; drops them,
    /// so reads return what the disk holds. A failure to drop is logged.
    pub async fn forget_unwritten(&self) {
        if let Err(e) = self.drop_cached(0, 0).await {
            tracing::warn!(
                path = %self.path.display(),
                "cannot drop the cached pages after a failed write-back: {e}"
            );
        }
    }

    /// Asks the kernel to drop the clean pages of a range (`len` 0: to the
    /// end) from the page cache; it starts writing back dirty ones, which
    /// stay.
    pub async fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.direct_align.is_some() {
            return Ok(());
        }
        self.advise(offset, len, libc::POSIX_FADV_DONTNEED).await
    }

    /// [`Self::drop_cached`] in the background; a failure is only logged
    /// (the advice changes no data).
    pub fn drop_cached_later(self: &Arc<Self>, offset: u64, len: u64) {
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(e) = store.drop_cached(offset, len).await {
                tracing::debug!(path = %store.path.display(), "cannot drop cached pages: {e}");
            }
        });
    }

    /// Gives the kernel page-cache advice for a range (`len` 0: to the end).
    async fn advise(&self, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        let file = self.file.clone();
        blocking(move || {
            // SAFETY: plain advisory syscall on an fd owned by `file`.
            let r = unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    advice,
                )
            };
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(())
        })
        .await
    }

    /// The allocation map of `[offset, offset+len)` as at most `max` runs.
    /// Files use SEEK_DATA/SEEK_HOLE; block devices report all data.
    pub async fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        if self.kind == BackingKind::BlockDevice {
            return Ok(vec![Extent {
                length: len,
                hole: false,
            }]);
        }
        let file = self.file.clone();
        blocking(move || seek_extents(&file, offset, len, max)).await
    }
}

/// Widens `[offset, offset+len)` to `align` boundaries.
fn widen(offset: u64, len: usize, align: usize) -> (u64, u64) {
    let a = align as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    (start, end)
}

/// How long start-up waits for a backing held by an exiting process: after
/// a `kill -9` the kernel tears down the old process's io_uring (and with it
/// its open files) asynchronously.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Retries `attempt` while it fails with `busy_errno`, for up to [`RELEASE_WAIT`].
/// Whether a block device can zero ranges without writing them (its
/// queue's `write_zeroes_max_bytes` is not 0), which the kernel's
/// `PUNCH_HOLE` on a block device needs. Where it cannot, a punch first
/// drops the range from the page cache — dirty pages and the zeroed part
/// of partial ones included — and then fails, leaving the range's content
/// to chance; a trim then must not try. Unknown (no sysfs): assumed able.
fn device_zeroes(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return true;
    };
    let dev = meta.rdev();
    let base = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    // A partition has no queue of its own: its disk's is one level up.
    ["queue", "../queue"]
        .iter()
        .find_map(|q| {
            std::fs::read_to_string(format!("{base}/{q}/write_zeroes_max_bytes"))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .is_none_or(|max| max > 0)
}

fn retry_while_busy<T>(
    busy_errno: i32,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match attempt() {
            Err(e)
                if e.raw_os_error() == Some(busy_errno) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// What a backing path holds, checked against the configuration.
enum Found {
    /// Nothing yet: a file of `size` bytes is to be created.
    Missing { size: u64 },
    /// A block device (opened), exporting `size` bytes.
    Device { size: u64, file: File },
    /// A regular file of `size` bytes; `grown_tail`: longer by the rest of
    /// its last direct-I/O block, to be cut back.
    File { size: u64, grown_tail: bool },
}

/// Checks what `path` holds against the configured `size`, changing
/// nothing; a block device is opened with `open_device` to read its size.
fn examine(
    path: &Path,
    size: Option<u64>,
    read_only: bool,
    direct: bool,
    open_device: impl FnOnce() -> Result<File, OpenError>,
) -> Result<Found, OpenError> {
    let mismatch = |message: String| OpenError::Mismatch {
        path: path.to_path_buf(),
        message,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size = size
                .ok_or_else(|| mismatch("file does not exist and no size is configured".into()))?;
            if read_only {
                return Err(mismatch(
                    "read-only volume's backing file does not exist".into(),
                ));
            }
            return Ok(Found::Missing { size });
        }
        Err(e) => return Err(os(path, "cannot stat backing")(e)),
    };
    let ft = meta.file_type();
    if ft.is_block_device() {
        let file = open_device()?;
        let mut dev_size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        unsafe { blk_get_size64(file.as_raw_fd(), &mut dev_size) }
            .map_err(|e| os(path, "BLKGETSIZE64")(e.into()))?;
        let size = match size {
            None => dev_size,
            Some(s) if s <= dev_size => s,
            Some(s) => {
                return Err(mismatch(format!(
                    "block device is {dev_size} bytes, smaller than the configured size {s}"
                )))
            }
        };
        if size == 0 {
            return Err(mismatch("block device has size 0".into()));
        }
        return Ok(Found::Device { size, file });
    }
    if !ft.is_file() {
        return Err(mismatch("not a regular file or block device".into()));
    }
    let Some(size) = size else {
        return Err(mismatch("size is required for file-backed volumes".into()));
    };
    // A direct-I/O write of a partial last block writes the whole block
    // and then cuts the file back; a crash in between leaves it grown to
    // the block's end, past the volume.
    let grown_tail = direct
        && !read_only
        && size % DIRECT_FILE_BLOCK != 0
        && meta.len() == size.next_multiple_of(DIRECT_FILE_BLOCK);
    if meta.len() != size && !grown_tail {
        return Err(mismatch(format!(
            "existing file is {} bytes but the configured size is {size}; fix the size (essd \
             never truncates or grows a backing file)",
            meta.len()
        )));
    }
    Ok(Found::File { size, grown_tail })
}

fn lock_exclusive(file: &File, path: &Path) -> Result<(), OpenError> {
    let locked = retry_while_busy(libc::EWOULDBLOCK, || {
        // SAFETY: flock on an fd owned by `file`.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    });
    match locked {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(OpenError::Mismatch {
            path: path.to_path_buf(),
            message: "backing file is locked by another process (another essd serving it?)".into(),
        }),
        Err(e) => Err(os(path, "cannot lock backing file")(e)),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an fd owned by `file`.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn seek_extents(file: &File, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    let push = |out: &mut Vec<Extent>, length: u64, hole: bool| match out.last_mut() {
        Some(last) if last.hole == hole => last.length += length,
        _ => out.push(Extent { length, hole }),
    };
    while pos < end && out.len() < max {
        let data = lseek(file, pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        if data > pos {
            push(&mut out, data - pos, true);
            pos = data;
            continue;
        }
        let hole = lseek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let hole = hole.max(pos + 1);
        push(&mut out, hole - pos, false);
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> BackingStore {
        let path = dir.join("v");
        let engine = Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
        let probe = BackingStore::probe(&path, Some(1 << 20), false, false).unwrap();
        BackingStore::open(&path, probe, false, false, engine).unwrap()
    }

    /// A failed sync (counted as the store counts them) reaches every
    /// party once, whoever's sync the kernel reported it to; a sticky
    /// party's flushes fail from then on.
    #[tokio::test]
    async fn every_party_learns_of_a_failed_sync_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let (host, cleaner) = (
            FlushWatch::new(&store, false),
            FlushWatch::new(&store, false),
        );
        let copies = FlushWatch::new(&store, true);
        store.flush_for(&host).await.unwrap();
        // Another party's sync took the kernel's report.
        store.failed_flushes.fetch_add(1, Ordering::AcqRel);
        let later = FlushWatch::new(&store, false);
        for watch in [&host, &cleaner, &copies] {
            let e = store.flush_for(watch).await.unwrap_err();
            assert!(e.to_string().contains("a write-back failed"), "{e}");
        }
        store.flush_for(&host).await.unwrap();
        store.flush_for(&cleaner).await.unwrap();
        store.flush_for(&later).await.unwrap();
        assert!(store.flush_for(&copies).await.is_err());
        // A party that makes up for the failures takes them as seen.
        store.failed_flushes.fetch_add(1, Ordering::AcqRel);
        assert!(cleaner.catch_up(&store));
        assert!(!cleaner.catch_up(&store));
        store.flush_for(&cleaner).await.unwrap();
    }

    /// Two FUA writes sync at the same time and the other one takes the
    /// kernel's report of a failed write-back, which may have been this
    /// one's pages: this one fails too, once the other has counted it.
    #[tokio::test]
    async fn a_fua_write_fails_if_a_sync_beside_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store(dir.path()));
        store
            .write(0, Bytes::from(vec![1u8; 4096]), true)
            .await
            .unwrap();
        // The other FUA write, syncing.
        let other = FuaTicket::take(&store);
        let this = tokio::spawn({
            let store = store.clone();
            async move { store.write(4096, Bytes::from(vec![2u8; 4096]), true).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!this.is_finished(), "answered before the other sync ended");
        // The other one's sync fails, is counted, and ends.
        store.failed_flushes.fetch_add(1, Ordering::AcqRel);
        drop(other);
        let e = this.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("a write-back failed"), "{e}");
    }
}
