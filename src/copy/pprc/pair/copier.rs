//! The background copy of a duplex pending pair (initial copy and resync):
//! the marked tracks, run by run, each under its track locks.

use super::*;

impl Pair {
    /// Starts the background copy of this activation (see
    /// [`Pair::run_copier`]).
    pub fn spawn_copier(self: &Arc<Self>, volume: Arc<Volume>, stop: CancellationToken) {
        let copier = tokio::spawn(self.clone().run_copier(volume, stop));
        *self.copier.lock().unwrap_or_else(|p| p.into_inner()) = Some(copier);
    }

    /// Waits until the copier of an earlier activation (stopped by the
    /// suspend) has ended: its copies still in flight, answered or failed,
    /// would otherwise move the cursor of the next activation's copy, and
    /// a cleaning pass would clear marks that copy has not reached.
    pub async fn await_copier_ended(&self) {
        let copier = self.copier.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(copier) = copier {
            let _ = copier.await;
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
