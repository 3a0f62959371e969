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

/// The BLAKE3 value of chunk `index` of a file cut by `layout`, whose bytes are `data`:
/// the chaining value of the chunk's subtree of the file's BLAKE3 tree (the chunk's
/// offset is part of it, so the same bytes at another index give another value), or,
/// for a file of exactly one chunk, the file's BLAKE3 itself. [`TreeHasher`] combines
/// the values of all chunks into the file's BLAKE3, equal to `b3sum` of the file.
///
/// Requires a power-of-two chunk size of at least 1 KiB (BLAKE3's chunk) and `data` no
/// longer than the chunk, and not empty in a file of several chunks (BLAKE3 has no value
/// for an empty subtree and panics): the protocol checks all three before any chunk is
/// hashed (a chunk's `raw_len` must be the layout's, at least 1 byte).
pub fn chunk_value(layout: &ChunkLayout, index: u32, data: &[u8]) -> Hash {
    use blake3::hazmat::HasherExt;
    debug_assert!(
        layout.chunk_size.is_power_of_two() && layout.chunk_size as usize >= blake3::CHUNK_LEN
    );
    debug_assert!(data.len() <= layout.chunk_size as usize);
    if layout.count() == 1 {
        return hash_bytes(data);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(layout.offset(index));
    hasher.update(data);
    hasher.finalize_non_root()
}

/// Combines chunk values ([`chunk_value`]), given in index order, into the whole file's
/// BLAKE3. Memory is O(log chunks): subtrees are merged as soon as the tree's shape
/// allows (BLAKE3's own lazy merging, with chunk subtrees in place of 1 KiB chunks,
/// which is valid because every chunk but the last covers the same power of two of
/// BLAKE3 chunks).
#[derive(Debug, Clone)]
pub struct TreeHasher {
    count: u32,
    pushed: u32,
    stack: Vec<Hash>,
}

impl TreeHasher {
    /// For a file cut by `layout`.
    pub fn new(layout: &ChunkLayout) -> TreeHasher {
        TreeHasher {
            count: layout.count(),
            pushed: 0,
            stack: Vec::new(),
        }
    }

    /// Chunks pushed so far (the next value pushed is that chunk's).
    pub fn pushed(&self) -> u32 {
        self.pushed
    }

    /// Adds the value of the next chunk.
    pub fn push(&mut self, value: Hash) {
        use blake3::hazmat::{merge_subtrees_non_root, Mode};
        // Merge what is complete to the left: after `pushed` chunks the stack holds one
        // subtree per set bit of `pushed`; merging lazily (before the push, not after)
        // keeps the last merge for `finalize`, which must be the root.
        while self.stack.len() > self.pushed.count_ones() as usize {
            let (Some(right), Some(left)) = (self.stack.pop(), self.stack.pop()) else {
                break;
            };
            self.stack
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        self.stack.push(value);
        self.pushed = self.pushed.saturating_add(1);
    }

    /// The file's BLAKE3, or `None` when not exactly the layout's chunk count was pushed.
    pub fn finalize(mut self) -> Option<Hash> {
        use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
        if self.pushed != self.count {
            return None;
        }
        match self.count {
            0 => return Some(hash_bytes(&[])),
            // A one-chunk file's value is already its root hash.
            1 => return self.stack.pop(),
            _ => {}
        }
        while self.stack.len() > 2 {
            let right = self.stack.pop()?;
            let left = self.stack.pop()?;
            self.stack
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        let right = self.stack.pop()?;
        let left = self.stack.pop()?;
        Some(*merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
    }
}

/// The BLAKE3 of a whole source file read chunk by chunk: the chunk values and the file
/// hash derived from them, with one read and one hash of every byte.
pub fn file_tree_hash(file: &std::fs::File, layout: &ChunkLayout) -> std::io::Result<Hash> {
    use std::os::unix::fs::FileExt;
    let mut tree = TreeHasher::new(layout);
    let mut buf = vec![0u8; layout.chunk_size as usize];
    for index in 0..layout.count() {
        let len = layout.len(index).unwrap_or(0) as usize;
        file.read_exact_at(&mut buf[..len], layout.offset(index))?;
        tree.push(chunk_value(layout, index, &buf[..len]));
    }
    tree.finalize()
        .ok_or_else(|| std::io::Error::other("chunk count mismatch"))
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

    /// The whole-file hash derived from chunk values, for chunk size `cs`.
    fn derived(data: &[u8], cs: u32) -> Hash {
        let layout = ChunkLayout::new(data.len() as u64, cs);
        let mut tree = TreeHasher::new(&layout);
        for i in 0..layout.count() {
            let off = layout.offset(i) as usize;
            let len = layout.len(i).unwrap() as usize;
            tree.push(chunk_value(&layout, i, &data[off..off + len]));
        }
        tree.finalize().unwrap()
    }

    #[test]
    fn derived_hashes_equal_blake3_at_the_boundary_sizes() {
        let data: Vec<u8> = (0..(70 * 4096 + 17))
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for cs in [1024u32, 4096, 65536] {
            let c = cs as usize;
            for len in [
                0,
                1,
                c - 1,
                c,
                c + 1,
                2 * c,
                3 * c,
                3 * c + 5,
                5 * c - 1,
                7 * c,
                8 * c,
                9 * c + 1,
                13 * c + 100,
                16 * c,
                17 * c,
            ] {
                if len > data.len() {
                    continue;
                }
                assert_eq!(
                    derived(&data[..len], cs),
                    hash_bytes(&data[..len]),
                    "size {len}, chunk size {cs}"
                );
            }
        }
    }

    #[test]
    fn a_chunk_at_another_index_has_another_value() {
        let layout = ChunkLayout::new(4 * 1024, 1024);
        let bytes = [7u8; 1024];
        assert_ne!(
            chunk_value(&layout, 1, &bytes),
            chunk_value(&layout, 2, &bytes)
        );
        // Too few or too many values give no hash at all.
        let mut tree = TreeHasher::new(&layout);
        tree.push(chunk_value(&layout, 0, &bytes));
        assert_eq!(tree.clone().finalize(), None);
        for i in 1..5 {
            tree.push(chunk_value(&layout, i.min(3), &bytes));
        }
        assert_eq!(tree.finalize(), None);
    }

    proptest! {
        /// `b3sum` of the file equals the hash derived from its chunk values, for any
        /// size and chunk size (chunk counts that are and are not powers of two).
        #[test]
        fn derived_hash_equals_blake3(
            len in 0usize..200_000,
            shift in 10u32..15,
            seed in any::<u8>(),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            prop_assert_eq!(derived(&data, 1 << shift), hash_bytes(&data));
        }

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
