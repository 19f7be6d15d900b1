//! Failover and failback on both sides: the volume that takes over, and
//! the old primary that becomes its secondary and hands over the tracks
//! it changed but never mirrored.

use super::*;
use crate::copy::pprc::{pair, wire};

impl PprcManager {
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
        // As a resume does: a write of this pair from an earlier time this
        // volume was primary, stalled on a link that timed out, must not
        // land over the copy of its track.
        pair.await_unanswered()
            .await
            .map_err(|message| PairError::Peer {
                peer: pair.spec.peer.clone(),
                message,
            })?;
        self.tell(
            &pair.spec,
            json!({"op": "failback", "volume": pair.spec.peer_volume, "primary": volume,
                   "size": vol.size(), "track_size": pair.track_size()}),
        )
        .await?;
        // Fetch the old primary's changes and add them to ours.
        let (_, _, link) = self.live_link(&pair.spec)?;
        let name = wire::volume_name(&pair.spec.peer_volume);
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
            Message::Ack { error } => return Err(peer_err(pair::errno_name(error))),
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

    /// The old primary's side of a failback: becomes the secondary of the
    /// volume that took over and keeps its out-of-sync bitmap for the
    /// hand-over.
    pub(super) async fn hand_over(
        &self,
        peer: &str,
        volume: &str,
        primary: &str,
        size: u64,
        track_size: u64,
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
        // Everything that can refuse the hand-over is checked before it
        // changes anything.
        if vol.size() < size {
            return Err(format!(
                "secondary {volume} ({} bytes) is smaller than primary {primary} ({size} bytes)",
                vol.size()
            ));
        }
        if track_size != self.server.track_size {
            return Err(format!(
                "the track size of {peer} ({track_size} bytes) differs from this server's ({} \
                 bytes): the out-of-sync tracks cannot be handed over",
                self.server.track_size
            ));
        }
        // The bitmap goes over in one frame.
        let bitmap_bytes = vol.size().div_ceil(self.server.track_size).div_ceil(8);
        if bitmap_bytes + 128 > u64::from(wire::MAX_PAYLOAD) {
            return Err(format!(
                "volume {volume}'s out-of-sync bitmap ({bitmap_bytes} bytes) is too large to \
                 hand over; terminate the pair and establish it with mode copy"
            ));
        }
        if vol.is_flashcopy_target() {
            return Err(format!(
                "volume {volume} is a FlashCopy target and cannot become a secondary; withdraw \
                 the relationship first"
            ));
        }
        // Not "failover": that reason lets a failback start here, which,
        // should the hand-over fail below and leave this pair as it is,
        // would copy this volume over the one that took over.
        pair.suspend(
            SuspendReason::SecondarySuspended,
            Some(format!("{peer} {primary} took over; failback from there")),
        );
        pair.stop_tasks();
        // Writes the consistency group holds for this volume hold its
        // gate: they go on now, recorded (the pair is suspended), and the
        // hand-over below carries their tracks. The other pairs of the
        // group stay held until the freeze.
        pair.leave_group();
        // So do the writes of a critical pair waiting for the resync after
        // this server's restart: that resync waits for the pairs' lock this
        // hand-over holds, and would never start.
        pair.restart_resync_settled();
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

    pub(super) async fn handover_bitmap(&self, peer: &str, volume: &str) -> Result<Message, u32> {
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
        let name = wire::volume_name(volume);
        Ok(Message::Bitmap {
            volume: name,
            track_size: self.server.track_size as u32,
            tracks,
            bits: Bytes::from(bits),
        })
    }
}
