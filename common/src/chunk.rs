//! Chunk geometry, chunk sets and checksums.
//!
//! A file of `size` bytes is cut into `ceil(size / chunk_size)` chunks; chunk `i` covers
//! bytes `[i * chunk_size, min((i + 1) * chunk_size, size))`. A zero-byte file has no
//! chunks. Chunks are the unit of verification (each carries its BLAKE3) and of resume
//! (the receiver tells the agent which chunks it still misses).

use std::collections::BTreeMap;

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

    /// Bytes covered by the chunks of `r` (clamped to the file).
    pub fn range_bytes(&self, r: ChunkRange) -> u64 {
        let start = self.offset(r.start).min(self.size);
        let end = self.offset(r.end).min(self.size);
        end - start
    }

    /// The whole file as one range list (empty for a zero-byte file).
    pub fn all(&self) -> Vec<ChunkRange> {
        match self.count() {
            0 => Vec::new(),
            n => vec![ChunkRange { start: 0, end: n }],
        }
    }
}

/// A set of chunk indices, e.g. the chunks a receiver has verified.
///
/// Stored as disjoint, non-adjacent ranges of present indices (start → end, half-open),
/// so its memory grows with how fragmented the set is, never with the file's chunk
/// count: an empty set for a 1 TiB file costs as little as one for a 1 KiB file, and a
/// file received in order is one range. Every operation is O(log ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSet {
    ranges: BTreeMap<u32, u32>,
    count: u32,
    present: u32,
}

impl ChunkSet {
    /// An empty set for a file of `count` chunks. Allocates nothing.
    pub fn new(count: u32) -> Self {
        ChunkSet {
            ranges: BTreeMap::new(),
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

    /// The range holding `index`, if any.
    fn range_of(&self, index: u32) -> Option<(u32, u32)> {
        let (&start, &end) = self.ranges.range(..=index).next_back()?;
        (index < end).then_some((start, end))
    }

    pub fn contains(&self, index: u32) -> bool {
        index < self.count && self.range_of(index).is_some()
    }

    /// Adds `index`; returns false when it was already present or out of range.
    pub fn insert(&mut self, index: u32) -> bool {
        if index >= self.count || self.range_of(index).is_some() {
            return false;
        }
        // index < count <= u32::MAX, so index + 1 does not overflow.
        let mut start = index;
        let mut end = index + 1;
        if let Some((&s, &e)) = self.ranges.range(..index).next_back() {
            if e == index {
                start = s;
            }
        }
        if let Some(e) = self.ranges.remove(&end) {
            end = e;
        }
        self.ranges.insert(start, end);
        self.present += 1;
        true
    }

    /// Removes `index`; returns false when it was absent.
    pub fn remove(&mut self, index: u32) -> bool {
        let Some((start, end)) = self.range_of(index) else {
            return false;
        };
        self.ranges.remove(&start);
        if start < index {
            self.ranges.insert(start, index);
        }
        if index + 1 < end {
            self.ranges.insert(index + 1, end);
        }
        self.present -= 1;
        true
    }

    /// The present indices as ascending, non-overlapping, non-adjacent ranges.
    pub fn ranges(&self) -> impl Iterator<Item = ChunkRange> + '_ {
        self.ranges
            .iter()
            .map(|(&start, &end)| ChunkRange { start, end })
    }

    /// The absent indices as ascending, non-overlapping, non-adjacent ranges.
    pub fn missing(&self) -> Vec<ChunkRange> {
        let mut out = Vec::new();
        let mut next = 0u32;
        for r in self.ranges() {
            if next < r.start {
                out.push(ChunkRange {
                    start: next,
                    end: r.start,
                });
            }
            next = r.end;
        }
        if next < self.count {
            out.push(ChunkRange {
                start: next,
                end: self.count,
            });
        }
        out
    }

    /// Bytes of the absent chunks in `layout` (the layout the set was made for).
    pub fn missing_bytes(&self, layout: &ChunkLayout) -> u64 {
        self.missing().iter().map(|r| layout.range_bytes(*r)).sum()
    }
}

/// BLAKE3 of a byte slice.
pub fn hash_bytes(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// BLAKE3 of a whole file, streamed with a fixed-size buffer (never the whole file in
/// memory). Blocking: call it off the async runtime.
pub fn hash_file(path: &std::path::Path) -> std::io::Result<(Hash, u64)> {
    hash_reader(std::fs::File::open(path)?)
}

/// BLAKE3 of everything `reader` yields, and its length, with a fixed-size buffer.
pub fn hash_reader(mut reader: impl std::io::Read) -> std::io::Result<(Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
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

    #[test]
    fn an_empty_set_of_a_huge_file_allocates_nothing_and_answers_at_once() {
        // 1 TiB in 64 KiB chunks: 16 Mi chunks.
        let layout = ChunkLayout::new(1 << 40, 64 * 1024);
        let mut set = ChunkSet::new(layout.count());
        assert_eq!(set.ranges.len(), 0);
        assert_eq!(set.missing_bytes(&layout), 1 << 40);
        for i in 0..1000 {
            set.insert(i);
        }
        assert_eq!(set.ranges.len(), 1, "in-order chunks are one range");
        assert_eq!(set.missing_bytes(&layout), (1 << 40) - 1000 * 64 * 1024);
    }

    /// One operation on a set, applied both to a `ChunkSet` and to a plain model.
    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32),
        Remove(u32),
    }

    fn op(count: u32) -> impl Strategy<Value = Op> {
        // Indices a little past the end too: those must be refused.
        let idx = 0..count + 3;
        prop_oneof![
            3 => idx.clone().prop_map(Op::Insert),
            1 => idx.prop_map(Op::Remove),
        ]
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

        /// The range set behaves exactly like a set of indices below `count`.
        #[test]
        fn behaves_like_a_plain_set(
            (count, ops) in (0u32..200).prop_flat_map(|c| (Just(c), proptest::collection::vec(op(c), 0..400)))
        ) {
            let mut set = ChunkSet::new(count);
            let mut model = std::collections::BTreeSet::new();
            for o in ops {
                match o {
                    Op::Insert(i) => prop_assert_eq!(set.insert(i), i < count && model.insert(i)),
                    Op::Remove(i) => prop_assert_eq!(set.remove(i), model.remove(&i)),
                }
                prop_assert_eq!(set.present() as usize, model.len());
            }
            for i in 0..count + 3 {
                prop_assert_eq!(set.contains(i), model.contains(&i), "index {}", i);
            }
            prop_assert_eq!(set.is_complete(), model.len() == count as usize);
            // Ranges are ascending, non-empty, disjoint and not adjacent (fully merged).
            let ranges: Vec<ChunkRange> = set.ranges().collect();
            for r in &ranges { prop_assert!(r.start < r.end && r.end <= count); }
            for w in ranges.windows(2) { prop_assert!(w[0].end < w[1].start); }
            let listed: Vec<u32> = ranges.iter().flat_map(|r| r.start..r.end).collect();
            prop_assert_eq!(listed, model.iter().copied().collect::<Vec<_>>());
            // Missing bytes agree with the model for a layout with a short last chunk.
            let layout = ChunkLayout::new(u64::from(count) * 10 - u64::from(count > 0) * 3, 10);
            let expected: u64 = (0..count).filter(|i| !model.contains(i)).map(|i| u64::from(layout.len(i).unwrap())).sum();
            prop_assert_eq!(set.missing_bytes(&layout), expected);
        }
    }
}
