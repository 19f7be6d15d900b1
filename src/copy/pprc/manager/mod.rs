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
/// pair back): a message held on a slow link may arrive after later ones
/// sent over another, and must not undo them.
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
        let record = dir.join("pairs.json");
        let records: Vec<Record> = match std::fs::read(&record) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PairError::Corrupt {
                path: record.clone(),
                message: format!("cannot parse: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err(format!("cannot read {}", record.display()))(e)),
        };
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
            let volume = mgr
                .volume(&rec.spec.volume)
                .map_err(|_| PairError::Corrupt {
                    path: record.clone(),
                    message: format!("pair of {}: the volume is not configured", rec.spec.volume),
                })?;
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

    fn unpublish_secondary(&self, volume: &str) {
        self.accepting
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(volume);
    }

    /// Writes the record of every pair.
    async fn save(&self) -> Result<(), PairError> {
        let entries = self.entries.lock().await;
        self.save_locked(&entries)
    }

    fn save_locked(&self, entries: &[Entry]) -> Result<(), PairError> {
        let records: Vec<Record> = entries
            .iter()
            .map(|e| match e {
                Entry::Primary(p) => Record {
                    role: PairRole::Primary,
                    spec: p.spec.clone(),
                    status: p.status(),
                    bitmap: p
                        .oos()
                        .path()
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned()),
                    accepting: true,
                    bytes_sent: p.bytes_sent(),
                },
                Entry::Secondary(s) => Record {
                    role: PairRole::Secondary,
                    spec: s.spec.clone(),
                    status: s.status.clone(),
                    bitmap: s.handover.clone(),
                    accepting: s.accepting,
                    bytes_sent: 0,
                },
            })
            .collect();
        let mut bytes = serde_json::to_vec_pretty(&records).map_err(|e| PairError::Corrupt {
            path: self.dir.join("pairs.json"),
            message: format!("cannot encode: {e}"),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.dir.join("pairs.json"), &bytes, 0o600)?;
        Ok(())
    }

    /// Records status changes and tells secondaries about them.
    ///
    /// A secondary that could not be told (no live link, or no answer) is
    /// told again every [`RETELL_INTERVAL`] until its server answers, also
    /// after a restart of this server: otherwise a secondary whose primary
    /// suspended while the links were down would show itself duplex, and
    /// current, once they came back.
    ///
    /// Each pair's secondary is told in a task of its own, one tell at a
    /// time per pair (so it sees the pair's states in order): a peer that
    /// does not answer, which takes [`LINK_TIMEOUT`] to find out, does not
    /// hold up telling the secondaries on other peers.
    async fn recorder(self: Arc<Self>) {
        // Per volume, the pair last seen (a terminated pair's successor on
        // the same volume is new) and in what state; `seen` for the log,
        // `told` for what its secondary's server has answered.
        let mut seen: HashMap<String, Told> = HashMap::new();
        let mut told: HashMap<String, Told> = HashMap::new();
        // Volumes whose secondary is being told, and whether what it
        // answers still counts (not once its pair asked to be told again).
        let mut telling: HashMap<String, bool> = HashMap::new();
        // Volumes whose secondary's server could not be told: told again
        // on the next change or after [`RETELL_INTERVAL`].
        let mut untold: HashSet<String> = HashSet::new();
        let mut last_retry = tokio::time::Instant::now();
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel::<TellDone>();
        // The record could not be written (its file system full or
        // failing): written again every [`RETELL_INTERVAL`] until it is, so
        // that a crash after the file system recovers finds the pairs as
        // they are, not as they were (a freeze's suspensions among them).
        let mut unrecorded: Option<String> = None;
        loop {
            let retry_at = last_retry + RETELL_INTERVAL;
            let wake = tokio::select! {
                () = self.changed.notified() => Wake::Changed,
                Some(done) = answered.recv() => Wake::Answered(done),
                () = tokio::time::sleep_until(retry_at),
                    if !untold.is_empty() || unrecorded.is_some() => Wake::Retry,
            };
            let retry = !matches!(wake, Wake::Answered(_));
            if retry {
                last_retry = tokio::time::Instant::now();
            }
            if matches!(wake, Wake::Changed) || (retry && unrecorded.is_some()) {
                match self.save().await {
                    Ok(()) => {
                        if let Some(e) = unrecorded.take() {
                            tracing::warn!(
                                "PPRC pairs recorded again (the last record had failed: {e})"
                            );
                        }
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if unrecorded.as_ref() != Some(&e) {
                            tracing::error!(
                                "cannot record PPRC pairs: {e} (tried again every {}s)",
                                RETELL_INTERVAL.as_secs()
                            );
                        }
                        unrecorded = Some(e);
                    }
                }
            }
            match wake {
                Wake::Changed => {}
                Wake::Answered(TellDone {
                    volume,
                    told: entry,
                }) => {
                    let counts = telling.remove(&volume).unwrap_or(false);
                    match entry {
                        Some(entry) if counts => {
                            told.insert(volume, entry);
                        }
                        Some(_) => {}
                        None => {
                            untold.insert(volume);
                        }
                    }
                }
                Wake::Retry => {}
            }
            // Each status is stamped as it is read, under the pair's
            // operation lock: a request to take a pair back is stamped and
            // sent under it too, so the status told after one is read after
            // its outcome, and one read before is stamped earlier (the
            // secondary ignores it if it arrives later). A pair whose lock
            // an operation holds is passed over: once the operation ends
            // (see [`Operation`]) this loop looks at it again.
            let mut primaries = HashSet::new();
            let mut pairs: Vec<(Arc<Pair>, Status, Stamp)> = Vec::new();
            for e in self.entries.lock().await.iter() {
                let Entry::Primary(p) = e else { continue };
                primaries.insert(p.spec.volume.clone());
                if let Ok(_idle) = self.operation_lock(&p.spec.volume).try_lock() {
                    pairs.push((p.clone(), p.status(), self.stamp()));
                }
            }
            seen.retain(|v, _| primaries.contains(v));
            told.retain(|v, _| primaries.contains(v));
            untold.retain(|v| primaries.contains(v));
            for volume in
                std::mem::take(&mut *self.retell.lock().unwrap_or_else(|p| p.into_inner()))
            {
                told.remove(&volume);
                untold.remove(&volume);
                if let Some(counts) = telling.get_mut(&volume) {
                    *counts = false;
                }
            }
            for (pair, status, stamp) in pairs {
                let now = (status.state, status.reason);
                let is = |map: &HashMap<String, Told>| {
                    map.get(&pair.spec.volume)
                        .is_some_and(|(w, state, reason)| {
                            w.upgrade().is_some_and(|p| Arc::ptr_eq(&p, &pair))
                                && (*state, *reason) == now
                        })
                };
                let entry = (Arc::downgrade(&pair), now.0, now.1);
                if !is(&seen) {
                    seen.insert(pair.spec.volume.clone(), entry.clone());
                    if status.state == PairState::Suspended {
                        // Only the marks need to stay durable now: drop the
                        // regions kept for duplex writes.
                        if let Err(e) = pair.narrow().await {
                            tracing::warn!(volume = %pair.spec.volume, "cannot narrow the out-of-sync bitmap: {e}");
                        }
                    }
                    let detail = match status.reason {
                        Some(r) => format!(", {}", r.name()),
                        None => String::new(),
                    };
                    self.log.record(
                        "pprc.pair.state",
                        format!(
                            "{} → {} {}: {}{detail}",
                            pair.spec.volume,
                            pair.spec.peer,
                            pair.spec.peer_volume,
                            status.state.name()
                        ),
                        None,
                    );
                }
                let volume = &pair.spec.volume;
                // Told already; or being told (its answer wakes this loop,
                // which then tells the state the pair has by then); or
                // not reachable a moment ago, until the next change or retry.
                if is(&told) || telling.contains_key(volume) || (untold.contains(volume) && !retry)
                {
                    continue;
                }
                untold.remove(volume);
                telling.insert(volume.clone(), true);
                let (mgr, answers) = (self.clone(), answers.clone());
                tokio::spawn(async move {
                    let told = mgr
                        .tell_state(&pair.spec, &status, stamp)
                        .await
                        .then_some(entry);
                    let volume = pair.spec.volume.clone();
                    let _ = answers.send(TellDone { volume, told });
                });
            }
        }
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
            tokio::spawn(pair.clone().run_copier(volume.clone(), stop));
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

    /// Establishes a pair, or resumes a suspended one (`mode` resync).
    pub async fn establish(&self, req: &EstablishPair) -> Result<PairView, PairError> {
        let volume = self.volume(&req.volume)?;
        let secondary: VolumeId = req.secondary.parse()?;
        if secondary.serial == self.server.serial {
            return Err(PairError::SameServer(req.secondary.clone()));
        }
        let spec = PairSpec {
            volume: req.volume.clone(),
            peer: secondary.serial.to_string(),
            peer_volume: secondary.to_string(),
            lss: volume.info().id.lss,
            peer_lss: secondary.lss,
            critical: req.critical,
        };
        let _operation = self.operation(&req.volume).await;
        let entries = self.entries.lock().await;
        let existing = entries.iter().position(|e| e.volume() == req.volume);
        if let Some(i) = existing {
            let Entry::Primary(pair) = &entries[i] else {
                if let (Entry::Secondary(s), CopyOption::Resync) = (&entries[i], req.mode) {
                    // `pprc resume` given the secondary: say where to resume.
                    return Err(PairError::Invalid(format!(
                        "volume {} is the secondary of a pair with {} {}; a pair is resumed at its primary's server: essctl pprc resume {} on {}",
                        req.volume, s.spec.peer, s.spec.peer_volume, s.spec.peer_volume, s.spec.peer
                    )));
                }
                return Err(PairError::InPair {
                    volume: req.volume.clone(),
                    what: Self::describe(&entries[i]),
                });
            };
            let pair = pair.clone();
            if pair.spec.peer_volume != spec.peer_volume || req.mode != CopyOption::Resync {
                return Err(PairError::InPair {
                    volume: req.volume.clone(),
                    what: format!(
                        "{}{}",
                        Self::describe(&entries[i]),
                        if pair.spec.peer_volume == spec.peer_volume
                            && pair.state() == PairState::Suspended
                        {
                            "; resume it with mode resync"
                        } else {
                            ""
                        }
                    ),
                });
            }
            if pair.state() != PairState::Suspended {
                return Err(PairError::Invalid(format!(
                    "pair {} → {} is {}, not suspended",
                    req.volume,
                    spec.peer_volume,
                    pair.state().name()
                )));
            }
            // A volume that took over is brought back by a failback: a
            // resume would copy its own tracks only, never those its old
            // primary changed but did not mirror — and once an interrupted
            // failback made that volume the secondary, its side would take
            // the resync and the pair would go duplex with them different.
            if pair.status().reason == Some(SuspendReason::Failover) {
                return Err(PairError::Invalid(format!(
                    "pair {} → {} is suspended (failover): this volume took over, and only a \
                     failback copies the tracks {} changed but never mirrored too: essctl pprc \
                     failback {}",
                    req.volume, spec.peer_volume, spec.peer, req.volume
                )));
            }
            Self::check_mirror_limit(&entries, &spec.peer)?;
            self.check_path(&spec)?;
            drop(entries);
            // A request of a link that timed out must not land after the
            // resync's copy of its track.
            pair.await_unanswered()
                .await
                .map_err(|message| PairError::Peer {
                    peer: spec.peer.clone(),
                    message,
                })?;
            let asked = self
                .ask_secondary(&pair.spec, volume.size(), req.permit_online, true)
                .await;
            let entries = self.entries.lock().await;
            // Only a failback's hand-over can have changed the pair
            // meanwhile (its peer took it over).
            let still = Self::is_entry(&entries, &pair) && pair.state() == PairState::Suspended;
            // Resumes to other peers may have reached the limit meanwhile:
            // the secondary, asked already, is told the pair stays
            // suspended.
            let limit = Self::check_mirror_limit(&entries, &spec.peer);
            if asked.is_ok() && still && limit.is_ok() {
                self.start(&pair, &volume, PairState::DuplexPending).await;
            }
            self.asked_secondary(&pair.spec);
            asked?;
            limit?;
            if !still {
                return Err(PairError::Invalid(format!(
                    "pair {} → {} changed while its secondary was asked to take it back: {}",
                    req.volume,
                    spec.peer_volume,
                    Self::describe_volume(&entries, &req.volume)
                )));
            }
            self.save_locked(&entries)?;
            self.log.record(
                "pprc.pair.resync",
                format!(
                    "{} → {} {}: resync of {} out-of-sync track(s)",
                    req.volume,
                    spec.peer,
                    spec.peer_volume,
                    pair.marked()
                ),
                None,
            );
            return Ok(self.view_primary(&pair).await);
        }
        if req.mode == CopyOption::Resync {
            return Err(PairError::Invalid(format!(
                "volume {} has no suspended pair to resync; establish with mode copy or nocopy",
                req.volume
            )));
        }
        Self::check_new_pair(&entries, &spec.peer)?;
        self.check_path(&spec)?;
        drop(entries);
        self.ask_secondary(&spec, volume.size(), req.permit_online, false)
            .await?;
        let mut entries = self.entries.lock().await;
        // Meanwhile a peer's request may have made the volume a secondary,
        // or establishes to other peers reached the limit: the secondary's
        // side just made is ended again.
        let changed = match entries.iter().find(|e| e.volume() == req.volume) {
            Some(e) => Err(PairError::InPair {
                volume: req.volume.clone(),
                what: Self::describe(e),
            }),
            None => Self::check_new_pair(&entries, &spec.peer),
        };
        if let Err(e) = changed {
            drop(entries);
            let _ = self
                .tell(
                    &spec,
                    json!({"op": "terminate", "volume": spec.peer_volume, "primary": spec.volume}),
                )
                .await;
            return Err(e);
        }
        let tracks = volume.size().div_ceil(self.server.track_size);
        let file = format!("{}.oos", req.volume);
        let path = self.dir.join(&file);
        let _ = std::fs::remove_file(&path);
        let oos = TrackBitmap::create(&path, self.server.track_size, tracks)?;
        if req.mode == CopyOption::Copy {
            oos.set_range(0, tracks);
            oos.commit_bits()
                .await
                .map_err(io_err(format!("cannot write {}", path.display())))?;
        }
        let state = if req.mode == CopyOption::Copy {
            PairState::DuplexPending
        } else {
            PairState::Duplex
        };
        // Mirroring from the moment it is attached: no change is made on
        // this volume alone in between (with no copy, none would ever
        // reach the secondary).
        let pair = self.new_pair(spec.clone(), &volume, oos, new_status(state, None));
        {
            let _quiet = volume.gate().write().await;
            volume.attach_pprc(pair.clone());
        }
        self.start(&pair, &volume, state).await;
        entries.push(Entry::Primary(pair.clone()));
        self.save_locked(&entries)?;
        self.log.record(
            "pprc.pair.establish",
            format!(
                "{} → {} {} ({}{})",
                req.volume,
                spec.peer,
                spec.peer_volume,
                match req.mode {
                    CopyOption::Copy => "copy entire volume",
                    _ => "do not copy",
                },
                if req.critical { ", critical" } else { "" }
            ),
            None,
        );
        drop(entries);
        Ok(self.view_primary(&pair).await)
    }

    /// Refuses a new pair to `peer` that would make this server the
    /// primary of pairs with more than [`MAX_PEERS`] peers, or mirror to
    /// more than that many at once.
    fn check_new_pair(entries: &[Entry], peer: &str) -> Result<(), PairError> {
        let mut peers: Vec<&str> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Primary(p) => Some(p.spec.peer.as_str()),
                Entry::Secondary(_) => None,
            })
            .collect();
        peers.sort_unstable();
        peers.dedup();
        if !peers.contains(&peer) && peers.len() >= MAX_PEERS {
            return Err(PairError::Invalid(format!(
                "this server already mirrors to {} peers ({}); a primary server mirrors to at most {MAX_PEERS}",
                peers.len(),
                peers.join(", ")
            )));
        }
        Self::check_mirror_limit(entries, peer)
    }

    /// Refuses to start mirroring to `peer` (establish, resume, failback)
    /// while pairs of this server mirror (duplex or duplex pending) to
    /// [`MAX_PEERS`] other peers. A failover may leave this server with
    /// pairs with a fifth peer (a recovery site must be able to take over
    /// whatever else it mirrors); this keeps the peers it mirrors to at
    /// once within the limit.
    fn check_mirror_limit(entries: &[Entry], peer: &str) -> Result<(), PairError> {
        let mut peers: Vec<&str> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Primary(p)
                    if p.spec.peer != peer
                        && matches!(p.state(), PairState::Duplex | PairState::DuplexPending) =>
                {
                    Some(p.spec.peer.as_str())
                }
                _ => None,
            })
            .collect();
        peers.sort_unstable();
        peers.dedup();
        if peers.len() >= MAX_PEERS {
            return Err(PairError::MirrorLimit(
                peers.into_iter().map(str::to_string).collect(),
            ));
        }
        Ok(())
    }

    fn check_path(&self, spec: &PairSpec) -> Result<(), PairError> {
        self.live_link(spec).map(|_| ())
    }

    /// A live link of the pair's path (and where it sits in the route), or
    /// why there is none.
    fn live_link(
        &self,
        spec: &PairSpec,
    ) -> Result<(Arc<super::paths::Route>, usize, Arc<PeerLink>), PairError> {
        let route = self
            .paths
            .route(spec.lss, &spec.peer, spec.peer_lss)
            .ok_or_else(|| PairError::NoPath {
                lss: spec.lss,
                peer: spec.peer.clone(),
                peer_lss: spec.peer_lss,
            })?;
        let (at, link) = route.pick().ok_or_else(|| PairError::PathDown {
            lss: spec.lss,
            peer: spec.peer.clone(),
            peer_lss: spec.peer_lss,
        })?;
        Ok((route, at, link))
    }

    /// Removes the path `lss` → `peer` `peer_lss`. Refused while pairs of
    /// this server use it (as the path of their primary, in any state),
    /// naming them, unless `force`: their mirroring then stops as if every
    /// link were lost (they suspend, critical ones are write-inhibited), and
    /// a resume needs the path again.
    pub async fn remove_path(
        &self,
        lss: u8,
        peer: &str,
        peer_lss: u8,
        force: bool,
    ) -> Result<PathView, PathError> {
        // Held throughout: no pair is established over the path meanwhile.
        let entries = self.entries.lock().await;
        let mut pairs: Vec<String> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Primary(p)
                    if p.spec.lss == lss && p.spec.peer == peer && p.spec.peer_lss == peer_lss =>
                {
                    Some(format!(
                        "{} → {} ({})",
                        p.spec.volume,
                        p.spec.peer_volume,
                        p.state().name()
                    ))
                }
                _ => None,
            })
            .collect();
        pairs.sort();
        let exists = self.paths.view(lss, peer, peer_lss).await.is_some();
        if exists && !pairs.is_empty() && !force {
            return Err(PathError::InUse {
                lss,
                peer: peer.to_string(),
                peer_lss,
                pairs,
            });
        }
        let view = self.paths.remove(lss, peer, peer_lss, &pairs).await?;
        drop(entries);
        Ok(view)
    }

    /// Suspends a pair: from the primary (mirroring stops, changes are
    /// recorded) or from the secondary (it stops accepting changes; the
    /// primary suspends at its next change).
    pub async fn suspend(&self, volume: &str) -> Result<PairView, PairError> {
        let _operation = self.operation(volume).await;
        let mut entries = self.entries.lock().await;
        let entry = entries
            .iter_mut()
            .find(|e| e.volume() == volume)
            .ok_or_else(|| PairError::NoPair(volume.to_string()))?;
        match entry {
            Entry::Primary(pair) => {
                let pair = pair.clone();
                if !matches!(pair.state(), PairState::Duplex | PairState::DuplexPending) {
                    return Err(PairError::Invalid(format!(
                        "pair {volume} → {} is {}, not mirroring",
                        pair.spec.peer_volume,
                        pair.state().name()
                    )));
                }
                // Clear the marks of tracks already in sync first, so a
                // resync copies only what changes from now on (which
                // flushes the secondary: not under the entries lock).
                if pair.state() == PairState::Duplex {
                    drop(entries);
                    let _ = pair.clean(false).await;
                    entries = self.entries.lock().await;
                    if !Self::is_entry(&entries, &pair) {
                        return Err(PairError::NoPair(volume.to_string()));
                    }
                }
                pair.suspend(SuspendReason::Manual, None);
                self.save_locked(&entries)?;
                self.log.record(
                    "pprc.pair.suspend",
                    format!(
                        "{volume} → {} {} suspended",
                        pair.spec.peer, pair.spec.peer_volume
                    ),
                    None,
                );
                drop(entries);
                Ok(self.view_primary(&pair).await)
            }
            Entry::Secondary(side) => {
                side.accepting = false;
                side.status.state = PairState::Suspended;
                side.status.reason = Some(SuspendReason::Manual);
                side.status.since = SystemTime::now();
                let side = side.clone();
                self.publish_secondary(&side);
                self.save_locked(&entries)?;
                self.log.record(
                    "pprc.pair.suspend",
                    format!(
                        "secondary {volume} of {} {} suspended",
                        side.spec.peer, side.spec.peer_volume
                    ),
                    None,
                );
                Ok(self.view_secondary(&side))
            }
        }
    }

    /// Ends a pair. From the primary both sides become simplex (the
    /// secondary is told; if it cannot be reached it keeps its side until
    /// terminated there). From the secondary, its side ends and the volume
    /// is writable again — for a recovery site whose primary is gone, or
    /// a split mirror suspended first; a secondary still mirrored by a
    /// connected primary is refused (that primary would go on as if
    /// duplex while hosts write here).
    pub async fn terminate(&self, volume: &str) -> Result<PairView, PairError> {
        let _operation = self.operation(volume).await;
        let mut entries = self.entries.lock().await;
        let i = entries
            .iter()
            .position(|e| e.volume() == volume)
            .ok_or_else(|| PairError::NoPair(volume.to_string()))?;
        if let Entry::Secondary(side) = &entries[i] {
            let mirrored = matches!(
                side.status.state,
                PairState::Duplex | PairState::DuplexPending
            );
            if mirrored && super::secondary::links_from(&side.spec.peer).0 > 0 {
                return Err(PairError::Invalid(format!(
                    "{volume} is the {} secondary of {} {}, which is connected: suspend the \
                     pair first, terminate it at {}, or fail over here",
                    side.status.state.name(),
                    side.spec.peer,
                    side.spec.peer_volume,
                    side.spec.peer
                )));
            }
        }
        let vol = self.volume(volume)?;
        let mut view = match &entries[i] {
            Entry::Primary(pair) => self.view_primary(pair).await,
            Entry::Secondary(side) => self.view_secondary(side),
        };
        // Recorded first: if the record cannot be written nothing changes
        // (a pair ended here but still in the record would come back at
        // restart and resync only its marks, not what hosts wrote here
        // meanwhile); and a crash after the secondary was told must not
        // bring the pair back here at restart.
        let entry = entries.remove(i);
        if let Err(e) = self.save_locked(&entries) {
            entries.insert(i, entry);
            return Err(e);
        }
        match entry {
            Entry::Primary(pair) => {
                // Writes the consistency group holds for this pair go on
                // (they hold the gate).
                pair.terminate();
                // The view was taken before: the group holds its writes no
                // more.
                view.detail = pair.status().detail;
                {
                    let _quiet = vol.gate().write().await;
                    vol.detach_pprc();
                }
                drop(entries);
                let told = self
                    .tell(&pair.spec, json!({"op": "terminate", "volume": pair.spec.peer_volume, "primary": volume}))
                    .await;
                let _ = pair.oos().remove_file();
                self.log.record(
                    "pprc.pair.terminate",
                    format!(
                        "{volume} → {} {} terminated{}",
                        pair.spec.peer,
                        pair.spec.peer_volume,
                        match &told {
                            Ok(_) => String::new(),
                            Err(e) =>
                                format!(" here only (secondary not told: {e}; terminate it there)"),
                        }
                    ),
                    None,
                );
                if let Err(e) = told {
                    view.detail = Some(format!(
                        "secondary not told: {e}; terminate it on {}",
                        pair.spec.peer
                    ));
                }
            }
            Entry::Secondary(side) => {
                self.unpublish_secondary(volume);
                vol.set_secondary(false);
                if let Some(h) = &side.handover {
                    let _ = std::fs::remove_file(self.dir.join(h));
                }
                self.log.record(
                    "pprc.pair.terminate",
                    format!(
                        "secondary {volume} of {} {} terminated; the volume is writable",
                        side.spec.peer, side.spec.peer_volume
                    ),
                    None,
                );
            }
        }
        view.state = PairState::Simplex.name().into();
        view.replication_status = "not current".into();
        Ok(view)
    }

    /// Failover at the secondary's server, without contacting the
    /// primary: the secondary becomes the suspended primary of the
    /// reverse pair and records its own changes from now on.
    pub async fn failover(&self, volume: &str) -> Result<PairView, PairError> {
        let mut entries = self.entries.lock().await;
        let i = entries
            .iter()
            .position(|e| e.volume() == volume)
            .ok_or_else(|| PairError::NoPair(volume.to_string()))?;
        let Entry::Secondary(side) = &entries[i] else {
            return Err(PairError::Invalid(format!(
                "volume {volume} is {}; failover is done at the secondary",
                Self::describe(&entries[i])
            )));
        };
        let old = side.spec.clone();
        let vol = self.volume(volume)?;
        let peer_id: VolumeId = old.peer_volume.parse()?;
        let spec = PairSpec {
            volume: volume.to_string(),
            peer: old.peer.clone(),
            peer_volume: old.peer_volume.clone(),
            lss: vol.info().id.lss,
            peer_lss: peer_id.lss,
            critical: false,
        };
        let file = format!("{volume}.oos");
        let path = self.dir.join(&file);
        let _ = std::fs::remove_file(&path);
        let tracks = vol.size().div_ceil(self.server.track_size);
        let oos = TrackBitmap::create(&path, self.server.track_size, tracks)?;
        // A failback that was interrupted before its new primary fetched
        // this volume's hand-over bitmap: those tracks (changed here, never
        // mirrored) differ from the peer and stay marked.
        let handover = side.handover.clone();
        if let Some(h) = &handover {
            let old = TrackBitmap::open(&self.dir.join(h), self.server.track_size, tracks)?;
            for w in 0..old.words() {
                let mask = old.word(w);
                if mask != 0 {
                    oos.set_word(w, mask);
                }
            }
            oos.commit_bits()
                .await
                .map_err(io_err(format!("cannot write {}", path.display())))?;
        }
        let mut status = new_status(PairState::Suspended, Some(SuspendReason::Failover));
        status.detail = Some(format!("took over from {} {}", old.peer, old.peer_volume));
        let pair = self.new_pair(spec, &vol, oos, status);
        // Recorded before the volume takes over: if the record cannot be
        // written nothing changes (a volume written by hosts here that the
        // record still calls a secondary would be the secondary again at
        // restart, with those writes on it alone).
        let side = std::mem::replace(&mut entries[i], Entry::Primary(pair.clone()));
        if let Err(e) = self.save_locked(&entries) {
            entries[i] = side;
            pair.stop_tasks();
            let _ = pair.oos().remove_file();
            return Err(e);
        }
        {
            let _quiet = vol.gate().write().await;
            vol.attach_pprc(pair.clone());
            self.unpublish_secondary(volume);
            vol.set_secondary(false);
        }
        if let Some(h) = &handover {
            let _ = std::fs::remove_file(self.dir.join(h));
        }
        self.log.record(
            "pprc.pair.failover",
            format!(
                "{volume} took over from {} {}: suspended primary, recording changes",
                old.peer, old.peer_volume
            ),
            None,
        );
        drop(entries);
        Ok(self.view_primary(&pair).await)
    }

    /// Failback after a failover: the old primary becomes the secondary
    /// and hands over the tracks it changed but never mirrored; the union
    /// with this side's changes is copied to it.
    pub async fn failback(&self, volume: &str) -> Result<PairView, PairError> {
        let _operation = self.operation(volume).await;
        let entries = self.entries.lock().await;
        let Some(Entry::Primary(pair)) = entries.iter().find(|e| e.volume() == volume) else {
            return Err(match entries.iter().find(|e| e.volume() == volume) {
                Some(e) => PairError::Invalid(format!(
                    "volume {volume} is {}; failback is done at the volume that took over",
                    Self::describe(e)
                )),
                None => PairError::NoPair(volume.to_string()),
            });
        };
        let pair = pair.clone();
        if pair.state() != PairState::Suspended {
            return Err(PairError::Invalid(format!(
                "pair {volume} → {} is {}; failback starts from a suspended pair",
                pair.spec.peer_volume,
                pair.state().name()
            )));
        }
        // Any other suspended pair is resumed: a resume first waits for the
        // secondary to end links dropped with writes unanswered, which
        // could otherwise land over the copy of their tracks.
        let reason = pair.status().reason;
        if reason != Some(SuspendReason::Failover) {
            return Err(PairError::Invalid(format!(
                "pair {volume} → {} is suspended ({}), not taken over by a failover; failback is \
                 done at a volume that took over: resume this pair with essctl pprc resume {volume}",
                pair.spec.peer_volume,
                reason.map_or("no reason", SuspendReason::name)
            )));
        }
        Self::check_mirror_limit(&entries, &pair.spec.peer)?;
        let vol = self.volume(volume)?;
        self.check_path(&pair.spec)?;
        drop(entries);
        self.tell(
            &pair.spec,
            json!({"op": "failback", "volume": pair.spec.peer_volume, "primary": volume, "size": vol.size()}),
        )
        .await?;
        // Fetch the old primary's changes and add them to ours.
        let (_, _, link) = self.live_link(&pair.spec)?;
        let name = super::wire::volume_name(&pair.spec.peer_volume);
        let peer_err = |message: String| PairError::Peer {
            peer: pair.spec.peer.clone(),
            message,
        };
        let answer = tokio::time::timeout(
            LINK_TIMEOUT,
            link.call(Message::BitmapRequest { volume: name }),
        )
        .await
        .map_err(|_| peer_err("no bitmap within the link timeout".into()))?
        .map_err(|e| peer_err(e.to_string()))?;
        let handed = match answer {
            Message::Bitmap {
                tracks,
                track_size,
                bits,
                ..
            } => {
                if u64::from(track_size) != pair.track_size() {
                    return Err(peer_err(format!(
                        "its track size {track_size} differs from this server's {}",
                        pair.track_size()
                    )));
                }
                let oos = pair.oos();
                let mut added = 0;
                for (w, chunk) in bits.chunks(8).enumerate() {
                    let mut word = [0u8; 8];
                    word[..chunk.len()].copy_from_slice(chunk);
                    let mut mask = u64::from_le_bytes(word);
                    let first = w as u64 * 64;
                    if first >= tracks.min(oos.tracks()) {
                        break;
                    }
                    let limit = tracks.min(oos.tracks()) - first;
                    if limit < 64 {
                        mask &= (1u64 << limit) - 1;
                    }
                    if mask != 0 {
                        pair.import_marks(w, mask);
                        added += u64::from(mask.count_ones());
                    }
                }
                oos.commit_bits()
                    .await
                    .map_err(io_err(format!("cannot write {}", oos.path().display())))?;
                added
            }
            Message::Ack { error } => return Err(peer_err(super::pair::errno_name(error))),
            other => return Err(peer_err(format!("unexpected answer {other:?}"))),
        };
        let _ = self
            .tell(
                &pair.spec,
                json!({"op": "handover-done", "volume": pair.spec.peer_volume}),
            )
            .await;
        let entries = self.entries.lock().await;
        // Its operation lock keeps every request of this server off the
        // pair; only a failback of the peer's own could have changed it.
        if !Self::is_entry(&entries, &pair)
            || pair.state() != PairState::Suspended
            || pair.status().reason != Some(SuspendReason::Failover)
        {
            return Err(PairError::Invalid(format!(
                "pair {volume} → {} changed during the failback: {}",
                pair.spec.peer_volume,
                Self::describe_volume(&entries, volume)
            )));
        }
        // Copies to other peers may have started meanwhile: the failback
        // stops short (both sides suspended), to be run again.
        Self::check_mirror_limit(&entries, &pair.spec.peer)?;
        self.start(&pair, &vol, PairState::DuplexPending).await;
        self.save_locked(&entries)?;
        self.log.record(
            "pprc.pair.failback",
            format!(
                "{volume} → {} {}: copying {} track(s) ({handed} changed on {} before it stopped mirroring)",
                pair.spec.peer,
                pair.spec.peer_volume,
                pair.marked(),
                pair.spec.peer
            ),
            None,
        );
        drop(entries);
        Ok(self.view_primary(&pair).await)
    }

    /// Freezes the consistency group (see [`ConsistencyGroup::freeze`]).
    pub async fn freeze(&self) -> Result<(usize, GroupState), PairError> {
        let group = self.group.as_ref().ok_or_else(|| {
            PairError::Invalid("no LSS of this server is in a consistency group".into())
        })?;
        let n = group.freeze().await;
        self.log
            .record("pprc.freeze", format!("{n} pair(s) suspended"), None);
        Ok((n, group.state()))
    }

    /// Releases the consistency group's held writes.
    pub async fn unfreeze(&self) -> Result<(usize, GroupState), PairError> {
        let group = self.group.as_ref().ok_or_else(|| {
            PairError::Invalid("no LSS of this server is in a consistency group".into())
        })?;
        let n = group.unfreeze().await;
        self.log.record("pprc.unfreeze", "writes released", None);
        Ok((n, group.state()))
    }

    /// The server stops: a consistency group that holds writes is frozen
    /// (or, frozen on demand, released) at once, as by its timeout, and so
    /// is every hold until the process ends (see
    /// [`ConsistencyGroup::stop`]).
    pub async fn stop_group(&self) {
        let Some(group) = &self.group else {
            return;
        };
        match group.stop().await {
            Some((GroupState::Holding { .. }, n)) => self.log.record(
                "pprc.freeze",
                format!("server stopping: {n} pair(s) suspended, held writes released"),
                None,
            ),
            Some((GroupState::Frozen { .. }, _)) => self.log.record(
                "pprc.unfreeze",
                "server stopping: held writes released",
                None,
            ),
            Some((GroupState::Normal, _)) | None => {}
        }
    }

    /// The consistency group's state and volumes, if there is a group.
    pub fn group(&self) -> Option<(GroupState, Vec<String>)> {
        self.group.as_ref().map(|g| (g.state(), g.volumes()))
    }

    async fn view_primary(&self, pair: &Arc<Pair>) -> PairView {
        let status = pair.status();
        let tracks = pair.oos().tracks();
        let oos = pair.out_of_sync();
        let path = self
            .paths
            .view(pair.spec.lss, &pair.spec.peer, pair.spec.peer_lss)
            .await;
        // While the consistency group holds the pair's writes, its
        // secondary is not updated: the pair is not current, whatever its
        // state (which stays as it is until the freeze).
        let held = pair.group_hold();
        let current = status.state == PairState::Duplex && oos == 0 && held.is_none();
        PairView {
            volume: pair.spec.volume.clone(),
            role: PairRole::Primary,
            state: status.state.name().into(),
            reason: status.reason.map(|r| r.name().into()),
            detail: match (status.detail.clone(), held) {
                (Some(own), Some(held)) => Some(format!("{own}; {held}")),
                (own, held) => own.or(held),
            },
            since: rfc3339(status.since),
            peer: pair.spec.peer.clone(),
            // The path's address, else where [[peer]] says it listens
            // (a volume that took over by a failover has no path yet).
            peer_address: path.as_ref().map(|p| p.peer_address.clone()).or_else(|| {
                self.paths
                    .peer_address(&pair.spec.peer)
                    .map(|a| a.to_string())
            }),
            peer_volume: pair.spec.peer_volume.clone(),
            path,
            out_of_sync_tracks: oos,
            tracks,
            track_size: pair.track_size(),
            copied_percent: if tracks == 0 {
                100.0
            } else {
                (tracks - oos.min(tracks)) as f64 * 100.0 / tracks as f64
            },
            rate_tracks_per_second: pair.copy_rate(),
            bytes_sent: pair.bytes_sent(),
            copy_started: status.copy_started.map(rfc3339),
            copy_completed: status.copy_completed.map(rfc3339),
            critical: pair.spec.critical,
            write_inhibited: status.write_inhibited,
            consistency_group: self.lss_props(pair.spec.lss).1,
            replication_status: if current { "current" } else { "not current" }.into(),
            primary_links: None,
            primary_unreachable_since: None,
        }
    }

    fn view_secondary(&self, side: &SecondarySide) -> PairView {
        let tracks = self
            .server
            .lookup(&side.spec.volume)
            .map_or(0, |v| v.size().div_ceil(self.server.track_size));
        let in_sync = side.status.state == PairState::Duplex;
        // Without a link the primary may be writing on, suspended: this
        // side cannot know that it is current.
        let (links, last_ended) = super::secondary::links_from(&side.spec.peer);
        let current = in_sync && links > 0;
        PairView {
            volume: side.spec.volume.clone(),
            role: PairRole::Secondary,
            state: side.status.state.name().into(),
            reason: side.status.reason.map(|r| r.name().into()),
            detail: side.status.detail.clone(),
            since: rfc3339(side.status.since),
            peer: side.spec.peer.clone(),
            // Where the primary's server listens for this server's links
            // (a path back, e.g. for a failback).
            peer_address: self
                .paths
                .peer_address(&side.spec.peer)
                .map(|a| a.to_string()),
            peer_volume: side.spec.peer_volume.clone(),
            path: None,
            out_of_sync_tracks: 0,
            tracks,
            track_size: self.server.track_size,
            copied_percent: if in_sync { 100.0 } else { 0.0 },
            rate_tracks_per_second: None,
            bytes_sent: 0,
            copy_started: None,
            copy_completed: None,
            critical: side.spec.critical,
            write_inhibited: false,
            consistency_group: false,
            replication_status: if current { "current" } else { "not current" }.into(),
            primary_links: Some(links as u64),
            primary_unreachable_since: (links == 0)
                .then(|| rfc3339(last_ended.unwrap_or(self.server.started))),
        }
    }

    /// Every pair, both roles, by volume.
    pub async fn list(&self) -> Vec<PairView> {
        let entries: Vec<Entry> = self.entries.lock().await.clone();
        let mut out = Vec::new();
        for e in &entries {
            out.push(match e {
                Entry::Primary(p) => self.view_primary(p).await,
                Entry::Secondary(s) => self.view_secondary(s),
            });
        }
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }

    /// One volume's pair.
    pub async fn show(&self, volume: &str) -> Result<PairView, PairError> {
        self.list()
            .await
            .into_iter()
            .find(|v| v.volume == volume)
            .ok_or_else(|| {
                if self.server.lookup(volume).is_none() {
                    PairError::UnknownVolume(volume.to_string())
                } else {
                    PairError::NoPair(volume.to_string())
                }
            })
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

    /// Answers a peer's pair-management request.
    async fn handle(
        &self,
        peer: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let text = |k: &str| {
            request
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let volume = text("volume");
        let primary = text("primary");
        match text("op").as_str() {
            "become-secondary" => {
                self.become_secondary(peer, &volume, &primary, JoinRequest::of(request))
                    .await
            }
            "state" => {
                let mut entries = self.entries.lock().await;
                let mut drop_cache = false;
                let mut handed_over = None;
                if let Some(Entry::Secondary(side)) =
                    entries.iter_mut().find(|e| e.volume() == volume)
                {
                    let stamp = Stamp::of(request);
                    if side.spec.peer == peer
                        && side.accepting
                        && stamp.is_none_or(|s| s.supersedes(side.last_stamp))
                    {
                        if let Ok(state) = serde_json::from_value(request["state"].clone()) {
                            side.last_stamp = stamp.or(side.last_stamp);
                            // A copy ended (told duplex, perhaps without
                            // duplex pending first when it was short).
                            drop_cache = state == PairState::Suspended
                                || (state == PairState::Duplex
                                    && side.status.state != PairState::Duplex);
                            if state == PairState::Duplex {
                                // The copy has every track handed over, also
                                // when the primary's word of it got lost.
                                handed_over = side.handover.take();
                            }
                            side.status.state = state;
                            side.status.reason =
                                serde_json::from_value(request["reason"].clone()).unwrap_or(None);
                            side.status.since = SystemTime::now();
                        }
                    }
                }
                self.save_locked(&entries).map_err(|e| e.to_string())?;
                // Removed once the record no longer names it.
                if let Some(h) = handed_over {
                    let _ = std::fs::remove_file(self.dir.join(h));
                }
                if drop_cache {
                    self.drop_secondary_cache(&volume);
                }
                Ok(json!({}))
            }
            "terminate" => {
                let mut entries = self.entries.lock().await;
                let Some(i) = entries.iter().position(|e| {
                    matches!(e, Entry::Secondary(s) if s.spec.volume == volume && s.spec.peer == peer)
                }) else {
                    return Ok(json!({"note": "no such secondary"}));
                };
                entries.remove(i);
                self.unpublish_secondary(&volume);
                if let Some(v) = self.server.lookup(&volume) {
                    v.set_secondary(false);
                }
                self.save_locked(&entries).map_err(|e| e.to_string())?;
                self.log.record(
                    "pprc.pair.terminate",
                    format!("secondary {volume} of {peer} {primary} terminated by its primary"),
                    None,
                );
                Ok(json!({}))
            }
            "lss" => {
                let id = request.get("lss").and_then(|v| v.as_u64());
                match id {
                    Some(id) if self.server.lss().iter().any(|l| u64::from(l.id) == id) => {
                        Ok(json!({}))
                    }
                    Some(id) => Err(format!("no LSS 0x{id:02X} is configured")),
                    None => Err("an LSS request without an LSS".to_string()),
                }
            }
            "failback" => match request.get("size").and_then(|v| v.as_u64()) {
                Some(size) => self.hand_over(peer, &volume, &primary, size).await,
                None => Err("a failback request without the primary's size".to_string()),
            },
            "handover-done" => {
                let mut entries = self.entries.lock().await;
                let handed_over = match entries
                    .iter_mut()
                    .find(|e| e.volume() == volume)
                    .filter(|e| matches!(e, Entry::Secondary(s) if s.spec.peer == peer))
                {
                    Some(Entry::Secondary(side)) => side.handover.take(),
                    _ => None,
                };
                self.save_locked(&entries).map_err(|e| e.to_string())?;
                // Removed once the record no longer names it.
                if let Some(h) = handed_over {
                    let _ = std::fs::remove_file(self.dir.join(h));
                }
                Ok(json!({}))
            }
            other => Err(format!("unknown pair request {other:?}")),
        }
    }

    /// Drops a secondary's clean pages from the page cache, in the
    /// background, when its pair suspends or its copy is done (the copy
    /// ends with a flush, so then every page is clean). What comes next —
    /// mirrored host writes, or a resync of scattered tracks — is small
    /// writes; into the large page-cache folios a copy leaves, each costs
    /// several times a write into new pages, and write-back writes whole
    /// folios (on Linux 6.x ext4 a 1% resync took 24–27 ms instead of 16,
    /// and 4 KiB host writes right after an initial copy ran 3–4× slower
    /// with the primary's copy reads also leaving large folios).
    fn drop_secondary_cache(&self, volume: &str) {
        if let Some(v) = self.server.lookup(volume) {
            v.store().drop_cached_later(0, 0);
        }
    }

    async fn become_secondary(
        &self,
        peer: &str,
        volume: &str,
        primary: &str,
        asked: JoinRequest,
    ) -> Result<serde_json::Value, String> {
        let JoinRequest {
            size,
            permit_online,
            joining,
            stamp,
        } = asked;
        // By its ID only: pairs are recorded under the ID, so an alias
        // would get past the check that the volume is in no pair.
        let vol = self
            .server
            .lookup(volume)
            .filter(|v| v.name() == volume)
            .cloned()
            .ok_or_else(|| format!("volume {volume} is not defined on {}", self.server.serial))?;
        let mut entries = self.entries.lock().await;
        if let Some(e) = entries.iter_mut().find(|e| e.volume() == volume) {
            return match e {
                Entry::Secondary(side)
                    if side.spec.peer == peer
                        && side.spec.peer_volume == primary
                        && joining == Joining::Restart
                        && !side.accepting =>
                {
                    // An operator suspended this side; only an operator's
                    // resume at the primary ends that, not its restart.
                    Err(format!(
                        "secondary {volume} was suspended here; resume the pair at {peer}"
                    ))
                }
                Entry::Secondary(side)
                    if side.spec.peer == peer
                        && side.spec.peer_volume == primary
                        && !stamp.is_none_or(|s| s.supersedes(side.last_stamp)) =>
                {
                    // Held on a slow link: the primary gave up on it and
                    // has told this side the pair's state since.
                    tracing::warn!(
                        volume,
                        peer,
                        "ignored a late request to take the pair back: its primary told this \
                         side the pair's state since"
                    );
                    Err(format!(
                        "a late request of {peer}: it told secondary {volume} the pair's state \
                         since; nothing changed"
                    ))
                }
                Entry::Secondary(side)
                    if side.spec.peer == peer && side.spec.peer_volume == primary =>
                {
                    side.accepting = true;
                    side.last_stamp = stamp.or(side.last_stamp);
                    side.status = new_status(PairState::DuplexPending, None);
                    // The primary copies every track it recorded now.
                    vol.mirror_restarts();
                    let side = side.clone();
                    self.publish_secondary(&side);
                    self.save_locked(&entries).map_err(|e| e.to_string())?;
                    Ok(json!({}))
                }
                other => Err(format!(
                    "volume {volume} is already {}",
                    Self::describe(other)
                )),
            };
        }
        if joining != Joining::New {
            // Its side was terminated here: hosts may have written the
            // volume since, and no record says where, so copying the
            // primary's out-of-sync tracks alone could leave them different.
            return Err(format!(
                "volume {volume} is no longer the secondary of {peer} {primary} (its side was \
                 terminated here and the volume may have been written since); establish the \
                 pair again with mode copy"
            ));
        }
        if vol.size() < size {
            return Err(format!(
                "secondary {volume} ({} bytes) is smaller than primary {primary} ({size} bytes)",
                vol.size()
            ));
        }
        if vol.info().read_only {
            return Err(format!("secondary {volume} is configured read-only"));
        }
        if vol
            .flashcopy()
            .is_some_and(|fc| fc.role == crate::copy::flashcopy::Role::Target)
        {
            return Err(format!("volume {volume} is a FlashCopy target"));
        }
        if vol.clients() > 0 && !permit_online {
            return Err(format!(
                "secondary {volume} is in use by {} host connection(s); establish with \
                 --permit-online (API: \"permit_online\": true) to mirror to it anyway",
                vol.clients()
            ));
        }
        let primary_id: VolumeId = primary
            .parse()
            .map_err(|e: crate::volume::id::IdError| e.to_string())?;
        let side = SecondarySide {
            spec: PairSpec {
                volume: volume.to_string(),
                peer: peer.to_string(),
                peer_volume: primary.to_string(),
                lss: vol.info().id.lss,
                peer_lss: primary_id.lss,
                critical: false,
            },
            status: new_status(PairState::DuplexPending, None),
            accepting: true,
            handover: None,
            last_stamp: stamp,
        };
        {
            // Host changes that passed the access gate are done first; the
            // primary's copy must not be overwritten by one of them.
            let _quiet = vol.gate().write().await;
            vol.set_secondary(true);
        }
        self.publish_secondary(&side);
        entries.push(Entry::Secondary(Box::new(side)));
        self.save_locked(&entries).map_err(|e| e.to_string())?;
        self.log.record(
            "pprc.pair.secondary",
            format!("{volume} is the secondary of {peer} {primary}"),
            None,
        );
        Ok(json!({}))
    }

    /// The old primary's side of a failback: becomes the secondary of the
    /// volume that took over and keeps its out-of-sync bitmap for the
    /// hand-over.
    async fn hand_over(
        &self,
        peer: &str,
        volume: &str,
        primary: &str,
        size: u64,
    ) -> Result<serde_json::Value, String> {
        let mut entries = self.entries.lock().await;
        let i = entries
            .iter()
            .position(|e| e.volume() == volume)
            .ok_or_else(|| format!("volume {volume} is in no pair on {}", self.server.serial))?;
        let pair = match &entries[i] {
            Entry::Secondary(side)
                if side.spec.peer == peer && side.spec.peer_volume == primary =>
            {
                // Asked again after an interrupted failback.
                return Ok(json!({}));
            }
            Entry::Primary(p) if p.spec.peer == peer && p.spec.peer_volume == primary => p.clone(),
            other => return Err(format!("volume {volume} is {}", Self::describe(other))),
        };
        let vol = self.volume(volume).map_err(|e| e.to_string())?;
        if vol.size() < size {
            return Err(format!(
                "secondary {volume} ({} bytes) is smaller than primary {primary} ({size} bytes)",
                vol.size()
            ));
        }
        pair.suspend(
            SuspendReason::Failover,
            Some(format!("{peer} {primary} took over")),
        );
        pair.stop_tasks();
        // Writes the consistency group holds for this volume hold its
        // gate: they go on now, recorded (the pair is suspended), and the
        // hand-over below carries their tracks. The other pairs of the
        // group stay held until the freeze.
        pair.leave_group();
        {
            let _quiet = vol.gate().write().await;
            vol.detach_pprc();
            vol.set_secondary(true);
        }
        pair.narrow()
            .await
            .map_err(|e| format!("cannot write the out-of-sync bitmap: {e}"))?;
        let handover = format!("{volume}.handover");
        // Linked, not renamed: until the record below names the hand-over
        // file, the recorded primary's bitmap must still be there (a crash
        // in between left a record whose bitmap was missing, and essd
        // refused to start).
        let target = self.dir.join(&handover);
        let _ = std::fs::remove_file(&target);
        std::fs::hard_link(pair.oos().path(), &target)
            .map_err(|e| format!("cannot keep the out-of-sync bitmap: {e}"))?;
        let side = SecondarySide {
            spec: PairSpec {
                volume: volume.to_string(),
                peer: peer.to_string(),
                peer_volume: primary.to_string(),
                lss: pair.spec.lss,
                peer_lss: pair.spec.peer_lss,
                critical: false,
            },
            // Suspended until the primary says its copy started: a failback
            // that stops short of it leaves the pair suspended there, and
            // this side must not show a copy that is not running.
            status: new_status(PairState::Suspended, Some(SuspendReason::Failover)),
            accepting: true,
            handover: Some(handover),
            last_stamp: None,
        };
        self.publish_secondary(&side);
        entries[i] = Entry::Secondary(Box::new(side));
        self.save_locked(&entries).map_err(|e| e.to_string())?;
        let _ = pair.oos().remove_file();
        self.log.record(
            "pprc.pair.failback",
            format!(
                "{volume} is now the secondary of {peer} {primary}; {} changed track(s) handed over",
                pair.marked()
            ),
            None,
        );
        Ok(json!({"tracks": pair.marked()}))
    }

    async fn handover_bitmap(&self, peer: &str, volume: &str) -> Result<Message, u32> {
        let entries = self.entries.lock().await;
        let Some(Entry::Secondary(side)) = entries.iter().find(|e| e.volume() == volume) else {
            return Err(errno::EINVAL);
        };
        if side.spec.peer != peer {
            return Err(errno::EPERM);
        }
        let vol = self.server.lookup(volume).ok_or(errno::EINVAL)?;
        let tracks = vol.size().div_ceil(self.server.track_size);
        let bits = match &side.handover {
            Some(h) => {
                let bm = TrackBitmap::open(&self.dir.join(h), self.server.track_size, tracks)
                    .map_err(|_| errno::EIO)?;
                let mut bytes = Vec::with_capacity(tracks.div_ceil(8) as usize);
                for w in 0..bm.words() {
                    bytes.extend_from_slice(&bm.word(w).to_le_bytes());
                }
                bytes.truncate(tracks.div_ceil(8) as usize);
                bytes
            }
            None => vec![0u8; tracks.div_ceil(8) as usize],
        };
        let name = super::wire::volume_name(volume);
        Ok(Message::Bitmap {
            volume: name,
            track_size: self.server.track_size as u32,
            tracks,
            bits: Bytes::from(bits),
        })
    }
}

impl PeerRequests for PprcManager {
    fn accepts(&self, peer: &str, volume: &str) -> bool {
        self.accepting
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .is_some_and(|(p, ok)| p == peer && *ok)
    }

    fn refusal(&self, peer: &str, volume: &str) -> u32 {
        if self
            .accepting
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .is_some_and(|(p, _)| p == peer)
        {
            ESHUTDOWN
        } else {
            errno::EPERM
        }
    }

    fn control(self: Arc<Self>, peer: String, body: Bytes) -> BoxFuture<(u32, Bytes)> {
        Box::pin(async move {
            let request: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return (
                        errno::EINVAL,
                        Bytes::from(format!("malformed request: {e}")),
                    )
                }
            };
            match self.handle(&peer, &request).await {
                Ok(v) => (0, Bytes::from(v.to_string())),
                Err(message) => (errno::EINVAL, Bytes::from(message)),
            }
        })
    }

    fn bitmap(self: Arc<Self>, peer: String, volume: String) -> BoxFuture<Result<Message, u32>> {
        Box::pin(async move { self.handover_bitmap(&peer, &volume).await })
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
