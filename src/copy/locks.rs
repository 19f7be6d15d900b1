//! Per-track reader/writer locks.
//!
//! Tracks hash onto a fixed table of async RwLocks. A request locks the
//! shards of all its tracks in ascending shard order, so two requests can
//! never wait on each other in a cycle. Unrelated tracks may share a shard;
//! that only costs a little concurrency.

use std::sync::Arc;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Number of lock shards.
const SHARDS: usize = 1024;

/// A table of track locks.
#[derive(Debug)]
pub struct TrackLocks {
    shards: Vec<Arc<RwLock<()>>>,
}

/// Held locks; released on drop.
#[derive(Debug)]
pub enum TrackGuard {
    /// Shared locks.
    Shared(Vec<OwnedRwLockReadGuard<()>>),
    /// Exclusive locks.
    Exclusive(Vec<OwnedRwLockWriteGuard<()>>),
}

impl Default for TrackLocks {
    fn default() -> Self {
        TrackLocks {
            shards: (0..SHARDS).map(|_| Arc::new(RwLock::new(()))).collect(),
        }
    }
}

impl TrackLocks {
    fn shard_order(tracks: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut shards: Vec<usize> = tracks
            .into_iter()
            .map(|t| (t % SHARDS as u64) as usize)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Locks every track in `[first, end)` for writing; a range covering
    /// every shard locks the whole table without listing its tracks.
    pub async fn exclusive_range(&self, first: u64, end: u64) -> TrackGuard {
        if end - first >= SHARDS as u64 {
            let mut guards = Vec::with_capacity(SHARDS);
            for shard in &self.shards {
                guards.push(shard.clone().write_owned().await);
            }
            return TrackGuard::Exclusive(guards);
        }
        self.exclusive(first..end).await
    }

    /// Locks `tracks` for reading.
    pub async fn shared(&self, tracks: impl IntoIterator<Item = u64>) -> TrackGuard {
        let mut guards = Vec::new();
        for s in Self::shard_order(tracks) {
            guards.push(self.shards[s].clone().read_owned().await);
        }
        TrackGuard::Shared(guards)
    }

    /// Locks `tracks` for writing (copying or changing them).
    pub async fn exclusive(&self, tracks: impl IntoIterator<Item = u64>) -> TrackGuard {
        let mut guards = Vec::new();
        for s in Self::shard_order(tracks) {
            guards.push(self.shards[s].clone().write_owned().await);
        }
        TrackGuard::Exclusive(guards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_exclusive_locks_serialize_without_deadlock() {
        let locks = Arc::new(TrackLocks::default());
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let locks = locks.clone();
            tasks.push(tokio::spawn(async move {
                // Ranges in both directions over shared shards.
                let tracks: Vec<u64> = if i % 2 == 0 {
                    (0..40).collect()
                } else {
                    (0..40).rev().map(|t| t + 1024).collect()
                };
                let _g = locks.exclusive(tracks).await;
                tokio::task::yield_now().await;
            }));
        }
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(5), t)
                .await
                .unwrap()
                .unwrap();
        }
    }
}
