//! Fuzz bytes → values near the boundaries that matter (chunk sizes at their limits,
//! file sizes at chunk boundaries, paths that must be refused), so that the fuzzer does
//! not have to find `65536` or `"../x"` by chance.

use arbitrary::{Result, Unstructured};
use skyferry_common::protocol::{MAX_CHUNK_SIZE, MAX_PATH_LEN, MIN_CHUNK_SIZE};

/// A power of two within `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
fn power_of_two_chunk_size(u: &mut Unstructured) -> Result<u32> {
    let (lo, hi) = (
        MIN_CHUNK_SIZE.trailing_zeros(),
        MAX_CHUNK_SIZE.trailing_zeros(),
    );
    Ok(1 << u.int_in_range(lo..=hi)?)
}

/// A chunk size as a peer may offer it: mostly valid (a power of two within the
/// bounds), sometimes within the bounds but not a power of two, just outside them, or
/// anything (including 0).
pub fn offered_chunk_size(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=10)? {
        0..=3 => MIN_CHUNK_SIZE,
        4 => MIN_CHUNK_SIZE + 1,
        5 => 3 * MIN_CHUNK_SIZE / 2 + 7,
        6 => MAX_CHUNK_SIZE,
        7 => MIN_CHUNK_SIZE - 1,
        8 => MAX_CHUNK_SIZE + 1,
        9 => power_of_two_chunk_size(u)?,
        _ => u.arbitrary()?,
    })
}

/// A chunk size the agent's configuration accepts (`transfer.chunk_size` is validated
/// to a power of two within `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`).
pub fn agent_chunk_size(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=4)? {
        0..=2 => MIN_CHUNK_SIZE,
        3 => MAX_CHUNK_SIZE,
        _ => power_of_two_chunk_size(u)?,
    })
}

/// A file size near the chunk boundaries of `chunk_size`: 0, a few bytes, k chunks
/// minus one, exactly, plus one, thousands of chunks (enough for a resume that must be
/// coalesced), a huge file, or anything up to `u64::MAX`.
pub fn file_size(u: &mut Unstructured, chunk_size: u32) -> Result<u64> {
    let cs = u64::from(chunk_size.max(1));
    let k = u64::from(u.int_in_range(1u8..=6)?);
    Ok(match u.int_in_range(0u8..=8)? {
        0 => 0,
        1 => u.int_in_range(1u64..=64)?,
        2 => cs * k - 1,
        3 => cs * k,
        4 => cs * k + 1,
        5 => cs * k + u.int_in_range(0..=cs - 1)?,
        6 => cs * u64::from(u.int_in_range(7u32..=20_000)?) + u.int_in_range(0..=cs - 1)?,
        7 => u.int_in_range(0u64..=1 << 44)?,
        _ => u.arbitrary()?,
    })
}

/// A receiver's `max_file_size`.
pub fn max_file_size(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u64::MAX,
        1 => 1 << 40,
        2 => 1 << 20,
        _ => u.arbitrary()?,
    })
}

/// Paths the receiver must accept.
const GOOD_PATHS: &[&str] = &[
    "2024-05-01/det07.fits",
    "a",
    "night/exp_0001/det84.fits.fz",
    "ümlaut/ファイル.fits",
    ".hidden/x",
    "a..b/c",
];

/// Paths the receiver must refuse.
const BAD_PATHS: &[&str] = &[
    "",
    "/etc/passwd",
    "..",
    "a/../b",
    "../a",
    "a/./b",
    "./a",
    "a//b",
    "a/",
    "a\\b",
    "a\0b",
    "a\nb",
    "\u{1b}[2Jx",
    "a\u{85}b",
    "a\u{7f}",
];

/// An offered path: good, bad, at the length limits, or any string.
pub fn path(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0u8..=5)? {
        0 | 1 => (*u.choose(GOOD_PATHS)?).to_owned(),
        2 => (*u.choose(BAD_PATHS)?).to_owned(),
        // A component of 255 (allowed) or 256 bytes.
        3 => format!("d/{}", "c".repeat(u.int_in_range(255..=256)?)),
        // A whole path of MAX_PATH_LEN bytes or one more.
        4 => {
            let len = u.int_in_range(MAX_PATH_LEN..=MAX_PATH_LEN + 1)?;
            let mut s = "abc/".repeat(len / 4 + 1);
            s.truncate(len - 1);
            s.push('z');
            s
        }
        _ => u.arbitrary()?,
    })
}

/// `len` bytes of chunk content, repetitive enough for zstd to pay.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 61) as u8).wrapping_mul(seed | 1) ^ seed)
        .collect()
}
