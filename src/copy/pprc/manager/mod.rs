//! Every PPRC pair of this server, in both roles.
//!
//! As **primary**, a pair is a [`Pair`] attached to its volume (the
//! mirroring layer of the write path), with its out-of-sync bitmap in
//! `STATE_DIR/pprc/<volume>.oos`. As **secondary**, a pair is a record: the
//! volume is protected from host writes and accepts the changes its
//! primary's server mirrors, and nothing else.
//!
//! Management requests reach the other side over the path's links as
//! control messages ([`PeerRequests`]): establishing a pair makes the peer
//! volume a secondary (refused if it is smaller, in a pair, a FlashCopy
//! target, or in use without `--permit-online`); state changes
//! are pushed to it; terminate ends both sides; failback asks the old
//! primary to become the secondary and to hand over its out-of-sync
//! bitmap, so only the union of both sides' changed tracks is copied.
//!
//! Pairs are recorded in `STATE_DIR/pprc/pairs.json` on every change. A
//! primary that restarts while mirroring comes back suspended ("primary
//! restarted") and resynchronises its recorded tracks by itself as soon as
//! the path is up — the pairs of the consistency group all together, or
//! none of them. A duplex pair stopped cleanly (every host request
//! answered, both volumes flushed) recorded none, so it is duplex again
//! once its secondary has taken it back.
//!
//! This file holds the pair table and what every request shares; the
//! requests are in its parts: `operations` (the operator's: establish,
//! suspend, terminate, freeze), `failover` (failover and failback, both
//! sides), `peer` (what peer servers ask), `views` (list and show) and
//! `record` (`pairs.json`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;

use super::group::{ConsistencyGroup, GroupState};
use super::link::{LinkError, PeerLink};
use super::pair::{Pair, PairEnv, PairSpec, PairState, Status, SuspendReason, ESHUTDOWN};
use super::paths::{PathError, PathManager, PathView, LINK_TIMEOUT};
use super::secondary::{BoxFuture, PeerRequests};
use super::wire::Message;
use crate::control::log::{rfc3339, EventLog};
use crate::copy::bitmap::{BitmapError, TrackBitmap};
use crate::nbd::proto::errno;
use crate::state::{write_atomic, StateIoError};
use crate::volume::id::VolumeId;
use crate::volume::server::StorageServer;
use crate::volume::Volume;

mod failover;
mod operations;
mod peer;
mod record;
mod views;

pub use record::check_recorded;
use record::{read_records, RECORD};

/// Most peer servers one primary server mirrors to.
pub const MAX_PEERS: usize = 4;

/// How often a pair's state is told again to a secondary's server that
/// could not be told.
pub const RETELL_INTERVAL: Duration = Duration::from_secs(1);

/// Why a pair request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// No such volume here.
    #[error("volume {0} is not defined on this server")]
    UnknownVolume(String),
    /// A malformed volume ID.
    #[error("{0}")]
    BadId(#[from] crate::volume::id::IdError),
    /// The secondary is on this server.
    #[error("the secondary {0} is on this server; a pair mirrors to a peer server")]
    SameServer(String),
    /// No path between the LSSs.
    #[error("no path 0x{lss:02X} → {peer} 0x{peer_lss:02X}; establish one first (essctl pprc path establish)")]
    NoPath {
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
    },
    /// The path has no live link.
    #[error("path 0x{lss:02X} → {peer} 0x{peer_lss:02X} has no live link")]
    PathDown {
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
    },
    /// The volume is already in a pair.
    #[error("volume {volume} is already {what}")]
    InPair {
        /// Volume.
        volume: String,
        /// Its pair, described.
        what: String,
    },
    /// The volume is in no pair.
    #[error("volume {0} is not in a PPRC pair")]
    NoPair(String),
    /// Mirroring the pair would make this server mirror to more than
    /// [`MAX_PEERS`] peers at once.
    #[error(
        "this server is mirroring to {MAX_PEERS} peers ({}); a primary server mirrors to at most \
         {MAX_PEERS} at once: suspend or terminate its pairs with one of them first",
        .0.join(", ")
    )]
    MirrorLimit(Vec<String>),
    /// The request does not fit the pair's role or state.
    #[error("{0}")]
    Invalid(String),
    /// The peer refused or failed.
    #[error("{peer} refused: {message}")]
    Peer {
        /// Peer serial.
        peer: String,
        /// Its message.
        message: String,
    },
    /// The bitmap file failed.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The record could not be written.
    #[error(transparent)]
    State(#[from] StateIoError),
    /// An OS error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The record could not be read.
    #[error("{path}: {message}")]
    Corrupt {
        /// Record file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl PairError {
    /// Whether the error is the caller's (bad request) rather than a
    /// failure of this server.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            PairError::Bitmap(_)
                | PairError::State(_)
                | PairError::Io { .. }
                | PairError::Corrupt { .. }
        )
    }
}

/// How an establish copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CopyOption {
    /// Copy the entire volume (initial copy).
    #[default]
    Copy,
    /// Do not copy: the volumes are known identical.
    Nocopy,
    /// Copy out-of-sync tracks only (resume a suspended pair).
    Resync,
}

/// An establish-pair request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstablishPair {
    /// Primary volume (here).
    pub volume: String,
    /// Secondary volume (its ID names its server).
    pub secondary: String,
    /// Copy option.
    #[serde(default)]
    pub mode: CopyOption,
    /// Critical volume mode.
    #[serde(default)]
    pub critical: bool,
    /// Permit if the secondary is online (attached by hosts).
    #[serde(default)]
    pub permit_online: bool,
}

/// A pair's role on this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairRole {
    /// This volume is mirrored to a peer.
    Primary,
    /// This volume receives a peer's changes.
    Secondary,
}

/// One pair as shown by list and show.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PairView {
    /// The volume here.
    pub volume: String,
    /// Its role.
    pub role: PairRole,
    /// `simplex`, `duplex pending`, `duplex` or `suspended`.
    pub state: String,
    /// Suspend reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// Detail of the failure.
    #[serde(default)]
    pub detail: Option<String>,
    /// Since when (RFC 3339).
    pub since: String,
    /// The other side's server.
    pub peer: String,
    /// The other side's replication address.
    pub peer_address: Option<String>,
    /// The other side's volume.
    pub peer_volume: String,
    /// The path (primary side), with its links.
    #[serde(default)]
    pub path: Option<PathView>,
    /// Tracks that differ (primary side).
    pub out_of_sync_tracks: u64,
    /// Tracks of the volume.
    pub tracks: u64,
    /// Track size in bytes.
    pub track_size: u64,
    /// Percent in sync.
    pub copied_percent: f64,
    /// Copy rate in tracks per second while duplex pending.
    #[serde(default)]
    pub rate_tracks_per_second: Option<f64>,
    /// Bytes sent to the secondary.
    pub bytes_sent: u64,
    /// When the last copy (initial or resync) started.
    #[serde(default)]
    pub copy_started: Option<String>,
    /// When the last copy completed.
    #[serde(default)]
    pub copy_completed: Option<String>,
    /// Critical volume mode.
    pub critical: bool,
    /// Hosts may not write the primary.
    pub write_inhibited: bool,
    /// The primary's LSS is in the consistency group.
    pub consistency_group: bool,
    /// `current` (duplex, nothing out of sync; on the primary side also
    /// no write held by its consistency group, on the secondary side a
    /// link from the primary open) or `not current`.
    pub replication_status: String,
    /// Secondary side: links from the primary's server open now.
    #[serde(default)]
    pub primary_links: Option<u64>,
    /// Secondary side, with no link from the primary open: since when
    /// (RFC 3339; the server's start if it has had none).
    #[serde(default)]
    pub primary_unreachable_since: Option<String>,
}

/// One pair in the record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    role: PairRole,
    spec: PairSpec,
    status: Status,
    /// Primary: the OOS bitmap file. Secondary after failback: the old
    /// primary's bitmap awaiting hand-over.
    #[serde(default)]
    bitmap: Option<String>,
    /// Secondary: accepting the primary's changes (false once suspended
    /// here; a restart must not undo that).
    #[serde(default = "accepting_default")]
    accepting: bool,
    /// Primary: bytes sent to the secondary so far (as of this record).
    #[serde(default)]
    bytes_sent: u64,
}

fn accepting_default() -> bool {
    true
}

/// How a primary asks this server to take (back) the secondary side of a
/// pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Joining {
    /// A new pair (copy or no copy): the volume becomes a secondary.
    New,
    /// An operator's resync: only a volume that still holds its side of
    /// this pair (suspended or not) may take it back.
    Resync,
    /// The automatic resync of a restarted primary: as `Resync`, and not
    /// when the side was suspended here (only an operator ends that).
    Restart,
}

/// A primary's request to take (back) the secondary side of a pair.
#[derive(Clone, Copy, Debug)]
struct JoinRequest {
    /// The primary volume's size in bytes.
    size: u64,
    /// Mirror to a volume hosts have open.
    permit_online: bool,
    joining: Joining,
    stamp: Option<Stamp>,
}

impl JoinRequest {
    fn of(request: &serde_json::Value) -> JoinRequest {
        let flag = |name: &str| request.get(name).and_then(|v| v.as_bool()) == Some(true);
        JoinRequest {
            size: request
                .get("size")
                .and_then(|v| v.as_u64())
                .unwrap_or(u64::MAX),
            permit_online: flag("permit_online"),
            joining: if flag("restart") {
                Joining::Restart
            } else if flag("resync") {
                Joining::Resync
            } else {
                Joining::New
            },
            stamp: Stamp::of(request),
        }
    }
}

/// Puts in order the messages of a primary's server that set what a
/// secondary's side shows (the pair's state told, a request to take the
/// pair back, a terminate): a message held on a slow link may arrive after
/// later ones sent over another, and must not undo them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// This run of the sending server.
    run: u64,
    /// Counts the run's stamped messages from 1.
    seq: u64,
}

impl Stamp {
    /// Whether a message stamped `self` may set what a side that `last`
    /// set shows: a later one of the same run, or any of another run (an
    /// earlier run's links closed with it).
    fn supersedes(self, last: Option<Stamp>) -> bool {
        last.is_none_or(|l| l.run != self.run || self.seq > l.seq)
    }

    /// The stamp of a peer's request, if it has one.
    fn of(request: &serde_json::Value) -> Option<Stamp> {
        request
            .get("stamp")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }
}

/// The secondary side of a pair.
#[derive(Clone, Debug)]
struct SecondarySide {
    spec: PairSpec,
    status: Status,
    /// Accepting the primary's changes (not suspended or ended here).
    accepting: bool,
    handover: Option<String>,
    /// The stamp of the primary's message that last set `status` (none
    /// since this server started).
    last_stamp: Option<Stamp>,
}

#[derive(Clone)]
enum Entry {
    Primary(Arc<Pair>),
    Secondary(Box<SecondarySide>),
}

impl Entry {
    fn volume(&self) -> &str {
        match self {
            Entry::Primary(p) => &p.spec.volume,
            Entry::Secondary(s) => &s.spec.volume,
        }
    }
}

/// An operation's hold of its volume's lock (see
/// [`PprcManager::operations`]). Once it ends the recorder looks at the
/// pair again: it passes over a pair while the lock is held.
struct Operation {
    _held: tokio::sync::OwnedMutexGuard<()>,
    changed: Arc<Notify>,
}

impl Drop for Operation {
    fn drop(&mut self) {
        self.changed.notify_one();
    }
}

/// The pairs of one resync after a restart: once it has started or
/// given up (dropped), the changes of critical pairs that waited for it
/// go on (see [`Pair::await_restart_resync`]).
struct RestartResyncSettled(Vec<Arc<Pair>>);

impl Drop for RestartResyncSettled {
    fn drop(&mut self) {
        for pair in &self.0 {
            pair.restart_resync_settled();
        }
    }
}

/// What a secondary's server was told of its pair: the pair (a
/// terminated pair's successor on the same volume is another), its state
/// and suspend reason.
type Told = (std::sync::Weak<Pair>, PairState, Option<SuspendReason>);

/// A tell of the recorder done: the primary volume, and what its
/// secondary's server answered to (`None`: no live link or no answer).
struct TellDone {
    volume: String,
    told: Option<Told>,
}

/// What woke the recorder.
enum Wake {
    /// A pair changed (or was asked to be told again).
    Changed,
    /// A tell is done.
    Answered(TellDone),
    /// Time to tell again the secondaries that could not be told.
    Retry,
}

/// Every pair of this server.
pub struct PprcManager {
    server: Arc<StorageServer>,
    dir: PathBuf,
    paths: Arc<PathManager>,
    log: Arc<EventLog>,
    timeout: Duration,
    group: Option<Arc<ConsistencyGroup>>,
    changed: Arc<Notify>,
    /// Every pair of this server. Held only for short critical sections,
    /// never while waiting on a peer: the handler of the peers' requests
    /// ([`PprcManager::handle`]) takes it too, and a peer may be waiting on
    /// this server just then.
    entries: tokio::sync::Mutex<Vec<Entry>>,
    /// Per volume, the lock of the operations on its pair that ask its
    /// peer (establish, resume, the restart's resync, suspend, terminate,
    /// failback): taken before `entries`, and held across the peer's
    /// answer, so that one such operation at a time runs on a volume. The
    /// recorder only tries it (see [`PprcManager::recorder`]); the handler
    /// of the peers' requests never takes it.
    operations: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Secondary volume → (primary serial, accepting), for the data path.
    accepting: RwLock<HashMap<String, (String, bool)>>,
    /// Primary volumes whose secondary was asked to take the pair back
    /// since the recorder last looked: what it was told before no longer
    /// holds (see [`PprcManager::asked_secondary`]).
    retell: std::sync::Mutex<Vec<String>>,
    /// This run's [`Stamp::run`].
    run: u64,
    /// Stamped messages sent so far in this run.
    stamped: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PprcManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PprcManager")
            .field("dir", &self.dir)
            .finish()
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PairError {
    let what = what.into();
    move |source| PairError::Io { what, source }
}

fn new_status(state: PairState, reason: Option<SuspendReason>) -> Status {
    Status {
        state,
        reason,
        detail: None,
        since: SystemTime::now(),
        copy_started: None,
        copy_completed: None,
        write_inhibited: false,
    }
}

impl PprcManager {
    /// Opens the manager, restoring recorded pairs. Primaries that were
    /// mirroring come back suspended and resume by themselves once their
    /// path is up.
    pub async fn open(
        server: Arc<StorageServer>,
        state_dir: &Path,
        paths: Arc<PathManager>,
        log: Arc<EventLog>,
        timeout: Duration,
    ) -> Result<Arc<Self>, PairError> {
        let dir = state_dir.join("pprc");
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        let record = dir.join(RECORD);
        let records = read_records(&record)?;
        let group_lss: Vec<_> = server
            .lss()
            .iter()
            .filter(|l| l.consistency_group)
            .collect();
        let group = (!group_lss.is_empty()).then(|| {
            ConsistencyGroup::new(
                group_lss
                    .iter()
                    .map(|l| l.consistency_timeout)
                    .max()
                    .unwrap_or(Duration::from_secs(60)),
            )
        });
        let mgr = Arc::new(PprcManager {
            server,
            dir,
            paths,
            log,
            timeout,
            group,
            changed: Arc::new(Notify::new()),
            entries: tokio::sync::Mutex::new(Vec::new()),
            operations: std::sync::Mutex::new(HashMap::new()),
            accepting: RwLock::new(HashMap::new()),
            retell: std::sync::Mutex::new(Vec::new()),
            run: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()),
            stamped: std::sync::atomic::AtomicU64::new(0),
        });
        if let Some(group) = &mgr.group {
            // A freeze's suspensions are recorded before the writes it
            // held are released.
            let me = Arc::downgrade(&mgr);
            group.set_record(Box::new(move || {
                let me = me.clone();
                Box::pin(async move {
                    match me.upgrade() {
                        Some(mgr) => mgr.save().await.map_err(|e| e.to_string()),
                        None => Ok(()),
                    }
                })
            }));
        }
        let mut entries = Vec::new();
        let mut resume = Vec::new();
        for rec in records {
            let volume = rec.volume(&record, |v| mgr.volume(v).ok())?;
            rec.check_bitmap(&mgr.dir, mgr.server.track_size, Some(volume.size()))?;
            match rec.role {
                PairRole::Secondary => {
                    volume.set_secondary(true);
                    let side = SecondarySide {
                        spec: rec.spec,
                        status: rec.status,
                        accepting: rec.accepting,
                        handover: rec.bitmap,
                        last_stamp: None,
                    };
                    mgr.publish_secondary(&side);
                    entries.push(Entry::Secondary(Box::new(side)));
                }
                PairRole::Primary => {
                    let file = rec.bitmap.clone().unwrap_or_default();
                    let oos = TrackBitmap::open(
                        &mgr.dir.join(&file),
                        mgr.server.track_size,
                        volume.size().div_ceil(mgr.server.track_size),
                    )?;
                    let mut status = rec.status.clone();
                    let was_mirroring =
                        matches!(status.state, PairState::Duplex | PairState::DuplexPending);
                    if was_mirroring {
                        status.state = PairState::Suspended;
                        status.reason = Some(SuspendReason::PrimaryRestart);
                        status.detail = Some("waiting for the path to resume".into());
                        status.since = SystemTime::now();
                    }
                    let pair = mgr.new_pair(rec.spec, &volume, oos, status);
                    pair.restore_bytes_sent(rec.bytes_sent);
                    if was_mirroring {
                        pair.await_restart_resync();
                        resume.push((pair.clone(), volume.clone()));
                    }
                    volume.attach_pprc(pair.clone());
                    entries.push(Entry::Primary(pair));
                }
            }
        }
        *mgr.entries.lock().await = entries;
        mgr.save().await?;
        tokio::spawn(mgr.clone().recorder());
        // Tell every secondary the state its primary restarted in.
        mgr.changed.notify_one();
        // The pairs of the consistency group resume together or not at
        // all: one resumed alone would mirror a write that depends on one
        // made on another's primary alone.
        let (grouped, single): (Vec<_>, Vec<_>) =
            resume.into_iter().partition(|(p, _)| p.in_group());
        let mut batches: Vec<_> = single.into_iter().map(|r| vec![r]).collect();
        if !grouped.is_empty() {
            batches.push(grouped);
        }
        for batch in batches {
            tokio::spawn(mgr.clone().resume_after_restart(batch));
        }
        Ok(mgr)
    }

    /// Resumes pairs that were mirroring when this server stopped, as
    /// soon as their paths are up: all of `pairs` or none (they stay
    /// suspended, reason "primary restarted", until an operator resumes
    /// them).
    async fn resume_after_restart(self: Arc<Self>, pairs: Vec<(Arc<Pair>, Arc<Volume>)>) {
        // However this ends, the changes of critical pairs that wait for it
        // go on (see [`Pair::await_restart_resync`]).
        let _settled = RestartResyncSettled(pairs.iter().map(|(p, _)| p.clone()).collect());
        let deadline = tokio::time::Instant::now() + LINK_TIMEOUT * 2;
        while let Some((pair, _)) = pairs
            .iter()
            .find(|(p, _)| p.route().is_none_or(|r| r.live() == 0))
        {
            if tokio::time::Instant::now() > deadline {
                let why = format!(
                    "no live link within {}s of the restart; resume it with essctl pprc resume {}",
                    (LINK_TIMEOUT * 2).as_secs(),
                    pair.spec.volume
                );
                self.stay_suspended(&pairs, &pair.spec.volume, &why);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Under their operation locks (taken in the order of their
        // volumes): an operator's terminate or resume before wins, one
        // after waits for the outcome.
        let mut pairs = pairs;
        pairs.sort_by(|(p, _), (q, _)| p.spec.volume.cmp(&q.spec.volume));
        let mut operations = Vec::with_capacity(pairs.len());
        for (pair, _) in &pairs {
            operations.push(self.operation(&pair.spec.volume).await);
        }
        let still = |entries: &[Entry], pair: &Arc<Pair>| {
            Self::is_entry(entries, pair)
                && pair.status().reason == Some(SuspendReason::PrimaryRestart)
        };
        let entries = self.entries.lock().await;
        let pairs: Vec<_> = pairs
            .into_iter()
            .filter(|(pair, _)| still(&entries, pair))
            .collect();
        for (pair, _) in &pairs {
            if let Err(e) = Self::check_mirror_limit(&entries, &pair.spec.peer) {
                let why = format!("the resync after the restart was not started: {e}");
                self.stay_suspended(&pairs, &pair.spec.volume, &why);
                return;
            }
        }
        drop(entries);
        for (i, (pair, volume)) in pairs.iter().enumerate() {
            if let Err(e) = self.ask_secondary_again(&pair.spec, volume.size()).await {
                let why = format!("the resync after the restart failed: {e}");
                self.stay_suspended(&pairs, &pair.spec.volume, &why);
                self.asked_secondary(&pair.spec);
                // The secondaries asked already expect a resync: they
                // are told the pair stays suspended (and again, by the
                // recorder, until their servers answer).
                for (asked, _) in &pairs[..i] {
                    self.asked_secondary(&asked.spec);
                    let _ = self
                        .tell(
                            &asked.spec,
                            json!({"op": "state", "volume": asked.spec.peer_volume, "primary": asked.spec.volume,
                                   "state": PairState::Suspended, "reason": SuspendReason::PrimaryRestart,
                                   "stamp": self.stamp()}),
                        )
                        .await;
                }
                return;
            }
        }
        let entries = self.entries.lock().await;
        // Only a failback's hand-over can have changed a pair meanwhile
        // (the peer took it over, and refused to take it back).
        if let Some((pair, _)) = pairs.iter().find(|(p, _)| !still(&entries, p)) {
            let why = "the resync after the restart failed: the pair changed meanwhile";
            self.stay_suspended(&pairs, &pair.spec.volume, why);
        } else {
            for (pair, volume) in &pairs {
                self.start(pair, volume, PairState::DuplexPending).await;
            }
        }
        drop(entries);
        for (pair, _) in &pairs {
            self.asked_secondary(&pair.spec);
        }
        drop(operations);
    }

    /// The lock of the operations on `volume`'s pair (see
    /// [`PprcManager::operations`]).
    fn operation_lock(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(volume.to_string())
            .or_default()
            .clone()
    }

    /// Waits for the operations on `volume`'s pair under way to end, and
    /// holds their lock until the returned [`Operation`] is dropped.
    async fn operation(&self, volume: &str) -> Operation {
        Operation {
            _held: self.operation_lock(volume).lock_owned().await,
            changed: self.changed.clone(),
        }
    }

    /// Whether `pair` is still the pair of its volume in `entries` (not
    /// terminated, nor handed over by a failback meanwhile).
    fn is_entry(entries: &[Entry], pair: &Arc<Pair>) -> bool {
        entries
            .iter()
            .any(|e| matches!(e, Entry::Primary(p) if Arc::ptr_eq(p, pair)))
    }

    /// Says, in the log and in each pair's detail, why `pairs` stay
    /// suspended after a restart: `why` for `failed`, and for the other
    /// pairs of its consistency group that they resume only with it.
    fn stay_suspended(&self, pairs: &[(Arc<Pair>, Arc<Volume>)], failed: &str, why: &str) {
        for (pair, _) in pairs {
            let detail = if pair.spec.volume == failed {
                why.to_string()
            } else {
                format!("{failed} of its consistency group cannot resume: {why}")
            };
            tracing::warn!(volume = %pair.spec.volume, "PPRC pair stays suspended: {detail}");
            pair.explain(SuspendReason::PrimaryRestart, detail);
        }
    }

    fn volume(&self, id: &str) -> Result<Arc<Volume>, PairError> {
        self.server
            .lookup(id)
            .cloned()
            .ok_or_else(|| PairError::UnknownVolume(id.to_string()))
    }

    fn lss_props(&self, lss: u8) -> (bool, bool) {
        self.server
            .lss()
            .iter()
            .find(|l| l.id == lss)
            .map_or((false, false), |l| (l.critical_heavy, l.consistency_group))
    }

    fn new_pair(
        &self,
        spec: PairSpec,
        volume: &Volume,
        oos: TrackBitmap,
        status: Status,
    ) -> Arc<Pair> {
        let (heavy, grouped) = self.lss_props(spec.lss);
        let group = if grouped { self.group.clone() } else { None };
        let pair = Arc::new(Pair::new(
            spec,
            volume.store().clone(),
            self.server.track_size,
            oos,
            status,
            PairEnv {
                paths: self.paths.clone(),
                timeout: self.timeout,
                heavy,
                group: group.clone(),
                changed: self.changed.clone(),
            },
        ));
        if let Some(g) = group {
            g.join(&pair);
        }
        pair
    }

    fn publish_secondary(&self, side: &SecondarySide) {
        self.accepting
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                side.spec.volume.clone(),
                (side.spec.peer.clone(), side.accepting),
            );
    }

    /// Ends this server's secondary side of `vol`: its primary's changes
    /// are refused from now on, and hosts may write it once those that
    /// passed the secondary check are done (they hold the volume's gate).
    async fn end_secondary(&self, vol: &Volume) {
        self.unpublish_secondary(vol.name());
        let _quiet = vol.gate().write().await;
        vol.set_secondary(false);
    }

    fn unpublish_secondary(&self, volume: &str) {
        self.accepting
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
    }

    /// The next stamp of this run (see [`Stamp`]).
    fn stamp(&self) -> Stamp {
        Stamp {
            run: self.run,
            seq: self
                .stamped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1,
        }
    }

    /// Tells the secondary's server the pair's state, `status` as read
    /// when `stamp` was taken. True once that server answered (a refusal
    /// too: asking again would change nothing); false if there was no live
    /// link or no answer.
    async fn tell_state(&self, spec: &PairSpec, status: &Status, stamp: Stamp) -> bool {
        let Ok((route, at, link)) = self.live_link(spec) else {
            return false;
        };
        let request = json!({"op": "state", "volume": spec.peer_volume, "primary": spec.volume,
                             "state": status.state, "reason": status.reason, "stamp": stamp});
        match link.control(&request, LINK_TIMEOUT).await {
            Ok(_) => true,
            Err(LinkError::NoAnswer(_) | LinkError::WrongAnswer(_)) => false,
            Err(e) => {
                route.fail(at, &link, e.to_string());
                false
            }
        }
    }

    /// Sends a control request over the pair's path; `Ok(body)` or the
    /// peer's refusal.
    async fn tell(
        &self,
        spec: &PairSpec,
        request: serde_json::Value,
    ) -> Result<serde_json::Value, PairError> {
        let (route, at, link) = self.live_link(spec)?;
        let refused = |message: String| PairError::Peer {
            peer: spec.peer.clone(),
            message,
        };
        match link.control(&request, LINK_TIMEOUT).await {
            Ok(Ok(body)) => Ok(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)),
            Ok(Err(reason)) => Err(refused(reason)),
            // The link itself may be fine.
            Err(e @ (LinkError::NoAnswer(_) | LinkError::WrongAnswer(_))) => {
                Err(refused(e.to_string()))
            }
            Err(e) => {
                route.fail(at, &link, e.to_string());
                Err(refused(e.to_string()))
            }
        }
    }

    /// Asks the peer to take the secondary side of the pair (`resync`:
    /// back). Called under the pair's operation lock, which orders its
    /// stamp against the recorder's (see [`PprcManager::recorder`]).
    async fn ask_secondary(
        &self,
        spec: &PairSpec,
        size: u64,
        permit_online: bool,
        resync: bool,
    ) -> Result<(), PairError> {
        self.tell(
            spec,
            json!({"op": "become-secondary", "volume": spec.peer_volume, "primary": spec.volume,
                   "size": size, "permit_online": permit_online, "resync": resync,
                   "stamp": self.stamp()}),
        )
        .await
        .map(|_| ())
    }

    /// Asks the peer to take the pair back after this server restarted:
    /// only a volume that still holds its side of this very pair may (one
    /// terminated there meanwhile may have been written by hosts; a resync
    /// of this side's marks alone would leave the volumes different).
    /// Called under the pair's operation lock, as
    /// [`PprcManager::ask_secondary`].
    async fn ask_secondary_again(&self, spec: &PairSpec, size: u64) -> Result<(), PairError> {
        self.tell(
            spec,
            json!({"op": "become-secondary", "volume": spec.peer_volume, "primary": spec.volume,
                   "size": size, "permit_online": false, "resync": true, "restart": true,
                   "stamp": self.stamp()}),
        )
        .await
        .map(|_| ())
    }

    /// After the secondary of `spec` was asked to take the pair back (a
    /// resync, or this server's restart), answered or not: its side may
    /// have become duplex pending although the pair here stays suspended
    /// (the answer was lost), or may have been told a state the pair has
    /// again by the time the recorder looks (it suspended at once, with the
    /// same reason). The recorder tells it the pair's state again, until
    /// its server answers. Called once the pair is started, if it is.
    fn asked_secondary(&self, spec: &PairSpec) {
        self.retell
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(spec.volume.clone());
        self.changed.notify_one();
    }

    /// Starts mirroring in `state` (duplex or duplex pending).
    async fn start(&self, pair: &Arc<Pair>, volume: &Arc<Volume>, state: PairState) {
        pair.start_mirroring(state).await;
        let stop = pair.restart_tasks();
        tokio::spawn(pair.clone().run_cleaner(stop.clone()));
        if state == PairState::DuplexPending {
            pair.spawn_copier(volume.clone(), stop);
        }
    }

    fn describe(entry: &Entry) -> String {
        match entry {
            Entry::Primary(p) => format!(
                "the primary of a pair with {} {} ({})",
                p.spec.peer,
                p.spec.peer_volume,
                p.state().name()
            ),
            Entry::Secondary(s) => format!(
                "the secondary of a pair with {} {}",
                s.spec.peer, s.spec.peer_volume
            ),
        }
    }

    /// What `volume` is in `entries` now (see [`PprcManager::describe`]).
    fn describe_volume(entries: &[Entry], volume: &str) -> String {
        entries
            .iter()
            .find(|e| e.volume() == volume)
            .map_or("it is in no pair".to_string(), Self::describe)
    }

    /// Stops every pair's tasks (at shutdown). With `drained` (every host
    /// request answered, none can arrive), a duplex pair whose volumes are
    /// both flushed is recorded clean: its bitmap is cleared, so its
    /// restart resyncs nothing (see [`Pair::clean_at_stop`]). Otherwise,
    /// and for every other pair, its marks stay recorded.
    pub async fn shutdown(&self, drained: bool) {
        // Not under the entries lock: a clean stop flushes the secondaries.
        let entries = self.entries.lock().await.clone();
        for e in &entries {
            if let Entry::Primary(p) = e {
                p.stop_tasks();
                if drained {
                    match p.clean_at_stop().await {
                        Ok(true) => tracing::info!(
                            volume = %p.spec.volume,
                            "PPRC pair stopped in sync: nothing to copy after the restart"
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::warn!(
                            volume = %p.spec.volume,
                            reason = ?e.reason,
                            "PPRC pair keeps its recorded tracks: {e}"
                        ),
                    }
                }
                if let Err(e) = p.narrow().await {
                    tracing::warn!(volume = %p.spec.volume, "cannot narrow the out-of-sync bitmap: {e}");
                }
            }
        }
        let _ = self.save().await;
    }
}

#[cfg(test)]
mod tests {
    use super::Stamp;

    #[test]
    fn a_stamp_supersedes_earlier_ones_of_its_run_and_any_of_another_run() {
        let stamp = |run, seq| Stamp { run, seq };
        assert!(stamp(7, 1).supersedes(None));
        assert!(stamp(7, 5).supersedes(Some(stamp(7, 4))));
        assert!(!stamp(7, 4).supersedes(Some(stamp(7, 5))));
        assert!(!stamp(7, 5).supersedes(Some(stamp(7, 5))));
        assert!(stamp(8, 1).supersedes(Some(stamp(7, 5))));
        assert!(stamp(7, 1).supersedes(Some(stamp(8, 9))));
    }
}
