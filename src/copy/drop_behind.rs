//! Drop-behind for background copies: the ranges a copy has read (or
//! written and flushed), to be dropped from the page cache once it is
//! done with them.
//!
//! A copy reads and writes each page once, so keeping its pages would
//! only evict the rest of the cache. Worse, on Linux 6.x ext4 the pages a
//! copy leaves are in large folios (readahead builds them for sequential
//! reads, large writes for themselves), and every later small write into
//! one walks all its buffer heads: 4 KiB random writes ran 3–4× slower
//! right after a copy. The ranges are widened to [`DROP_BEHIND_ALIGN`], so
//! no folio straddles an edge (`POSIX_FADV_DONTNEED` keeps a folio that is
//! only partly inside the range).

use std::collections::VecDeque;

/// Alignment of the ranges dropped: the largest page-cache folio on
/// x86-64.
pub const DROP_BEHIND_ALIGN: u64 = 2 << 20;

/// The byte ranges a copy is through with and has not yet dropped from the
/// page cache, widened to [`DROP_BEHIND_ALIGN`], in order.
#[derive(Debug, Default)]
pub struct DropBehind {
    pending: VecDeque<(u64, u64)>,
}

impl DropBehind {
    /// Notes a range the copy has read (ranges come in increasing order).
    pub fn note(&mut self, start: u64, end: u64) {
        let start = start / DROP_BEHIND_ALIGN * DROP_BEHIND_ALIGN;
        let end = end.div_ceil(DROP_BEHIND_ALIGN) * DROP_BEHIND_ALIGN;
        match self.pending.back_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => self.pending.push_back((start, end)),
        }
    }

    /// Takes the noted ranges' parts below byte `below`, rounded down to
    /// the alignment (the rest may still be read).
    pub fn take_below(&mut self, below: u64) -> Vec<(u64, u64)> {
        let below = below / DROP_BEHIND_ALIGN * DROP_BEHIND_ALIGN;
        let mut taken = Vec::new();
        while let Some(front) = self.pending.front_mut() {
            let cut = front.1.min(below);
            if cut <= front.0 {
                break;
            }
            taken.push((front.0, cut));
            front.0 = cut;
            if front.0 == front.1 {
                self.pending.pop_front();
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn whole_aligned_ranges_go_once_the_copy_is_past_them() {
        let mut behind = DropBehind::default();
        // Runs of a copy: adjacent ones merge, widened to 2 MiB.
        behind.note(0, MIB);
        behind.note(MIB, 2 * MIB + (64 << 10));
        behind.note(9 * MIB, 9 * MIB + (64 << 10));
        assert_eq!(behind.take_below(MIB), vec![]);
        // Only whole 2 MiB regions below what was read go.
        assert_eq!(behind.take_below(3 * MIB), vec![(0, 2 * MIB)]);
        assert_eq!(behind.take_below(3 * MIB), vec![]);
        assert_eq!(
            behind.take_below(10 * MIB),
            vec![(2 * MIB, 4 * MIB), (8 * MIB, 10 * MIB)]
        );
        behind.note(11 * MIB, 11 * MIB + 1);
        assert_eq!(behind.take_below(u64::MAX), vec![(10 * MIB, 12 * MIB)]);
        assert_eq!(behind.take_below(u64::MAX), vec![]);
    }
}
