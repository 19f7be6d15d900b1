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
//!
//! This file holds the pair's state and its transitions; its parts are
//! `mirror` (the host write path), `cleaner` and `copier`.

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
use crate::volume::store::{BackingStore, FlushWatch};
use crate::volume::{GateGuard, Volume, VolumeError, VolumeOp};

mod cleaner;
mod copier;
mod mirror;

pub use mirror::await_unanswered_on;

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
    /// The cleaner's view of the backing's failed syncs: a failed
    /// write-back the kernel reported to another party's flush keeps the
    /// marks too.
    flushes: FlushWatch,
    /// When both volumes were last flushed (by the cleaner or a host).
    last_flush: Mutex<Instant>,
    timeout: Duration,
    bytes_sent: AtomicU64,
    cursor: AtomicU64,
    /// The background copy of the last activation that had one, until a
    /// resume has waited for it to end (see [`Pair::await_copier_ended`]).
    copier: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
            flushes: FlushWatch::new(&store, false),
            store,
            last_flush: Mutex::new(Instant::now()),
            timeout: env.timeout,
            bytes_sent: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            copier: Mutex::new(None),
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
        // Failed write-backs so far left their tracks recorded (the pair
        // suspended on them, or was suspended already): this copy carries
        // what the disk holds — the pages that failed are dropped from the
        // cache, in case nothing did yet. Only later ones concern the
        // cleaner.
        if self.flushes.catch_up(&self.store) {
            self.forget_unwritten().await;
        }
        self.starts.fetch_add(1, Ordering::AcqRel);
        // Nothing is copied yet in this activation: no cleaning pass may
        // take the last one's cursor for this one's.
        self.cursor.store(0, Ordering::Release);
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
mod tests;
