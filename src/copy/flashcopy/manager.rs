//! Establishing, withdrawing, listing and restoring FlashCopy
//! relationships, and their persistent record.
//!
//! The record (`STATE_DIR/flashcopy/relationships.json`) and one bitmap
//! file per relationship live in the state directory. Establish writes the
//! bitmap and then the record durably before the relationship takes effect;
//! withdraw detaches first and then rewrites the record, so after a crash
//! at any instant a relationship either exists with a bitmap that never
//! overstates what was copied, or not at all.
//!
//! Several pairs in one request share one T0: the I/O gates of every volume
//! involved are held exclusively while the relationships are attached, so
//! no write to any source lands between the first and the last attach.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::copier::{self, CopierEnd};
use super::{CopyMode, Relationship, Role};
use crate::control::log::{rfc3339, EventLog};
use crate::copy::bitmap::{BitmapError, TrackBitmap};
use crate::copy::pprc::group::GroupState;
use crate::state::{write_atomic, StateIoError};
use crate::volume::id::VolumeId;
use crate::volume::server::StorageServer;
use crate::volume::Volume;

/// Why a FlashCopy request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FlashCopyError {
    /// No such volume on this server.
    #[error("volume {0} does not exist on this server")]
    UnknownVolume(String),
    /// The volume belongs to another storage server.
    #[error("volume {volume} belongs to storage server {serial}, not {ours}: FlashCopy source and target must be on the same server")]
    OtherServer {
        /// Volume ID.
        volume: String,
        /// Its serial.
        serial: String,
        /// This server's serial.
        ours: String,
    },
    /// Source and target are the same volume.
    #[error("source and target are the same volume {0}")]
    SameVolume(String),
    /// A volume appears twice in one request.
    #[error("volume {0} appears more than once in the request")]
    Duplicate(String),
    /// The target is smaller than the source.
    #[error("target {target} ({target_size} bytes) is smaller than source {source_id} ({source_size} bytes)")]
    TargetTooSmall {
        /// Source ID.
        source_id: String,
        /// Source size.
        source_size: u64,
        /// Target ID.
        target: String,
        /// Target size.
        target_size: u64,
    },
    /// The volume is already in a relationship.
    #[error(
        "volume {volume} is already the {role} of FlashCopy relationship {source_id} → {target}"
    )]
    InRelationship {
        /// Volume ID.
        volume: String,
        /// Its role there.
        role: &'static str,
        /// The relationship's source.
        source_id: String,
        /// The relationship's target.
        target: String,
    },
    /// The target is a read-only volume.
    #[error("target {0} is a read-only volume")]
    ReadOnlyTarget(String),
    /// The target is the primary of a PPRC pair: a FlashCopy would change
    /// its content with no write its secondary could follow.
    #[error("target {target} is the primary of PPRC pair {target} → {peer} {peer_volume}: a FlashCopy onto it would leave its secondary different; terminate the pair first")]
    PprcPrimaryTarget {
        /// Target ID.
        target: String,
        /// The pair's secondary server.
        peer: String,
        /// The pair's secondary volume.
        peer_volume: String,
    },
    /// A volume is the primary of a PPRC pair whose consistency group
    /// holds writes: its held writes keep it from the quiet instant an
    /// establish (T0) or a withdraw needs until the group is frozen (or
    /// unfrozen).
    #[error("writes to {volume} are held by its PPRC consistency group ({state}): the FlashCopy needs them done; {release}, then try again")]
    HeldByGroup {
        /// Volume ID.
        volume: String,
        /// The group's state (`holding` or `frozen`).
        state: String,
        /// What releases them.
        release: String,
    },
    /// Withdrawing would change a target that is in a PPRC pair: its
    /// uncopied tracks would no longer read the source's T0 content, with
    /// no write the other side of the pair could follow.
    #[error("target {target} of {source_id} → {target} is in a PPRC pair and {uncopied} of its tracks are not copied yet: a withdraw would leave the pair's volumes different; terminate the pair first, or wait for the background copy")]
    MirroredTarget {
        /// The relationship's source.
        source_id: String,
        /// Target ID.
        target: String,
        /// Tracks still read from the source.
        uncopied: u64,
    },
    /// The target has NBD clients and the request did not permit it.
    #[error("target {target} has {clients} connected NBD client(s); disconnect them or permit establishing onto an online target")]
    TargetOnline {
        /// Target ID.
        target: String,
        /// Attached clients.
        clients: u64,
    },
    /// Nothing matched a withdraw selector.
    #[error("no FlashCopy relationship involves {0}")]
    NotFound(String),
    /// The request was empty or malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A bitmap file problem.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// The relationship record could not be written.
    #[error(transparent)]
    State(#[from] StateIoError),
    /// Another I/O problem.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The persistent record cannot be restored.
    #[error("{path}: {message}")]
    Corrupt {
        /// Record file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Options of an establish request.
#[derive(Clone, Copy, Debug)]
pub struct EstablishOptions {
    /// COPY (background copy) or NOCOPY.
    pub mode: CopyMode,
    /// Background copy limit in bytes per second; 0 = unlimited.
    pub rate: u64,
    /// Allow a target with connected NBD clients.
    pub permit_online: bool,
}

/// State shown for a relationship.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelationshipState {
    /// Background copy in progress.
    Copying,
    /// Background copy finished (the relationship is ending).
    Copied,
    /// NOCOPY: copies only tracks about to change.
    Nocopy,
    /// The background copy stopped on an error.
    Failed,
}

/// A relationship as shown by list and show.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RelationshipView {
    /// Source volume ID.
    pub source: String,
    /// Target volume ID.
    pub target: String,
    /// Current state.
    pub state: RelationshipState,
    /// `copy` or `nocopy`.
    pub mode: CopyMode,
    /// Background copy limit in MiB/s; `None` = unlimited.
    pub rate_mib_s: Option<f64>,
    /// T0 as RFC 3339.
    pub t0: String,
    /// T0 in seconds since the epoch.
    pub t0_unix: f64,
    /// Track size in bytes.
    pub track_size: u64,
    /// Tracks in the relationship.
    pub tracks_total: u64,
    /// Tracks whose T0 content is on the target.
    pub tracks_copied: u64,
    /// Tracks still read from the source.
    pub tracks_remaining: u64,
    /// Copied share, 0–100.
    pub percent: f64,
    /// Data bytes copied so far (holes excluded).
    pub bytes_copied: u64,
    /// Why the background copy failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RelationshipView {
    /// Snapshot of a live relationship.
    pub fn of(rel: &Relationship) -> Self {
        let total = rel.bitmap().tracks();
        let copied = rel.bitmap().count();
        let state = if rel.failure().is_some() {
            RelationshipState::Failed
        } else if rel.mode == CopyMode::NoCopy {
            RelationshipState::Nocopy
        } else if copied == total {
            RelationshipState::Copied
        } else {
            RelationshipState::Copying
        };
        RelationshipView {
            source: rel.source_id.clone(),
            target: rel.target_id.clone(),
            state,
            mode: rel.mode,
            rate_mib_s: (rel.rate() > 0).then(|| rel.rate() as f64 / (1 << 20) as f64),
            t0: rfc3339(rel.t0),
            t0_unix: rel
                .t0
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            track_size: rel.track_size,
            tracks_total: total,
            tracks_copied: copied,
            tracks_remaining: total - copied,
            percent: if total == 0 {
                100.0
            } else {
                copied as f64 * 100.0 / total as f64
            },
            bytes_copied: rel.bytes_copied(),
            error: rel.failure(),
        }
    }
}

/// One relationship in the persistent record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    source: String,
    target: String,
    mode: CopyMode,
    rate: u64,
    t0_unix_ns: u128,
    track_size: u64,
    tracks: u64,
    bitmap: String,
}

/// The persistent record file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RecordFile {
    relationships: Vec<Record>,
    /// Targets left incomplete by a withdraw before the copy finished.
    incomplete_targets: BTreeSet<String>,
}

struct Inner {
    rels: Vec<(Arc<Relationship>, Record)>,
    incomplete: BTreeSet<String>,
}

/// Owns every FlashCopy relationship of a server.
pub struct FlashCopyManager {
    server: Arc<StorageServer>,
    dir: PathBuf,
    log: Arc<EventLog>,
    inner: tokio::sync::Mutex<Inner>,
}

impl std::fmt::Debug for FlashCopyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlashCopyManager")
            .field("dir", &self.dir)
            .finish()
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FlashCopyError {
    let what = what.into();
    move |source| FlashCopyError::Io { what, source }
}

/// The relationship record's name in `STATE_DIR/flashcopy`.
const RECORD: &str = "relationships.json";

/// Reads the relationship record at `path` (empty if there is none).
fn read_record_file(path: &Path) -> Result<RecordFile, FlashCopyError> {
    crate::state::read_record(path)
        .map(Option::unwrap_or_default)
        .map_err(|e| FlashCopyError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

impl Record {
    /// Both volumes, as `lookup` finds them; fails if the configuration no
    /// longer has one, saying how to take it out properly.
    fn volumes<V>(
        &self,
        record: &Path,
        lookup: impl Fn(&str) -> Option<V>,
    ) -> Result<(V, V), FlashCopyError> {
        let find = |role: &str, volume: &str| {
            lookup(volume).ok_or_else(|| FlashCopyError::Corrupt {
                path: record.to_path_buf(),
                message: format!(
                    "relationship {} → {}: {role} {volume} is no longer in the configuration; \
                     put it back, start essd and withdraw the relationship (essctl flashcopy \
                     withdraw {}:{}) before taking it out",
                    self.source, self.target, self.source, self.target
                ),
            })
        };
        Ok((find("source", &self.source)?, find("target", &self.target)?))
    }
}

/// Checks, changing nothing, that every relationship recorded in
/// `state_dir` has both its volumes `configured`, as a start needs.
pub fn check_recorded(
    state_dir: &Path,
    configured: impl Fn(&str) -> bool,
) -> Result<(), FlashCopyError> {
    let path = state_dir.join("flashcopy").join(RECORD);
    read_record_file(&path)?
        .relationships
        .iter()
        .try_for_each(|rec| {
            rec.volumes(&path, |v| configured(v).then_some(()))
                .map(drop)
        })
}

impl FlashCopyManager {
    /// Opens the manager, restoring persisted relationships (their copiers
    /// resume where they stopped).
    pub async fn open(
        server: Arc<StorageServer>,
        state_dir: &Path,
        log: Arc<EventLog>,
    ) -> Result<Arc<Self>, FlashCopyError> {
        let dir = state_dir.join("flashcopy");
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        let path = dir.join(RECORD);
        let file = read_record_file(&path)?;
        let mgr = Arc::new(FlashCopyManager {
            server,
            dir,
            log,
            inner: tokio::sync::Mutex::new(Inner {
                rels: Vec::new(),
                incomplete: file.incomplete_targets.clone(),
            }),
        });
        let mut inner = mgr.inner.lock().await;
        for rec in file.relationships {
            let (source, target) = rec.volumes(&path, |v| mgr.server.lookup(v).cloned())?;
            let bitmap = TrackBitmap::open(&mgr.dir.join(&rec.bitmap), rec.track_size, rec.tracks)?;
            let t0 = UNIX_EPOCH + Duration::from_nanos(rec.t0_unix_ns as u64);
            let rel = Arc::new(Relationship::new(
                rec.source.clone(),
                rec.target.clone(),
                source.store().clone(),
                target.store().clone(),
                rec.mode,
                rec.rate,
                t0,
                rec.track_size,
                bitmap,
            ));
            source.attach_flashcopy(rel.clone(), Role::Source);
            target.attach_flashcopy(rel.clone(), Role::Target);
            mgr.log.record(
                "flashcopy.restore",
                format!(
                    "{} → {} restored ({} of {} tracks copied)",
                    rec.source,
                    rec.target,
                    rel.bitmap().count(),
                    rel.bitmap().tracks()
                ),
                None,
            );
            if rec.mode == CopyMode::Copy {
                mgr.spawn_copier(rel.clone());
            }
            inner.rels.push((rel, rec));
        }
        drop(inner);
        Ok(mgr)
    }

    fn own_volume(&self, id: &str) -> Result<Arc<Volume>, FlashCopyError> {
        if let Ok(parsed) = id.parse::<VolumeId>() {
            if parsed.serial != self.server.serial {
                return Err(FlashCopyError::OtherServer {
                    volume: id.to_string(),
                    serial: parsed.serial.to_string(),
                    ours: self.server.serial.to_string(),
                });
            }
        }
        self.server
            .lookup(id)
            .cloned()
            .ok_or_else(|| FlashCopyError::UnknownVolume(id.to_string()))
    }

    fn check_free(inner: &Inner, volume: &str) -> Result<(), FlashCopyError> {
        for (rel, _) in &inner.rels {
            let role = if rel.source_id == volume {
                "source"
            } else if rel.target_id == volume {
                "target"
            } else {
                continue;
            };
            return Err(FlashCopyError::InRelationship {
                volume: volume.to_string(),
                role,
                source_id: rel.source_id.clone(),
                target: rel.target_id.clone(),
            });
        }
        Ok(())
    }

    /// Establishes relationships for `pairs` (source, target) with one T0.
    /// Returns as soon as the relationships and bitmaps exist.
    pub async fn establish(
        self: &Arc<Self>,
        pairs: &[(String, String)],
        opts: EstablishOptions,
    ) -> Result<Vec<RelationshipView>, FlashCopyError> {
        let started = Instant::now();
        if pairs.is_empty() {
            return Err(FlashCopyError::BadRequest(
                "no source:target pair given".into(),
            ));
        }
        let mut inner = self.inner.lock().await;
        // Validate everything before touching anything.
        let mut seen = BTreeSet::new();
        let mut resolved = Vec::new();
        for (s, t) in pairs {
            let source = self.own_volume(s)?;
            let target = self.own_volume(t)?;
            let (sid, tid) = (source.name().to_string(), target.name().to_string());
            if sid == tid {
                return Err(FlashCopyError::SameVolume(sid));
            }
            for id in [&sid, &tid] {
                if !seen.insert(id.clone()) {
                    return Err(FlashCopyError::Duplicate(id.clone()));
                }
                Self::check_free(&inner, id)?;
            }
            if !target.writable() {
                return Err(FlashCopyError::ReadOnlyTarget(tid));
            }
            if target.size() < source.size() {
                return Err(FlashCopyError::TargetTooSmall {
                    source_id: sid,
                    source_size: source.size(),
                    target: tid,
                    target_size: target.size(),
                });
            }
            if !opts.permit_online && target.clients() > 0 {
                return Err(FlashCopyError::TargetOnline {
                    target: tid,
                    clients: target.clients(),
                });
            }
            resolved.push((source, target));
        }

        // Hold the I/O gates of every volume involved: T0 is one instant.
        let mut volumes: Vec<&Arc<Volume>> = resolved.iter().flat_map(|(s, t)| [s, t]).collect();
        volumes.sort_by(|a, b| a.name().cmp(b.name()));
        let mut gates = Vec::new();
        for v in &volumes {
            gates.push(quiet(v).await?);
        }
        // Under the gates: a pair attaches (and a volume becomes a
        // secondary) under its volume's gate, so none can slip in before
        // the relationship is attached.
        for (_, target) in &resolved {
            if let Some(pair) = target.pprc() {
                return Err(FlashCopyError::PprcPrimaryTarget {
                    target: target.name().to_string(),
                    peer: pair.spec.peer.clone(),
                    peer_volume: pair.spec.peer_volume.clone(),
                });
            }
            if !target.writable() {
                return Err(FlashCopyError::ReadOnlyTarget(target.name().to_string()));
            }
        }
        // Writes acknowledged before T0 become durable with it.
        for (source, _) in &resolved {
            source
                .store()
                .flush()
                .await
                .map_err(io_err(format!("flushing source {} at T0", source.name())))?;
        }
        let t0 = SystemTime::now();
        let track_size = self.server.track_size;
        let mut created = Vec::new();
        let result: Result<(), FlashCopyError> = async {
            for (source, target) in &resolved {
                let tracks = source.size().div_ceil(track_size);
                let name = format!(
                    "{}-{}-{}.bitmap",
                    source.name(),
                    target.name(),
                    t0.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
                );
                let bitmap = TrackBitmap::create(&self.dir.join(&name), track_size, tracks)?;
                let rel = Arc::new(Relationship::new(
                    source.name().to_string(),
                    target.name().to_string(),
                    source.store().clone(),
                    target.store().clone(),
                    opts.mode,
                    opts.rate,
                    t0,
                    track_size,
                    bitmap,
                ));
                let rec = Record {
                    source: rel.source_id.clone(),
                    target: rel.target_id.clone(),
                    mode: opts.mode,
                    rate: opts.rate,
                    t0_unix_ns: t0.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos(),
                    track_size,
                    tracks,
                    bitmap: name,
                };
                created.push((rel, rec));
            }
            let mut all: Vec<Record> = inner.rels.iter().map(|(_, r)| r.clone()).collect();
            all.extend(created.iter().map(|(_, r)| r.clone()));
            let mut incomplete = inner.incomplete.clone();
            for (_, t) in &resolved {
                incomplete.remove(t.name());
            }
            self.save(&all, &incomplete)?;
            inner.incomplete = incomplete;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            for (rel, _) in &created {
                let _ = rel.bitmap().remove_file();
            }
            return Err(e);
        }
        for ((source, target), (rel, _)) in resolved.iter().zip(&created) {
            source.attach_flashcopy(rel.clone(), Role::Source);
            target.attach_flashcopy(rel.clone(), Role::Target);
        }
        drop(gates);
        let mut views = Vec::new();
        for (rel, rec) in created {
            if rel.mode == CopyMode::Copy {
                self.spawn_copier(rel.clone());
            }
            views.push(RelationshipView::of(&rel));
            inner.rels.push((rel, rec));
        }
        let list: Vec<String> = views
            .iter()
            .map(|v| format!("{} → {}", v.source, v.target))
            .collect();
        self.log.record(
            "flashcopy.establish",
            format!(
                "established {} ({}, rate {}, T0 {})",
                list.join(", "),
                match opts.mode {
                    CopyMode::Copy => "background copy",
                    CopyMode::NoCopy => "nocopy",
                },
                if opts.rate == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{} B/s", opts.rate)
                },
                rfc3339(t0)
            ),
            Some(started.elapsed()),
        );
        Ok(views)
    }

    fn save(
        &self,
        records: &[Record],
        incomplete: &BTreeSet<String>,
    ) -> Result<(), FlashCopyError> {
        let file = RecordFile {
            relationships: records.to_vec(),
            incomplete_targets: incomplete.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| FlashCopyError::Corrupt {
            path: self.dir.join(RECORD),
            message: format!("cannot encode: {e}"),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.dir.join(RECORD), &bytes, 0o600)?;
        Ok(())
    }

    fn spawn_copier(self: &Arc<Self>, rel: Arc<Relationship>) {
        let mgr = Arc::downgrade(self);
        tokio::spawn(async move {
            let started = Instant::now();
            let end = copier::run(rel.clone()).await;
            let Some(mgr) = mgr.upgrade() else { return };
            match end {
                CopierEnd::Complete => mgr.finish(&rel, started.elapsed()).await,
                CopierEnd::Stopped => {}
                CopierEnd::Failed(msg) => {
                    mgr.log
                        .record("flashcopy.copy-failed", msg, Some(started.elapsed()))
                }
            }
        });
    }

    /// Ends a relationship whose background copy completed, once no PPRC
    /// consistency group holds writes to its volumes: the detach waits for
    /// their gates, which held writes keep until the freeze, and every
    /// FlashCopy request and every read of those volumes would wait
    /// behind it meanwhile.
    async fn finish(&self, rel: &Arc<Relationship>, took: Duration) {
        let mut inner = loop {
            let inner = self.inner.lock().await;
            if !inner.rels.iter().any(|(r, _)| Arc::ptr_eq(r, rel)) {
                return;
            }
            let mut held = None;
            for id in [&rel.source_id, &rel.target_id] {
                if let Some(v) = self.server.lookup(id) {
                    if quiet(v).await.is_err() {
                        held = Some(v.clone());
                        break;
                    }
                }
            }
            let Some(v) = held else { break inner };
            drop(inner);
            if let Some(pair) = v.pprc() {
                pair.group_gate().await;
            }
        };
        match self.detach(&mut inner, std::slice::from_ref(rel), false).await {
            Ok(()) => self.log.record(
                "flashcopy.end",
                format!(
                    "{} → {} background copy complete ({} bytes of data copied); relationship ended",
                    rel.source_id,
                    rel.target_id,
                    rel.bytes_copied()
                ),
                Some(took),
            ),
            Err(e) => tracing::error!("cannot end {} → {}: {e}", rel.source_id, rel.target_id),
        }
    }

    /// Removes relationships: rewrites the record (nothing changes if that
    /// fails), stops their background copiers and waits until they have,
    /// detaches them from their volumes (draining in-flight I/O), deletes
    /// the bitmaps.
    async fn detach(
        &self,
        inner: &mut Inner,
        rels: &[Arc<Relationship>],
        mark_incomplete: bool,
    ) -> Result<(), FlashCopyError> {
        // The record first: if it cannot be written nothing has changed
        // (the background copy goes on). A crash after it leaves the
        // relationships withdrawn, which is what was asked.
        // Judged by the copies recorded durably: a crash right after the
        // record must not leave a target called complete that lacks copies
        // not yet committed.
        let mut incomplete = inner.incomplete.clone();
        for rel in rels {
            if mark_incomplete && !rel.copied_durably().await {
                incomplete.insert(rel.target_id.clone());
            }
        }
        let remaining: Vec<Record> = inner
            .rels
            .iter()
            .filter(|(r, _)| !rels.iter().any(|x| Arc::ptr_eq(x, r)))
            .map(|(_, rec)| rec.clone())
            .collect();
        self.save(&remaining, &incomplete)?;
        inner.incomplete = incomplete;
        for rel in rels {
            rel.stop.cancel();
        }
        // A copier stops between chunks: wait, or the rest of its current
        // chunk would overwrite host writes to the detached target.
        for rel in rels {
            rel.copier_stopped.cancelled().await;
        }
        let mut volumes = Vec::new();
        for rel in rels {
            for id in [&rel.source_id, &rel.target_id] {
                if let Some(v) = self.server.lookup(id) {
                    volumes.push(v.clone());
                }
            }
        }
        volumes.sort_by(|a, b| a.name().cmp(b.name()));
        volumes.dedup_by(|a, b| a.name() == b.name());
        let mut gates = Vec::new();
        for v in &volumes {
            gates.push(v.gate().write().await);
        }
        for v in &volumes {
            v.detach_flashcopy();
        }
        inner
            .rels
            .retain(|(r, _)| !rels.iter().any(|x| Arc::ptr_eq(x, r)));
        drop(gates);
        for rel in rels {
            if let Err(e) = rel.bitmap().remove_file() {
                tracing::warn!(path = %rel.bitmap().path().display(), "cannot remove bitmap: {e}");
            }
        }
        Ok(())
    }

    /// Withdraws relationships selected by volume (source or target) or by
    /// `SOURCE:TARGET` pair.
    pub async fn withdraw(
        &self,
        selectors: &[String],
    ) -> Result<Vec<RelationshipView>, FlashCopyError> {
        let started = Instant::now();
        if selectors.is_empty() {
            return Err(FlashCopyError::BadRequest(
                "nothing to withdraw: name a volume or SOURCE:TARGET".into(),
            ));
        }
        let mut inner = self.inner.lock().await;
        let mut chosen: Vec<Arc<Relationship>> = Vec::new();
        for sel in selectors {
            let found: Vec<Arc<Relationship>> = inner
                .rels
                .iter()
                .map(|(r, _)| r)
                .filter(|r| self.matches(r, sel))
                .cloned()
                .collect();
            if found.is_empty() {
                return Err(FlashCopyError::NotFound(sel.clone()));
            }
            for r in found {
                if !chosen.iter().any(|c| Arc::ptr_eq(c, &r)) {
                    chosen.push(r);
                }
            }
        }
        // From here on no target becomes a PPRC primary (establish checks
        // this under the target's gate) until the withdraw is over.
        let _withdrawing = Withdrawing::mark(&chosen);
        for rel in &chosen {
            let mirrored = match self.server.lookup(&rel.target_id) {
                Some(target) => {
                    let _no_pair_attaches = quiet(target).await?;
                    target.pprc().is_some() || target.is_secondary()
                }
                None => false,
            };
            if mirrored && !rel.copied_durably().await {
                return Err(FlashCopyError::MirroredTarget {
                    source_id: rel.source_id.clone(),
                    target: rel.target_id.clone(),
                    uncopied: rel.bitmap().tracks() - rel.bitmap().count(),
                });
            }
        }
        // Refused before anything changes if a volume's writes are held by
        // its PPRC consistency group (the detach below would wait for them
        // until the freeze).
        for rel in &chosen {
            for id in [&rel.source_id, &rel.target_id] {
                if let Some(v) = self.server.lookup(id) {
                    drop(quiet(v).await?);
                }
            }
        }
        let views: Vec<RelationshipView> = chosen.iter().map(|r| RelationshipView::of(r)).collect();
        self.detach(&mut inner, &chosen, true).await?;
        for v in &views {
            let note = if v.tracks_remaining > 0 {
                format!(
                    "; {:.1}% of tracks were copied: target {} is incomplete",
                    v.percent, v.target
                )
            } else {
                String::new()
            };
            self.log.record(
                "flashcopy.withdraw",
                format!("withdrew {} → {}{note}", v.source, v.target),
                Some(started.elapsed()),
            );
        }
        Ok(views)
    }

    fn matches(&self, rel: &Relationship, selector: &str) -> bool {
        let canonical = |id: &str| {
            self.server
                .lookup(id)
                .map(|v| v.name().to_string())
                .unwrap_or_else(|| id.to_string())
        };
        match selector.split_once(':') {
            Some((s, t)) => rel.source_id == canonical(s) && rel.target_id == canonical(t),
            None => {
                let id = canonical(selector);
                rel.source_id == id || rel.target_id == id
            }
        }
    }

    /// Every relationship.
    pub async fn list(&self) -> Vec<RelationshipView> {
        let inner = self.inner.lock().await;
        inner
            .rels
            .iter()
            .map(|(r, _)| RelationshipView::of(r))
            .collect()
    }

    /// Relationships involving a volume or matching `SOURCE:TARGET`.
    pub async fn show(&self, selector: &str) -> Result<Vec<RelationshipView>, FlashCopyError> {
        let inner = self.inner.lock().await;
        let found: Vec<RelationshipView> = inner
            .rels
            .iter()
            .filter(|(r, _)| self.matches(r, selector))
            .map(|(r, _)| RelationshipView::of(r))
            .collect();
        if found.is_empty() {
            return Err(FlashCopyError::NotFound(selector.to_string()));
        }
        Ok(found)
    }

    /// Whether a withdraw left this volume's target copy incomplete.
    pub async fn is_incomplete(&self, volume: &str) -> bool {
        self.inner.lock().await.incomplete.contains(volume)
    }

    /// Every volume left incomplete by a withdraw.
    pub async fn incomplete_targets(&self) -> BTreeSet<String> {
        self.inner.lock().await.incomplete.clone()
    }

    /// Stops every background copier (at shutdown); bitmaps stay.
    pub async fn stop_copiers(&self) {
        let inner = self.inner.lock().await;
        for (rel, _) in &inner.rels {
            rel.stop.cancel();
        }
    }
}

/// Relationships marked as being withdrawn, until dropped.
struct Withdrawing<'a>(&'a [Arc<Relationship>]);

impl<'a> Withdrawing<'a> {
    fn mark(rels: &'a [Arc<Relationship>]) -> Self {
        for rel in rels {
            rel.set_withdrawing(true);
        }
        Withdrawing(rels)
    }
}

impl Drop for Withdrawing<'_> {
    fn drop(&mut self) {
        for rel in self.0 {
            rel.set_withdrawing(false);
        }
    }
}

/// How long a FlashCopy waits for a volume's gate while the volume's PPRC
/// consistency group holds writes before it is refused.
const HELD_GRACE: Duration = Duration::from_millis(500);

/// Takes `volume`'s gate exclusively: every change in progress is done.
/// Refused if it is the primary of a PPRC pair whose consistency group
/// holds writes that keep the gate (they wait for the freeze, or the
/// unfreeze, up to the consistency timeout).
async fn quiet(
    volume: &Arc<Volume>,
) -> Result<tokio::sync::RwLockWriteGuard<'_, ()>, FlashCopyError> {
    let Some(pair) = volume.pprc().filter(|p| p.in_group()) else {
        return Ok(volume.gate().write().await);
    };
    tokio::select! {
        gate = volume.gate().write() => Ok(gate),
        state = pair.group_held_for(HELD_GRACE) => {
            let (state, release) = match state {
                GroupState::Frozen { .. } => {
                    ("frozen", "unfreeze the group (essctl pprc unfreeze)")
                }
                _ => ("holding", "freeze the group (essctl pprc freeze)"),
            };
            Err(FlashCopyError::HeldByGroup {
                volume: volume.name().to_string(),
                state: state.into(),
                release: release.into(),
            })
        }
    }
}
