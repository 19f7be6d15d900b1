//! The host write path of a mirrored volume: marking tracks before a
//! write, sending it to the secondary beside the local write, the critical
//! modes, and what a failed send does to the pair.

use super::*;
use crate::copy::pprc::{paths, secondary};

impl Pair {
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
            // For the write's own tracks: another write may have set
            // their bits and not yet handed them to a commit.
            if let Err(e) = self.oos.commit_bits_for(first, end).await {
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
                self.oos
                    .commit_bits_for(first, end)
                    .await
                    .map_err(unrecorded)?;
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
        // A failure is registered before the write ends: a cleaning pass
        // that starts once it has ended must find the pair failed, not
        // take its track for one in sync and clear its mark.
        let local_failed =
            matches!(&local_result, Err(e) if !matches!(e, VolumeError::NotFast { .. }));
        if let Err(e) = &local_result {
            if local_failed {
                self.fail(SuspendReason::PrimaryIoError, e.to_string());
            }
        }
        let remote = self.judge(remote);
        if let Err((reason, detail)) = &remote {
            if !self.is_terminated() {
                self.fail(*reason, detail.clone());
            }
        }
        self.end(epoch, first, end);
        if local_failed {
            // A FUA write whose write-back failed leaves its pages cached
            // with data the disk does not hold.
            self.forget_unwritten().await;
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
        self.after_send(VolumeOp::Flush, self.judge(r)).await?;
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
    pub(super) async fn forget_unwritten(&self) {
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
        remote: Result<(), Failure>,
    ) -> Result<(), VolumeError> {
        let Err((reason, detail)) = remote else {
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
    pub(super) fn critical_inhibits(&self, reason: Option<SuspendReason>) -> bool {
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

    /// Sends one request over the path's live links, moving to the next
    /// link when one fails: host changes in turn, the copy's writes to the
    /// least busy link (see [`paths::Route::pick_least_busy`]).
    pub(super) async fn send(&self, message: Message) -> Result<u32, SendError> {
        let bytes = match &message {
            Message::Write { data, .. } => data.len() as u64,
            _ => 0,
        } + wire::HEADER_LEN as u64;
        // The error of the last link this request failed on, if any.
        let mut last: Option<String> = None;
        for _ in 0..=paths::MAX_LINKS {
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
            match link
                .answer_within(link.request(message.clone()), self.timeout)
                .await
            {
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
        for _ in 0..paths::MAX_LINKS {
            let Some((at, link)) = route.pick() else {
                break;
            };
            let ask = Message::Control {
                body: secondary::drained_body(&broken.peer().link_id),
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
        match self.route() {
            Some(route) => await_unanswered_on(&route, self.timeout).await,
            None => Ok(()),
        }
    }
}

/// [`Pair::await_unanswered`] for a path, with the secondary's `timeout`:
/// also before a new pair's copy on it (a request of an earlier pair on
/// the same volumes, stalled on a dropped link, must not land after the
/// copy of its track).
pub async fn await_unanswered_on(route: &Route, timeout: Duration) -> Result<(), String> {
    let limit = secondary::SILENCE_LIMIT + timeout;
    for id in route.unanswered() {
        let Some((at, link)) = route.pick() else {
            return Err("no live link left".into());
        };
        let ask = Message::Control {
            body: secondary::drained_body(&id),
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
