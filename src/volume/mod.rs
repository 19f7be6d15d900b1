//! Servers, LSSs and volumes: identity, backing stores, the access gate and
//! per-volume statistics.
//!
//! * [`id`] — serials and 8-character volume IDs.
//! * [`store`] — the file or block device behind a volume.
//! * [`server`] — the storage server: all LSSs and volumes of one `essd`.
//!
//! [`Volume`] is what the protocol layer talks to: it checks ranges and the
//! access gate (read-only volumes, PPRC secondaries, write-inhibited
//! primaries), counts I/O, and sends changes down the copy-services stack:
//! the PPRC primary layer when the volume is a pair's primary
//! ([`crate::copy::pprc::pair`]), then the FlashCopy layer when it is in a
//! relationship ([`crate::copy::flashcopy`]), then its
//! [`store::BackingStore`]. Every host I/O holds the volume's I/O gate
//! shared; copy services take it exclusively for an instant to attach or
//! detach a relationship or pair with no I/O in flight.

pub mod id;
pub mod server;
pub mod store;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::Serialize;

use crate::copy::flashcopy::{Change, Relationship, Role};
use crate::copy::pprc::pair::Pair;
use id::VolumeId;
use store::{BackingStore, Extent, FlushWatch};

/// Operations a volume performs, for messages and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeOp {
    /// Read data.
    Read,
    /// Write data.
    Write,
    /// Flush to stable storage.
    Flush,
    /// Discard.
    Trim,
    /// Write zeroes.
    WriteZeroes,
    /// Prefetch.
    Cache,
    /// Allocation query.
    BlockStatus,
}

impl VolumeOp {
    /// Whether the op changes data (and so needs write access).
    pub fn modifies(self) -> bool {
        matches!(
            self,
            VolumeOp::Write | VolumeOp::Trim | VolumeOp::WriteZeroes
        )
    }
}

impl std::fmt::Display for VolumeOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VolumeOp::Read => "read",
            VolumeOp::Write => "write",
            VolumeOp::Flush => "flush",
            VolumeOp::Trim => "trim",
            VolumeOp::WriteZeroes => "write-zeroes",
            VolumeOp::Cache => "cache",
            VolumeOp::BlockStatus => "block-status",
        })
    }
}

/// A failed volume operation.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The range ends past the end of the volume.
    #[error("{op} of {len} bytes at offset {offset} is beyond the end of volume {volume} ({size} bytes)")]
    OutOfRange {
        /// Operation.
        op: VolumeOp,
        /// Volume ID.
        volume: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// The volume does not accept writes.
    #[error("volume {volume} is read-only")]
    ReadOnly {
        /// Volume ID.
        volume: String,
    },
    /// The volume is a PPRC secondary: hosts cannot write it.
    #[error("volume {volume} is a PPRC secondary and cannot be written by hosts")]
    Secondary {
        /// Volume ID.
        volume: String,
    },
    /// A change mirrored from a PPRC primary reached a volume that is no
    /// longer a secondary (it took over while the change waited).
    #[error("{op} mirrored to volume {volume} refused: it is no longer a PPRC secondary")]
    NotSecondary {
        /// Operation.
        op: VolumeOp,
        /// Volume ID.
        volume: String,
    },
    /// A critical PPRC pair could not update its secondary.
    #[error("{op} refused: volume {volume} is write-inhibited (critical PPRC pair cannot update its secondary)")]
    WriteInhibited {
        /// Operation.
        op: VolumeOp,
        /// Volume ID.
        volume: String,
    },
    /// A fast-only zeroing request that the backing cannot do quickly.
    #[error("{op} cannot be done fast on volume {volume}")]
    NotFast {
        /// Operation.
        op: VolumeOp,
        /// Volume ID.
        volume: String,
    },
    /// The change could not be recorded in the copy services' metadata (a
    /// PPRC pair's out-of-sync bitmap), so it was not made.
    #[error("{op} at offset {offset} refused: cannot record the change in {path}: {source}")]
    Unrecorded {
        /// Operation.
        op: VolumeOp,
        /// The metadata file.
        path: String,
        /// Request offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backing store failed.
    #[error("{op} at offset {offset} on {path}: {source}")]
    Io {
        /// Operation.
        op: VolumeOp,
        /// Backing path.
        path: String,
        /// Request offset.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Per-volume I/O counters.
#[derive(Debug, Default)]
pub struct VolumeStats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
    clients: AtomicU64,
}

/// A snapshot of [`VolumeStats`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Trims completed.
    pub trims: u64,
    /// Write-zeroes completed.
    pub write_zeroes: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// Static description of a volume, as configured.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    /// The volume ID (primary export name).
    pub id: VolumeId,
    /// Optional second export name.
    pub alias: Option<String>,
    /// Export description.
    pub description: Option<String>,
    /// Refuse all writes.
    pub read_only: bool,
}

/// A volume's FlashCopy relationship and its role in it.
#[derive(Debug, Clone)]
pub struct FlashCopyLink {
    /// The relationship.
    pub relationship: Arc<Relationship>,
    /// Source or target.
    pub role: Role,
}

/// An exported volume.
#[derive(Debug)]
pub struct Volume {
    info: VolumeInfo,
    id_text: String,
    store: Arc<BackingStore>,
    stats: VolumeStats,
    /// Shared by host I/O; exclusive while copy services change the volume.
    /// Taken before any track lock of the copy services, by host I/O and
    /// copies alike ([`Volume::hold_gate`]).
    gate: Arc<tokio::sync::RwLock<()>>,
    flashcopy: RwLock<Option<FlashCopyLink>>,
    pprc: RwLock<Option<Arc<Pair>>>,
    secondary: AtomicBool,
    /// As a PPRC secondary: the store's failed flushes its primary has
    /// been told of, or that the primary's next copy covers.
    failures_told: AtomicU64,
}

impl Volume {
    /// Wraps an open backing store.
    pub fn new(info: VolumeInfo, store: BackingStore) -> Self {
        Volume {
            id_text: info.id.to_string(),
            info,
            store: Arc::new(store),
            stats: VolumeStats::default(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            flashcopy: RwLock::new(None),
            pprc: RwLock::new(None),
            secondary: AtomicBool::new(false),
            failures_told: AtomicU64::new(0),
        }
    }

    /// Configured identity and options.
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// The volume ID as text (the export name).
    pub fn name(&self) -> &str {
        &self.id_text
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The backing store.
    pub fn store(&self) -> &Arc<BackingStore> {
        &self.store
    }

    /// The I/O gate (see the module docs).
    pub fn gate(&self) -> &tokio::sync::RwLock<()> {
        &self.gate
    }

    /// Holds the I/O gate shared, for a copy that then takes track locks
    /// and reads with [`Volume::read_for_copy`] and
    /// [`Volume::extents_for_copy`]. The order gate, then track locks, is
    /// the one host I/O keeps: a copy that took the gate for each read
    /// while holding its track locks would wait forever behind a queued
    /// exclusive holder (a terminate) that waits for a host write that
    /// waits for those track locks.
    pub async fn hold_gate(&self) -> GateGuard {
        GateGuard(self.gate.clone().read_owned().await)
    }

    fn holds(&self, gate: &GateGuard) -> bool {
        Arc::ptr_eq(
            tokio::sync::OwnedRwLockReadGuard::rwlock(&gate.0),
            &self.gate,
        )
    }

    /// The volume's FlashCopy relationship, if any.
    pub fn flashcopy(&self) -> Option<FlashCopyLink> {
        self.flashcopy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the volume is the target of a FlashCopy relationship.
    pub fn is_flashcopy_target(&self) -> bool {
        self.flashcopy().is_some_and(|fc| fc.role == Role::Target)
    }

    /// Whether the volume is the target of a FlashCopy relationship being
    /// withdrawn (check under the gate).
    pub fn is_flashcopy_target_withdrawn(&self) -> bool {
        self.flashcopy()
            .is_some_and(|fc| fc.role == Role::Target && fc.relationship.is_withdrawing())
    }

    /// Routes this volume's I/O through `relationship` (hold the gate).
    pub fn attach_flashcopy(&self, relationship: Arc<Relationship>, role: Role) {
        *self.flashcopy.write().unwrap_or_else(|p| p.into_inner()) =
            Some(FlashCopyLink { relationship, role });
    }

    /// Routes this volume's I/O straight to its store again (hold the gate).
    pub fn detach_flashcopy(&self) {
        *self.flashcopy.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The PPRC pair this volume is the primary of, if any.
    pub fn pprc(&self) -> Option<Arc<Pair>> {
        self.pprc.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Routes this volume's changes through `pair` (hold the gate).
    pub fn attach_pprc(&self, pair: Arc<Pair>) {
        *self.pprc.write().unwrap_or_else(|p| p.into_inner()) = Some(pair);
    }

    /// Takes the PPRC primary layer away (hold the gate).
    pub fn detach_pprc(&self) {
        *self.pprc.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Marks the volume a PPRC secondary (hosts cannot write it) or not.
    pub fn set_secondary(&self, secondary: bool) {
        if secondary {
            self.mirror_restarts();
        }
        self.secondary.store(secondary, Ordering::Release);
    }

    /// As a PPRC secondary: its primary is about to copy every track it
    /// recorded, which covers what the flushes that failed so far left
    /// unwritten.
    pub fn mirror_restarts(&self) {
        self.failures_told
            .store(self.store.failed_flushes(), Ordering::Release);
    }

    /// As a PPRC secondary: whether a flush of the store failed since the
    /// primary was last told, now counted as told. Any party's flush
    /// counts (a host reading the secondary, a FlashCopy's T0): it took
    /// the kernel's only report of the failed write-back.
    pub fn untold_flush_failure(&self) -> bool {
        let failed = self.store.failed_flushes();
        self.failures_told.swap(failed, Ordering::AcqRel) != failed
    }

    /// After a failed flush or FUA write of a PPRC secondary: the pages
    /// whose write-back failed stay cached, clean, with data its disk
    /// does not hold. They are dropped, so that readers (a FlashCopy
    /// from the secondary, a host after a failover) get what the disk
    /// holds.
    pub async fn forget_unwritten(&self) {
        self.store.forget_unwritten().await;
    }

    /// Whether the volume is a PPRC secondary.
    pub fn is_secondary(&self) -> bool {
        self.secondary.load(Ordering::Acquire)
    }

    /// Whether hosts may write the volume now (the access gate): not a
    /// read-only volume, not a PPRC secondary.
    pub fn writable(&self) -> bool {
        !self.info.read_only && !self.is_secondary()
    }

    /// Number of NBD clients attached right now.
    pub fn clients(&self) -> u64 {
        self.stats.clients.load(Ordering::Relaxed)
    }

    /// Registers an attached client; the guard unregisters it on drop.
    pub fn attach(self: &std::sync::Arc<Self>) -> ClientGuard {
        self.stats.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(self.clone())
    }

    /// Current counters.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            reads: get(&s.reads),
            writes: get(&s.writes),
            bytes_read: get(&s.bytes_read),
            bytes_written: get(&s.bytes_written),
            flushes: get(&s.flushes),
            trims: get(&s.trims),
            write_zeroes: get(&s.zeroes),
            errors: get(&s.errors),
        }
    }

    /// Checks that `[offset, offset+len)` lies inside the volume and that a
    /// modifying op is allowed by the access gate.
    pub fn check(&self, op: VolumeOp, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check_range(op, offset, len)?;
        if op.modifies() && !self.writable() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            let volume = self.id_text.clone();
            return Err(if self.info.read_only {
                VolumeError::ReadOnly { volume }
            } else {
                VolumeError::Secondary { volume }
            });
        }
        Ok(())
    }

    /// Checks only that `[offset, offset+len)` lies inside the volume.
    fn check_range(&self, op: VolumeOp, offset: u64, len: u64) -> Result<(), VolumeError> {
        if offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
        {
            return Ok(());
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        Err(VolumeError::OutOfRange {
            op,
            volume: self.id_text.clone(),
            offset,
            len,
            size: self.size(),
        })
    }

    fn io_error(&self, op: VolumeOp, offset: u64) -> impl FnOnce(io::Error) -> VolumeError + '_ {
        move |source| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            if source.raw_os_error() == Some(libc::EOPNOTSUPP) && op == VolumeOp::WriteZeroes {
                return VolumeError::NotFast {
                    op,
                    volume: self.id_text.clone(),
                };
            }
            tracing::warn!(volume = %self.id_text, %op, offset, "I/O error: {source}");
            VolumeError::Io {
                op,
                path: self.store.path().display().to_string(),
                offset,
                source,
            }
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, VolumeError> {
        let data = self.read_uncounted(offset, len).await?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Writes `data` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let len = data.len() as u64;
        self.change(VolumeOp::Write, offset, len, Change::Write(data, fua))
            .await?;
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every completed write durable (on a PPRC primary, on both
    /// sides).
    pub async fn flush(&self) -> Result<(), VolumeError> {
        self.flush_with(None).await
    }

    /// A watch of this volume's failed syncs from now on, for a party that
    /// flushes it (an NBD connection).
    pub fn flush_watch(&self) -> FlushWatch {
        FlushWatch::new(&self.store, false)
    }

    /// [`Volume::flush`] for the party `watch`: it fails also when a sync
    /// of another party failed since this one's last flush (see
    /// [`BackingStore::flush_for`]).
    pub async fn flush_for(&self, watch: &FlushWatch) -> Result<(), VolumeError> {
        self.flush_with(Some(watch)).await
    }

    async fn flush_with(&self, watch: Option<&FlushWatch>) -> Result<(), VolumeError> {
        let local = async {
            match watch {
                Some(watch) => self.store.flush_for(watch).await,
                None => self.store.flush().await,
            }
            .map_err(self.io_error(VolumeOp::Flush, 0))
        };
        match self.pprc() {
            Some(pair) => pair.flush(local).await?,
            None => {
                let flushed = local.await;
                if flushed.is_err() && self.is_secondary() {
                    self.forget_unwritten().await;
                }
                flushed?
            }
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every completed write durable here only.
    pub async fn flush_local(&self) -> Result<(), VolumeError> {
        self.store
            .flush()
            .await
            .map_err(self.io_error(VolumeOp::Flush, 0))
    }

    /// Discards a range (advisory).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        // With FUA: durable, also if its write-back failed and another
        // party's sync was told (see [`BackingStore::flush_for`]).
        let watch = self.flush_watch();
        self.change(VolumeOp::Trim, offset, len, Change::Trim)
            .await?;
        if fua {
            self.flush_for(&watch).await?;
        }
        self.stats.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Zeroes a range. `may_punch`: holes allowed; `fast_only`: fail rather
    /// than write zero buffers.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let watch = self.flush_watch();
        self.change(
            VolumeOp::WriteZeroes,
            offset,
            len,
            Change::Zero(may_punch, fast_only, false),
        )
        .await?;
        if fua {
            self.flush_for(&watch).await?;
        }
        self.stats.zeroes.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Prefetches a range.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.check(VolumeOp::Cache, offset, len)?;
        self.store
            .cache(offset, len)
            .await
            .map_err(self.io_error(VolumeOp::Cache, offset))
    }

    /// Allocation map of a range, at most `max` runs (for hosts and copy
    /// services alike).
    pub async fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, VolumeError> {
        self.check(VolumeOp::BlockStatus, offset, len)?;
        let _gate = self.gate.read().await;
        self.extents_below_gate(offset, len, max).await
    }

    /// [`Volume::extents`] for a copy holding `gate` (of this volume).
    pub async fn extents_for_copy(
        &self,
        gate: &GateGuard,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, VolumeError> {
        debug_assert!(self.holds(gate), "another volume's gate");
        self.check(VolumeOp::BlockStatus, offset, len)?;
        self.extents_below_gate(offset, len, max).await
    }

    async fn extents_below_gate(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, VolumeError> {
        match self.flashcopy() {
            Some(fc) => fc.relationship.extents(fc.role, offset, len, max).await,
            None => self.store.extents(offset, len, max).await,
        }
        .map_err(self.io_error(VolumeOp::BlockStatus, offset))
    }

    /// Reads `len` bytes at `offset`, not counted as host I/O.
    async fn read_uncounted(&self, offset: u64, len: usize) -> Result<Bytes, VolumeError> {
        self.check_range(VolumeOp::Read, offset, len as u64)?;
        let _gate = self.gate.read().await;
        self.read_below_gate(offset, len).await
    }

    /// Reads for copy services holding `gate` (of this volume):
    /// range-checked, through the FlashCopy layer, not counted as host I/O.
    pub async fn read_for_copy(
        &self,
        gate: &GateGuard,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, VolumeError> {
        debug_assert!(self.holds(gate), "another volume's gate");
        self.check_range(VolumeOp::Read, offset, len as u64)?;
        self.read_below_gate(offset, len).await
    }

    async fn read_below_gate(&self, offset: u64, len: usize) -> Result<Bytes, VolumeError> {
        match self.flashcopy() {
            Some(fc) => fc.relationship.read(fc.role, offset, len).await,
            None => self.store.read(offset, len).await,
        }
        .map_err(self.io_error(VolumeOp::Read, offset))
    }

    /// Applies a change mirrored from a PPRC primary: range-checked, then
    /// through the FlashCopy layer, but not subject to the host access
    /// gate (a secondary refuses host writes and takes its primary's).
    /// Refused once the volume is no longer a secondary.
    pub async fn apply_mirrored(
        &self,
        offset: u64,
        len: u64,
        change: Change,
    ) -> Result<(), VolumeError> {
        let op = match change {
            Change::Write(..) => VolumeOp::Write,
            Change::Zero(..) => VolumeOp::WriteZeroes,
            Change::Trim => VolumeOp::Trim,
        };
        self.check_range(op, offset, len)?;
        let _gate = self.gate.read().await;
        // Checked under the gate: a secondary takes over (failover) under
        // the exclusive gate, and a change that waited for it then would
        // land, unrecorded, over what hosts write there from now on.
        if !self.is_secondary() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(VolumeError::NotSecondary {
                op,
                volume: self.id_text.clone(),
            });
        }
        self.change_below_pprc(op, offset, len, change).await
    }

    /// Applies a host change through the copy-services layers, checked
    /// under the gate: a volume becomes a PPRC secondary under the
    /// exclusive gate, so a change waiting for it then is refused.
    async fn change(
        &self,
        op: VolumeOp,
        offset: u64,
        len: u64,
        change: Change,
    ) -> Result<(), VolumeError> {
        let _gate = self.gate.read().await;
        self.check(op, offset, len)?;
        match self.pprc() {
            Some(pair) => {
                let local = |change| self.change_below_pprc(op, offset, len, change);
                pair.mirror(op, offset, len, change, local).await
            }
            None => self.change_below_pprc(op, offset, len, change).await,
        }
        .inspect_err(|e| {
            if matches!(e, VolumeError::WriteInhibited { .. }) {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// The layers below PPRC: FlashCopy, then the store.
    async fn change_below_pprc(
        &self,
        op: VolumeOp,
        offset: u64,
        len: u64,
        change: Change,
    ) -> Result<(), VolumeError> {
        match self.flashcopy() {
            Some(fc) => fc.relationship.modify(fc.role, offset, len, change).await,
            None => change.apply(&self.store, offset, len).await,
        }
        .map_err(self.io_error(op, offset))
    }
}

/// A shared hold on a volume's I/O gate that may move into a task
/// ([`Volume::hold_gate`]).
#[derive(Debug)]
pub struct GateGuard(tokio::sync::OwnedRwLockReadGuard<()>);

/// Counts an attached client while alive.
#[derive(Debug)]
pub struct ClientGuard(std::sync::Arc<Volume>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.stats.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::volume::server::test_server;

    /// A host write that was waiting at the gate while the volume became a
    /// PPRC secondary (which happens under the exclusive gate) is refused:
    /// it could otherwise land over the primary's copy of its track.
    #[tokio::test]
    async fn a_host_write_waiting_while_the_volume_becomes_a_secondary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let srv = test_server(dir.path(), &["v.img"]);
        let v = srv.lookup("000FCB02").unwrap().clone();
        let quiet = v.gate().write().await;
        let write = tokio::spawn({
            let v = v.clone();
            async move { v.write(0, Bytes::from(vec![0xAB; 4096]), true).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!write.is_finished());
        v.set_secondary(true);
        drop(quiet);
        let written = write.await.unwrap();
        assert!(
            matches!(written, Err(VolumeError::Secondary { .. })),
            "{written:?}"
        );
        let image = std::fs::read(dir.path().join("v.img")).unwrap();
        assert!(image.iter().all(|&b| b == 0));
    }
}
