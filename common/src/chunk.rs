//! Chunk geometry, chunk sets and checksums.
//!
//! A file of `size` bytes is cut into `ceil(size / chunk_size)` chunks; chunk `i` covers
//! bytes `[i * chunk_size, min((i + 1) * chunk_size, size))`. A zero-byte file has no
//! chunks. Chunks are the unit of verification (each carries its BLAKE3) and of resume
//! (the receiver tells the agent which chunks it still misses).

use crate::protocol::{ChunkRange, Hash};

/// How a file of a given size is cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLayout {
    pub size: u64,
    pub chunk_size: u32,
}

impl ChunkLayout {
    pub fn new(size: u64, chunk_size: u32) -> Self {
        debug_assert!(chunk_size > 0, "chunk size is validated by the caller");
        ChunkLayout { size, chunk_size }
    }

    /// Number of chunks; saturates at `u32::MAX` (callers reject such files: see
    /// [`ChunkLayout::fits_u32`]).
    pub fn count(&self) -> u32 {
        let cs = u64::from(self.chunk_size.max(1));
        u32::try_from(self.size.div_ceil(cs)).unwrap_or(u32::MAX)
    }

    /// Whether the chunk count can be expressed on the wire.
    pub fn fits_u32(&self) -> bool {
        let cs = u64::from(self.chunk_size.max(1));
        self.size.div_ceil(cs) <= u64::from(u32::MAX)
    }

    /// Byte offset of chunk `index`.
    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size)
    }

    /// Length of chunk `index`, or `None` when the index is out of range.
    pub fn len(&self, index: u32) -> Option<u32> {
        if index >= self.count() {
            return None;
        }
        let rest = self.size - self.offset(index);
        // rest > 0 because index < count; the min bounds it by chunk_size (a u32).
        Some(rest.min(u64::from(self.chunk_size)) as u32)
    }

    /// The whole file as one range list (empty for a zero-byte file).
    pub fn all(&self) -> Vec<ChunkRange> {
        match self.count() {
            0 => Vec::new(),
            n => vec![ChunkRange { start: 0, end: n }],
        }
    }
}

/// A set of chunk indices (a bitmap), e.g. the chunks a receiver has verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    bits: Vec<u64>,
    count: u32,
    present: u32,
}

impl ChunkSet {
    /// An empty set for a file of `count` chunks.
    pub fn new(count: u32) -> Self {
        ChunkSet {
            bits: vec![0; (count as usize).div_ceil(64)],
            count,
            present: 0,
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn present(&self) -> u32 {
        self.present
    }

    pub fn is_complete(&self) -> bool {
        self.present == self.count
    }

    pub fn contains(&self, index: u32) -> bool {
        index < self.count && self.bits[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    /// Adds `index`; returns false when it was already present or out of range.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.count || self.contains(index) {
            return false;
        }
        self.bits[(index / 64) as usize] |= 1 << (index % 64);
        self.present += 1;
        true
    }

    pub fn remove(&mut self, index: u32) -> bool {
        if !self.contains(index) {
            return false;
        }
        self.bits[(index / 64) as usize] &= !(1 << (index % 64));
        self.present -= 1;
        true
    }

    /// The absent indices as ascending, non-overlapping, non-adjacent ranges.
    pub fn missing(&self) -> Vec<ChunkRange> {
        let mut out = Vec::new();
        let mut start = None;
        for i in 0..self.count {
            match (self.contains(i), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    out.push(ChunkRange { start: s, end: i });
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push(ChunkRange {
                start: s,
                end: self.count,
            });
        }
        out
    }
}

/// BLAKE3 of a byte slice.
pub fn hash_bytes(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// BLAKE3 of a whole file, streamed with a fixed-size buffer (never the whole file in
/// memory). Blocking: call it off the async runtime.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<(Hash, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((*hasher.finalize().as_bytes(), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundary_sizes() {
        let cs = 1000u32;
        let cases = [
            (0u64, 0u32),
            (1, 1),
            (999, 1),
            (1000, 1),
            (1001, 2),
            (5000, 5),
            (5001, 6),
        ];
        for (size, count) in cases {
            let l = ChunkLayout::new(size, cs);
            assert_eq!(l.count(), count, "size {size}");
            let total: u64 = (0..l.count()).map(|i| u64::from(l.len(i).unwrap())).sum();
            assert_eq!(total, size, "chunk lengths add up for size {size}");
            assert_eq!(l.len(l.count()), None);
        }
        assert_eq!(ChunkLayout::new(1001, cs).len(1), Some(1));
        assert!(ChunkLayout::new(0, cs).all().is_empty());
    }

    proptest! {
        #[test]
        fn missing_is_the_complement(count in 0u32..300, picks in proptest::collection::vec(0u32..300, 0..300)) {
            let mut set = ChunkSet::new(count);
            for p in &picks { set.insert(*p); }
            let missing = set.missing();
            let mut covered = ChunkSet::new(count);
            for r in &missing {
                prop_assert!(r.start < r.end);
                for i in r.start..r.end {
                    prop_assert!(!set.contains(i));
                    covered.insert(i);
                }
            }
            prop_assert_eq!(covered.present() + set.present(), count);
            for w in missing.windows(2) { prop_assert!(w[0].end < w[1].start); }
        }
    }
}
