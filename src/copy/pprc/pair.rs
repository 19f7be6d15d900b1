//! A PPRC pair's primary end: the mirroring layer of the host write path,
//! the out-of-sync (OOS) bitmap, the background copy (initial copy and
//! resync) and the cleaner.
//!
//! **Marks and the OOS bitmap.** The *marks* (in memory) are exactly the
//! tracks that may differ between primary and secondary; the OOS bitmap
//! file holds every mark durably before the data write that changes its
//! track (rule 3). While the pair is suspended, a host write marks its
//! tracks and waits for their bits to be committed (group commit, no data
//! flush) before writing locally. While the pair is duplex, a write marks
//! its tracks the same way *before* it is sent to both sides — so that a
//! crash of the primary mid-write, or a link lost mid-write, leaves the
//! track recorded — and the [cleaner](Pair::clean) clears marks again once
//! both volumes have been flushed and the tracks have been idle for a
//! whole cleaning interval. While the volume is being written, the cleaner
//! flushes at most every [`BUSY_FLUSH_INTERVAL`] — except while duplex
//! pending, when every pass records the copy's progress.
//!
//! **Activity regions.** A duplex write whose bits are not yet durable
//! commits the whole 64-track word around them (4 MiB with 64 KiB
//! tracks), like an activity log: the writes that follow into the same
//! region find their bits durable and pay no bitmap fsync. The file is
//! then a superset of the marks; the extra bits stay while the region is
//! active and are dropped when it has been idle for a cleaning pass, when
//! the pair suspends ([`Pair::narrow`]), stops or hands its bitmap over.
//! Resyncs copy the marks only, so a link lost mid-write costs the tracks
//! really written; only after a crash of the primary, when the marks are
//! gone, does it resync whole regions from the file. A pass with nothing
//! to clear flushes nothing.
//!
//! **Clearing safely**: every write marks its tracks in `touched` when it
//! starts and when it ends, and counts itself in the current cleaning
//! epoch. A cleaning pass resets `touched` and flips the epoch, waits for
//! the writes of the old epoch to end, flushes both volumes, and then
//! clears only marks that no write touched meanwhile — so a mark is never
//! cleared while a write of that track is in flight or not yet durable on
//! either side.
//!
//! **Copy** (duplex pending): the copier walks the set bits from a cursor,
//! reads each run of tracks through the volume's own read path (a
//! FlashCopy target reads its point-in-time view), sends holes as zeroing
//! and data as writes, holding the tracks' locks until the secondary has
//! acknowledged, so a host write to the same track is ordered before or
//! after the copy, never interleaved. Host writes during the copy are
//! mirrored as in duplex. When the cursor reaches the end the pair is
//! duplex.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::group::ConsistencyGroup;
use super::link::PeerLink;
use super::paths::{PathManager, Route};
use super::wire::{self, Message};
use crate::copy::bitmap::{TrackBitmap, TrackBits};
use crate::copy::drop_behind::DropBehind;
use crate::copy::flashcopy::Change;
use crate::copy::locks::{Overlaps, TrackLocks};
use crate::nbd::proto::errno;
use crate::pipeline::Batch;
use crate::volume::store::BackingStore;
use crate::volume::{GateGuard, Volume, VolumeError, VolumeOp};

/// The errno a secondary answers when its side of the pair was suspended
/// or terminated there.
pub const ESHUTDOWN: u32 = 108;

/// Interval between cleaning passes.
pub const CLEAN_INTERVAL: Duration = Duration::from_secs(2);
/// Least time between two flushes of the cleaner while the volume is being
/// written (the kernel's own write-back age for dirty pages).
pub const BUSY_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
/// Most bytes the copier sends per request.
const COPY_CHUNK: u64 = 1 << 20;
/// Copies the copier keeps in flight.
const COPY_DEPTH: usize = 8;
/// Most timeouts a request waits for its answer on a link that keeps
/// answering the requests ahead of it (see [`Pair::answer`]).
const QUEUED_PATIENCE: u32 = 4;

/// A pair's state, as in the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairState {
    /// Not in a pair.
    Simplex,
    /// Initial copy or resync in progress.
    DuplexPending,
    /// In sync: every write reaches both volumes.
    Duplex,
    /// Mirroring stopped; changes are recorded.
    Suspended,
}

impl PairState {
    /// The state's name as shown to users.
    pub fn name(self) -> &'static str {
        match self {
            PairState::Simplex => "simplex",
            PairState::DuplexPending => "duplex pending",
            PairState::Duplex => "duplex",
            PairState::Suspended => "suspended",
        }
    }

    /// The state on the wire.
    pub fn wire(self) -> wire::PairState {
        match self {
            PairState::Simplex => wire::PairState::Simplex,
            PairState::DuplexPending => wire::PairState::DuplexPending,
            PairState::Duplex => wire::PairState::Duplex,
            PairState::Suspended => wire::PairState::Suspended,
        }
    }
}

/// Why a pair is suspended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuspendReason {
    /// An operator suspended it.
    Manual,
    /// No link of the path could carry a change in time.
    LinkLost,
    /// The secondary failed to apply a change.
    SecondaryIoError,
    /// The primary failed to apply a change.
    PrimaryIoError,
    /// The consistency group was frozen.
    Freeze,
    /// The secondary's server suspended or ended its side.
    SecondarySuspended,
    /// This volume took over from its primary.
    Failover,
    /// The primary restarted and the secondary could not be reached.
    PrimaryRestart,
}

impl SuspendReason {
    /// Whether the secondary could not be updated (as opposed to an
    /// operator's or the group's decision, or a restart).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            SuspendReason::LinkLost
                | SuspendReason::SecondaryIoError
                | SuspendReason::SecondarySuspended
        )
    }

    /// The reason as shown to users.
    pub fn name(self) -> &'static str {
        match self {
            SuspendReason::Manual => "manual",
            SuspendReason::LinkLost => "link lost",
            SuspendReason::SecondaryIoError => "secondary I/O error",
            SuspendReason::PrimaryIoError => "primary I/O error",
            SuspendReason::Freeze => "freeze",
            SuspendReason::SecondarySuspended => "suspended at the secondary",
            SuspendReason::Failover => "failover",
            SuspendReason::PrimaryRestart => "primary restarted",
        }
    }
}

/// A pair's changing status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Current state.
    pub state: PairState,
    /// Why it is suspended.
    pub reason: Option<SuspendReason>,
    /// Detail of the failure that suspended it.
    pub detail: Option<String>,
    /// When the state was entered.
    pub since: SystemTime,
    /// When the last copy (initial or resync) started.
    pub copy_started: Option<SystemTime>,
    /// When the last copy completed.
    pub copy_completed: Option<SystemTime>,
    /// Hosts may not write the primary (critical modes).
    pub write_inhibited: bool,
}

/// Fixed identity and options of a pair.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairSpec {
    /// The primary volume here.
    pub volume: String,
    /// The secondary's server.
    pub peer: String,
    /// The secondary volume.
    pub peer_volume: String,
    /// Primary LSS.
    pub lss: u8,
    /// Secondary LSS.
    pub peer_lss: u8,
    /// Critical volume mode.
    pub critical: bool,
}

/// Why background work stopped mirroring, and how to say it.
type Failure = (SuspendReason, String);

/// Why a duplex pair could not be recorded clean at a stop of its server.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct StopError {
    /// What kind of failure it was.
    pub reason: SuspendReason,
    /// What failed.
    pub detail: String,
}

/// Why a change could not be mirrored.
#[derive(Debug)]
enum SendError {
    /// No path, or no live link on it.
    NoLink(String),
    /// A link took longer than the timeout.
    Timeout(String),
}

/// The primary end of one pair.
pub struct Pair {
    /// Identity and options.
    pub spec: PairSpec,
    wire_volume: wire::VolumeName,
    track_size: u64,
    /// Critical heavy mode of the primary's LSS.
    heavy: bool,
    group: Option<Arc<ConsistencyGroup>>,
    status: Mutex<Status>,
    inhibited: AtomicBool,
    /// Why this pair of a consistency group could not update its
    /// secondary, when the group's freeze then suspended it (reason
    /// `freeze`): the critical mode still judges that failure.
    group_failure: Mutex<Option<SuspendReason>>,
    /// Durable: every mark, plus whole active regions while mirroring.
    oos: TrackBitmap,
    /// The tracks that may differ (a subset of `oos`), changed only
    /// under `clean_lock` (read to set, write to clear).
    marks: TrackBits,
    touched: Vec<AtomicU64>,
    /// `touched` as it was at the start of the last cleaning pass.
    recent: Mutex<Vec<u64>>,
    epoch: AtomicU64,
    active: [AtomicU64; 2],
    ended: Notify,
    clean_lock: RwLock<()>,
    /// One cleaning pass at a time.
    passes: tokio::sync::Mutex<()>,
    locks: TrackLocks,
    /// Held shared by changes made on the primary alone (the pair not
    /// mirroring), exclusively while the pair starts mirroring.
    local_only: tokio::sync::RwLock<()>,
    /// Mirrored changes in flight: overlapping ones go one after another,
    /// so both volumes apply them in the same order (requests spread over
    /// several links may be applied in any order on the secondary).
    overlaps: Overlaps,
    paths: Arc<PathManager>,
    /// The primary volume's backing, flushed before marks are cleared.
    store: Arc<BackingStore>,
    /// When both volumes were last flushed (by the cleaner or a host).
    last_flush: Mutex<Instant>,
    timeout: Duration,
    bytes_sent: AtomicU64,
    cursor: AtomicU64,
    copy_clock: Mutex<Option<(Instant, u64)>>,
    /// Rings when the status changes (the manager records it).
    pub changed: Arc<Notify>,
    tasks: Mutex<CancellationToken>,
    /// Cancelled when the pair is terminated (see [`Pair::terminate`]).
    terminated: CancellationToken,
    /// Cancelled when the pair leaves its consistency group (see
    /// [`Pair::leave_group`]): the group no longer holds its writes.
    left_group: CancellationToken,
    /// True from a restart of this server that found the pair mirroring
    /// until the restart's resync has started or given up (see
    /// [`Pair::await_restart_resync`]).
    restart_resync: watch::Sender<bool>,
    /// How many times the pair started mirroring (established or resumed):
    /// a write that failed before the last start belongs to an earlier
    /// activation, whose resync copies its track.
    starts: AtomicU64,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").field("spec", &self.spec).finish()
    }
}

/// Settings a pair takes from its server.
pub struct PairEnv {
    /// The server's paths.
    pub paths: Arc<PathManager>,
    /// Time the secondary has to acknowledge.
    pub timeout: Duration,
    /// Critical heavy mode of the primary's LSS.
    pub heavy: bool,
    /// The consistency group, if the primary's LSS is in one.
    pub group: Option<Arc<ConsistencyGroup>>,
    /// Rung on status changes.
    pub changed: Arc<Notify>,
}

impl Pair {
    /// A pair of the volume backed by `store`, over an open OOS bitmap, in
    /// `status`.
    pub fn new(
        spec: PairSpec,
        store: Arc<BackingStore>,
        track_size: u64,
        oos: TrackBitmap,
        status: Status,
        env: PairEnv,
    ) -> Pair {
        let wire_volume = wire::volume_name(&spec.peer_volume);
        let words = oos.words();
        Pair {
            spec,
            wire_volume,
            track_size,
            heavy: env.heavy,
            group: env.group,
            inhibited: AtomicBool::new(status.write_inhibited),
            restart_resync: watch::channel(false).0,
            group_failure: Mutex::new(None),
            status: Mutex::new(status),
            marks: oos.bits().snapshot(),
            oos,
            touched: (0..words).map(|_| AtomicU64::new(0)).collect(),
            recent: Mutex::new(vec![0; words]),
            epoch: AtomicU64::new(0),
            active: [AtomicU64::new(0), AtomicU64::new(0)],
            ended: Notify::new(),
            clean_lock: RwLock::new(()),
            passes: tokio::sync::Mutex::new(()),
            locks: TrackLocks::default(),
            local_only: tokio::sync::RwLock::new(()),
            overlaps: Overlaps::default(),
            paths: env.paths,
            store,
            last_flush: Mutex::new(Instant::now()),
            timeout: env.timeout,
            bytes_sent: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            copy_clock: Mutex::new(None),
            changed: env.changed,
            tasks: Mutex::new(CancellationToken::new()),
            terminated: CancellationToken::new(),
            left_group: CancellationToken::new(),
            starts: AtomicU64::new(0),
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current state.
    pub fn state(&self) -> PairState {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).state
    }

    /// Whether hosts may not write the primary now (critical modes).
    pub fn write_inhibited(&self) -> bool {
        self.inhibited.load(Ordering::Acquire)
    }

    /// The OOS bitmap.
    pub fn oos(&self) -> &TrackBitmap {
        &self.oos
    }

    /// Number of marked tracks (that may differ), copied or not.
    pub fn marked(&self) -> u64 {
        self.marks.count()
    }

    /// Marks the tracks of `mask` in word `i` (a bitmap handed over at
    /// failback); the caller commits the bitmap before writing them.
    pub fn import_marks(&self, i: usize, mask: u64) {
        let _no_clearing = self.clean_lock.read().unwrap_or_else(|p| p.into_inner());
        self.oos.set_word(i, mask);
        self.marks.set_word(i, mask);
    }

    /// Track size in bytes.
    pub fn track_size(&self) -> u64 {
        self.track_size
    }

    /// Tracks that still differ: all marks while suspended, the marks
    /// the copier has still to copy while duplex pending, none in duplex.
    pub fn out_of_sync(&self) -> u64 {
        match self.state() {
            PairState::Suspended => self.marks.count(),
            PairState::DuplexPending => self.marks.count_from(self.cursor.load(Ordering::Acquire)),
            PairState::Duplex | PairState::Simplex => 0,
        }
    }

    /// Bytes of changes and copies sent to the secondary since the pair
    /// was established (across restarts of this server).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Adds the bytes a recorded pair had sent before this server started.
    pub fn restore_bytes_sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Copy rate in tracks per second since the copy started, if copying.
    pub fn copy_rate(&self) -> Option<f64> {
        let clock = *self.copy_clock.lock().unwrap_or_else(|p| p.into_inner());
        let (start, left_at_start) = clock?;
        if self.state() != PairState::DuplexPending {
            return None;
        }
        let done = left_at_start.saturating_sub(self.out_of_sync());
        let secs = start.elapsed().as_secs_f64();
        (secs > 0.0).then(|| done as f64 / secs)
    }

    /// The path's links, if the path exists.
    pub fn route(&self) -> Option<Arc<Route>> {
        self.paths
            .route(self.spec.lss, &self.spec.peer, self.spec.peer_lss)
    }

    fn set_status(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_one();
    }

    /// Replaces the detail of a pair suspended for `reason`; a pair in any
    /// other state or suspended for another reason is left as it is.
    pub fn explain(&self, reason: SuspendReason, detail: String) {
        self.set_status(|s| {
            if s.state == PairState::Suspended && s.reason == Some(reason) {
                s.detail = Some(detail);
            }
        });
    }

    /// Enters `state` (not suspended), resetting the reason.
    fn enter(&self, state: PairState) {
        self.set_status(|s| Self::entered(s, state));
        self.inhibited.store(false, Ordering::Release);
        self.set_group_failure(None);
        self.restart_resync_settled();
    }

    /// This server restarted with the pair mirroring (it is suspended,
    /// reason `primary restarted`) and resynchronises it by itself once
    /// its path is up. Until that resync has started or given up (see
    /// [`Pair::restart_resync_settled`]), a critical pair's host changes
    /// wait: whether its secondary can be updated is not known yet, and
    /// the critical mode must not take a change on the primary alone that
    /// the secondary will not get.
    pub fn await_restart_resync(&self) {
        self.restart_resync.send_replace(true);
    }

    /// The restart's resync has started (the pair mirrors) or given up
    /// (the pair stays suspended and the critical mode judges why):
    /// changes waiting for it go on.
    pub fn restart_resync_settled(&self) {
        self.restart_resync
            .send_if_modified(|pending| std::mem::replace(pending, false));
    }

    /// Holds a critical pair's host change while the restart's resync is
    /// pending (see [`Pair::await_restart_resync`]), or until the pair is
    /// terminated.
    async fn restart_gate(&self) {
        if !self.spec.critical || !*self.restart_resync.borrow() {
            return;
        }
        let mut pending = self.restart_resync.subscribe();
        tokio::select! {
            _ = pending.wait_for(|p| !*p) => {}
            _ = self.terminated.cancelled() => {}
        }
    }

    /// Whether this pair of a consistency group could not update its
    /// secondary and waits for the group's freeze (or was frozen since):
    /// it is not in sync, so no mark may be cleared — not by the cleaner,
    /// nor by the pass of a manual suspend.
    fn failed_in_group(&self) -> bool {
        self.group_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn set_group_failure(&self, reason: Option<SuspendReason>) {
        *self.group_failure.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Enters `state` only if the pair is in `from` (checked and changed
    /// under the status lock, so a suspend cannot slip in between).
    /// Returns whether it did.
    fn enter_from(&self, from: PairState, state: PairState) -> bool {
        let mut entered = false;
        self.set_status(|s| {
            if s.state == from {
                Self::entered(s, state);
                entered = true;
            }
        });
        if entered {
            self.inhibited.store(false, Ordering::Release);
            self.set_group_failure(None);
            self.restart_resync_settled();
        }
        entered
    }

    /// `s` changed to `state` (not suspended).
    fn entered(s: &mut Status, state: PairState) {
        s.state = state;
        s.reason = None;
        s.detail = None;
        s.since = SystemTime::now();
        if state == PairState::DuplexPending {
            s.copy_started = Some(SystemTime::now());
            s.copy_completed = None;
        }
        if state == PairState::Duplex && s.copy_started.is_some() && s.copy_completed.is_none() {
            s.copy_completed = Some(SystemTime::now());
        }
        s.write_inhibited = false;
    }

    /// Enters `state` (duplex or duplex pending) once no change made on the
    /// primary alone is in flight: every such change has then been made
    /// and marked before the copier can read its track, and none is made
    /// alone from now on.
    pub async fn start_mirroring(&self, state: PairState) {
        let _none_alone = self.local_only.write().await;
        self.starts.fetch_add(1, Ordering::AcqRel);
        self.enter(state);
    }

    /// Suspends the pair (if it is mirroring) and stops its copier and
    /// cleaner. Returns whether it was mirroring.
    pub fn suspend(&self, reason: SuspendReason, detail: Option<String>) -> bool {
        let mut was = false;
        self.set_status(|s| {
            if matches!(s.state, PairState::Duplex | PairState::DuplexPending) {
                was = true;
                s.state = PairState::Suspended;
                s.reason = Some(reason);
                s.detail = detail.clone();
                s.since = SystemTime::now();
            }
        });
        if was {
            self.tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .cancel();
            tracing::warn!(
                volume = %self.spec.volume,
                "PPRC pair suspended: {}{}",
                reason.name(),
                detail.map(|d| format!(": {d}")).unwrap_or_default()
            );
        }
        was
    }

    fn inhibit(&self) {
        self.inhibited.store(true, Ordering::Release);
        self.set_status(|s| s.write_inhibited = true);
    }

    /// A fresh token for this activation's tasks (the old ones stop).
    pub fn restart_tasks(&self) -> CancellationToken {
        let token = CancellationToken::new();
        let old = std::mem::replace(
            &mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()),
            token.clone(),
        );
        old.cancel();
        token
    }

    /// The pair is terminated: its tasks stop, it leaves its consistency
    /// group, and its writes held by the group go on — to the primary
    /// alone. The other pairs of the group stay held until the freeze.
    pub fn terminate(self: &Arc<Self>) {
        self.stop_tasks();
        // Before the release: a released write must find the pair ended.
        self.terminated.cancel();
        self.leave_group();
    }

    /// The pair leaves its consistency group and the group no longer
    /// holds its writes: they go on as the pair's state says (a suspended
    /// pair records them). The other pairs of the group stay held until
    /// the freeze. For a pair taken over by a failback: suspend it first,
    /// so that no released write is mirrored.
    pub fn leave_group(self: &Arc<Self>) {
        if let Some(group) = &self.group {
            group.leave(self);
        }
        self.left_group.cancel();
    }

    /// Whether the primary's LSS is in the consistency group.
    pub fn in_group(&self) -> bool {
        self.group.is_some()
    }

    /// While the pair's consistency group holds its writes: why, and what
    /// releases them when (see [`ConsistencyGroup::hold_detail`]). `None`
    /// while they flow, and for a pair in no group or that left it.
    pub fn group_hold(&self) -> Option<String> {
        match &self.group {
            Some(group) if !self.left_group.is_cancelled() && !self.is_terminated() => {
                group.hold_detail(&self.spec.volume)
            }
            _ => None,
        }
    }

    /// Returns once the pair's consistency group has held writes for
    /// `grace` without a break (never if the pair is in no group or left
    /// it), with the group's state then.
    pub async fn group_held_for(&self, grace: Duration) -> super::group::GroupState {
        match &self.group {
            Some(group) => tokio::select! {
                state = group.held_for(grace) => state,
                _ = self.left_group.cancelled() => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Whether the pair was terminated.
    pub fn is_terminated(&self) -> bool {
        self.terminated.is_cancelled()
    }

    /// Stops the copier and cleaner.
    pub fn stop_tasks(&self) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }

    fn track_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / self.track_size;
        let end = (offset + len.max(1)).div_ceil(self.track_size);
        (first, end.min(self.oos.tracks()))
    }

    fn mark_touched(&self, first: u64, end: u64) {
        for t in first..end {
            self.touched[(t / 64) as usize].fetch_or(1 << (t % 64), Ordering::AcqRel);
        }
    }

    /// Marks `[first, end)` out of sync and waits until the marks are
    /// durable, committing whole regions (see the module docs). Returns
    /// the cleaning epoch the write counts in.
    async fn begin(&self, first: u64, end: u64) -> std::io::Result<u64> {
        let epoch = {
            let _no_clearing = self.clean_lock.read().unwrap_or_else(|p| p.into_inner());
            let epoch = self.epoch.load(Ordering::Acquire);
            self.active[(epoch & 1) as usize].fetch_add(1, Ordering::AcqRel);
            self.mark_touched(first, end);
            self.marks.set_range(first, end, |_| {});
            epoch
        };
        // Marked first: narrowing never drops a marked track's bit, so a
        // bit found durable here stays so until the write has ended.
        if !self.oos.all_durable(first, end) {
            let region = (first / 64 * 64, end.div_ceil(64) * 64);
            self.oos
                .set_range(region.0, region.1.min(self.oos.tracks()));
            if let Err(e) = self.oos.commit_bits().await {
                self.end(epoch, first, end);
                return Err(e);
            }
        }
        Ok(epoch)
    }

    fn end(&self, epoch: u64, first: u64, end: u64) {
        let _no_clearing = self.clean_lock.read().unwrap_or_else(|p| p.into_inner());
        self.mark_touched(first, end);
        if self.active[(epoch & 1) as usize].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ended.notify_waiters();
        }
    }

    /// Holds the caller while the consistency group holds writes, until
    /// the pair leaves the group.
    pub async fn group_gate(&self) {
        if let Some(group) = &self.group {
            tokio::select! {
                _ = group.pass() => {}
                _ = self.left_group.cancelled() => {}
            }
        }
    }

    /// The mirroring layer: applies a host change locally (the future
    /// `local` makes of it) and on the secondary, as the pair's state
    /// requires.
    ///
    /// `local` makes its future only where it is awaited, so the future is
    /// built in place instead of being moved (large) into this one's state.
    pub async fn mirror<F>(
        &self,
        op: VolumeOp,
        offset: u64,
        len: u64,
        change: Change,
        local: impl FnOnce(Change) -> F,
    ) -> Result<(), VolumeError>
    where
        F: Future<Output = Result<(), VolumeError>>,
    {
        self.group_gate().await;
        self.restart_gate().await;
        if self.is_terminated() {
            // Terminated while held: the volume is simplex.
            return local(change).await;
        }
        // After the gate: a failure that held the group may have
        // inhibited the pair meanwhile.
        if self.write_inhibited() {
            return Err(self.inhibited_error(op));
        }
        let (first, end) = self.track_range(offset, len);
        let unrecorded = |source: std::io::Error| VolumeError::Unrecorded {
            op,
            path: self.oos.path().display().to_string(),
            offset,
            source,
        };
        let mirroring = || matches!(self.state(), PairState::Duplex | PairState::DuplexPending);
        if !mirroring() {
            let alone = self.local_only.read().await;
            // Checked again: the pair may have started mirroring meanwhile.
            if !mirroring() {
                self.apply_critical_mode(op)?;
                // Suspended: record the change durably, then make it.
                {
                    let _no_clearing = self.clean_lock.read().unwrap_or_else(|p| p.into_inner());
                    self.mark_touched(first, end);
                    self.marks.set_range(first, end, |_| {});
                    self.oos.set_range(first, end);
                }
                self.oos.commit_bits().await.map_err(unrecorded)?;
                let result = local(change).await;
                // A refused fast zero wrote nothing.
                if matches!(&result, Err(e) if !matches!(e, VolumeError::NotFast { .. })) {
                    self.forget_unwritten().await;
                }
                // The change is made and marked: a resume need not wait
                // for the group's freeze below.
                drop(alone);
                // Like a mirrored write: not answered while the group
                // holds writes.
                self.group_gate().await;
                return result;
            }
        }
        let _in_turn = self.overlaps.enter(offset, offset + len).await;
        let _ordered = self.locks.shared_range(first, end).await;
        let epoch = match self.begin(first, end).await {
            Ok(epoch) => epoch,
            Err(e) => {
                // Nothing was written on either side; the pair cannot go on
                // recording changes, so it says why.
                let e = unrecorded(e);
                self.fail(SuspendReason::PrimaryIoError, e.to_string());
                self.group_gate().await;
                return Err(e);
            }
        };
        let message = match &change {
            Change::Write(data, fua) => Message::Write {
                volume: self.wire_volume,
                offset,
                fua: *fua,
                copy: false,
                data: data.clone(),
            },
            Change::Zero(punch, _, _) => Message::Zero {
                volume: self.wire_volume,
                offset,
                len,
                punch: *punch,
            },
            Change::Trim => Message::Trim {
                volume: self.wire_volume,
                offset,
                len,
            },
        };
        let (local_result, remote) = if matches!(change, Change::Trim) {
            // A trim is advisory: what it changes depends on the backing
            // (a file punches a hole, a device without discard keeps its
            // data). The secondary is told what the primary's did: the
            // range it zeroed, or nothing.
            let l = local(change).await;
            let r = match l.as_ref().ok().and(self.store.discarded(offset, len)) {
                Some((start, end)) => {
                    self.send(Message::Zero {
                        volume: self.wire_volume,
                        offset: start,
                        len: end - start,
                        punch: true,
                    })
                    .await
                }
                None => Ok(0),
            };
            (l, r)
        } else if matches!(change, Change::Zero(_, true, _)) {
            // Fast-only zeroing may be refused locally: only mirror what
            // was done.
            let l = local(change).await;
            let r = if l.is_ok() {
                self.send(message).await
            } else {
                Ok(0)
            };
            (l, r)
        } else {
            // The request goes on its link first (with the others of its
            // batch), so the peer works on it while the local write runs.
            let local = async {
                Batch::local_turn().await;
                local(change).await
            };
            let (remote, local_result) = tokio::join!(self.send(message), local);
            (local_result, remote)
        };
        self.end(epoch, first, end);
        if let Err(e) = &local_result {
            if !matches!(e, VolumeError::NotFast { .. }) {
                self.fail(SuspendReason::PrimaryIoError, e.to_string());
                // A FUA write whose write-back failed leaves its pages
                // cached with data the disk does not hold.
                self.forget_unwritten().await;
            }
        }
        self.after_send(op, remote).await?;
        self.group_gate().await;
        local_result
    }

    /// Makes completed writes durable on both sides.
    pub async fn flush<F>(&self, local: F) -> Result<(), VolumeError>
    where
        F: Future<Output = Result<(), VolumeError>>,
    {
        if !matches!(self.state(), PairState::Duplex | PairState::DuplexPending) {
            let l = local.await;
            if l.is_err() {
                // The resync must copy what the disk holds.
                self.forget_unwritten().await;
            }
            return l;
        }
        let (l, r) = tokio::join!(
            local,
            self.send(Message::Flush {
                volume: self.wire_volume
            })
        );
        if let Err(e) = &l {
            // The primary's flush failed: writes the secondary now holds
            // durably may never reach the primary's disk (its failed pages
            // are not written back again, and the error is reported only
            // once). The written tracks stay marked: the pair suspends (in
            // a consistency group: the group holds writes until its freeze)
            // rather than letting the cleaner clear them as in sync.
            self.fail(SuspendReason::PrimaryIoError, e.to_string());
            self.forget_unwritten().await;
        }
        self.after_send(VolumeOp::Flush, r).await?;
        if l.is_err() {
            // Answered, like a failed write, only after the group's freeze.
            self.group_gate().await;
        }
        l?;
        // Both volumes were just written back: the cleaner's next flush
        // can wait as long as after one of its own.
        self.flushed_both();
        Ok(())
    }

    /// After the primary's storage failed a flush or a write (a FUA
    /// write's write-back): the pages it could not write back may stay
    /// cached, clean, with data its disk does not hold, until the kernel
    /// evicts them. They are dropped at once, so that hosts and a resync
    /// read what the disk holds, and the resync leaves both volumes equal.
    async fn forget_unwritten(&self) {
        self.store.forget_unwritten().await;
    }

    fn inhibited_error(&self, op: VolumeOp) -> VolumeError {
        VolumeError::WriteInhibited {
            op,
            volume: self.spec.volume.clone(),
        }
    }

    /// Handles the secondary's answer: suspends on failure and applies the
    /// critical modes.
    async fn after_send(
        &self,
        op: VolumeOp,
        remote: Result<u32, SendError>,
    ) -> Result<(), VolumeError> {
        let Err((reason, detail)) = self.judge(remote) else {
            return Ok(());
        };
        if self.is_terminated() {
            // The change was made on the primary, which is simplex now.
            return Ok(());
        }
        let mut inhibited = false;
        let mut resumed_since = false;
        if let Some(group) = &self.group {
            // Hold this write (and every write of the group) until the
            // group is frozen by an operator or its timeout.
            if self.state() != PairState::Suspended {
                let starts = self.starts.load(Ordering::Acquire);
                self.stop_tasks();
                // The critical mode judges this failure now: the freeze
                // suspends the pair with reason `freeze`, which never
                // inhibits.
                self.set_group_failure(Some(reason));
                inhibited = self.critical_inhibits(Some(reason));
                if inhibited {
                    self.inhibit();
                }
                group.hold(&self.spec.volume, &detail);
                self.group_gate().await;
                if self.is_terminated() {
                    return Ok(());
                }
                // An operator resumed the pair after the freeze suspended
                // it, before this write was released: the write's tracks
                // stay marked (its shared track lock keeps the resync's
                // copier off them until now), so the resync carries the
                // change, and the pair must not be suspended again.
                resumed_since = self.starts.load(Ordering::Acquire) != starts;
            }
        }
        if !resumed_since {
            self.suspend(reason, Some(detail));
        }
        let critical = if inhibited {
            Err(self.inhibited_error(op))
        } else {
            self.apply_critical_mode(op)
        };
        if op == VolumeOp::Flush {
            // A flush changes nothing: the critical mode inhibits the
            // changes after it, and the flush is answered by the
            // primary's own, like every flush of an inhibited primary.
            return Ok(());
        }
        critical
    }

    /// Whether the critical mode write-inhibits the primary of a pair
    /// suspended for `reason`: a critical pair that could not update its
    /// secondary does — with critical heavy at once, else once its path
    /// has no live link left.
    fn critical_inhibits(&self, reason: Option<SuspendReason>) -> bool {
        // A pair still suspended by this server's restart could not be
        // resynchronised (see [`Pair::await_restart_resync`]): its
        // secondary cannot be updated either.
        let cannot_update = |r: SuspendReason| r.is_failure() || r == SuspendReason::PrimaryRestart;
        self.spec.critical
            && reason.is_some_and(cannot_update)
            && (self.heavy || self.route().map_or(0, |r| r.live()) == 0)
    }

    /// The critical-mode table for a suspended pair: a critical pair that
    /// could not update its secondary — nor resynchronise it after this
    /// server's restart — inhibits writes: with critical heavy at once,
    /// else once its path has no live link left. A pair suspended by an
    /// operator or a freeze never does.
    fn apply_critical_mode(&self, op: VolumeOp) -> Result<(), VolumeError> {
        if !self.spec.critical {
            return Ok(());
        }
        let reason = match self.status.lock().unwrap_or_else(|p| p.into_inner()).reason {
            // Frozen after this pair could not update its secondary: that
            // failure is what the critical mode judges.
            Some(SuspendReason::Freeze) => Some(
                self.group_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or(SuspendReason::Freeze),
            ),
            other => other,
        };
        if self.critical_inhibits(reason) {
            self.inhibit();
            return Err(self.inhibited_error(op));
        }
        Ok(())
    }

    /// Waits for the answer to `request`, sent on `link`: it fails once
    /// the timeout has passed with no answer — unless the link has
    /// answered other requests (not heartbeats, which a secondary answers
    /// while a write hangs) since this one was sent, the last within
    /// the timeout: it is working through those queued ahead of this one
    /// (a copy's, on a link slower than the others). Then it fails a
    /// timeout after the link's last answer, and after [`QUEUED_PATIENCE`]
    /// timeouts in all. So a link that stalls fails its requests a
    /// timeout after its last sign of life.
    async fn answer<F: Future>(
        &self,
        link: &PeerLink,
        request: F,
    ) -> Result<F::Output, tokio::time::error::Elapsed> {
        let sent = tokio::time::Instant::now();
        let limit = sent + self.timeout * QUEUED_PATIENCE;
        let mut deadline = sent + self.timeout;
        tokio::pin!(request);
        loop {
            match tokio::time::timeout_at(deadline, &mut request).await {
                Ok(answer) => return Ok(answer),
                Err(elapsed) => {
                    let last = tokio::time::Instant::from_std(link.last_answer());
                    let progress = last + self.timeout;
                    let now = tokio::time::Instant::now();
                    if last <= sent || progress <= now || deadline >= limit {
                        return Err(elapsed);
                    }
                    deadline = progress.min(limit);
                }
            }
        }
    }

    /// Sends one request over the path's live links, moving to the next
    /// link when one fails: host changes in turn, the copy's writes to the
    /// least busy link (see [`super::paths::Route::pick_least_busy`]).
    async fn send(&self, message: Message) -> Result<u32, SendError> {
        let bytes = match &message {
            Message::Write { data, .. } => data.len() as u64,
            _ => 0,
        } + wire::HEADER_LEN as u64;
        // The error of the last link this request failed on, if any.
        let mut last: Option<String> = None;
        for _ in 0..=super::paths::MAX_LINKS {
            let Some(route) = self.route() else {
                return Err(SendError::NoLink(format!(
                    "no path 0x{:02X} → {} 0x{:02X}",
                    self.spec.lss, self.spec.peer, self.spec.peer_lss
                )));
            };
            let picked = if matches!(message, Message::Write { copy: true, .. }) {
                route.pick_least_busy()
            } else {
                route.pick()
            };
            let Some((at, link)) = picked else {
                let last = last.or_else(|| route.down_reason());
                let after = last.map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(SendError::NoLink(format!(
                    "no live link to {}{after}",
                    self.spec.peer
                )));
            };
            match self.answer(&link, link.request(message.clone())).await {
                Ok(Ok(code)) => {
                    self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(code);
                }
                Ok(Err(e)) => {
                    let error = e.to_string();
                    route.fail(at, &link, error.clone());
                    // The secondary may still be applying what the broken
                    // link carried: let it finish before this request goes
                    // again, so the older copy cannot land last.
                    if let Err(why) = self.await_drained(&route, &link).await {
                        // Every link of a peer that shut down says so.
                        let detail = if why == error {
                            error
                        } else {
                            format!("{error}; {why}")
                        };
                        return Err(SendError::NoLink(detail));
                    }
                    last = Some(error);
                }
                Err(_) => {
                    let why = format!(
                        "{} did not answer within {:?}",
                        self.spec.peer, self.timeout
                    );
                    // Its requests may still land: a resync waits for the
                    // secondary to end this link first.
                    route.fail_unanswered(at, &link, why.clone()).await;
                    return Err(SendError::Timeout(why));
                }
            }
        }
        Err(SendError::NoLink(
            last.unwrap_or_else(|| "no live link".to_string()),
        ))
    }

    /// Waits until the secondary has applied everything `broken` carried,
    /// asking over another live link of `route`.
    /// A link that breaks under the question fails in turn and the next
    /// live link is asked: while one is up, the path is only degraded.
    async fn await_drained(&self, route: &Route, broken: &PeerLink) -> Result<(), String> {
        let mut last = None;
        for _ in 0..super::paths::MAX_LINKS {
            let Some((at, link)) = route.pick() else {
                break;
            };
            let ask = Message::Control {
                body: super::secondary::drained_body(&broken.peer().link_id),
            };
            match tokio::time::timeout(self.timeout, link.request(ask)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(code)) => return Err(format!("the secondary answered {}", errno_name(code))),
                Ok(Err(e)) => {
                    route.fail(at, &link, e.to_string());
                    last = Some(e.to_string());
                }
                Err(_) => {
                    return Err(format!(
                        "the secondary did not finish the broken link's requests within {:?}",
                        self.timeout
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| "no live link left".into()))
    }

    /// Waits until the secondary has ended every link of the path that was
    /// dropped with a request unanswered (and applied what it carried), so
    /// that a resync's copies cannot be overtaken by such a request.
    pub async fn await_unanswered(&self) -> Result<(), String> {
        let Some(route) = self.route() else {
            return Ok(());
        };
        let limit = super::secondary::SILENCE_LIMIT + self.timeout;
        for id in route.unanswered() {
            let Some((at, link)) = route.pick() else {
                return Err("no live link left".into());
            };
            let ask = Message::Control {
                body: super::secondary::drained_body(&id),
            };
            match tokio::time::timeout(limit, link.request(ask)).await {
                Ok(Ok(0)) => route.answered(&id),
                Ok(Ok(code)) => return Err(format!("the secondary answered {}", errno_name(code))),
                Ok(Err(e)) => {
                    route.fail(at, &link, e.to_string());
                    return Err(e.to_string());
                }
                Err(_) => {
                    return Err(format!(
                        "the secondary did not end a link that timed out within {limit:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Sends a flush and reports whether the secondary made everything it
    /// acknowledged durable.
    async fn flush_secondary(&self) -> Result<(), Failure> {
        let answer = self
            .send(Message::Flush {
                volume: self.wire_volume,
            })
            .await;
        self.judge(answer)
    }

    /// Makes both volumes durable before marks are cleared: a power loss
    /// of the primary must not undo writes the secondary keeps while their
    /// tracks are no longer marked.
    async fn flush_both(&self) -> Result<(), Failure> {
        let primary = async {
            match self.store.flush().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.forget_unwritten().await;
                    Err((
                        SuspendReason::PrimaryIoError,
                        format!("cannot flush the primary volume: {e}"),
                    ))
                }
            }
        };
        let (secondary, primary) = tokio::join!(self.flush_secondary(), primary);
        secondary?;
        primary?;
        self.flushed_both();
        Ok(())
    }

    /// Notes that both volumes have just been flushed.
    fn flushed_both(&self) {
        *self.last_flush.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether a periodic cleaning pass may flush the volumes to clear
    /// marks: when no write touched the volume in the last interval, or
    /// the last flush of both (the cleaner's or a host's) is
    /// [`BUSY_FLUSH_INTERVAL`] ago. A busy volume keeps
    /// the marks of its idle tracks a little longer instead of having all
    /// its dirty pages written back, on both sides, every pass.
    fn flush_due(&self) -> bool {
        let idle = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|w| *w == 0);
        idle || self
            .last_flush
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= BUSY_FLUSH_INTERVAL
    }

    /// One cleaning pass (see the module docs): clears the marks of tracks
    /// that are in sync and durable on both sides — while duplex pending,
    /// only of tracks the copier has passed — and drops the bitmap's bits
    /// of tracks not marked. With `keep_recent` (the periodic pass),
    /// tracks written since the previous pass keep their marks too,
    /// regions written in this or the previous pass keep all their bits,
    /// so writes there cost no bitmap commit, and on a busy volume marks
    /// wait until the last flush is [`BUSY_FLUSH_INTERVAL`] ago (not while
    /// duplex pending). Returns how many marks were cleared.
    pub async fn clean(&self, keep_recent: bool) -> Result<u64, Failure> {
        let _one_pass = self.passes.lock().await;
        if self.failed_in_group() {
            return Ok(0);
        }
        let old = {
            let _all = self.clean_lock.write().unwrap_or_else(|p| p.into_inner());
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            for (w, r) in self.touched.iter().zip(recent.iter_mut()) {
                let touched = w.swap(0, Ordering::AcqRel);
                *r = if keep_recent { touched } else { 0 };
            }
            self.epoch.fetch_add(1, Ordering::AcqRel)
        };
        // Wait for the writes of the old epoch to end, also in a pass that
        // clears nothing: the next pass waits only for this epoch's.
        loop {
            let waiting = self.ended.notified();
            if self.active[(old & 1) as usize].load(Ordering::Acquire) == 0 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), waiting).await;
        }
        let below = match self.state() {
            PairState::DuplexPending => self.cursor.load(Ordering::Acquire),
            PairState::Duplex => self.oos.tracks(),
            _ => return Ok(0),
        };
        // While duplex pending, the marks below the cursor are mostly of
        // tracks the copier has copied: they are cleared every pass, busy
        // or not, so a resume after a suspend mid-copy copies what was
        // left, not the whole volume again. (The secondary writes its
        // copies back as they arrive: its flush has little to do.)
        let copying = self.state() == PairState::DuplexPending;
        let clear_marks = self.may_clear(below) && (!keep_recent || copying || self.flush_due());
        if !clear_marks && !self.may_drop_unmarked(keep_recent) {
            // Every mark is of a track written since the previous pass
            // (steady writes), or there is none, or the volume is busy and
            // was flushed less than BUSY_FLUSH_INTERVAL ago.
            return Ok(0);
        }
        if clear_marks {
            self.flush_both().await?;
        }
        self.oos
            .clear_with(|oos| {
                let _all = self.clean_lock.write().unwrap_or_else(|p| p.into_inner());
                let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                let mut cleared = 0;
                // Checked again: the pair may have failed during the flush.
                if clear_marks && !self.failed_in_group() {
                    for (w, mask) in self.clearable(below, &recent) {
                        cleared += self.marks.clear_word(w, mask);
                    }
                }
                self.drop_unmarked(oos, keep_recent.then_some(&recent[..]));
                cleared
            })
            .await
            .map_err(|e| {
                (
                    SuspendReason::PrimaryIoError,
                    format!("cannot write the out-of-sync bitmap: {e}"),
                )
            })
    }

    /// The marks a cleaning pass may clear, word by word (only nonzero
    /// words): marks of tracks below `below` that no write touched in this
    /// pass nor, with `recent`, in the previous one.
    fn clearable<'r>(
        &'r self,
        below: u64,
        recent: &'r [u64],
    ) -> impl Iterator<Item = (usize, u64)> + 'r {
        let words = (below / 64) as usize;
        let tail = below % 64;
        (0..=words.min(self.oos.words() - 1)).filter_map(move |w| {
            let mut mask =
                self.marks.word(w) & !self.touched[w].load(Ordering::Acquire) & !recent[w];
            if w == words {
                mask &= (1u64 << tail).wrapping_sub(1);
            }
            (mask != 0).then_some((w, mask))
        })
    }

    /// Whether a cleaning pass could clear any mark (before it flushes the
    /// secondary for them).
    fn may_clear(&self, below: u64) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let any = self.clearable(below, &recent).next().is_some();
        any
    }

    /// The bitmap's bits of tracks that are not marked, word by word (only
    /// nonzero words); with `recent`, only in regions no write touched in
    /// this cleaning pass nor the previous one.
    fn unmarked<'r>(
        &'r self,
        recent: Option<&'r [u64]>,
    ) -> impl Iterator<Item = (usize, u64)> + 'r {
        (0..self.oos.words()).filter_map(move |w| {
            let idle = recent.is_none_or(|r| r[w] | self.touched[w].load(Ordering::Acquire) == 0);
            let extra = self.oos.word(w) & !self.marks.word(w);
            (idle && extra != 0).then_some((w, extra))
        })
    }

    /// Whether a cleaning pass could drop any unmarked bit.
    fn may_drop_unmarked(&self, keep_recent: bool) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let any = self
            .unmarked(keep_recent.then_some(&recent[..]))
            .next()
            .is_some();
        any
    }

    /// Clears the unmarked bits (inside [`TrackBitmap::clear_with`], under
    /// the write lock of `clean_lock`).
    fn drop_unmarked(&self, oos: &TrackBitmap, recent: Option<&[u64]>) {
        for (w, extra) in self.unmarked(recent) {
            oos.clear_now(w, extra);
        }
    }

    /// Drops every unmarked bit from the bitmap file, so it holds exactly
    /// the tracks that may differ (when the pair stops mirroring, and
    /// before its bitmap is handed over or outlives this process).
    pub async fn narrow(&self) -> std::io::Result<()> {
        self.oos
            .clear_with(|oos| {
                let _all = self.clean_lock.write().unwrap_or_else(|p| p.into_inner());
                self.drop_unmarked(oos, None);
            })
            .await
    }

    /// At a clean stop of this server, once no host request is in flight
    /// (the caller stopped the copier and cleaner): if the pair is duplex,
    /// flushes both volumes — the secondary's FLUSH acknowledged — and
    /// then clears every mark and every bit of the bitmap file
    /// (fdatasync'd), so the resync after the restart copies nothing.
    /// Returns whether the pair was recorded clean; a pair not duplex, or
    /// whose flush failed, keeps its marks (the error says why).
    pub async fn clean_at_stop(&self) -> Result<bool, StopError> {
        if self.state() != PairState::Duplex {
            return Ok(false);
        }
        self.clean(false)
            .await
            .map_err(|(reason, detail)| StopError { reason, detail })?;
        Ok(self.state() == PairState::Duplex && self.marks.count() == 0 && self.oos.count() == 0)
    }

    /// A mirroring failure — of a host change or flush on the primary's
    /// storage, or of the cleaner or copier: a mirroring pair of a consistency group
    /// makes the group hold writes (its freeze suspends the pair, and its
    /// marks stay until then); any other pair suspends. A pair suspended
    /// meanwhile (by an operator or a freeze) stays as it is.
    fn fail(&self, reason: SuspendReason, detail: String) {
        let mirroring = matches!(self.state(), PairState::Duplex | PairState::DuplexPending);
        match &self.group {
            Some(group) if mirroring && !self.left_group.is_cancelled() => {
                // Not in sync any more: nothing may be cleared until the
                // freeze suspends the pair.
                self.stop_tasks();
                // Judged now: the freeze's reason never inhibits.
                self.set_group_failure(Some(reason));
                if self.critical_inhibits(Some(reason)) {
                    self.inhibit();
                }
                group.hold(&self.spec.volume, &detail)
            }
            _ => {
                self.suspend(reason, Some(detail));
            }
        }
    }

    /// Runs cleaning passes until the pair stops mirroring or `stop`.
    pub async fn run_cleaner(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(CLEAN_INTERVAL) => {}
            }
            if !matches!(self.state(), PairState::Duplex | PairState::DuplexPending) {
                return;
            }
            if let Err((reason, detail)) = self.clean(true).await {
                self.fail(reason, detail);
                return;
            }
        }
    }

    /// Copies every marked track to the secondary (duplex pending), then
    /// enters duplex. Stops early when the pair suspends or `stop`.
    pub async fn run_copier(self: Arc<Self>, volume: Arc<Volume>, stop: CancellationToken) {
        self.cursor.store(0, Ordering::Release);
        *self.copy_clock.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), self.marks.count()));
        let tracks = self.marks.tracks();
        let per_chunk = (COPY_CHUNK / self.track_size).max(1);
        let mut inflight = tokio::task::JoinSet::new();
        // First tracks of the runs being copied: the cursor (below which
        // the cleaner may clear marks) stays at the oldest until its copy
        // is acknowledged.
        let mut copying = std::collections::BTreeSet::new();
        let mut next = 0u64;
        let mut failed: Option<Failure> = None;
        let mut behind = DropBehind::default();
        while let Some(first) = self.marks.next_set(next) {
            if failed.is_some() || stop.is_cancelled() || self.state() != PairState::DuplexPending {
                break;
            }
            // A run of marked tracks, at most one chunk.
            let mut end = first + 1;
            while end < tracks && end - first < per_chunk && self.marks.get(end) {
                end += 1;
            }
            while inflight.len() >= COPY_DEPTH {
                if let Some(done) = inflight.join_next().await {
                    failed = failed.or(self.settle(done, &mut copying, next));
                }
            }
            let read = self.cursor.load(Ordering::Acquire) * self.track_size;
            self.drop_behind(&mut behind, read);
            behind.note(
                first * self.track_size,
                (end * self.track_size).min(self.store.size()),
            );
            next = end;
            // The gate first, then the track locks: the order host writes
            // take them in (see `Volume::hold_gate`).
            let gate = volume.hold_gate().await;
            let tracks_held = self.locks.exclusive_range_owned(first, end).await;
            if stop.is_cancelled() {
                break;
            }
            let (me, volume) = (self.clone(), volume.clone());
            copying.insert(first);
            inflight.spawn(async move {
                let r = me.copy_run(&volume, &gate, first, end).await;
                drop(tracks_held);
                drop(gate);
                (first, r)
            });
        }
        while let Some(done) = inflight.join_next().await {
            failed = failed.or(self.settle(done, &mut copying, next));
        }
        self.drop_behind(&mut behind, u64::MAX);
        if let Some((reason, detail)) = failed {
            self.fail(reason, detail);
            return;
        }
        if stop.is_cancelled() || self.state() != PairState::DuplexPending {
            return;
        }
        // Everything is copied: flush both volumes and clear the marks of
        // every track no host write is changing right now, so a suspend
        // soon after this point resyncs only what changes from now on.
        self.cursor.store(tracks, Ordering::Release);
        if let Err((reason, detail)) = self.clean(false).await {
            self.fail(reason, detail);
            return;
        }
        // Only if nothing suspended the pair during that last pass: a
        // suspend meanwhile stands, and the writes made since on the
        // primary alone are marked for the next resync.
        if stop.is_cancelled() || !self.enter_from(PairState::DuplexPending, PairState::Duplex) {
            return;
        }
        tracing::info!(volume = %self.spec.volume, "PPRC pair duplex");
    }

    /// Drops from the primary's page cache, in the background, what the
    /// copier has read below byte `read` (see [`crate::copy::drop_behind`]).
    fn drop_behind(&self, behind: &mut DropBehind, read: u64) {
        for (start, end) in behind.take_below(read) {
            self.store.drop_cached_later(start, end - start);
        }
    }

    /// Accounts for a finished copy: moves the cursor to the oldest copy
    /// still in flight (or `next`) and returns its failure, if any.
    fn settle(
        &self,
        done: Result<(u64, Result<(), Failure>), tokio::task::JoinError>,
        copying: &mut std::collections::BTreeSet<u64>,
        next: u64,
    ) -> Option<Failure> {
        let failure = match done {
            Ok((first, outcome)) => {
                // A failed run keeps the cursor below it: its marks stay.
                if outcome.is_ok() {
                    copying.remove(&first);
                }
                outcome.err()
            }
            Err(e) => Some((
                SuspendReason::PrimaryIoError,
                format!("copy task failed: {e}"),
            )),
        };
        self.cursor
            .store(copying.first().copied().unwrap_or(next), Ordering::Release);
        failure
    }

    /// Copies tracks `[first, end)` (locked by the caller, who holds the
    /// volume's `gate`).
    async fn copy_run(
        &self,
        volume: &Volume,
        gate: &GateGuard,
        first: u64,
        end: u64,
    ) -> Result<(), Failure> {
        let start = first * self.track_size;
        let stop = (end * self.track_size).min(self.store.size());
        if start >= stop {
            return Ok(());
        }
        let local = |e: VolumeError| (SuspendReason::PrimaryIoError, e.to_string());
        let mut at = start;
        while at < stop {
            // Holes go as zeroing, data as writes; a fragmented range takes
            // several allocation queries.
            let extents = volume
                .extents_for_copy(gate, at, stop - at, 64)
                .await
                .map_err(local)?;
            if extents.is_empty() {
                return Err((
                    SuspendReason::PrimaryIoError,
                    format!("no allocation information at offset {at}"),
                ));
            }
            for ext in extents {
                let len = ext.length.min(stop - at);
                if len == 0 {
                    break;
                }
                let message = if ext.hole {
                    Message::Zero {
                        volume: self.wire_volume,
                        offset: at,
                        len,
                        punch: true,
                    }
                } else {
                    let data: Bytes = volume
                        .read_for_copy(gate, at, len as usize)
                        .await
                        .map_err(local)?;
                    Message::Write {
                        volume: self.wire_volume,
                        offset: at,
                        fua: false,
                        copy: true,
                        data,
                    }
                };
                self.judge(self.send(message).await)?;
                at += len;
                if at >= stop {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Pair {
    /// Turns the secondary's answer into success or why the pair cannot
    /// go on mirroring.
    fn judge(&self, answer: Result<u32, SendError>) -> Result<(), Failure> {
        match answer {
            Ok(0) => Ok(()),
            Ok(ESHUTDOWN) => Err((
                SuspendReason::SecondarySuspended,
                format!(
                    "{} suspended its side, {}, and takes no changes for it",
                    self.spec.peer, self.spec.peer_volume
                ),
            )),
            Ok(code) => Err((
                SuspendReason::SecondaryIoError,
                format!(
                    "{} {} answered {}",
                    self.spec.peer,
                    self.spec.peer_volume,
                    errno_name(code)
                ),
            )),
            Err(SendError::NoLink(d)) | Err(SendError::Timeout(d)) => {
                Err((SuspendReason::LinkLost, d))
            }
        }
    }
}

/// An NBD-style errno by name.
pub fn errno_name(code: u32) -> String {
    match code {
        errno::EPERM => "EPERM (not a secondary of this pair)".into(),
        errno::EIO => "EIO".into(),
        errno::ENOMEM => "ENOMEM".into(),
        errno::EINVAL => "EINVAL (no such volume)".into(),
        errno::ENOSPC => "ENOSPC (beyond the end of the secondary)".into(),
        errno::ENOTSUP => "ENOTSUP".into(),
        other => format!("errno {other}"),
    }
}

#[cfg(test)]
#[path = "pair_tests.rs"]
mod tests;
