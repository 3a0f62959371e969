//! Per-chunk zstd compression that is skipped when it does not pay.
//!
//! Raw observatory frames compress modestly (noise dominates), already-compressed files
//! (`.fits.fz`, `.gz`) not at all. Compressing costs CPU on the agent and the receiver,
//! so a chunk is sent raw when zstd saves less than [`MIN_SAVING`]. After a chunk that did
//! not pay, the next chunks of the same file are sent raw without trying, for a probe
//! interval that doubles each time (up to [`MAX_SKIP`]): an incompressible 2 GiB file
//! costs a handful of compression attempts, not 512.

use crate::protocol::Codec;

/// A chunk is compressed only if zstd removes at least this fraction of its bytes.
pub const MIN_SAVING: f64 = 0.03;
/// Longest run of chunks sent raw without a compression attempt.
pub const MAX_SKIP: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("zstd decompression failed: {0}")]
    Corrupt(std::io::Error),
    #[error("decompressed to {actual} bytes, expected {expected}")]
    WrongLength { expected: u32, actual: usize },
}

/// Compression decisions for one file's chunks, in order. Holds one zstd context that is
/// reused for every chunk.
pub struct Compressor {
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Output buffer, kept across chunks that did not pay.
    scratch: Vec<u8>,
    skip: u32,
    next_skip: u32,
}

impl Compressor {
    /// `level` 0 disables compression.
    pub fn new(level: i32) -> Self {
        Compressor {
            level,
            zstd: None,
            scratch: Vec::new(),
            skip: 0,
            next_skip: 1,
        }
    }

    /// Encodes one chunk: returns the codec and the payload to send, which is `raw`
    /// itself (moved, not copied) when the chunk goes out uncompressed.
    pub fn encode(&mut self, raw: Vec<u8>) -> (Codec, Vec<u8>) {
        if self.level == 0 || raw.is_empty() {
            return (Codec::Raw, raw);
        }
        if self.skip > 0 {
            self.skip -= 1;
            return (Codec::Raw, raw);
        }
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(raw.len()));
        if self.zstd.is_none() {
            self.zstd = zstd::bulk::Compressor::new(self.level).ok();
        }
        let scratch = &mut self.scratch;
        let paid = match self
            .zstd
            .as_mut()
            .map(|z| z.compress_to_buffer(&raw, scratch))
        {
            Some(Ok(n)) => (n as f64) <= raw.len() as f64 * (1.0 - MIN_SAVING),
            _ => false,
        };
        if paid {
            self.next_skip = 1;
            (Codec::Zstd, std::mem::take(&mut self.scratch))
        } else {
            self.skip = self.next_skip;
            self.next_skip = (self.next_skip * 2).min(MAX_SKIP);
            (Codec::Raw, raw)
        }
    }
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("level", &self.level)
            .field("skip", &self.skip)
            .finish()
    }
}

/// Decodes chunk payloads, reusing one zstd context.
#[derive(Default)]
pub struct Decoder {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    /// Decodes a payload into `out` (cleared first), which must end up exactly `raw_len`
    /// bytes long. The output is bounded by `raw_len` (which the caller checked against
    /// the chunk size): a hostile payload cannot inflate memory beyond it.
    pub fn decode(
        &mut self,
        codec: Codec,
        payload: &[u8],
        raw_len: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        out.clear();
        match codec {
            Codec::Raw => out.extend_from_slice(payload),
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(CompressError::Corrupt)?);
                }
                let z = self.zstd.as_mut().ok_or(CompressError::WrongLength {
                    expected: raw_len,
                    actual: 0,
                })?;
                // zstd writes only into the capacity already there and never grows the
                // Vec, so memory stays bounded by the largest chunk seen.
                out.reserve_exact(raw_len as usize);
                z.decompress_to_buffer(payload, out)
                    .map_err(CompressError::Corrupt)?;
            }
        }
        if out.len() != raw_len as usize {
            return Err(CompressError::WrongLength {
                expected: raw_len,
                actual: out.len(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_round_trips_and_random_is_sent_raw() {
        let mut c = Compressor::new(1);
        let text = b"SIMPLE  =                    T / conforming FITS file".repeat(1000);
        let (codec, payload) = c.encode(text.clone());
        assert_eq!(codec, Codec::Zstd);
        let mut out = Vec::new();
        Decoder::default()
            .decode(codec, &payload, text.len() as u32, &mut out)
            .unwrap();
        assert_eq!(out, text);

        let random = noisy(100_000, 7);
        let (codec, payload) = c.encode(random.clone());
        assert_eq!(codec, Codec::Raw);
        assert_eq!(payload, random);
    }

    #[test]
    fn skips_attempts_after_incompressible_chunks() {
        let mut c = Compressor::new(1);
        let random = noisy(10_000, 3);
        // 1 attempt, skip 1, attempt, skip 2, attempt, skip 4 ...: attempts grow logarithmically.
        let mut attempts = 0;
        for _ in 0..200 {
            let before = c.skip;
            c.encode(random.clone());
            if before == 0 {
                attempts += 1;
            }
        }
        assert!(
            attempts < 15,
            "{attempts} attempts for 200 incompressible chunks"
        );
    }

    #[test]
    fn rejects_wrong_length_and_garbage() {
        let mut out = Vec::new();
        let mut d = Decoder::default();
        assert!(matches!(
            d.decode(Codec::Raw, b"abc", 4, &mut out),
            Err(CompressError::WrongLength {
                expected: 4,
                actual: 3
            })
        ));
        assert!(d
            .decode(Codec::Zstd, b"definitely not zstd", 10, &mut out)
            .is_err());
        // A valid frame that inflates beyond raw_len is refused, not allocated.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        assert!(d.decode(Codec::Zstd, &big, 1000, &mut out).is_err());
        assert!(out.capacity() < 1 << 20);
    }
}
