//! The record of every pair, `STATE_DIR/pprc/pairs.json`: written on
//! every change, and by the recorder task when a pair changes by itself;
//! read at start, when every pair's volume must be configured.

use super::*;

/// The pair record's name in `STATE_DIR/pprc`.
pub(super) const RECORD: &str = "pairs.json";

/// Reads the pair record at `path` (empty if there is none).
pub(super) fn read_records(path: &Path) -> Result<Vec<Record>, PairError> {
    crate::state::read_record(path)
        .map(Option::unwrap_or_default)
        .map_err(|e| PairError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Checks, changing nothing, that the volume of every pair recorded in
/// `state_dir` is `configured`, and that the pairs' bitmaps have tracks of
/// `track_size` bytes and, for a volume whose configured size is known
/// (`size`), as many as it has, as a start needs.
pub fn check_recorded(
    state_dir: &Path,
    track_size: u64,
    configured: impl Fn(&str) -> bool,
    size: impl Fn(&str) -> Option<u64>,
) -> Result<(), PairError> {
    let dir = state_dir.join("pprc");
    let path = dir.join(RECORD);
    read_records(&path)?.iter().try_for_each(|rec| {
        rec.volume(&path, |v| configured(v).then_some(()))?;
        rec.check_bitmap(&dir, track_size, size(&rec.spec.volume))
    })
}

impl Record {
    /// The pair's role here, and the command that ends it properly.
    fn terminate_hint(&self) -> (&'static str, String) {
        let spec = &self.spec;
        match self.role {
            PairRole::Primary => ("primary", format!("essctl pprc terminate {}", spec.volume)),
            PairRole::Secondary => (
                "secondary",
                format!(
                    "essctl pprc terminate {} at {}",
                    spec.peer_volume, spec.peer
                ),
            ),
        }
    }

    /// Checks that the pair's bitmap in `dir`, if it has one, is of
    /// `track_size` tracks and, when the volume's size is known, as many
    /// as it has: a changed `server.track_size` or volume size would make
    /// the recorded tracks mean other bytes.
    pub(super) fn check_bitmap(
        &self,
        dir: &Path,
        track_size: u64,
        size: Option<u64>,
    ) -> Result<(), PairError> {
        let Some(file) = &self.bitmap else {
            return Ok(());
        };
        let path = dir.join(file);
        if self.role == PairRole::Secondary && !path.exists() {
            // A hand-over bitmap a failback already took, or lost: the
            // failover that would use it says so; the start goes on.
            return Ok(());
        }
        let (found_size, found_tracks) = TrackBitmap::read_shape(&path)?;
        let changed = if found_size != track_size {
            format!("tracks of {found_size} bytes, and server.track_size is now {track_size}")
        } else {
            match size.map(|s| (s, s.div_ceil(track_size))) {
                Some((bytes, tracks)) if tracks != found_tracks => format!(
                    "{found_tracks} tracks, and volume {} now has {tracks} ({bytes} bytes)",
                    self.spec.volume
                ),
                _ => return Ok(()),
            }
        };
        let (role, terminate) = self.terminate_hint();
        Err(PairError::Corrupt {
            path,
            message: format!(
                "the out-of-sync bitmap of {role} {} of the pair with {} {} has {changed}; put \
                 the old setting back, start essd and terminate the pair ({terminate}) before \
                 changing it",
                self.spec.volume, self.spec.peer, self.spec.peer_volume
            ),
        })
    }

    /// The pair's volume here, as `lookup` finds it; fails if the
    /// configuration no longer has it, saying how to take it out properly.
    pub(super) fn volume<V>(
        &self,
        record: &Path,
        lookup: impl Fn(&str) -> Option<V>,
    ) -> Result<V, PairError> {
        if let Some(volume) = lookup(&self.spec.volume) {
            return Ok(volume);
        }
        let spec = &self.spec;
        let (role, terminate) = self.terminate_hint();
        Err(PairError::Corrupt {
            path: record.to_path_buf(),
            message: format!(
                "{role} {} of the pair with {} {} is no longer in the configuration; put it \
                 back, start essd and terminate the pair ({terminate}) before taking it out",
                spec.volume, spec.peer, spec.peer_volume
            ),
        })
    }
}

impl PprcManager {
    /// Writes the record of every pair.
    pub(super) async fn save(&self) -> Result<(), PairError> {
        let entries = self.entries.lock().await;
        self.save_locked(&entries)
    }

    pub(super) fn save_locked(&self, entries: &[Entry]) -> Result<(), PairError> {
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
            path: self.dir.join(RECORD),
            message: format!("cannot encode: {e}"),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.dir.join(RECORD), &bytes, 0o600)?;
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
    pub(super) async fn recorder(self: Arc<Self>) {
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
}
