//! What `pprc list` and `pprc show` answer: each pair as its primary or
//! its secondary sees it.

use super::*;
use crate::copy::pprc::secondary;

impl PprcManager {
    /// The pair as its primary (this server) sees it.
    pub(super) async fn view_primary(&self, pair: &Arc<Pair>) -> PairView {
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

    /// The pair as its secondary (this server) sees it.
    pub(super) fn view_secondary(&self, side: &SecondarySide) -> PairView {
        let tracks = self
            .server
            .lookup(&side.spec.volume)
            .map_or(0, |v| v.size().div_ceil(self.server.track_size));
        let in_sync = side.status.state == PairState::Duplex;
        // Without a link the primary may be writing on, suspended: this
        // side cannot know that it is current.
        let (links, last_ended) = secondary::links_from(&side.spec.peer);
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
}
