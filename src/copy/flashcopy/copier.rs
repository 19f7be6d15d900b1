//! The background copier of a COPY relationship.
//!
//! Walks the tracks in order, a chunk at a time. For each chunk it locks the
//! uncopied tracks, re-checks them, copies runs of them (source holes become
//! target holes with one punch), marks them, and releases the locks before
//! the next chunk, so host I/O keeps flowing. Copied ranges are pushed to
//! disk right away (write-back started, not waited for), and bits are
//! group-committed every 256 MiB copied or every second. After each
//! commit (which flushes the target first) the copied ranges are dropped
//! from both volumes' page cache ([`crate::copy::drop_behind`]). The copy
//! rate limit, if any, is applied to data bytes copied (holes are free).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Relationship;
use crate::copy::drop_behind::DropBehind;

/// Tracks locked and copied together (fewer when a rate limit is set, so
/// the limit is kept within about a tenth of a second).
const CHUNK_TRACKS: u64 = 256;
/// Data copied between bitmap commits. Host writes that need a copied
/// track's bit durable commit on their own, so this only bounds how much
/// copying a crash can make the copier repeat.
const COMMIT_BYTES: u64 = 256 << 20;
/// Most tracks a source hole is skipped by in one step.
const HOLE_STEP_TRACKS: u64 = 1 << 20;
/// Longest time between bitmap commits.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How the copier ended.
#[derive(Debug, PartialEq, Eq)]
pub enum CopierEnd {
    /// Every track is copied and durable.
    Complete,
    /// Stopped by withdraw or shutdown.
    Stopped,
    /// An I/O error stopped the copy; the relationship stays.
    Failed(String),
}

/// Copies every uncopied track of `rel`.
pub async fn run(rel: Arc<Relationship>) -> CopierEnd {
    // Withdraw waits for this: no copy may reach the target after detach.
    let _stopped = rel.copier_stopped.clone().drop_guard();
    match copy_all(&rel).await {
        Ok(end) => end,
        Err(e) => {
            let msg = format!(
                "background copy {} → {} failed: {e}",
                rel.source_id, rel.target_id
            );
            tracing::error!("{msg}");
            // A failed write-back of the target said already what to do.
            rel.failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(msg.clone());
            CopierEnd::Failed(msg)
        }
    }
}

async fn copy_all(rel: &Relationship) -> std::io::Result<CopierEnd> {
    let tracks = rel.bitmap.tracks();
    let started = Instant::now();
    let start_bytes = rel.bytes_copied();
    let mut last_commit = Instant::now();
    let mut bytes_at_commit = rel.bytes_copied();
    let mut behind = DropBehind::default();
    let mut chunk = 0;
    while chunk < tracks {
        if rel.stop.is_cancelled() {
            rel.commit().await?;
            return Ok(CopierEnd::Stopped);
        }
        let rate = rel.rate();
        let chunk_tracks = if rate == 0 {
            CHUNK_TRACKS
        } else {
            (rate / 10 / rel.track_size).clamp(1, CHUNK_TRACKS)
        };
        if let Some(next) = skip_hole(rel, chunk, chunk_tracks).await? {
            chunk = next;
            continue;
        }
        let end = (chunk + chunk_tracks).min(tracks);
        let chunk_bytes = {
            let (first, _) = rel.track_range(chunk);
            let (last, last_len) = rel.track_range(end - 1);
            first..last + last_len
        };
        let pending = rel.uncopied(chunk, end - 1);
        if !pending.is_empty() {
            // Wait until the limit allows more, before (not after) copying.
            throttle(rel, started, rel.bytes_copied() - start_bytes).await;
            if rel.stop.is_cancelled() {
                continue;
            }
            let _guard = rel.locks.exclusive(pending.iter().copied()).await;
            let pending: Vec<u64> = pending
                .into_iter()
                .filter(|&t| !rel.bitmap.get(t))
                .collect();
            // Copy maximal runs of consecutive uncopied tracks.
            let mut i = 0;
            while i < pending.len() {
                let mut j = i;
                while j + 1 < pending.len() && pending[j + 1] == pending[j] + 1 {
                    j += 1;
                }
                let (off, _) = rel.track_range(pending[i]);
                let (last_off, last_len) = rel.track_range(pending[j]);
                rel.copy_run(off, last_off + last_len - off).await?;
                // Stream the copy to disk now, so commits find little to flush.
                rel.target
                    .start_writeback(off, last_off + last_len - off)
                    .await?;
                rel.copies.fetch_add((j - i + 1) as u64, Ordering::AcqRel);
                for &t in &pending[i..=j] {
                    rel.bitmap.set(t);
                }
                i = j + 1;
            }
            behind.note(chunk_bytes.start, chunk_bytes.end);
        }
        let copied = rel.bytes_copied();
        if copied - bytes_at_commit >= COMMIT_BYTES || last_commit.elapsed() >= COMMIT_INTERVAL {
            rel.commit().await?;
            bytes_at_commit = copied;
            last_commit = Instant::now();
            drop_copied(rel, &mut behind, chunk_bytes.end);
        }
        chunk = end;
        tokio::task::yield_now().await;
    }
    rel.commit().await?;
    drop_copied(rel, &mut behind, u64::MAX);
    if rel.bitmap.all_set() {
        Ok(CopierEnd::Complete)
    } else {
        // Tracks may only be skipped if they were copied meanwhile; anything
        // else is a logic error worth reporting rather than ending silently.
        Err(std::io::Error::other(
            "background copy finished with uncopied tracks",
        ))
    }
}

/// Drops what the copier has copied (and committed) below byte `below`
/// from the page cache of both volumes, in the background.
fn drop_copied(rel: &Relationship, behind: &mut DropBehind, below: u64) {
    for (start, end) in behind.take_below(below) {
        rel.source.drop_cached_later(start, end - start);
        rel.target.drop_cached_later(start, end - start);
    }
}

/// If the source is a hole from track `chunk` on for more than two chunks,
/// makes the uncopied tracks of (a large step of) that hole target holes in
/// one punch per run, marks them, and returns the track to continue from.
async fn skip_hole(
    rel: &Relationship,
    chunk: u64,
    chunk_tracks: u64,
) -> std::io::Result<Option<u64>> {
    let (off, _) = rel.track_range(chunk);
    let data_at = rel.source.next_data(off).await?;
    // A source grown since T0 has a tail outside the relationship, a hole
    // perhaps: the hole ends with the relationship's tracks at most.
    let hole_end = (data_at / rel.track_size).min(rel.bitmap.tracks());
    if hole_end < chunk + 2 * chunk_tracks {
        return Ok(None);
    }
    let end = hole_end.min(chunk + HOLE_STEP_TRACKS);
    let _guard = rel.locks.exclusive_range(chunk, end).await;
    // Tracks written since (copy-before-write) are marked and skipped; the
    // unmarked ones still have the source's T0 content: a hole.
    for (first, last) in rel.bitmap.unset_runs(chunk, end) {
        let (start, _) = rel.track_range(first);
        let (last_start, last_len) = rel.track_range(last - 1);
        rel.target
            .write_zeroes(start, last_start + last_len - start, true, false)
            .await?;
        rel.copies.fetch_add(last - first, Ordering::AcqRel);
        rel.bitmap.set_range(first, last);
    }
    Ok(Some(end))
}

/// Sleeps so that `bytes` since `started` stay within the rate limit.
async fn throttle(rel: &Relationship, started: Instant, bytes: u64) {
    let rate = rel.rate();
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
    let elapsed = started.elapsed();
    if due > elapsed {
        tokio::select! {
            _ = tokio::time::sleep(due - elapsed) => {}
            _ = rel.stop.cancelled() => {}
        }
    }
}
