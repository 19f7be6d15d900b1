//! Copy services: persistent track bitmaps, per-track locks, FlashCopy and
//! PPRC.
//!
//! * [`bitmap`] — a track bitmap kept in memory and in a file in the state
//!   directory, with group commit (one fsync pair covers many updates).
//! * [`locks`] — per-track reader/writer locks so host I/O never races a
//!   copy of the same track.
//! * [`drop_behind`] — what background copies drop from the page cache
//!   once they are through with it.
//! * [`flashcopy`] — point-in-time copies: relationships, the data path
//!   rules (copy-before-write, target redirect), the background copier and
//!   the manager that establishes, withdraws and restores relationships.
//! * [`pprc`] — synchronous remote mirroring: the peer protocol and links,
//!   paths, pairs and their out-of-sync bitmaps, the consistency group.

pub mod bitmap;
pub mod drop_behind;
pub mod flashcopy;
pub mod locks;
pub mod pprc;

/// The tracks `[first, last]` touched by `len > 0` bytes at `offset`.
pub fn track_span(offset: u64, len: u64, track_size: u64) -> (u64, u64) {
    (offset / track_size, (offset + len - 1) / track_size)
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans() {
        assert_eq!(super::track_span(0, 1, 4096), (0, 0));
        assert_eq!(super::track_span(4095, 2, 4096), (0, 1));
        assert_eq!(super::track_span(8192, 8192, 4096), (2, 3));
    }
}
