//! The cleaner: flushes both volumes and clears the marks of tracks idle
//! for a whole pass, narrowing the bitmap file to the marks.

use super::*;

impl Pair {
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
            match self.store.flush_for(&self.flushes).await {
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
    pub(super) fn flushed_both(&self) {
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
        // The activation and state the marks are judged in: a pair that
        // suspends (or resumes) before they are cleared clears none.
        let (starts, state) = (self.starts.load(Ordering::Acquire), self.state());
        let below = match state {
            PairState::DuplexPending => self.cursor.load(Ordering::Acquire),
            PairState::Duplex => self.oos.tracks(),
            _ => return Ok(0),
        };
        // While duplex pending, the marks below the cursor are mostly of
        // tracks the copier has copied: they are cleared every pass, busy
        // or not, so a resume after a suspend mid-copy copies what was
        // left, not the whole volume again. (The secondary writes its
        // copies back as they arrive: its flush has little to do.)
        let copying = state == PairState::DuplexPending;
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
                // Checked again: the pair may have failed, or suspended
                // and resumed, during the flush.
                let unchanged =
                    self.starts.load(Ordering::Acquire) == starts && self.state() == state;
                if clear_marks && unchanged && !self.failed_in_group() {
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
    pub(super) fn fail(&self, reason: SuspendReason, detail: String) {
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
}
