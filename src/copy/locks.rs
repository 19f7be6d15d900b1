//! Per-track reader/writer locks, and the queue that orders overlapping
//! changes.
//!
//! [`TrackLocks`]: tracks hash onto a fixed table of async RwLocks. A
//! request locks the shards of all its tracks in ascending shard order, so
//! two requests can never wait on each other in a cycle. Unrelated tracks
//! may share a shard; that only costs a little concurrency.
//!
//! [`Overlaps`]: byte ranges of changes in flight, in arrival order. A
//! change goes ahead once no change that arrived before it overlaps its
//! range, so two copies of a volume that apply the same changes apply
//! overlapping ones in the same order.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

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

/// Changes in flight by byte range (see the module docs).
#[derive(Debug, Default)]
pub struct Overlaps {
    queue: Mutex<OverlapQueue>,
    released: Notify,
}

#[derive(Debug, Default)]
struct OverlapQueue {
    /// `(start, end, ticket)` of every change that arrived and has not
    /// ended, oldest first.
    entries: Vec<(u64, u64, u64)>,
    next_ticket: u64,
}

/// A change's place in [`Overlaps`]; it leaves the queue on drop.
#[derive(Debug)]
pub struct OverlapGuard<'a> {
    overlaps: &'a Overlaps,
    ticket: u64,
}

impl Overlaps {
    fn lock(&self) -> std::sync::MutexGuard<'_, OverlapQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a change of `[start, end)` and waits until every change that
    /// arrived before it and overlaps it has ended.
    pub async fn enter(&self, start: u64, end: u64) -> OverlapGuard<'_> {
        let overlaps = |(s, e, _): &(u64, u64, u64)| *s < end && start < *e;
        let (guard, ticket) = {
            let mut q = self.lock();
            let ticket = q.next_ticket;
            q.next_ticket += 1;
            // Everything queued arrived earlier: with no overlap it goes
            // ahead at once, under this one lock.
            let free = !q.entries.iter().any(overlaps);
            q.entries.push((start, end, ticket));
            // The guard at once, so a cancelled wait leaves the queue too.
            let guard = OverlapGuard {
                overlaps: self,
                ticket,
            };
            if free {
                return guard;
            }
            (guard, ticket)
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            {
                let q = self.lock();
                let blocked = q.entries.iter().take_while(|e| e.2 != ticket).any(overlaps);
                if !blocked {
                    return guard;
                }
                // Registered before the lock is released: an older change
                // that ends after this point wakes this one.
                released.as_mut().enable();
            }
            released.await;
        }
    }

    /// Number of changes queued or in flight.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Drop for OverlapGuard<'_> {
    fn drop(&mut self) {
        let mut q = self.overlaps.lock();
        if let Some(i) = q.entries.iter().position(|e| e.2 == self.ticket) {
            // `remove`, not `swap_remove`: the queue stays in arrival order.
            q.entries.remove(i);
        }
        drop(q);
        self.overlaps.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_changes_go_in_arrival_order_and_others_at_once() {
        let overlaps = Overlaps::default();
        let first = overlaps.enter(0, 4096).await;
        // Not overlapping: at once (ranges are half-open).
        let beside = overlaps.enter(4096, 8192).await;
        let order = Mutex::new(Vec::new());
        let second = async {
            let _g = overlaps.enter(1000, 2000).await;
            order.lock().unwrap().push(2);
        };
        let third = async {
            // Overlaps only the second change, which arrived before it.
            tokio::task::yield_now().await;
            let _g = overlaps.enter(1500, 1600).await;
            order.lock().unwrap().push(3);
        };
        let release = async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(order.lock().unwrap().is_empty(), "went ahead of an overlap");
            assert_eq!(overlaps.len(), 4);
            drop(first);
        };
        tokio::join!(second, third, release);
        assert_eq!(*order.lock().unwrap(), vec![2, 3]);
        drop(beside);
        assert_eq!(overlaps.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let overlaps = Overlaps::default();
        let first = overlaps.enter(0, 10).await;
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), overlaps.enter(5, 15)).await;
        assert!(waited.is_err());
        assert_eq!(overlaps.len(), 1);
        drop(first);
        let _again = overlaps.enter(5, 15).await;
    }

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
