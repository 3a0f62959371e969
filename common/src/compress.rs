//! Per-chunk zstd compression that is skipped when it does not pay.
//!
//! Two codecs: plain zstd, and for FITS files of 16-bit pixels a byte-shuffle before zstd
//! ([`shuffle`], chosen per file from its first header cards by [`Compressor::for_head`]).
//!
//! Raw observatory frames compress modestly (noise dominates), already-compressed files
//! (`.fits.fz`, `.gz`) not at all. Compressing costs CPU on the agent and the receiver,
//! so a chunk is sent raw when zstd saves less than [`MIN_SAVING`]. After a chunk that did
//! not pay, the next chunks of the same file are sent raw without trying, for a probe
//! interval that doubles each time (up to [`MAX_SKIP`]): an incompressible 2 GiB file
//! costs a handful of compression attempts, not 512.

pub mod shuffle;

use crate::buf::AlignedBuf;
use crate::protocol::Codec;

/// How many bytes of a file's start [`Compressor::for_head`] looks at: one FITS header
/// block.
pub const HEAD_LEN: usize = 2880;

/// A chunk is compressed only if zstd removes at least this fraction of its bytes.
pub const MIN_SAVING: f64 = 0.03;
/// Longest run of chunks sent raw without a compression attempt.
pub const MAX_SKIP: u32 = 32;

/// Why a chunk payload was not accepted. Every variant means the payload is not what
/// the protocol allows (docs/protocol.md §6); the receiver answers `chunk_mismatch`.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("zstd decompression failed: {0}")]
    Corrupt(std::io::Error),
    #[error("decompressed to {actual} bytes, expected {expected}")]
    WrongLength { expected: u32, actual: usize },
    #[error("payload of {len} bytes is too short for a zstd frame header")]
    ShortHeader { len: usize },
    #[error("payload is a zstd skippable frame (magic {magic:#010x}); a chunk is exactly one zstd frame")]
    Skippable { magic: u32 },
    #[error("payload does not start with the zstd frame magic (found {magic:#010x})")]
    NotZstd { magic: u32 },
    #[error("zstd frame uses dictionary {id}; chunks are compressed without dictionaries")]
    Dictionary { id: u32 },
    #[error("zstd frame header does not declare its decompressed size; it must declare raw_len ({expected})")]
    NoContentSize { expected: u32 },
    #[error("zstd frame header declares {declared} decompressed bytes, raw_len is {expected}")]
    DeclaredLength { declared: u64, expected: u32 },
    #[error("zstd frame is malformed: {0}")]
    Malformed(&'static str),
    #[error("payload holds {extra} bytes after its zstd frame of {frame} bytes; a chunk is exactly one zstd frame")]
    Trailing { frame: usize, extra: usize },
}

/// The zstd frame magic number (RFC 8878 §3.1.1), little-endian on the wire.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames have magic numbers 0x184D2A50..=0x184D2A5F (RFC 8878 §3.1.2).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// What a zstd frame header (RFC 8878 §3.1.1.1) declares, as far as acceptance goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    /// `Frame_Content_Size`, when the header carries one.
    content_size: Option<u64>,
    /// `Dictionary_ID`; 0 when absent (no dictionary).
    dictionary: u32,
}

/// Parses the header at the start of `payload`, refusing anything that is not a plain
/// zstd frame. Reads only the header (at most 18 bytes): nothing is decompressed yet.
fn frame_header(payload: &[u8]) -> Result<FrameHeader, CompressError> {
    let short = || CompressError::ShortHeader { len: payload.len() };
    let magic_bytes: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(short)?;
    let magic = u32::from_le_bytes(magic_bytes);
    if magic & 0xFFFF_FFF0 == SKIPPABLE_MAGIC {
        return Err(CompressError::Skippable { magic });
    }
    if magic != ZSTD_MAGIC {
        return Err(CompressError::NotZstd { magic });
    }
    let descriptor = *payload.get(4).ok_or_else(short)?;
    if descriptor & 0x08 != 0 {
        return Err(CompressError::Malformed(
            "reserved bit of the frame header descriptor is set",
        ));
    }
    let single_segment = descriptor & 0x20 != 0;
    let dictionary_len = [0, 1, 2, 4][usize::from(descriptor & 0x03)];
    let content_size_len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    // Magic, descriptor, then the window descriptor unless the frame is single-segment.
    let mut at = 5 + usize::from(!single_segment);
    let mut field = |len: usize| -> Result<u64, CompressError> {
        let bytes = payload.get(at..at + len).ok_or_else(short)?;
        at += len;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b)))
    };
    // At most 4 bytes: fits in u32.
    let dictionary = field(dictionary_len)? as u32;
    let content_size = match content_size_len {
        0 => None,
        // The 2-byte form is offset by 256 (RFC 8878 §3.1.1.1.4).
        2 => Some(field(2)? + 256),
        n => Some(field(n)?),
    };
    Ok(FrameHeader {
        content_size,
        dictionary,
    })
}

/// Checks that `payload` is exactly one plain zstd frame that declares `raw_len` bytes
/// (docs/protocol.md §6), from its headers alone: nothing is decompressed yet.
fn one_frame_of(payload: &[u8], raw_len: u32) -> Result<(), CompressError> {
    let header = frame_header(payload)?;
    if header.dictionary != 0 {
        return Err(CompressError::Dictionary {
            id: header.dictionary,
        });
    }
    match header.content_size {
        None => return Err(CompressError::NoContentSize { expected: raw_len }),
        Some(n) if n != u64::from(raw_len) => {
            return Err(CompressError::DeclaredLength {
                declared: n,
                expected: raw_len,
            })
        }
        Some(_) => {}
    }
    // Walks the block headers only (no decompression).
    let frame = zstd::zstd_safe::find_frame_compressed_size(payload)
        .map_err(|code| CompressError::Malformed(zstd::zstd_safe::get_error_name(code)))?;
    if frame != payload.len() {
        return Err(CompressError::Trailing {
            frame,
            extra: payload.len().saturating_sub(frame),
        });
    }
    Ok(())
}

/// When the agent compresses chunks (`transfer.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Never: every chunk goes raw.
    Off,
    /// Every chunk is tried (and sent raw when zstd saves too little).
    Zstd,
    /// Only while the link, not the CPU, is the bottleneck ([`AutoCompress`]).
    Auto,
}

/// Above this fraction of wall time spent by uploads waiting for the network to take
/// their data, the link is the bottleneck: compressing turns on.
pub const AUTO_ON_ABOVE: f64 = 0.5;
/// Below this fraction compressing turns off again (the gap keeps it from flapping).
pub const AUTO_OFF_BELOW: f64 = 0.15;

/// The `auto` decision, from measurements the I/O layer makes: the fraction of the last
/// interval's wall time that uploads spent blocked on QUIC flow or congestion control
/// (summed over uploads). Waiting for the network means spare CPU: spend it on fewer
/// bytes. Not waiting means the CPU (or the disk) sets the pace: compressing would only
/// slow the transfer down.
#[derive(Debug, Clone, Default)]
pub struct AutoCompress {
    on: bool,
}

impl AutoCompress {
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Takes the blocked fraction of the interval just ended; returns whether to compress.
    pub fn handle_interval(&mut self, blocked_fraction: f64) -> bool {
        if self.on && blocked_fraction < AUTO_OFF_BELOW {
            self.on = false;
        } else if !self.on && blocked_fraction > AUTO_ON_ABOVE {
            self.on = true;
        }
        self.on
    }
}

/// Compression decisions for one file's chunks, in order. Holds one zstd context that is
/// reused for every chunk.
pub struct Compressor {
    level: i32,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Set for FITS files of 16-bit pixels: chunks are shuffled before zstd.
    shuffle: Option<shuffle::ShuffleEncoder>,
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
            shuffle: None,
            scratch: Vec::new(),
            skip: 0,
            next_skip: 1,
        }
    }

    /// For the file that begins with `head` (its first [`HEAD_LEN`] bytes, or all of a
    /// shorter file): the shuffle codec if it is FITS with 16-bit pixels, else plain zstd.
    pub fn for_head(level: i32, head: &[u8]) -> Self {
        let mut c = Compressor::new(level);
        if level != 0 && shuffle::is_fits_16bit(head) {
            c.shuffle = shuffle::ShuffleEncoder::new(level);
        }
        c
    }

    /// The codec chunks are tried with.
    pub fn codec(&self) -> Codec {
        match self.shuffle {
            Some(_) => Codec::ZstdShuffle16,
            None => Codec::Zstd,
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
        let scratch = &mut self.scratch;
        let size = match self.shuffle.as_mut() {
            Some(s) => s.compress(&raw, scratch).map(|()| scratch.len()),
            None => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Compressor::new(self.level).ok();
                }
                self.zstd
                    .as_mut()
                    .and_then(|z| z.compress_to_buffer(&raw, scratch).ok())
            }
        };
        let paid = size.is_some_and(|n| (n as f64) <= raw.len() as f64 * (1.0 - MIN_SAVING));
        if paid {
            self.next_skip = 1;
            (self.codec(), std::mem::take(&mut self.scratch))
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
    shuffle: Option<shuffle::ShuffleDecoder>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    /// Decodes a payload into `out`, which must end up exactly `raw_len` bytes long (the
    /// caller checked `raw_len` against the chunk size). `out` is aligned for direct I/O,
    /// so the receiver writes it to storage as it is.
    ///
    /// A `zstd` payload must be exactly one zstd frame (RFC 8878), checked before any
    /// byte is decompressed: not a skippable frame, no dictionary, a header that declares
    /// the decompressed size and declares `raw_len`, and no bytes after the frame. A
    /// content checksum in the frame is optional and verified by zstd when present. Then
    /// zstd decodes into `raw_len` bytes of `out` and no more, which is what bounds
    /// memory, and the output must fill them exactly. One frame per chunk also bounds the CPU a
    /// payload can cost: many tiny frames in one payload would each pay zstd's per-frame
    /// set-up.
    pub fn decode(
        &mut self,
        codec: Codec,
        payload: &[u8],
        raw_len: u32,
        out: &mut AlignedBuf,
    ) -> Result<(), CompressError> {
        let written = match codec {
            Codec::Raw => {
                if payload.len() != raw_len as usize {
                    return Err(CompressError::WrongLength {
                        expected: raw_len,
                        actual: payload.len(),
                    });
                }
                out.copy_from(payload);
                payload.len()
            }
            Codec::Zstd => {
                one_frame_of(payload, raw_len)?;
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(CompressError::Corrupt)?);
                }
                let z = self.zstd.as_mut().ok_or(CompressError::WrongLength {
                    expected: raw_len,
                    actual: 0,
                })?;
                // zstd writes into the slice only: output beyond `raw_len` is an error,
                // so memory stays bounded by the chunk size.
                out.set_len(raw_len as usize);
                z.decompress_to_buffer(payload, &mut out[..])
                    .map_err(CompressError::Corrupt)?
            }
            Codec::ZstdShuffle16 => {
                one_frame_of(payload, raw_len)?;
                if self.shuffle.is_none() {
                    self.shuffle = shuffle::ShuffleDecoder::new();
                }
                let d = self
                    .shuffle
                    .as_mut()
                    .ok_or(CompressError::Malformed("cannot create a zstd context"))?;
                out.set_len(raw_len as usize);
                // Fills all of `out` or fails: more or fewer bytes are an error.
                d.decompress(payload, &mut out[..]).map_err(|e| match e {
                    shuffle::ShuffleError::Zstd(name) => CompressError::Malformed(name),
                    shuffle::ShuffleError::Length { produced } => CompressError::WrongLength {
                        expected: raw_len,
                        actual: produced,
                    },
                })?;
                raw_len as usize
            }
        };
        if written != raw_len as usize {
            out.set_len(written.min(raw_len as usize));
            return Err(CompressError::WrongLength {
                expected: raw_len,
                actual: written,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compresses_only_while_the_network_is_the_bottleneck() {
        let mut auto = AutoCompress::default();
        assert!(!auto.is_on(), "a fast link is assumed at first");
        assert!(!auto.handle_interval(0.3));
        assert!(
            auto.handle_interval(0.9),
            "uploads mostly wait for the link"
        );
        assert!(auto.handle_interval(0.3), "stays on inside the gap");
        assert!(
            !auto.handle_interval(0.05),
            "the link keeps up: CPU is the limit"
        );
    }

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
        let mut out = AlignedBuf::new();
        Decoder::default()
            .decode(codec, &payload, text.len() as u32, &mut out)
            .unwrap();
        assert_eq!(&out[..], &text[..]);

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
        let mut out = AlignedBuf::new();
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

    /// One chunk's worth of compressible bytes and its single zstd frame.
    fn frame(len: usize) -> (Vec<u8>, Vec<u8>) {
        let raw = b"DATE-OBS= '2024-05-01'".repeat(len / 22 + 1)[..len].to_vec();
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        (raw, z)
    }

    fn decode(payload: &[u8], raw_len: u32) -> Result<Vec<u8>, CompressError> {
        let mut out = AlignedBuf::new();
        Decoder::default()
            .decode(Codec::Zstd, payload, raw_len, &mut out)
            .map(|()| out.to_vec())
    }

    #[test]
    fn the_frame_header_is_read_as_rfc_8878_says() {
        // What our own compressor writes: a single frame that declares its size, for
        // every size class of the content-size field.
        for len in [1usize, 255, 256, 65_791, 65_792, 1 << 20] {
            let (raw, z) = frame(len);
            let h = frame_header(&z).unwrap();
            assert_eq!(h.content_size, Some(len as u64), "len {len}");
            assert_eq!(h.dictionary, 0);
            assert_eq!(decode(&z, len as u32).unwrap(), raw);
        }
        assert!(matches!(
            frame_header(&[0x28, 0xB5, 0x2F]),
            Err(CompressError::ShortHeader { len: 3 })
        ));
    }

    #[test]
    fn a_chunk_is_exactly_one_plain_zstd_frame() {
        let (raw, z) = frame(10_000);
        let len = raw.len() as u32;

        // What zstd alone makes of a payload (the decoder before these checks).
        let plain = |payload: &[u8]| {
            let mut out = Vec::with_capacity(len as usize);
            zstd::bulk::Decompressor::new()
                .unwrap()
                .decompress_to_buffer(payload, &mut out)
                .map(|_| out.len())
                .ok()
        };

        // Two frames back to back: zstd alone decodes both.
        let mut two = frame(5_000).1;
        two.extend_from_slice(&frame(5_000).1);
        assert_eq!(plain(&two), Some(10_000));
        assert!(matches!(
            decode(&two, len),
            Err(CompressError::DeclaredLength {
                declared: 5000,
                expected: 10_000
            })
        ));
        let mut trailing = z.clone();
        trailing.extend_from_slice(&frame(0).1);
        assert!(matches!(
            decode(&trailing, len),
            Err(CompressError::Trailing { extra, .. }) if extra == frame(0).1.len()
        ));
        let mut junk = z.clone();
        junk.push(0);
        assert!(matches!(
            decode(&junk, len),
            Err(CompressError::Trailing { extra: 1, .. })
        ));

        // A skippable frame in front (zstd alone would skip it).
        let mut skippable = vec![0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
        skippable.extend_from_slice(&z);
        assert_eq!(plain(&skippable), Some(10_000), "zstd alone skips it");
        assert!(matches!(
            decode(&skippable, len),
            Err(CompressError::Skippable { magic: 0x184D_2A50 })
        ));
        assert!(matches!(
            decode(b"\x00\x01\x02\x03\x04\x05", len),
            Err(CompressError::NotZstd { .. })
        ));

        // No declared size: the size cannot be checked before decompressing.
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .unwrap();
        let unsized_frame = c.compress(&raw).unwrap();
        assert_eq!(frame_header(&unsized_frame).unwrap().content_size, None);
        assert_eq!(plain(&unsized_frame), Some(10_000), "zstd alone accepts it");
        assert!(matches!(
            decode(&unsized_frame, len),
            Err(CompressError::NoContentSize { expected: 10_000 })
        ));

        // A frame naming a dictionary is refused before zstd is asked: the same frame
        // with a 1-byte Dictionary_ID (7) added to its header.
        let descriptor = z[4];
        let id_at = 5 + usize::from(descriptor & 0x20 == 0);
        let mut with_dict = z[..id_at].to_vec();
        with_dict[4] = descriptor | 0x01;
        with_dict.push(7);
        with_dict.extend_from_slice(&z[id_at..]);
        assert!(matches!(
            decode(&with_dict, len),
            Err(CompressError::Dictionary { id: 7 })
        ));

        // A content checksum is allowed, and verified.
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .unwrap();
        let mut summed = c.compress(&raw).unwrap();
        assert_eq!(decode(&summed, len).unwrap(), raw);
        let last = summed.len() - 1;
        summed[last] ^= 1;
        assert!(matches!(
            decode(&summed, len),
            Err(CompressError::Corrupt(_))
        ));

        // A truncated frame is malformed, found before decompression.
        assert!(matches!(
            decode(&z[..z.len() - 1], len),
            Err(CompressError::Malformed(_))
        ));
        assert_eq!(decode(&z, len).unwrap(), raw);
    }
}
