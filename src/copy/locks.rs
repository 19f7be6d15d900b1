//! Per-track reader/writer locks, and the queue that orders overlapping
//! changes.
//!
//! [`TrackLocks`]: tracks hash onto a fixed table of reader/writer locks,
//! one atomic word each in one allocation, so taking a free lock is a
//! single atomic operation on a small table. A request locks the shards of
//! all its tracks in ascending shard order, so two requests can never wait
//! on each other in a cycle. Unrelated tracks may share a shard; that only
//! costs a little concurrency. A waiting writer (a copier) keeps new
//! readers (host writes) out, so a busy track cannot starve its copy.
//!
//! [`Overlaps`]: byte ranges of changes in flight, in arrival order. A
//! change goes ahead once no change that arrived before it overlaps its
//! range, so two copies of a volume that apply the same changes apply
//! overlapping ones in the same order.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Number of lock shards.
const SHARDS: usize = 1024;

/// A shard's word: readers holding it in the low 32 bits, writers waiting
/// for it above, and the top bit while a writer holds it.
const READER: u64 = 1;
const READERS: u64 = (1 << 32) - 1;
const WAITING_WRITER: u64 = 1 << 32;
const WAITING_WRITERS: u64 = ((1 << 31) - 1) << 32;
const WRITER: u64 = 1 << 63;

/// The shared table of a [`TrackLocks`].
#[derive(Debug)]
struct Table {
    shards: Box<[AtomicU64]>,
    /// Wakes waiters: a lock was released or a writer stopped waiting.
    released: Notify,
}

/// A table of track locks.
#[derive(Debug)]
pub struct TrackLocks {
    table: Arc<Table>,
}

/// Whether a guard holds its shards shared or exclusive.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Shared,
    Exclusive,
}

/// The shards a guard holds, in ascending order.
#[derive(Debug)]
enum Shards {
    /// Up to two ascending runs (a track range that wraps around the
    /// table is two).
    Runs([Range<usize>; 2]),
    /// Sorted, without duplicates.
    List(Vec<usize>),
}

impl Shards {
    /// The shards of tracks `[first, end)`.
    fn of_range(first: u64, end: u64) -> Shards {
        let shards = SHARDS as u64;
        if end <= first {
            return Shards::Runs([0..0, 0..0]);
        }
        if end - first >= shards {
            return Shards::Runs([0..SHARDS, 0..0]);
        }
        let (a, b) = ((first % shards) as usize, ((end - 1) % shards) as usize);
        if a <= b {
            Shards::Runs([a..b + 1, 0..0])
        } else {
            Shards::Runs([0..b + 1, a..SHARDS])
        }
    }

    /// The shards of `tracks`.
    fn of_tracks(tracks: impl IntoIterator<Item = u64>) -> Shards {
        let mut shards: Vec<usize> = tracks
            .into_iter()
            .map(|t| (t % SHARDS as u64) as usize)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        Shards::List(shards)
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let (runs, list): (&[Range<usize>], &[usize]) = match self {
            Shards::Runs(runs) => (runs, &[]),
            Shards::List(list) => (&[], list),
        };
        runs.iter()
            .flat_map(Clone::clone)
            .chain(list.iter().copied())
    }
}

/// How a guard reaches its table: borrowed, or owned so it can move into
/// another task.
#[derive(Debug)]
enum TableRef<'a> {
    Borrowed(&'a Table),
    Owned(Arc<Table>),
}

impl std::ops::Deref for TableRef<'_> {
    type Target = Table;

    fn deref(&self) -> &Table {
        match self {
            TableRef::Borrowed(t) => t,
            TableRef::Owned(t) => t,
        }
    }
}

/// Held locks; released on drop.
#[derive(Debug)]
pub struct TrackGuard<'a> {
    table: TableRef<'a>,
    shards: Shards,
    /// Shards of `shards` locked so far, in order.
    held: usize,
    mode: Mode,
}

impl Drop for TrackGuard<'_> {
    fn drop(&mut self) {
        let mut wake = false;
        for s in self.shards.iter().take(self.held) {
            let word = &self.table.shards[s];
            wake |= match self.mode {
                Mode::Shared => {
                    let before = word.fetch_sub(READER, Ordering::Release);
                    // The last reader out lets a waiting writer in.
                    before & READERS == READER && before & WAITING_WRITERS != 0
                }
                Mode::Exclusive => {
                    word.fetch_and(!WRITER, Ordering::Release);
                    true
                }
            };
        }
        if wake {
            self.table.released.notify_waiters();
        }
    }
}

/// A writer counted as waiting for a shard; uncounted on drop (also when
/// its wait is cancelled), so readers are not kept out for nothing.
struct WaitingWriter<'a> {
    table: &'a Table,
    shard: usize,
    counted: bool,
}

impl Drop for WaitingWriter<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.table.shards[self.shard].fetch_sub(WAITING_WRITER, Ordering::Release);
            self.table.released.notify_waiters();
        }
    }
}

impl Table {
    /// Takes one shard for reading if no writer holds it or waits for it.
    fn try_read(&self, shard: usize) -> bool {
        let word = &self.shards[shard];
        let mut current = word.load(Ordering::Relaxed);
        while current & (WRITER | WAITING_WRITERS) == 0 {
            match word.compare_exchange_weak(
                current,
                current + READER,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
        false
    }

    /// Takes one shard for reading: at once unless a writer holds it or
    /// waits for it.
    async fn read(&self, shard: usize) {
        while !self.try_read(shard) {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before trying again: a release after this point
            // wakes this wait.
            released.as_mut().enable();
            if self.try_read(shard) {
                return;
            }
            released.await;
        }
    }

    /// Takes one shard for writing, counted as waiting meanwhile.
    async fn write(&self, shard: usize) {
        let word = &self.shards[shard];
        if word
            .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        word.fetch_add(WAITING_WRITER, Ordering::AcqRel);
        let mut waiting = WaitingWriter {
            table: self,
            shard,
            counted: true,
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let mut current = word.load(Ordering::Acquire);
            while current & (WRITER | READERS) == 0 {
                match word.compare_exchange_weak(
                    current,
                    current - WAITING_WRITER + WRITER,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        waiting.counted = false;
                        return;
                    }
                    Err(now) => current = now,
                }
            }
            released.await;
        }
    }
}

impl Default for TrackLocks {
    fn default() -> Self {
        TrackLocks {
            table: Arc::new(Table {
                shards: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
                released: Notify::new(),
            }),
        }
    }
}

impl TrackLocks {
    async fn lock<'a>(table: TableRef<'a>, shards: Shards, mode: Mode) -> TrackGuard<'a> {
        let mut guard = TrackGuard {
            table,
            shards,
            held: 0,
            mode,
        };
        // `held` counts as it goes, so a cancelled wait releases exactly
        // what was taken.
        for s in guard.shards.iter() {
            match mode {
                Mode::Shared => guard.table.read(s).await,
                Mode::Exclusive => guard.table.write(s).await,
            }
            guard.held += 1;
        }
        guard
    }

    fn borrowed(&self) -> TableRef<'_> {
        TableRef::Borrowed(&self.table)
    }

    /// Locks tracks `[first, end)` for reading.
    pub async fn shared_range(&self, first: u64, end: u64) -> TrackGuard<'_> {
        Self::lock(self.borrowed(), Shards::of_range(first, end), Mode::Shared).await
    }

    /// Locks `tracks` for reading.
    pub async fn shared(&self, tracks: impl IntoIterator<Item = u64>) -> TrackGuard<'_> {
        Self::lock(self.borrowed(), Shards::of_tracks(tracks), Mode::Shared).await
    }

    /// Locks tracks `[first, end)` for writing; a range covering every
    /// shard locks the whole table without listing its tracks.
    pub async fn exclusive_range(&self, first: u64, end: u64) -> TrackGuard<'_> {
        Self::lock(
            self.borrowed(),
            Shards::of_range(first, end),
            Mode::Exclusive,
        )
        .await
    }

    /// Like [`TrackLocks::exclusive_range`], with a guard that may move to
    /// another task.
    pub async fn exclusive_range_owned(&self, first: u64, end: u64) -> TrackGuard<'static> {
        let table = TableRef::Owned(self.table.clone());
        Self::lock(table, Shards::of_range(first, end), Mode::Exclusive).await
    }

    /// Locks `tracks` for writing (copying or changing them).
    pub async fn exclusive(&self, tracks: impl IntoIterator<Item = u64>) -> TrackGuard<'_> {
        Self::lock(self.borrowed(), Shards::of_tracks(tracks), Mode::Exclusive).await
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
    use futures_util::FutureExt;

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

    #[test]
    fn a_track_range_maps_to_ascending_shards() {
        let of = |first, end| Shards::of_range(first, end).iter().collect::<Vec<_>>();
        assert_eq!(of(5, 8), vec![5, 6, 7]);
        assert_eq!(of(1024 + 5, 1024 + 6), vec![5]);
        // Wrapping around the table: the low run first.
        assert_eq!(of(1022, 1026), vec![0, 1, 1022, 1023]);
        assert_eq!(of(3, 3), Vec::<usize>::new());
        assert_eq!(of(7, 7 + 5000), (0..SHARDS).collect::<Vec<_>>());
        let listed = Shards::of_tracks([1030, 2, 6, 1026])
            .iter()
            .collect::<Vec<_>>();
        assert_eq!(listed, vec![2, 6]);
    }

    #[tokio::test]
    async fn readers_share_and_a_writer_waits_for_them() {
        let locks = TrackLocks::default();
        let a = locks.shared_range(0, 2).await;
        let b = locks.shared(1..2).await;
        let writer = locks.exclusive_range(1, 2);
        tokio::pin!(writer);
        assert!(
            writer.as_mut().now_or_never().is_none(),
            "writer went in with readers"
        );
        drop(a);
        assert!(
            writer.as_mut().now_or_never().is_none(),
            "writer went in with a reader"
        );
        // A disjoint shard is free all along.
        let other = locks
            .exclusive_range(2, 3)
            .now_or_never()
            .expect("a free shard");
        drop(b);
        let w = writer.as_mut().now_or_never().expect("readers gone");
        assert!(
            locks.shared_range(1, 2).now_or_never().is_none(),
            "read under a writer"
        );
        drop((w, other));
        assert!(locks.shared_range(1, 3).now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_waiting_writer_keeps_new_readers_out_until_it_is_done_or_gone() {
        let locks = TrackLocks::default();
        let reader = locks.shared_range(4, 5).await;
        {
            let writer = locks.exclusive_range(4, 5);
            tokio::pin!(writer);
            assert!(writer.as_mut().now_or_never().is_none());
            assert!(
                locks.shared_range(4, 5).now_or_never().is_none(),
                "a new reader overtook a waiting writer"
            );
            // Cancelled here: the wait is dropped.
        }
        let again = locks
            .shared_range(4, 5)
            .now_or_never()
            .expect("a cancelled writer blocks readers");
        drop((reader, again));
        // Nothing is left held: a writer goes in at once.
        assert!(locks
            .exclusive_range(0, SHARDS as u64)
            .now_or_never()
            .is_some());
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_lock_is_released() {
        let locks = Arc::new(TrackLocks::default());
        let held = locks.exclusive_range_owned(9, 10).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _r = locks.shared_range(9, 10).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // The owned guard moves to another task, which releases it.
        tokio::spawn(async move { drop(held) }).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the reader was never woken")
            .unwrap();
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
