//! Chunk buffers whose bytes start on a [`DIRECT_IO_ALIGN`] boundary, so that the
//! receiver can hand them to an `O_DIRECT` write: the kernel then moves them to the
//! device without copying them into the page cache first.

use std::ops::{Deref, DerefMut};

/// Alignment of buffer addresses, file offsets and lengths that `O_DIRECT` accepts on
/// every Linux filesystem and device in use (logical blocks are at most 4 KiB).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A byte buffer of adjustable length whose first byte is [`DIRECT_IO_ALIGN`]-aligned.
/// It keeps its memory across uses, and grows only when asked for more.
#[derive(Default)]
pub struct AlignedBuf {
    /// Backing store, `DIRECT_IO_ALIGN - 1` bytes larger than the usable part so that an
    /// aligned start always exists inside it. Never reallocated except by `set_len`.
    store: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new() -> Self {
        AlignedBuf::default()
    }

    /// Makes the buffer `len` bytes long. The bytes are whatever the buffer held before
    /// (or zeros where it grew): callers overwrite all of them.
    pub fn set_len(&mut self, len: usize) {
        if self.start + len > self.store.len() {
            // Zeroed memory from the allocator: pages the kernel has not handed out yet
            // cost nothing until they are written.
            let store = vec![0u8; len + DIRECT_IO_ALIGN - 1];
            let misalign = store.as_ptr() as usize % DIRECT_IO_ALIGN;
            self.start = (DIRECT_IO_ALIGN - misalign) % DIRECT_IO_ALIGN;
            self.store = store;
        }
        self.len = len;
    }

    /// Replaces the contents with a copy of `data`.
    pub fn copy_from(&mut self, data: &[u8]) {
        self.set_len(data.len());
        self.copy_from_slice(data);
    }

    /// Bytes the buffer can hold without growing.
    pub fn capacity(&self) -> usize {
        self.store.len() - self.start
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.store[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.store[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_is_aligned_whatever_the_length_and_contents_survive_shrinking() {
        let mut buf = AlignedBuf::new();
        assert!(buf.is_empty());
        for len in [1, 4095, 4096, 4097, 1 << 20, 3, (4 << 20) + 17] {
            buf.set_len(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % DIRECT_IO_ALIGN, 0, "len {len}");
        }
        buf.copy_from(b"skyferry");
        assert_eq!(&buf[..], b"skyferry");
        buf.set_len(3);
        assert_eq!(&buf[..], b"sky");
    }
}
