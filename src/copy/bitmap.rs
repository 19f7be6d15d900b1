//! Persistent track bitmaps with group commit.
//!
//! The bitmap lives in memory as atomic words and in a file: a 4 KiB header
//! (magic, version, track size, track count) followed by the bits, one
//! 4 KiB page per 32768 tracks. In a FlashCopy bitmap bits only ever go
//! from 0 to 1; a PPRC out-of-sync bitmap also clears them
//! ([`TrackBitmap::clear_with`]).
//!
//! Durability ordering: whoever sets a bit has already written the data
//! the bit stands for. A second, in-memory copy of the bits records which
//! ones are durable, so the data path can tell a track that is copied *and*
//! durable (nothing to wait for) from one whose bit still has to be
//! committed before the track may be changed. [`TrackBitmap::commit`] snapshots the dirty pages,
//! then makes the data durable (`data.flush()`), then writes and fsyncs the
//! snapshots — so a bit is never durable before its data. Concurrent
//! committers queue on one lock; the first does the work for all whose bits
//! it covered (group commit). An out-of-sync bitmap has the opposite
//! order — a bit must be durable before its track changes — and commits
//! with [`TrackBitmap::commit_bits`], which flushes no data.
//!
//! A setter marks a page for the commit only after setting its bits, so a
//! task that finds a track's bit already set by another, and is about to
//! change the track, commits with [`TrackBitmap::commit_for`] (or
//! [`TrackBitmap::commit_bits_for`]): it also writes bits that are in
//! memory and not yet marked.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::volume::store::{BackingStore, FlushWatch};

/// The data a commit makes durable before the bits: a store, flushed for
/// a party.
type Data<'a> = (&'a BackingStore, &'a FlushWatch);

const MAGIC: &[u8; 8] = b"ESSDBMP1";
const HEADER: u64 = 4096;
const PAGE: u64 = 4096;
const TRACKS_PER_PAGE: u64 = PAGE * 8;
const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;

/// A bitmap file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// An OS error.
    #[error("bitmap {path}: {source}")]
    Io {
        /// Bitmap file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a bitmap of this shape.
    #[error("bitmap {path}: {message}")]
    Corrupt {
        /// Bitmap file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Bits over `tracks` tracks in memory, as atomic 64-track words, with a
/// count of the set bits.
#[derive(Debug)]
pub struct TrackBits {
    tracks: u64,
    words: Vec<AtomicU64>,
    count: AtomicU64,
}

impl TrackBits {
    /// All clear.
    pub fn new(tracks: u64) -> Self {
        Self::from_words(tracks, vec![0; tracks.div_ceil(64) as usize])
    }

    /// From words (bit `b` of word `i` = track `64 i + b`); bits past the
    /// last track are dropped. `words` may be longer than needed.
    pub fn from_words(tracks: u64, mut words: Vec<u64>) -> Self {
        words.resize(words.len().max(tracks.div_ceil(64) as usize), 0);
        let mut count = 0;
        for (i, w) in words.iter_mut().enumerate() {
            let first = i as u64 * 64;
            if first >= tracks {
                *w = 0;
            } else if tracks - first < 64 {
                *w &= (1u64 << (tracks - first)) - 1;
            }
            count += u64::from(w.count_ones());
        }
        TrackBits {
            tracks,
            words: words.into_iter().map(AtomicU64::new).collect(),
            count: AtomicU64::new(count),
        }
    }

    /// Number of tracks.
    pub fn tracks(&self) -> u64 {
        self.tracks
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Whether track `t` is set.
    pub fn get(&self, t: u64) -> bool {
        self.word((t / 64) as usize) & (1 << (t % 64)) != 0
    }

    /// Number of 64-track words.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// Word `i` of the bits (bit `b` = track `64 i + b`).
    pub fn word(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    /// Sets the bits of `mask` in word `i`; returns how many were newly set.
    pub fn set_word(&self, i: usize, mask: u64) -> u64 {
        let old = self.words[i].fetch_or(mask, Ordering::AcqRel);
        let added = u64::from((mask & !old).count_ones());
        self.count.fetch_add(added, Ordering::AcqRel);
        added
    }

    /// Clears the bits of `mask` in word `i`; returns how many were set.
    pub fn clear_word(&self, i: usize, mask: u64) -> u64 {
        let old = self.words[i].fetch_and(!mask, Ordering::AcqRel);
        let cleared = u64::from((old & mask).count_ones());
        self.count.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// Sets every track in `[first, end)`, calling `changed` with each word
    /// that got a new bit; returns how many bits were newly set.
    pub fn set_range(&self, first: u64, end: u64, mut changed: impl FnMut(usize)) -> u64 {
        assert!(end <= self.tracks, "tracks {first}..{end} out of range");
        let mut newly = 0;
        let mut t = first;
        while t < end {
            let word = t / 64;
            let lo = t % 64;
            let hi = (end - word * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let added = self.set_word(word as usize, mask);
            if added > 0 {
                newly += added;
                changed(word as usize);
            }
            t = word * 64 + hi;
        }
        newly
    }

    /// The first set track at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut t = from;
        while t < self.tracks {
            let w = self.word((t / 64) as usize) >> (t % 64);
            if w != 0 {
                let found = t + u64::from(w.trailing_zeros());
                return (found < self.tracks).then_some(found);
            }
            t = (t / 64 + 1) * 64;
        }
        None
    }

    /// Number of set tracks at or after `from`.
    pub fn count_from(&self, from: u64) -> u64 {
        if from >= self.tracks {
            return 0;
        }
        let first = (from / 64) as usize;
        let head = self.word(first) >> (from % 64);
        u64::from(head.count_ones())
            + self.words[first + 1..]
                .iter()
                .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
                .sum::<u64>()
    }

    /// A copy of the bits as they are now.
    pub fn snapshot(&self) -> TrackBits {
        TrackBits::from_words(
            self.tracks,
            (0..self.words()).map(|i| self.word(i)).collect(),
        )
    }
}

/// Pages taken for a commit; put back into the dirty set on drop unless
/// the commit made them durable.
struct PutBack<'a> {
    dirty: &'a Mutex<BTreeSet<u64>>,
    pages: Option<Vec<u64>>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if let Some(pages) = self.pages.take() {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pages);
        }
    }
}

/// A persistent bitmap over `tracks` tracks.
#[derive(Debug)]
pub struct TrackBitmap {
    path: PathBuf,
    file: Arc<File>,
    bits: TrackBits,
    /// The bits known to be in the file and fsynced (a subset of `bits`).
    durable_words: Vec<AtomicU64>,
    /// Pages changed since they were last snapshotted.
    dirty: Mutex<BTreeSet<u64>>,
    /// Bumped after every new bit is set and its page marked dirty.
    generation: AtomicU64,
    /// Highest generation known durable.
    durable: AtomicU64,
    commit_lock: tokio::sync::Mutex<()>,
}

impl TrackBitmap {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> BitmapError + '_ {
        move |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn header(track_size: u64, tracks: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        h[16..24].copy_from_slice(&track_size.to_le_bytes());
        h[24..32].copy_from_slice(&tracks.to_le_bytes());
        h
    }

    fn file_len(tracks: u64) -> u64 {
        HEADER + tracks.div_ceil(TRACKS_PER_PAGE) * PAGE
    }

    /// Creates a new all-zero bitmap file (durably) and opens it.
    pub fn create(path: &Path, track_size: u64, tracks: u64) -> Result<Self, BitmapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Self::io(path))?;
        file.write_all_at(&Self::header(track_size, tracks), 0)
            .and_then(|()| file.set_len(Self::file_len(tracks)))
            .and_then(|()| file.sync_all())
            .map_err(Self::io(path))?;
        if let Some(dir) = path.parent() {
            crate::state::sync_dir(dir).map_err(|e| BitmapError::Io {
                path: path.to_path_buf(),
                source: e.source,
            })?;
        }
        Ok(Self::from_parts(path, file, tracks, Vec::new()))
    }

    /// The track size and the number of tracks an existing bitmap file
    /// describes.
    pub fn read_shape(path: &Path) -> Result<(u64, u64), BitmapError> {
        let file = File::open(path).map_err(Self::io(path))?;
        Self::shape_of(path, &file)
    }

    fn shape_of(path: &Path, file: &File) -> Result<(u64, u64), BitmapError> {
        let mut header = vec![0u8; HEADER as usize];
        file.read_exact_at(&mut header, 0).map_err(Self::io(path))?;
        let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let (track_size, tracks) = (field(16), field(24));
        if header != Self::header(track_size, tracks) {
            return Err(BitmapError::Corrupt {
                path: path.to_path_buf(),
                message: "not a track bitmap of this version".into(),
            });
        }
        Ok((track_size, tracks))
    }

    /// Opens an existing bitmap file, checking its shape.
    pub fn open(path: &Path, track_size: u64, tracks: u64) -> Result<Self, BitmapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Self::io(path))?;
        let (found_size, found_tracks) = Self::shape_of(path, &file)?;
        if (found_size, found_tracks) != (track_size, tracks) {
            return Err(BitmapError::Corrupt {
                path: path.to_path_buf(),
                message: format!(
                    "it describes {found_tracks} tracks of {found_size} bytes, not {tracks} \
                     tracks of {track_size} bytes"
                ),
            });
        }
        let mut bits = vec![0u8; (Self::file_len(tracks) - HEADER) as usize];
        file.read_exact_at(&mut bits, HEADER)
            .map_err(Self::io(path))?;
        Ok(Self::from_parts(path, file, tracks, bits))
    }

    fn from_parts(path: &Path, file: File, tracks: u64, bytes: Vec<u8>) -> Self {
        let nwords = tracks.div_ceil(TRACKS_PER_PAGE) as usize * WORDS_PER_PAGE;
        let words = (0..nwords)
            .map(|i| {
                bytes
                    .get(i * 8..i * 8 + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0)
            })
            .collect();
        let bits = TrackBits::from_words(tracks, words);
        let durable_words = (0..nwords).map(|i| AtomicU64::new(bits.word(i))).collect();
        TrackBitmap {
            path: path.to_path_buf(),
            file: Arc::new(file),
            bits,
            durable_words,
            dirty: Mutex::new(BTreeSet::new()),
            generation: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            commit_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Bitmap file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tracks.
    pub fn tracks(&self) -> u64 {
        self.bits.tracks()
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.bits.count()
    }

    /// Whether every bit is set.
    pub fn all_set(&self) -> bool {
        self.count() == self.tracks()
    }

    /// Whether every bit is set and durable.
    pub fn all_set_durably(&self) -> bool {
        let tracks = self.tracks();
        self.durable_words.iter().enumerate().all(|(i, word)| {
            let first = i as u64 * 64;
            let want = match tracks.saturating_sub(first) {
                0 => 0,
                n if n >= 64 => u64::MAX,
                n => (1u64 << n) - 1,
            };
            word.load(Ordering::Acquire) & want == want
        })
    }

    /// Whether track `t` is set.
    pub fn get(&self, t: u64) -> bool {
        self.bits.get(t)
    }

    /// The bits in memory.
    pub fn bits(&self) -> &TrackBits {
        &self.bits
    }

    /// Whether track `t`'s bit is durable (in the file and fsynced).
    pub fn is_durable(&self, t: u64) -> bool {
        self.durable_words[(t / 64) as usize].load(Ordering::Acquire) & (1 << (t % 64)) != 0
    }

    /// Whether every track in `[first, last]` is set.
    pub fn all_in(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|t| self.get(t))
    }

    /// Sets track `t` (its data must already be written); true if newly set.
    pub fn set(&self, t: u64) -> bool {
        assert!(t < self.tracks(), "track {t} out of range");
        self.set_range(t, t + 1) == 1
    }

    /// Sets every track in `[first, end)` (their data must already be
    /// written); returns how many were newly set.
    pub fn set_range(&self, first: u64, end: u64) -> u64 {
        let mut pages = Vec::new();
        let newly = self.bits.set_range(first, end, |word| {
            let page = word as u64 / WORDS_PER_PAGE as u64;
            if pages.last() != Some(&page) {
                pages.push(page);
            }
        });
        if newly > 0 {
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pages);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        newly
    }

    /// Maximal runs `[start, end)` of unset tracks within `[first, end)`.
    pub fn unset_runs(&self, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut t = first;
        while t < end {
            let w = self.bits.word((t / 64) as usize);
            if t % 64 == 0 && end - t >= 64 && (w == 0 || w == u64::MAX) {
                if w == 0 {
                    match runs.last_mut() {
                        Some(r) if r.1 == t => r.1 = t + 64,
                        _ => runs.push((t, t + 64)),
                    }
                }
                t += 64;
                continue;
            }
            if w & (1 << (t % 64)) == 0 {
                match runs.last_mut() {
                    Some(r) if r.1 == t => r.1 = t + 1,
                    _ => runs.push((t, t + 1)),
                }
            }
            t += 1;
        }
        runs
    }

    /// Makes every bit set so far durable, after making `data` durable
    /// (flushed for the party `watch`: see [`BackingStore::flush_for`]).
    pub async fn commit(&self, data: &BackingStore, watch: &FlushWatch) -> io::Result<()> {
        self.commit_after(Some((data, watch))).await
    }

    /// Makes every bit set so far durable (for bitmaps whose bits must be
    /// durable *before* their data changes, such as out-of-sync bitmaps).
    pub async fn commit_bits(&self) -> io::Result<()> {
        self.commit_after(None).await
    }

    /// Makes every set bit of `[first, end)` durable, after making `data`
    /// durable: also a bit another task has set in memory and not yet
    /// handed to a commit (a setter marks its page dirty only after its
    /// bits are set, so a plain [`TrackBitmap::commit`] may find nothing
    /// to do while such a bit is in memory only). For callers that found
    /// a track's bit set by someone else and are about to change the track;
    /// returns at once when every bit of the range is durable already.
    pub async fn commit_for(
        &self,
        data: &BackingStore,
        watch: &FlushWatch,
        first: u64,
        end: u64,
    ) -> io::Result<()> {
        self.commit_covering(Some((data, watch)), first, end).await
    }

    /// [`TrackBitmap::commit_for`] for bitmaps whose bits must be durable
    /// before their data changes (out-of-sync bitmaps): no data flush.
    pub async fn commit_bits_for(&self, first: u64, end: u64) -> io::Result<()> {
        self.commit_covering(None, first, end).await
    }

    async fn commit_covering(
        &self,
        data: Option<Data<'_>>,
        first: u64,
        end: u64,
    ) -> io::Result<()> {
        if self.all_durable(first, end) {
            return Ok(());
        }
        let words = (first / 64) as usize..=((end - 1) / 64) as usize;
        loop {
            self.commit_after(data).await?;
            // Bits in memory and not in the file: their setter has not
            // marked their pages yet. Mark them here; the next commit's
            // snapshot, taken after this, holds the bits.
            let mut behind = false;
            for i in words.clone() {
                if self.bits.word(i) & !self.durable_words[i].load(Ordering::Acquire) != 0 {
                    self.changed_word(i);
                    behind = true;
                }
            }
            if !behind {
                return Ok(());
            }
        }
    }

    async fn commit_after(&self, data: Option<Data<'_>>) -> io::Result<()> {
        let want = self.generation.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        let _one_at_a_time = self.commit_lock.lock().await;
        if self.durable.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        self.write_dirty(data).await
    }

    /// Clears bits: `choose` runs while no commit can start and clears
    /// bits with [`TrackBitmap::clear_now`]; the cleared pages are then
    /// written and fsynced before this returns. Returns `choose`'s result.
    pub async fn clear_with<T>(&self, choose: impl FnOnce(&Self) -> T) -> io::Result<T> {
        let _one_at_a_time = self.commit_lock.lock().await;
        let chosen = choose(self);
        self.write_dirty(None).await?;
        Ok(chosen)
    }

    /// Clears the bits of `mask` in word `word` in memory, at once (only
    /// inside [`TrackBitmap::clear_with`]). A cleared bit counts as not
    /// durable, so whoever sets it again waits for a later commit. Returns
    /// how many bits were cleared.
    pub fn clear_now(&self, word: usize, mask: u64) -> u64 {
        let cleared = self.bits.clear_word(word, mask);
        self.durable_words[word].fetch_and(!mask, Ordering::AcqRel);
        if cleared > 0 {
            self.changed_word(word);
        }
        cleared
    }

    /// Clears, in memory, every bit that is not durable (for a bitmap
    /// whose commits can no longer succeed: what its bits stood for may
    /// not have reached the disk). Returns how many were cleared.
    pub fn forget_undurable(&self) -> u64 {
        (0..self.bits.words())
            .map(|i| {
                let undurable = self.bits.word(i) & !self.durable_words[i].load(Ordering::Acquire);
                if undurable == 0 {
                    0
                } else {
                    self.bits.clear_word(i, undurable)
                }
            })
            .sum()
    }

    /// Number of 64-track words.
    pub fn words(&self) -> usize {
        self.bits.words()
    }

    /// Word `i` of the bits (bit `b` = track `64 i + b`).
    pub fn word(&self, i: usize) -> u64 {
        self.bits.word(i)
    }

    /// Sets the bits of `mask` in word `i` (their data must be handled by
    /// the caller's rules); returns how many were newly set.
    pub fn set_word(&self, i: usize, mask: u64) -> u64 {
        let added = self.bits.set_word(i, mask);
        if added > 0 {
            self.changed_word(i);
        }
        added
    }

    /// Marks word `i`'s page for the next commit.
    fn changed_word(&self, i: usize) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(i as u64 / WORDS_PER_PAGE as u64);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every track in `[first, end)` is set and durable.
    pub fn all_durable(&self, first: u64, end: u64) -> bool {
        (first..end).all(|t| self.is_durable(t))
    }

    /// Snapshots the dirty pages, makes `data` durable if given, then
    /// writes and fsyncs the snapshots (hold `commit_lock`).
    async fn write_dirty(&self, data: Option<Data<'_>>) -> io::Result<()> {
        let generation = self.generation.load(Ordering::Acquire);
        let pages: Vec<u64> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        // Until the pages are durable they go back to `dirty` on any exit:
        // an error, or this future being dropped at an await (otherwise a
        // later commit would find nothing dirty and return Ok).
        let mut put_back = PutBack {
            dirty: &self.dirty,
            pages: Some(pages.clone()),
        };
        let words: Vec<(usize, Vec<u64>)> = pages
            .iter()
            .map(|&p| {
                let first = p as usize * WORDS_PER_PAGE;
                let snapshot = (first..first + WORDS_PER_PAGE)
                    .map(|i| self.bits.word(i))
                    .collect();
                (first, snapshot)
            })
            .collect();
        let snapshots: Vec<(u64, Vec<u8>)> = words
            .iter()
            .map(|(first, snapshot)| {
                let bytes = snapshot.iter().flat_map(|w| w.to_le_bytes()).collect();
                (HEADER + (*first / WORDS_PER_PAGE) as u64 * PAGE, bytes)
            })
            .collect();
        let result = async {
            if let Some((data, watch)) = data {
                data.flush_for(watch).await?;
            }
            if snapshots.is_empty() {
                return Ok(());
            }
            let file = self.file.clone();
            tokio::task::spawn_blocking(move || -> io::Result<()> {
                for (offset, bytes) in &snapshots {
                    file.write_all_at(bytes, *offset)?;
                }
                file.sync_data()
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
        }
        .await;
        match result {
            Ok(()) => {
                put_back.pages = None;
                for (first, snapshot) in &words {
                    for (i, w) in snapshot.iter().enumerate() {
                        self.durable_words[first + i].fetch_or(*w, Ordering::AcqRel);
                    }
                }
                self.durable.fetch_max(generation, Ordering::AcqRel);
                Ok(())
            }
            // `put_back` returns the pages so a later commit retries them.
            Err(e) => Err(e),
        }
    }

    /// Deletes the bitmap file.
    pub fn remove_file(&self) -> io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_runs_match_single_bits() {
        let dir = tempfile::tempdir().unwrap();
        let bm = TrackBitmap::create(&dir.path().join("b"), 4096, 70_000).unwrap();
        assert_eq!(bm.set_range(3, 200), 197);
        assert_eq!(bm.set_range(100, 300), 100);
        bm.set(1000);
        assert_eq!(bm.set_range(65_530, 70_000), 4470);
        assert_eq!(bm.count(), 197 + 100 + 1 + 4470);
        assert!(bm.get(3) && bm.get(299) && !bm.get(300) && !bm.get(2));
        assert_eq!(
            bm.unset_runs(0, 70_000),
            vec![(0, 3), (300, 1000), (1001, 65_530)]
        );
        assert_eq!(bm.unset_runs(150, 310), vec![(300, 310)]);
    }

    #[test]
    fn track_bits_count_what_they_hold_and_drop_bits_past_the_end() {
        let bits = TrackBits::from_words(100, vec![u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(
            (bits.count(), bits.words(), bits.word(1)),
            (100, 3, (1 << 36) - 1)
        );
        assert_eq!(bits.word(2), 0);
        assert_eq!(bits.clear_word(0, 0xff), 8);
        assert_eq!(bits.clear_word(0, 0xff), 0);
        let mut changed = Vec::new();
        assert_eq!(bits.set_range(4, 70, |w| changed.push(w)), 4);
        assert_eq!(changed, vec![0]);
        assert_eq!(
            (bits.count(), bits.next_set(0), bits.count_from(90)),
            (96, Some(4), 10)
        );
        let copy = bits.snapshot();
        bits.clear_word(1, u64::MAX);
        assert_eq!(
            (copy.count(), bits.count(), bits.next_set(64)),
            (96, 60, None)
        );
    }

    #[tokio::test]
    async fn commit_persists_and_reopen_checks_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
        let probe = BackingStore::probe(&dir.path().join("d"), Some(4096), false, false).unwrap();
        let data = BackingStore::open(&dir.path().join("d"), probe, false, false, engine).unwrap();
        let bm = TrackBitmap::create(&path, 4096, 40_000).unwrap();
        bm.set_range(10, 20);
        bm.set(39_999);
        assert!(!bm.is_durable(10));
        bm.commit(&data, &FlushWatch::new(&data, false))
            .await
            .unwrap();
        assert!(bm.is_durable(10) && bm.is_durable(39_999));
        let again = TrackBitmap::open(&path, 4096, 40_000).unwrap();
        assert_eq!(again.count(), 11);
        assert!(again.get(19) && !again.get(20) && again.get(39_999));
        assert!(matches!(
            TrackBitmap::open(&path, 8192, 40_000),
            Err(BitmapError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn cleared_bits_are_durable_and_count_as_not_durable_when_set_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oos");
        let bm = TrackBitmap::create(&path, 65536, 1000).unwrap();
        bm.set_range(0, 200);
        bm.commit_bits().await.unwrap();
        assert!(bm.all_durable(0, 200));
        assert_eq!(bm.bits().next_set(0), Some(0));
        // Clear tracks 0..64 and 100..110.
        let cleared = bm
            .clear_with(|b| b.clear_now(0, u64::MAX) + b.clear_now(1, 0x3ff << 36))
            .await
            .unwrap();
        assert_eq!(cleared, 74);
        assert_eq!(bm.count(), 126);
        assert_eq!(bm.bits().next_set(0), Some(64));
        assert_eq!(bm.bits().next_set(100), Some(110));
        assert_eq!(bm.bits().count_from(150), 50);
        assert!(!bm.is_durable(5) && bm.is_durable(64));
        // On disk too.
        let again = TrackBitmap::open(&path, 65536, 1000).unwrap();
        assert_eq!(again.count(), 126);
        assert!(!again.get(105) && again.get(110));
        // Set again: not durable until the next commit.
        bm.set(5);
        assert!(!bm.all_durable(5, 6));
        bm.commit_bits().await.unwrap();
        assert!(bm.all_durable(5, 6));
        assert!(TrackBitmap::open(&path, 65536, 1000).unwrap().get(5));
    }

    /// A bit another task has set in memory but not yet marked for a
    /// commit (it is between setting the bits and marking their pages):
    /// a plain commit finds nothing to do, a commit for its track writes
    /// it.
    #[tokio::test]
    async fn a_commit_for_a_track_writes_a_bit_its_setter_has_not_marked_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oos");
        let bm = TrackBitmap::create(&path, 65536, 100_000).unwrap();
        bm.set(3);
        bm.commit_bits().await.unwrap();
        // The other task's bits: set, their pages not marked yet.
        bm.bits.set_word(1, 1 << 6);
        bm.bits.set_word(40_000 / 64, 1);
        bm.commit_bits().await.unwrap();
        assert!(!bm.is_durable(70), "a plain commit made nothing durable");
        bm.commit_bits_for(70, 71).await.unwrap();
        assert!(bm.is_durable(70) && bm.all_durable(3, 4));
        let again = TrackBitmap::open(&path, 65536, 100_000).unwrap();
        assert!(again.get(70) && again.get(3));
        // Only the tracks asked for: the other page waits for its setter.
        assert!(!again.get(40_000) && !bm.is_durable(40_000));

        let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
        let volume = dir.path().join("volume");
        let probe = BackingStore::probe(&volume, Some(4096), false, false).unwrap();
        let data = BackingStore::open(&volume, probe, false, false, engine).unwrap();
        bm.commit_for(&data, &FlushWatch::new(&data, false), 39_990, 40_010)
            .await
            .unwrap();
        assert!(bm.is_durable(40_000));
        assert!(TrackBitmap::open(&path, 65536, 100_000)
            .unwrap()
            .get(40_000));
    }

    /// Every bit set is not every bit durable: a partial last word too.
    #[tokio::test]
    async fn all_set_durably_waits_for_the_commit_of_every_bit() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
        let probe = BackingStore::probe(&dir.path().join("d"), Some(4096), false, false).unwrap();
        let data = BackingStore::open(&dir.path().join("d"), probe, false, false, engine).unwrap();
        let bm = TrackBitmap::create(&dir.path().join("b"), 4096, 70).unwrap();
        bm.set_range(0, 69);
        bm.commit(&data, &FlushWatch::new(&data, false))
            .await
            .unwrap();
        assert!(!bm.all_set() && !bm.all_set_durably());
        bm.set(69);
        assert!(bm.all_set() && !bm.all_set_durably());
        bm.commit(&data, &FlushWatch::new(&data, false))
            .await
            .unwrap();
        assert!(bm.all_set_durably());
    }

    /// A commit whose future is dropped while it waits (a request future
    /// dropped by an unwinding connection task, say) keeps the pages it
    /// took dirty: the next commit writes them, instead of finding nothing
    /// to do and answering Ok while the bit is not in the file.
    #[tokio::test]
    async fn a_dropped_commit_leaves_its_pages_to_the_next() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bitmap");
        let engine = crate::io::Engine::start(crate::config::IoEngineChoice::Threads).unwrap();
        let volume = dir.path().join("volume");
        let probe = BackingStore::probe(&volume, Some(4096), false, false).unwrap();
        let data = BackingStore::open(&volume, probe, false, false, engine).unwrap();
        let bm = TrackBitmap::create(&path, 4096, 100).unwrap();
        bm.set(7);
        {
            let watch = FlushWatch::new(&data, false);
            let first = bm.commit(&data, &watch);
            tokio::pin!(first);
            // Waiting for the data flush (on the thread pool), then dropped.
            assert!(first.as_mut().now_or_never().is_none());
        }
        bm.commit(&data, &FlushWatch::new(&data, false))
            .await
            .unwrap();
        assert!(bm.is_durable(7));
        assert!(
            TrackBitmap::open(&path, 4096, 100).unwrap().get(7),
            "the commit answered Ok but bit 7 is not in the file"
        );
    }
}
