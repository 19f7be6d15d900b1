//! FlashCopy: point-in-time copies of a volume onto another volume of the
//! same server.
//!
//! A [`Relationship`] pairs a source and a target backing store with a
//! track bitmap ("copied"). From T0 on, the data path keeps the target equal
//! to the source at T0 (rule 1 of the design):
//!
//! * a host write (or trim / write-zeroes) to an uncopied source track first
//!   copies the track's T0 content to the target and makes that copy and
//!   its bit durable, then changes the source;
//! * a host read of an uncopied target track is served from the source;
//! * a host write to an uncopied target track first copies the rest of a
//!   partially written track from the source, then writes, then marks it;
//! * the background copier (COPY mode, [`copier`]) copies uncopied tracks in
//!   order, turning source holes into target holes.
//!
//! Every path that tests and then changes a track's state holds that
//! track's lock ([`crate::copy::locks`]), so a track is copied at most once
//! and reads never see a half-updated track. Bits only go from 0 to 1, so
//! tracks already copied need no lock at all: a source whose tracks are all
//! copied writes straight to its backing store.
//!
//! [`manager`] establishes, withdraws, lists and restores relationships.

pub mod copier;
pub mod manager;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::bitmap::TrackBitmap;
use super::locks::TrackLocks;
use super::track_span;
use crate::volume::store::{BackingStore, Extent, FlushWatch};

/// Background copy or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Copy every track in the background; the relationship then ends.
    Copy,
    /// Copy only tracks about to change; lasts until withdrawn.
    #[serde(rename = "nocopy", alias = "no-copy")]
    NoCopy,
}

/// A volume's part in a relationship.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The volume being copied.
    Source,
    /// The point-in-time copy.
    Target,
}

/// A change a host makes to a range.
#[derive(Debug, Clone)]
pub enum Change {
    /// Write data, with FUA.
    Write(Bytes, bool),
    /// Write zeroes: may punch holes, fast only, FUA.
    Zero(bool, bool, bool),
    /// Discard (advisory).
    Trim,
}

impl Change {
    /// Applies the change to a backing store directly.
    pub async fn apply(&self, store: &BackingStore, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Change::Write(data, fua) => store.write(offset, data.clone(), *fua).await,
            Change::Zero(punch, fast, fua) => {
                // A write-back of these zeroes that failed and was reported
                // to another party's sync fails the FUA too.
                let watch = FlushWatch::new(store, false);
                store.write_zeroes(offset, len, *punch, *fast).await?;
                if *fua {
                    store.flush_for(&watch).await?;
                }
                Ok(())
            }
            Change::Trim => store.trim(offset, len).await,
        }
    }
}

/// One FlashCopy relationship.
#[derive(Debug)]
pub struct Relationship {
    /// Source volume ID.
    pub source_id: String,
    /// Target volume ID.
    pub target_id: String,
    source: Arc<BackingStore>,
    target: Arc<BackingStore>,
    /// COPY or NOCOPY.
    pub mode: CopyMode,
    /// Background copy rate limit in bytes per second (0 = unlimited).
    rate: AtomicU64,
    /// The point in time.
    pub t0: SystemTime,
    /// Track size of the bitmap.
    pub track_size: u64,
    /// Bytes covered: the source size.
    pub size: u64,
    bitmap: TrackBitmap,
    /// The commits' view of the target's failed syncs, sticky: once a
    /// write-back of the target failed, copies of T0 made before it may
    /// not be on its disk, and no later commit may record them as made.
    target_flushes: FlushWatch,
    locks: TrackLocks,
    /// Track copies done (host-triggered and background).
    copies: AtomicU64,
    /// Bytes of data copied (holes excluded).
    bytes_copied: AtomicU64,
    /// Why the background copy stopped, if it failed.
    failure: Mutex<Option<String>>,
    /// Stops the background copier.
    pub(crate) stop: CancellationToken,
    /// Cancelled once no background copier runs (at once for NOCOPY).
    pub(crate) copier_stopped: CancellationToken,
    /// A withdraw is under way: the target may not become a PPRC primary
    /// meanwhile (the withdraw checked it is none).
    withdrawing: AtomicBool,
}

impl Relationship {
    /// Builds a relationship over an open bitmap.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source_id: String,
        target_id: String,
        source: Arc<BackingStore>,
        target: Arc<BackingStore>,
        mode: CopyMode,
        rate: u64,
        t0: SystemTime,
        track_size: u64,
        bitmap: TrackBitmap,
    ) -> Self {
        Relationship {
            source_id,
            target_id,
            // The source as it was at T0, the bitmap's tracks: a source
            // grown since (a block device without a configured size) has a
            // tail that did not exist at T0, outside the relationship.
            size: source.size().min(bitmap.tracks() * track_size),
            target_flushes: FlushWatch::new(&target, true),
            source,
            target,
            mode,
            rate: AtomicU64::new(rate),
            t0,
            track_size,
            bitmap,
            locks: TrackLocks::default(),
            copies: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            failure: Mutex::new(None),
            stop: CancellationToken::new(),
            withdrawing: AtomicBool::new(false),
            copier_stopped: {
                let t = CancellationToken::new();
                if mode == CopyMode::NoCopy {
                    t.cancel();
                }
                t
            },
        }
    }

    /// The track bitmap ("copied").
    pub fn bitmap(&self) -> &TrackBitmap {
        &self.bitmap
    }

    /// Makes every bit set so far durable, after the target's data.
    pub async fn commit(&self) -> io::Result<()> {
        let committed = self.bitmap.commit(&self.target, &self.target_flushes).await;
        self.note_broken_target();
        committed
    }

    /// Whether every track's copy is recorded durably, after a commit of
    /// what is copied so far (one that fails leaves tracks not recorded).
    pub async fn copied_durably(&self) -> bool {
        let _ = self.commit().await;
        self.bitmap.all_set_durably()
    }

    /// Once a write-back of the target has failed, the relationship has
    /// failed: shown so, with what to do. The tracks copied and not yet
    /// recorded count as not copied (the source still holds their T0
    /// data: it changes only once a copy is recorded), so that reads of
    /// the target take them from the source, not from copies its disk may
    /// lack.
    fn note_broken_target(&self) {
        if !self.target_flushes.is_broken() {
            return;
        }
        self.bitmap.forget_undurable();
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            let msg = format!(
                "a write-back of target {} failed: copies of T0 made before it may be lost, \
                 and changes that need a copy are refused; withdraw the relationship",
                self.target_id
            );
            tracing::error!("FlashCopy {} → {}: {msg}", self.source_id, self.target_id);
            *failure = Some(msg);
        }
    }

    /// Marks a withdraw under way, or over.
    pub fn set_withdrawing(&self, on: bool) {
        self.withdrawing.store(on, Ordering::Release);
    }

    /// Whether a withdraw is under way.
    pub fn is_withdrawing(&self) -> bool {
        self.withdrawing.load(Ordering::Acquire)
    }

    /// Track copies performed so far (each track at most once).
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Acquire)
    }

    /// Data bytes copied so far.
    pub fn bytes_copied(&self) -> u64 {
        self.bytes_copied.load(Ordering::Acquire)
    }

    /// Background copy rate limit in bytes per second (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Why the background copy failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn track_range(&self, t: u64) -> (u64, u64) {
        let start = t * self.track_size;
        (start, self.track_size.min(self.size.saturating_sub(start)))
    }

    /// Copies track `t`'s current source content to the target (a source
    /// hole becomes a target hole). Caller holds the track's lock.
    async fn copy_track(&self, t: u64) -> io::Result<()> {
        let (off, len) = self.track_range(t);
        self.copy_run(off, len).await?;
        self.copies.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Copies `[off, off+len)` source → target, holes as holes.
    async fn copy_run(&self, off: u64, len: u64) -> io::Result<()> {
        let extents = self.source.extents(off, len, 4096).await?;
        let mut pos = off;
        for e in extents {
            let n = e.length.min(off + len - pos);
            if e.hole {
                self.target.write_zeroes(pos, n, true, false).await?;
            } else {
                let data = self.source.read(pos, n as usize).await?;
                self.target.write(pos, data, false).await?;
                self.bytes_copied.fetch_add(n, Ordering::AcqRel);
            }
            pos += n;
            if pos >= off + len {
                break;
            }
        }
        if pos < off + len {
            // Extents stopped early (capped): copy the rest as data.
            let data = self.source.read(pos, (off + len - pos) as usize).await?;
            self.target.write(pos, data, false).await?;
            self.bytes_copied
                .fetch_add(off + len - pos, Ordering::AcqRel);
        }
        Ok(())
    }

    fn uncopied(&self, first: u64, last: u64) -> Vec<u64> {
        (first..=last).filter(|&t| !self.bitmap.get(t)).collect()
    }

    /// Host read through `role`.
    pub async fn read(&self, role: Role, offset: u64, len: usize) -> io::Result<Bytes> {
        if role == Role::Source || offset >= self.size || len == 0 {
            return self.store(role).read(offset, len).await;
        }
        let end = offset + len as u64;
        let inside_end = end.min(self.size);
        let (first, last) = track_span(offset, inside_end - offset, self.track_size);
        let pending = self.uncopied(first, last);
        if pending.is_empty() {
            return self.target.read(offset, len).await;
        }
        let _guard = self.locks.shared(pending).await;
        let mut out = BytesMut::with_capacity(len);
        for (run_start, run_end, copied) in self.runs(offset, inside_end) {
            let store = if copied { &self.target } else { &self.source };
            out.extend_from_slice(
                &store
                    .read(run_start, (run_end - run_start) as usize)
                    .await?,
            );
        }
        if end > inside_end {
            out.extend_from_slice(
                &self
                    .target
                    .read(inside_end, (end - inside_end) as usize)
                    .await?,
            );
        }
        Ok(out.freeze())
    }

    /// Splits `[start, end)` (inside the source size) into runs of tracks
    /// that are all copied or all uncopied: `(run_start, run_end, copied)`.
    fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let t = pos / self.track_size;
            let track_end = ((t + 1) * self.track_size).min(end);
            let copied = self.bitmap.get(t);
            match runs.last_mut() {
                Some(last) if last.2 == copied => last.1 = track_end,
                _ => runs.push((pos, track_end, copied)),
            }
            pos = track_end;
        }
        runs
    }

    /// Host change through `role`, keeping T0 on the target.
    pub async fn modify(
        &self,
        role: Role,
        offset: u64,
        len: u64,
        change: Change,
    ) -> io::Result<()> {
        let store = self.store(role);
        if offset >= self.size || len == 0 {
            return change.apply(store, offset, len).await;
        }
        let end = offset + len;
        let inside_end = end.min(self.size);
        let (first, last) = track_span(offset, inside_end - offset, self.track_size);
        let pending = self.uncopied(first, last);
        if pending.is_empty() {
            // A bit set by the copier may not be durable yet (nor handed
            // to a commit): commit it before the track changes, or a crash
            // could forget the copy.
            let committed = self
                .bitmap
                .commit_for(&self.target, &self.target_flushes, first, last + 1)
                .await;
            self.note_broken_target();
            committed?;
            return change.apply(store, offset, len).await;
        }
        let _guard = self.locks.exclusive(pending.iter().copied()).await;
        let pending: Vec<u64> = pending
            .into_iter()
            .filter(|&t| !self.bitmap.get(t))
            .collect();
        // Track `t` lies wholly inside the change.
        let whole = |t| {
            let (ts, tl) = self.track_range(t);
            offset <= ts && ts + tl <= end
        };
        if matches!(change, Change::Zero(_, true, _)) {
            // A fast zero must not wait for copies of T0: refused before
            // anything changes, when any track needs one (every uncopied
            // track of the source; on the target, those it covers in part).
            let copies = match role {
                Role::Source => !pending.is_empty(),
                Role::Target => pending.iter().any(|&t| !whole(t)),
            };
            if copies {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
        }
        match role {
            Role::Source => {
                for &t in &pending {
                    self.copy_track(t).await?;
                    self.bitmap.set(t);
                }
                self.commit().await?;
                change.apply(store, offset, len).await
            }
            Role::Target => {
                for &t in &pending {
                    if !whole(t) {
                        self.copy_track(t).await?;
                    }
                }
                let trim = matches!(change, Change::Trim);
                change.apply(store, offset, len).await?;
                // A trim the backing did not carry out (it cannot discard)
                // changed nothing: a whole track it spared copying still
                // holds the target's old data, and reads T0 from the source.
                let discarded = if trim {
                    self.target.discarded(offset, len)
                } else {
                    None
                };
                for &t in &pending {
                    let (ts, tl) = self.track_range(t);
                    let changed = !trim
                        || !whole(t)
                        || discarded.is_some_and(|(start, stop)| start <= ts && ts + tl <= stop);
                    if changed {
                        self.bitmap.set(t);
                    }
                }
                self.commit().await
            }
        }
    }

    /// Allocation map through `role`: an uncopied target track reports the
    /// source's (unchanged since T0) allocation.
    pub async fn extents(
        &self,
        role: Role,
        offset: u64,
        len: u64,
        max: usize,
    ) -> io::Result<Vec<Extent>> {
        if role == Role::Source || offset >= self.size || len == 0 {
            return self.store(role).extents(offset, len, max).await;
        }
        let end = offset + len;
        let inside_end = end.min(self.size);
        let (first, last) = track_span(offset, inside_end - offset, self.track_size);
        let pending = self.uncopied(first, last);
        if pending.is_empty() {
            return self.target.extents(offset, len, max).await;
        }
        let _guard = self.locks.shared(pending).await;
        let mut out: Vec<Extent> = Vec::new();
        let mut parts = self.runs(offset, inside_end);
        if end > inside_end {
            parts.push((inside_end, end, true));
        }
        for (s, e, copied) in parts {
            let store = if copied { &self.target } else { &self.source };
            for x in store.extents(s, e - s, max).await? {
                match out.last_mut() {
                    Some(prev) if prev.hole == x.hole => prev.length += x.length,
                    _ => out.push(x),
                }
            }
            if out.len() >= max {
                out.truncate(max);
                break;
            }
        }
        Ok(out)
    }

    fn store(&self, role: Role) -> &BackingStore {
        match role {
            Role::Source => &self.source,
            Role::Target => &self.target,
        }
    }

    /// The source backing store.
    pub fn source_store(&self) -> &Arc<BackingStore> {
        &self.source
    }

    /// The target backing store.
    pub fn target_store(&self) -> &Arc<BackingStore> {
        &self.target
    }
}

#[cfg(test)]
mod tests;
