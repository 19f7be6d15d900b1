//! The operator's pair requests at this server: establish (and resume),
//! suspend, terminate, remove path, and the consistency group's freeze
//! and unfreeze.

use super::*;
use crate::copy::pprc::{pair, paths, secondary};

impl PprcManager {
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
            // Nor may the last activation's copier, still settling its
            // copies, move the resync's cursor.
            pair.await_copier_ended().await;
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
        // Not a turn of its links: the request to the secondary takes the
        // next one.
        let route = self.route_of(&spec)?;
        drop(entries);
        // A request of an earlier pair on these volumes, stalled on a link
        // that timed out, must not land after the copy of its track.
        pair::await_unanswered_on(&route, self.timeout)
            .await
            .map_err(|message| PairError::Peer {
                peer: spec.peer.clone(),
                message,
            })?;
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
        // Whatever fails from here on, the secondary's side just made is
        // ended again, so that no volume stays protected without a pair.
        // Under the volume's gate until the pair is attached: mirroring
        // from the moment it is (no change is made on this volume alone in
        // between; with no copy, none would ever reach the secondary), and
        // no FlashCopy withdraw of it as a target, which checks under the
        // gate that it is no primary, goes on meanwhile.
        let gate = match &changed {
            Ok(()) => Some(volume.gate().write().await),
            Err(_) => None,
        };
        let made = async {
            changed?;
            if volume.is_flashcopy_target_withdrawn() {
                return Err(PairError::Invalid(format!(
                    "volume {} is the target of a FlashCopy relationship being withdrawn; \
                     establish the pair once the withdraw has ended",
                    req.volume
                )));
            }
            let pair = self.new_primary(&spec, &volume, req.mode).await?;
            // Recorded before it mirrors: a pair that cannot be recorded
            // is not made.
            entries.push(Entry::Primary(pair.clone()));
            if let Err(e) = self.save_locked(&entries) {
                entries.pop();
                let _ = pair.oos().remove_file();
                return Err(e);
            }
            Ok(pair)
        }
        .await;
        let pair = match made {
            Ok(pair) => {
                volume.attach_pprc(pair.clone());
                drop(gate);
                pair
            }
            Err(e) => {
                drop(gate);
                drop(entries);
                let _ = self
                    .tell(
                        &spec,
                        json!({"op": "terminate", "volume": spec.peer_volume, "primary": spec.volume,
                               "stamp": self.stamp()}),
                    )
                    .await;
                return Err(e);
            }
        };
        let state = pair.state();
        self.start(&pair, &volume, state).await;
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
    pub(super) fn check_mirror_limit(entries: &[Entry], peer: &str) -> Result<(), PairError> {
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

    /// A new primary pair of `volume` (not attached, not started), with its
    /// out-of-sync bitmap: every track marked for a full copy, none
    /// without.
    async fn new_primary(
        &self,
        spec: &PairSpec,
        volume: &Arc<Volume>,
        mode: CopyOption,
    ) -> Result<Arc<Pair>, PairError> {
        let tracks = volume.size().div_ceil(self.server.track_size);
        let path = self.dir.join(format!("{}.oos", spec.volume));
        let _ = std::fs::remove_file(&path);
        let oos = TrackBitmap::create(&path, self.server.track_size, tracks)?;
        let state = if mode == CopyOption::Copy {
            oos.set_range(0, tracks);
            if let Err(e) = oos.commit_bits().await {
                let _ = oos.remove_file();
                return Err(io_err(format!("cannot write {}", path.display()))(e));
            }
            PairState::DuplexPending
        } else {
            PairState::Duplex
        };
        Ok(self.new_pair(spec.clone(), volume, oos, new_status(state, None)))
    }

    /// Refuses when the pair's path is missing or down; not a turn of its
    /// links (the request that follows takes the next one).
    pub(super) fn check_path(&self, spec: &PairSpec) -> Result<(), PairError> {
        if self.route_of(spec)?.live() == 0 {
            return Err(Self::path_down(spec));
        }
        Ok(())
    }

    fn path_down(spec: &PairSpec) -> PairError {
        PairError::PathDown {
            lss: spec.lss,
            peer: spec.peer.clone(),
            peer_lss: spec.peer_lss,
        }
    }

    /// A live link of the pair's path (and where it sits in the route), or
    /// why there is none.
    pub(super) fn live_link(
        &self,
        spec: &PairSpec,
    ) -> Result<(Arc<paths::Route>, usize, Arc<PeerLink>), PairError> {
        let route = self.route_of(spec)?;
        let (at, link) = route.pick().ok_or_else(|| Self::path_down(spec))?;
        Ok((route, at, link))
    }

    /// The path of the pair `spec`, up or down.
    fn route_of(&self, spec: &PairSpec) -> Result<Arc<paths::Route>, PairError> {
        self.paths
            .route(spec.lss, &spec.peer, spec.peer_lss)
            .ok_or_else(|| PairError::NoPath {
                lss: spec.lss,
                peer: spec.peer.clone(),
                peer_lss: spec.peer_lss,
            })
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
            if mirrored && secondary::links_from(&side.spec.peer).0 > 0 {
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
                    // A failback's hand-over that failed may have left the
                    // volume protected as a secondary.
                    vol.set_secondary(false);
                }
                drop(entries);
                let told = self
                    .tell(&pair.spec, json!({"op": "terminate", "volume": pair.spec.peer_volume, "primary": volume,
                                         "stamp": self.stamp()}))
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
                self.end_secondary(&vol).await;
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
}
