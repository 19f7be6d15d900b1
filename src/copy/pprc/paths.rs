//! PPRC paths: one-way routes from an LSS here to an LSS on a peer, each
//! over 1–8 authenticated TCP links.
//!
//! Every link has a monitor task: it opens the link (hello and
//! authentication), sends a heartbeat every [`HEARTBEAT`], and when the link
//! fails records why and when and reopens it. A path with some links down
//! is degraded, not lost. Paths are recorded in `STATE_DIR/pprc/paths.json`
//! and reopened when the server starts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::link::{LinkError, PeerLink};
use super::wire::{Message, NONCE_LEN};
use crate::control::log::{rfc3339, EventLog};
use crate::state::{write_atomic, StateIoError};
use crate::volume::id::{Serial, LSS_MAX, LSS_MIN};

/// Interval between heartbeats (and between reconnection attempts).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Time a link has to open or to answer a heartbeat.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most links in one path.
pub const MAX_LINKS: usize = 8;

/// Why a path request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The local LSS is not configured.
    #[error("LSS 0x{0:02X} is not defined on this server")]
    UnknownLss(u8),
    /// The peer LSS is out of range.
    #[error("peer LSS 0x{0:02X} is outside 0x10..0x1F")]
    BadPeerLss(u8),
    /// The peer is not configured.
    #[error("peer {0} is not configured ([[peer]] in the configuration)")]
    UnknownPeer(String),
    /// No replication secret is configured.
    #[error("no replication secret is configured ([replication] secret)")]
    NoSecret,
    /// A path recorded in the state directory cannot be reopened: the
    /// configuration no longer has its peer, or no replication secret.
    #[error(
        "{record}: path 0x{lss:02X} → {peer} 0x{peer_lss:02X} needs {missing}, which the \
         configuration no longer has; put it back, start essd and remove the path (essctl pprc \
         path remove) before taking it out"
    )]
    RecordedPathUnserved {
        /// The path record.
        record: std::path::PathBuf,
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
        /// What the configuration lacks.
        missing: String,
    },
    /// Link count outside 1..=8.
    #[error("a path has 1 to {MAX_LINKS} links, not {0}")]
    BadLinks(usize),
    /// The path exists and neither option was given.
    #[error(
        "path 0x{lss:02X} → {peer} 0x{peer_lss:02X} already exists; establish with \
         --if-not-exists to keep it or --force to replace it (API: \"if_not_exists\" or \
         \"force\": true)"
    )]
    Exists {
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
    },
    /// No link could be opened.
    #[error("no link to {peer} at {address} could be opened: {reason}")]
    Unreachable {
        /// Peer serial.
        peer: String,
        /// Peer address.
        address: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The path record could not be written.
    #[error(transparent)]
    State(#[from] StateIoError),
    /// The path record could not be read.
    #[error("{0}")]
    Corrupt(String),
    /// The peer refused the path (it has no such LSS).
    #[error("{peer} refused the path: {reason}")]
    PeerRefused {
        /// Peer serial.
        peer: String,
        /// The peer's answer.
        reason: String,
    },
    /// Pairs use the path and its removal was not forced.
    #[error(
        "path 0x{lss:02X} → {peer} 0x{peer_lss:02X} is used by the pair(s) {}; terminate them \
         first, or remove it anyway with --force (API: ?force=true): they then stop mirroring \
         (they suspend, and critical ones are write-inhibited)",
        .pairs.join(", ")
    )]
    InUse {
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
        /// The pairs over the path, as `PRIMARY → SECONDARY (state)`.
        pairs: Vec<String>,
    },
    /// No such path.
    #[error("no path 0x{lss:02X} → {peer} 0x{peer_lss:02X}")]
    NotFound {
        /// Local LSS.
        lss: u8,
        /// Peer serial.
        peer: String,
        /// Peer LSS.
        peer_lss: u8,
    },
}

/// An establish-path request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRequest {
    /// Local LSS.
    pub lss: u8,
    /// Peer serial.
    pub peer: String,
    /// Peer LSS.
    pub peer_lss: u8,
    /// Number of links (default 1).
    #[serde(default = "one")]
    pub links: usize,
    /// Keep an existing path instead of failing.
    #[serde(default)]
    pub if_not_exists: bool,
    /// Replace an existing path.
    #[serde(default)]
    pub force: bool,
}

fn one() -> usize {
    1
}

/// One link's state.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LinkState {
    Up { since: SystemTime },
    Down { reason: String, since: SystemTime },
}

/// A link as shown by list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkView {
    /// `up` or `down`.
    pub state: String,
    /// Why the link is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when (RFC 3339).
    pub since: String,
}

/// A path as shown by list.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PathView {
    /// Local LSS, e.g. `0x10`.
    pub lss: String,
    /// Peer serial.
    pub peer: String,
    /// Peer replication address.
    pub peer_address: String,
    /// Peer LSS.
    pub peer_lss: String,
    /// `up` (all links), `degraded` (some) or `down` (none).
    pub state: String,
    /// Each link.
    pub links: Vec<LinkView>,
}

struct Slot {
    state: Mutex<LinkState>,
    link: Mutex<Option<Arc<PeerLink>>>,
}

impl Slot {
    fn new(state: LinkState, link: Option<PeerLink>) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(state),
            link: Mutex::new(link.map(Arc::new)),
        })
    }

    fn link(&self) -> Option<Arc<PeerLink>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn is_up(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            LinkState::Up { .. }
        )
    }

    /// The link's state, counting an up link whose connection has closed
    /// (not yet noticed by its monitor) as down since it closed.
    fn current(&self) -> LinkState {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let link = self.link();
        match state {
            LinkState::Up { .. } if !link.as_ref().is_some_and(|l| l.is_open()) => {
                let shut_down = link.as_ref().is_some_and(|l| l.peer_shut_down());
                LinkState::Down {
                    reason: if shut_down {
                        LinkError::PeerShutDown.to_string()
                    } else {
                        "the connection closed".into()
                    },
                    since: closed_since(link.as_deref()),
                }
            }
            other => other,
        }
    }

    /// Marks the link down (if `link` is still this slot's link) and
    /// drops it; the monitor reopens it.
    fn fail(&self, link: &Arc<PeerLink>, reason: String) {
        let mut current = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *current = None;
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = LinkState::Down {
                reason,
                since: SystemTime::now(),
            };
        }
    }
}

/// When a link that is no longer usable went down: when its connection
/// closed, if it did, else now.
fn closed_since(link: Option<&PeerLink>) -> SystemTime {
    link.and_then(PeerLink::closed_at)
        .unwrap_or_else(SystemTime::now)
}

/// The links of one path, for the data path: requests are spread over the
/// live links in turn.
pub struct Route {
    slots: Vec<Arc<Slot>>,
    next: std::sync::atomic::AtomicUsize,
    /// Links dropped because a request on them got no answer in time:
    /// what they carried may still reach the secondary.
    unanswered: Mutex<Vec<[u8; NONCE_LEN]>>,
}

impl Route {
    fn new(slots: Vec<Arc<Slot>>) -> Arc<Route> {
        Arc::new(Route {
            slots,
            next: Default::default(),
            unanswered: Default::default(),
        })
    }

    /// Records that a request on link `at` got no answer in time: the link
    /// is dropped and told goodbye (the secondary ends it once it has
    /// applied what it carried), and remembered until the secondary has
    /// confirmed that ([`Route::unanswered`]).
    pub async fn fail_unanswered(&self, at: usize, link: &Arc<PeerLink>, reason: String) {
        self.fail(at, link, reason);
        let _ = link.close().await;
        let id = link.peer().link_id;
        let mut unanswered = self.unanswered.lock().unwrap_or_else(|p| p.into_inner());
        if !unanswered.contains(&id) {
            unanswered.push(id);
        }
    }

    /// The links dropped with requests unanswered, not yet confirmed ended.
    pub fn unanswered(&self) -> Vec<[u8; NONCE_LEN]> {
        self.unanswered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The secondary has ended link `id` and applied all it carried.
    pub fn answered(&self, id: &[u8; NONCE_LEN]) {
        self.unanswered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|u| u != id);
    }

    /// The next live link, round robin; `None` when every link is down.
    pub fn pick(&self) -> Option<(usize, Arc<PeerLink>)> {
        self.open_links_in_turn().next()
    }

    /// The live link with the fewest requests in flight, in turn among
    /// equals; `None` when every link is down. For the copy's requests
    /// (up to 8 MiB in flight): strictly in turn, a slower link would
    /// gather most of them, and the last one queued there would miss the
    /// timeout waiting for those ahead of it, suspending the pair with
    /// every link working.
    pub fn pick_least_busy(&self) -> Option<(usize, Arc<PeerLink>)> {
        self.open_links_in_turn()
            .min_by_key(|(_, link)| link.in_flight())
    }

    /// The open links, starting with the next one's turn.
    fn open_links_in_turn(&self) -> impl Iterator<Item = (usize, Arc<PeerLink>)> + '_ {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..n).filter_map(move |i| {
            let at = (start + i) % n;
            self.slots[at]
                .link()
                .filter(|l| l.is_open())
                .map(|l| (at, l))
        })
    }

    /// Records that link `at` failed a request; the path goes on over the
    /// others.
    pub fn fail(&self, at: usize, link: &Arc<PeerLink>, reason: String) {
        tracing::warn!("peer link down: {reason}");
        self.slots[at].fail(link, reason);
    }

    /// Why the link that went down last is down, if one is.
    pub fn down_reason(&self) -> Option<String> {
        self.slots
            .iter()
            .filter_map(|s| match s.current() {
                LinkState::Down { reason, since } => Some((since, reason)),
                LinkState::Up { .. } => None,
            })
            .max()
            .map(|(_, reason)| reason)
    }

    /// Number of links that are up.
    pub fn live(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.current(), LinkState::Up { .. }))
            .count()
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("links", &self.slots.len())
            .finish()
    }
}

struct Path {
    lss: u8,
    peer: Serial,
    address: SocketAddr,
    peer_lss: u8,
    route: Arc<Route>,
    stop: CancellationToken,
}

impl Path {
    fn view(&self) -> PathView {
        let links: Vec<LinkView> = self
            .route
            .slots
            .iter()
            .map(|s| match s.current() {
                LinkState::Up { since } => LinkView {
                    state: "up".into(),
                    reason: None,
                    since: rfc3339(since),
                },
                LinkState::Down { reason, since } => LinkView {
                    state: "down".into(),
                    reason: Some(reason),
                    since: rfc3339(since),
                },
            })
            .collect();
        let up = links.iter().filter(|l| l.state == "up").count();
        PathView {
            lss: format!("0x{:02X}", self.lss),
            peer: self.peer.to_string(),
            peer_address: self.address.to_string(),
            peer_lss: format!("0x{:02X}", self.peer_lss),
            state: if up == links.len() {
                "up"
            } else if up == 0 {
                "down"
            } else {
                "degraded"
            }
            .into(),
            links,
        }
    }
}

/// One path in the persistent record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    lss: u8,
    peer: String,
    peer_lss: u8,
    links: usize,
}

/// (local LSS, peer serial, peer LSS).
type RouteKey = (u8, String, u8);

/// The paths of this server.
pub struct PathManager {
    record: std::path::PathBuf,
    serial: Serial,
    lss: Vec<u8>,
    peers: Vec<(Serial, SocketAddr)>,
    secret: Option<Arc<[u8]>>,
    log: Arc<EventLog>,
    paths: tokio::sync::Mutex<Vec<Path>>,
    /// The paths' links by (local LSS, peer serial, peer LSS).
    routes: std::sync::RwLock<Vec<(RouteKey, Arc<Route>)>>,
    /// Links of removed paths that were dropped with requests unanswered,
    /// by the path they belonged to: the path established again takes
    /// them over, so a resync over it still waits for them to end.
    retired: std::sync::Mutex<Vec<(RouteKey, Vec<[u8; NONCE_LEN]>)>>,
}

impl std::fmt::Debug for PathManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathManager")
            .field("serial", &self.serial)
            .finish()
    }
}

/// The path record's name in `STATE_DIR/pprc`.
const RECORD: &str = "paths.json";

/// Reads the path record at `path` (empty if there is none).
fn read_records(path: &std::path::Path) -> Result<Vec<Record>, PathError> {
    crate::state::read_record(path)
        .map(Option::unwrap_or_default)
        .map_err(|e| PathError::Corrupt(format!("{}: {e}", path.display())))
}

impl Record {
    /// The path's peer (serial and address) and the secret for its links;
    /// fails if the configuration no longer has them, saying how to take
    /// the path out properly.
    fn served_by<S: Clone>(
        &self,
        record: &std::path::Path,
        peers: &[(Serial, SocketAddr)],
        secret: Option<&S>,
    ) -> Result<((Serial, SocketAddr), S), PathError> {
        let unserved = |missing: String| PathError::RecordedPathUnserved {
            record: record.to_path_buf(),
            lss: self.lss,
            peer: self.peer.clone(),
            peer_lss: self.peer_lss,
            missing,
        };
        let peer = peers
            .iter()
            .find(|(s, _)| s.as_str() == self.peer)
            .cloned()
            .ok_or_else(|| unserved(format!("[[peer]] serial = \"{}\"", self.peer)))?;
        let secret = secret.ok_or_else(|| unserved("a [replication] secret".into()))?;
        Ok((peer, secret.clone()))
    }
}

/// Checks, changing nothing, that the configuration has the peer of every
/// path recorded in `state_dir` and a secret for their links, as a start
/// needs.
pub fn check_recorded(
    state_dir: &std::path::Path,
    peers: &[(Serial, SocketAddr)],
    secret: bool,
) -> Result<(), PathError> {
    let path = state_dir.join("pprc").join(RECORD);
    read_records(&path)?
        .iter()
        .try_for_each(|r| r.served_by(&path, peers, secret.then_some(&())).map(drop))
}

impl PathManager {
    /// A manager for this server's LSSs and configured peers; reopens the
    /// paths recorded in `state_dir` (their links connect in the background).
    pub fn open(
        state_dir: &std::path::Path,
        serial: Serial,
        lss: Vec<u8>,
        peers: Vec<(Serial, SocketAddr)>,
        secret: Option<Vec<u8>>,
        log: Arc<EventLog>,
    ) -> Result<Self, PathError> {
        let dir = state_dir.join("pprc");
        std::fs::create_dir_all(&dir)
            .map_err(|e| PathError::Corrupt(format!("cannot create {}: {e}", dir.display())))?;
        let record = dir.join(RECORD);
        let records = read_records(&record)?;
        let mut mgr = PathManager {
            record,
            serial,
            lss,
            peers,
            secret: secret.map(Arc::from),
            log,
            paths: tokio::sync::Mutex::new(Vec::new()),
            routes: Default::default(),
            retired: Default::default(),
        };
        let mut paths = Vec::new();
        for r in records {
            let ((peer, address), secret) =
                r.served_by(&mgr.record, &mgr.peers, mgr.secret.as_ref())?;
            let slots: Vec<Arc<Slot>> = (0..r.links)
                .map(|_| {
                    let state = LinkState::Down {
                        reason: "not connected yet".into(),
                        since: SystemTime::now(),
                    };
                    Slot::new(state, None)
                })
                .collect();
            let stop = spawn_monitors(&slots, address, &mgr.serial, &peer, &secret);
            paths.push(Path {
                lss: r.lss,
                peer,
                address,
                peer_lss: r.peer_lss,
                route: Route::new(slots),
                stop,
            });
        }
        mgr.publish(&paths);
        mgr.paths = tokio::sync::Mutex::new(paths);
        Ok(mgr)
    }

    fn save(&self, paths: &[Path]) -> Result<(), PathError> {
        let records: Vec<Record> = paths
            .iter()
            .map(|p| Record {
                lss: p.lss,
                peer: p.peer.to_string(),
                peer_lss: p.peer_lss,
                links: p.route.slots.len(),
            })
            .collect();
        let mut bytes = serde_json::to_vec_pretty(&records)
            .map_err(|e| PathError::Corrupt(format!("cannot encode paths: {e}")))?;
        bytes.push(b'\n');
        write_atomic(&self.record, &bytes, 0o600)?;
        Ok(())
    }

    /// Establishes a path, opening its links. Fails if no link opens.
    pub async fn establish(&self, req: &PathRequest) -> Result<PathView, PathError> {
        if !self.lss.contains(&req.lss) {
            return Err(PathError::UnknownLss(req.lss));
        }
        if !(LSS_MIN..=LSS_MAX).contains(&req.peer_lss) {
            return Err(PathError::BadPeerLss(req.peer_lss));
        }
        if !(1..=MAX_LINKS).contains(&req.links) {
            return Err(PathError::BadLinks(req.links));
        }
        let (peer, address) = self
            .peers
            .iter()
            .find(|(s, _)| s.as_str() == req.peer)
            .cloned()
            .ok_or_else(|| PathError::UnknownPeer(req.peer.clone()))?;
        let secret = self.secret.clone().ok_or(PathError::NoSecret)?;
        let mut paths = self.paths.lock().await;
        let same = |p: &Path| p.lss == req.lss && p.peer == peer && p.peer_lss == req.peer_lss;
        if let Some(existing) = paths.iter().find(|p| same(p)) {
            if req.if_not_exists {
                return Ok(existing.view());
            }
            if !req.force {
                return Err(PathError::Exists {
                    lss: req.lss,
                    peer: req.peer.clone(),
                    peer_lss: req.peer_lss,
                });
            }
        }
        let mut slots = Vec::new();
        let mut last_error = String::new();
        for _ in 0..req.links {
            let now = SystemTime::now();
            let (state, link) = match self.connect(address, &peer, &secret).await {
                Ok(link) => (LinkState::Up { since: now }, Some(link)),
                Err(e) => {
                    last_error = e.to_string();
                    (
                        LinkState::Down {
                            reason: last_error.clone(),
                            since: now,
                        },
                        None,
                    )
                }
            };
            slots.push(Slot::new(state, link));
        }
        let Some(link) = slots.iter().find_map(|s| s.link()) else {
            return Err(PathError::Unreachable {
                peer: req.peer.clone(),
                address,
                reason: last_error,
            });
        };
        Self::check_peer_lss(&link, &req.peer, address, req.peer_lss).await?;
        let route = Route::new(slots.clone());
        // Links of the path this one replaces (or of a removed one) that
        // were dropped with requests unanswered may still deliver them: a
        // resync over the new links must still wait for the secondary to
        // end them.
        let key = (req.lss, peer.to_string(), req.peer_lss);
        let retired = self.take_retired(&key);
        let mut unanswered = retired.clone();
        let replaced = if req.force {
            paths.iter().position(same)
        } else {
            None
        };
        if let Some(i) = replaced {
            unanswered.extend(paths[i].route.unanswered());
        }
        *route.unanswered.lock().unwrap_or_else(|p| p.into_inner()) = unanswered;
        let stop = spawn_monitors(&slots, address, &self.serial, &peer, &secret);
        let path = Path {
            lss: req.lss,
            peer,
            address,
            peer_lss: req.peer_lss,
            route,
            stop,
        };
        let view = path.view();
        // The old path goes only once the record says so: if it cannot be
        // written, the old path stays as it was and the new links close.
        let old = replaced.map(|i| (i, paths.remove(i)));
        paths.push(path);
        if let Err(e) = self.save(&paths) {
            if let Some(p) = paths.pop() {
                p.stop.cancel();
            }
            if let Some((i, old)) = old {
                paths.insert(i, old);
            }
            if !retired.is_empty() {
                self.retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((key, retired));
            }
            return Err(e);
        }
        if let Some((_, old)) = old {
            old.stop.cancel();
        }
        self.publish(&paths);
        self.log.record(
            "pprc.path.establish",
            format!(
                "path {} → {} {} over {} link(s), {}",
                view.lss, view.peer, view.peer_lss, req.links, view.state
            ),
            None,
        );
        Ok(view)
    }

    /// Asks the peer, over a link just opened, whether it has the path's
    /// LSS: a path to an LSS the peer lacks is refused at once rather than
    /// at the first pair over it.
    async fn check_peer_lss(
        link: &PeerLink,
        peer: &str,
        address: SocketAddr,
        peer_lss: u8,
    ) -> Result<(), PathError> {
        let request = serde_json::json!({"op": "lss", "lss": peer_lss});
        match link.control(&request, LINK_TIMEOUT).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(reason)) => Err(PathError::PeerRefused {
                peer: peer.to_string(),
                reason,
            }),
            Err(e) => Err(PathError::Unreachable {
                peer: peer.to_string(),
                address,
                reason: e.to_string(),
            }),
        }
    }

    async fn connect(
        &self,
        address: SocketAddr,
        peer: &Serial,
        secret: &[u8],
    ) -> Result<PeerLink, LinkError> {
        PeerLink::connect(address, &self.serial, peer, secret, LINK_TIMEOUT).await
    }

    /// Keeps the unanswered links of a path being removed for the path
    /// established again in its place.
    fn retire(&self, path: &Path) {
        let unanswered = path.route.unanswered();
        if !unanswered.is_empty() {
            let key = (path.lss, path.peer.to_string(), path.peer_lss);
            self.retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((key, unanswered));
        }
    }

    /// Takes the unanswered links of removed paths that were `key`.
    fn take_retired(&self, key: &RouteKey) -> Vec<[u8; NONCE_LEN]> {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = Vec::new();
        retired.retain(|(k, ids)| {
            if k == key {
                taken.extend_from_slice(ids);
            }
            k != key
        });
        taken
    }

    /// Removes a path, closing its links. `in_use` names the pairs that
    /// still use it (a forced removal; see
    /// [`PprcManager::remove_path`](super::manager::PprcManager::remove_path),
    /// which refuses an unforced one), for the event log.
    pub async fn remove(
        &self,
        lss: u8,
        peer: &str,
        peer_lss: u8,
        in_use: &[String],
    ) -> Result<PathView, PathError> {
        let mut paths = self.paths.lock().await;
        let Some(i) = paths
            .iter()
            .position(|p| p.lss == lss && p.peer.as_str() == peer && p.peer_lss == peer_lss)
        else {
            return Err(PathError::NotFound {
                lss,
                peer: peer.to_string(),
                peer_lss,
            });
        };
        let path = paths.remove(i);
        // Recorded first: if the record cannot be written the path stays,
        // its links watched and carrying its pairs' writes.
        if let Err(e) = self.save(&paths) {
            paths.insert(i, path);
            return Err(e);
        }
        path.stop.cancel();
        self.retire(&path);
        self.publish(&paths);
        for slot in &path.route.slots {
            let link = slot.link.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(link) = link {
                let _ = link.close().await;
            }
        }
        let view = path.view();
        self.log.record(
            "pprc.path.remove",
            if in_use.is_empty() {
                format!(
                    "path {} → {} {} removed",
                    view.lss, view.peer, view.peer_lss
                )
            } else {
                format!(
                    "path {} → {} {} removed by force; pairs over it: {}",
                    view.lss,
                    view.peer,
                    view.peer_lss,
                    in_use.join(", ")
                )
            },
            None,
        );
        Ok(view)
    }

    /// Makes `paths` the routes the data path sees.
    fn publish(&self, paths: &[Path]) {
        let routes = paths
            .iter()
            .map(|p| ((p.lss, p.peer.to_string(), p.peer_lss), p.route.clone()))
            .collect();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
    }

    /// The replication address configured for a peer (`[[peer]]`).
    pub fn peer_address(&self, peer: &str) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|(s, _)| s.as_str() == peer)
            .map(|(_, a)| *a)
    }

    /// The links of the path `lss` → `peer` `peer_lss`, if it exists
    /// (looked up on every mirrored request: no allocation).
    pub fn route(&self, lss: u8, peer: &str, peer_lss: u8) -> Option<Arc<Route>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|((l, p, pl), _)| *l == lss && p == peer && *pl == peer_lss)
            .map(|(_, r)| r.clone())
    }

    /// The view of one path, if it exists.
    pub async fn view(&self, lss: u8, peer: &str, peer_lss: u8) -> Option<PathView> {
        self.paths
            .lock()
            .await
            .iter()
            .find(|p| p.lss == lss && p.peer.as_str() == peer && p.peer_lss == peer_lss)
            .map(Path::view)
    }

    /// Every path with its links.
    pub async fn list(&self) -> Vec<PathView> {
        self.paths.lock().await.iter().map(Path::view).collect()
    }

    /// Closes every link (at shutdown).
    pub async fn shutdown(&self) {
        for path in self.paths.lock().await.iter() {
            path.stop.cancel();
        }
    }
}

/// Starts one monitor per link; the returned token stops them all.
fn spawn_monitors(
    slots: &[Arc<Slot>],
    address: SocketAddr,
    local: &Serial,
    peer: &Serial,
    secret: &Arc<[u8]>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    for slot in slots {
        tokio::spawn(monitor(
            slot.clone(),
            address,
            local.clone(),
            peer.clone(),
            secret.clone(),
            stop.clone(),
        ));
    }
    stop
}

/// Keeps one link open: heartbeats while up, reconnects while down.
async fn monitor(
    slot: Arc<Slot>,
    address: SocketAddr,
    local: Serial,
    peer: Serial,
    secret: Arc<[u8]>,
    stop: CancellationToken,
) {
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
        first = false;
        let current = slot.link();
        let outcome = match &current {
            Some(link) => {
                let beat = Message::Heartbeat {
                    unix_ms: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis() as u64,
                };
                // Queued behind the link's other requests: a busy link
                // that answers them is up, though the heartbeat waits.
                match link.answer_within(link.request(beat), LINK_TIMEOUT).await {
                    Ok(Ok(_)) if slot.is_up() => continue,
                    Ok(Ok(_)) => Ok(None),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no heartbeat answer within {LINK_TIMEOUT:?} (longer while the link \
                         answered other requests)"
                    )),
                }
            }
            None => PeerLink::connect(address, &local, &peer, &secret, LINK_TIMEOUT)
                .await
                .map(|link| Some(Arc::new(link)))
                .map_err(|e| e.to_string()),
        };
        if stop.is_cancelled() {
            return;
        }
        let mut link = slot.link.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(opened) => {
                if let Some(opened) = opened {
                    *link = Some(opened);
                }
                // A heartbeat answered on a link that a request failed
                // meanwhile: the link is gone, down for that reason.
                if link.is_some() {
                    tracing::info!(%peer, %address, "peer link up");
                    *state = LinkState::Up {
                        since: SystemTime::now(),
                    };
                }
            }
            Err(reason) => {
                let had = link.take();
                if had.is_some() || !matches!(*state, LinkState::Down { .. }) {
                    tracing::warn!(%peer, %address, "peer link down: {reason}");
                    *state = LinkState::Down {
                        reason,
                        since: closed_since(had.as_deref()),
                    };
                } else if let LinkState::Down { reason: r, .. } = &mut *state {
                    // Still down: keep the time it went down, refresh why.
                    *r = reason;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::pprc::link::handshake;
    use bytes::BytesMut;

    #[tokio::test]
    async fn a_link_whose_connection_closed_is_down_since_it_closed() {
        let limit = Duration::from_secs(5);
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let peer = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let me = Serial::new("FCB02").unwrap();
            handshake(&mut b, &mut buf, &me, None, b"s3cret", limit)
                .await
                .unwrap();
            b
        });
        let (me, them) = (Serial::new("FCA31").unwrap(), Serial::new("FCB02").unwrap());
        let link = PeerLink::open(a, &me, &them, b"s3cret", limit)
            .await
            .unwrap();
        let up_since = SystemTime::now();
        let slot = Slot::new(LinkState::Up { since: up_since }, Some(link));
        assert!(matches!(slot.current(), LinkState::Up { since } if since == up_since));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before_close = SystemTime::now();
        drop(peer.await.unwrap());
        while slot.link().is_some_and(|l| l.is_open()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let LinkState::Down { reason, since } = slot.current() else {
            panic!("a closed link counts as up");
        };
        assert_eq!(reason, "the connection closed");
        assert!(
            since >= before_close && since < SystemTime::now() - Duration::from_millis(150),
            "down since {since:?}: the link came up at {up_since:?}, closed after {before_close:?}"
        );
    }
}
