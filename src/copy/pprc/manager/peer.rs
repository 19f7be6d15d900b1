//! Requests from peer servers: a primary's server making a volume here
//! its secondary, telling it state changes, and asking it to take part in
//! a failback.

use super::*;

impl PprcManager {
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
                if let Entry::Secondary(side) = &entries[i] {
                    if !Stamp::of(request).is_none_or(|s| s.supersedes(side.last_stamp)) {
                        // Held on a slow link while the primary made the
                        // pair again over another: it ends nothing.
                        tracing::warn!(
                            volume,
                            peer,
                            "ignored a late terminate: its primary asked this side to take the pair \
                             since"
                        );
                        return Ok(
                            json!({"note": "a late terminate; the pair was made again since"}),
                        );
                    }
                }
                // Recorded first: if the record cannot be written, the
                // side stays (the primary is told so and may ask again).
                let side = entries.remove(i);
                if let Err(e) = self.save_locked(&entries) {
                    entries.insert(i, side);
                    return Err(e.to_string());
                }
                if let Some(v) = self.server.lookup(&volume) {
                    self.end_secondary(v).await;
                }
                if let Entry::Secondary(side) = &side {
                    if let Some(h) = &side.handover {
                        let _ = std::fs::remove_file(self.dir.join(h));
                    }
                }
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
            "failback" => {
                let number = |k: &str| request.get(k).and_then(|v| v.as_u64());
                match (number("size"), number("track_size")) {
                    (Some(size), Some(track_size)) => {
                        self.hand_over(peer, &volume, &primary, size, track_size)
                            .await
                    }
                    _ => Err(
                        "a failback request without the primary's size and track size".to_string(),
                    ),
                }
            }
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
            // Under the gate: a FlashCopy onto this volume attaches under it
            // too, and checks that the volume is not a secondary.
            if vol.is_flashcopy_target() {
                return Err(format!("volume {volume} is a FlashCopy target"));
            }
            vol.set_secondary(true);
        }
        self.publish_secondary(&side);
        entries.push(Entry::Secondary(Box::new(side)));
        if let Err(e) = self.save_locked(&entries) {
            // Not recorded, so not made: the primary is refused, and no
            // volume stays protected without a pair.
            entries.pop();
            self.end_secondary(&vol).await;
            return Err(e.to_string());
        }
        self.log.record(
            "pprc.pair.secondary",
            format!("{volume} is the secondary of {peer} {primary}"),
            None,
        );
        Ok(json!({}))
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
