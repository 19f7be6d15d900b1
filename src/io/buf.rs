//! Buffers owned by in-flight I/O operations.
//!
//! An operation keeps its buffer until its completion arrives; the engine
//! hands the buffer back with the result. [`IoBuffer`] is an owned, optionally
//! aligned allocation (O_DIRECT needs sector alignment); [`IoBuf`] also admits
//! shared [`Bytes`] so write payloads go from the socket to the disk without
//! a copy.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use bytes::Bytes;

/// An owned byte buffer with a fixed capacity, a fill level and an alignment.
pub struct IoBuffer {
    ptr: NonNull<u8>,
    /// Filled bytes; always `<= cap`.
    len: usize,
    /// Usable capacity (the layout may be one byte larger for empty buffers).
    cap: usize,
    layout: Layout,
}

// SAFETY: IoBuffer owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuffer {}
// SAFETY: shared references only give read access to initialized bytes.
unsafe impl Sync for IoBuffer {}

impl IoBuffer {
    /// Allocates `capacity` bytes aligned to `align` (a power of two), empty.
    /// Large buffers come from (and return to) a pool, so big reads do not
    /// pay for fresh pages on every request.
    pub fn with_capacity(capacity: usize, align: usize) -> Self {
        if let Some(class) = pool::class_of(capacity, align) {
            let (ptr, layout) = pool::take(class);
            return IoBuffer {
                ptr,
                len: 0,
                cap: capacity,
                layout,
            };
        }
        let layout = Layout::from_size_align(capacity.max(1), align.max(1))
            .expect("buffer layout: alignment must be a power of two");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuffer {
            ptr,
            len: 0,
            cap: capacity,
            layout,
        }
    }

    /// Allocates a zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("buffer layout: alignment must be a power of two");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuffer {
            ptr,
            len,
            cap: len,
            layout,
        }
    }

    /// Copies `data` into a new buffer aligned to `align`.
    pub fn copy_from(data: &[u8], align: usize) -> Self {
        let mut buf = Self::with_capacity(data.len(), align);
        // SAFETY: the allocation holds at least data.len() bytes and cannot
        // overlap `data`, which the caller still borrows.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr.as_ptr(), data.len()) };
        buf.len = data.len();
        buf
    }

    /// Bytes filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Pointer to the first unfilled byte and the number of unfilled bytes.
    pub fn spare_mut(&mut self) -> (*mut u8, usize) {
        // SAFETY: len <= capacity, so the offset stays inside the allocation.
        (
            unsafe { self.ptr.as_ptr().add(self.len) },
            self.cap - self.len,
        )
    }

    /// Raw pointer to the first unfilled byte and the unfilled length, for
    /// handing to the kernel while the buffer is kept alive elsewhere.
    pub fn spare_raw(&self) -> (*mut u8, usize) {
        (
            self.ptr.as_ptr().wrapping_add(self.len),
            self.cap - self.len,
        )
    }

    /// Marks `n` more bytes as filled.
    ///
    /// # Safety
    /// The caller guarantees the next `n` bytes after the fill level were
    /// initialized (for instance by a completed read of `n` bytes).
    pub unsafe fn advance(&mut self, n: usize) {
        assert!(self.len + n <= self.cap, "advance past capacity");
        self.len += n;
    }

    /// Zero-fills the rest of the capacity (used when a read hits end of file).
    pub fn fill_zeroes(&mut self) {
        let (ptr, spare) = self.spare_mut();
        // SAFETY: `spare` bytes from `ptr` are inside the allocation.
        unsafe { std::ptr::write_bytes(ptr, 0, spare) };
        self.len = self.cap;
    }

    /// Shortens the filled part to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The filled bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialized and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The filled bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the first `len` bytes are initialized and owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Converts into `Bytes` without copying.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for IoBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        if pool::give_back(self.ptr, self.layout) {
            return;
        }
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A pool of large page-aligned allocations, one free list per power-of-two
/// size class from 64 KiB to 32 MiB, each holding at most 64 MiB.
mod pool {
    use std::alloc::{self, Layout};
    use std::ptr::NonNull;
    use std::sync::Mutex;

    const MIN_SHIFT: u32 = 16;
    const MAX_SHIFT: u32 = 25;
    const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
    const BYTES_PER_CLASS: usize = 64 << 20;
    const ALIGN: usize = 4096;

    /// Free allocations of one class. Raw pointers are owned by the pool.
    struct FreeList(Vec<NonNull<u8>>);
    // SAFETY: the pool exclusively owns the allocations in its lists.
    unsafe impl Send for FreeList {}

    static LISTS: [Mutex<FreeList>; CLASSES] =
        [const { Mutex::new(FreeList(Vec::new())) }; CLASSES];

    /// The class for a request, if it is pooled.
    pub(super) fn class_of(capacity: usize, align: usize) -> Option<usize> {
        if align > ALIGN || !((1 << MIN_SHIFT)..=(1 << MAX_SHIFT)).contains(&capacity) {
            return None;
        }
        let shift = capacity.next_power_of_two().trailing_zeros();
        Some((shift - MIN_SHIFT) as usize)
    }

    fn layout(class: usize) -> Layout {
        Layout::from_size_align(1 << (class as u32 + MIN_SHIFT), ALIGN).expect("pool layout")
    }

    /// Takes a buffer of `class`, allocating if the list is empty.
    pub(super) fn take(class: usize) -> (NonNull<u8>, Layout) {
        let layout = layout(class);
        let reused = LISTS[class]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .pop();
        if let Some(ptr) = reused {
            return (ptr, layout);
        }
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        match NonNull::new(raw) {
            Some(ptr) => (ptr, layout),
            None => alloc::handle_alloc_error(layout),
        }
    }

    /// Returns a pooled allocation; false if it is not pooled or the list is full.
    pub(super) fn give_back(ptr: NonNull<u8>, layout: Layout) -> bool {
        if layout.align() != ALIGN || !layout.size().is_power_of_two() {
            return false;
        }
        let shift = layout.size().trailing_zeros();
        if !(MIN_SHIFT..=MAX_SHIFT).contains(&shift) {
            return false;
        }
        let mut list = LISTS[(shift - MIN_SHIFT) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if (list.0.len() + 1) * layout.size() > BYTES_PER_CLASS.max(2 * layout.size()) {
            return false;
        }
        list.0.push(ptr);
        true
    }
}

impl std::fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuffer")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("align", &self.layout.align())
            .finish()
    }
}

/// Data to be written: shared bytes from the network, or an owned buffer.
#[derive(Debug)]
pub enum IoBuf {
    /// Zero-copy payload.
    Shared(Bytes),
    /// Owned (possibly aligned) buffer.
    Owned(IoBuffer),
}

impl IoBuf {
    /// The bytes to write.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::Shared(b) => b,
            IoBuf::Owned(b) => b.as_slice(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_fillable() {
        let mut b = IoBuffer::with_capacity(8192, 4096);
        assert_eq!(b.spare_mut().0 as usize % 4096, 0);
        assert_eq!(b.capacity(), 8192);
        let (ptr, n) = b.spare_mut();
        // SAFETY: writing within the spare capacity.
        unsafe { std::ptr::write_bytes(ptr, 7, 100) };
        assert_eq!(n, 8192);
        // SAFETY: 100 bytes were just initialized.
        unsafe { b.advance(100) };
        b.fill_zeroes();
        assert_eq!(b.len(), 8192);
        assert_eq!(&b.as_slice()[98..102], &[7, 7, 0, 0]);
        let frozen = b.freeze();
        assert_eq!(frozen.len(), 8192);
        assert_eq!(IoBuffer::copy_from(b"abc", 512).as_slice(), b"abc");
        assert!(IoBuffer::zeroed(5, 1).as_slice().iter().all(|&x| x == 0));
    }
}
