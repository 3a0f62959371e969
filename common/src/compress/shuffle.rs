//! The FITS-aware codec (`Codec::ZstdShuffle16`): a byte-shuffle of 16-bit samples, then
//! zstd.
//!
//! 16-bit FITS pixels are big-endian. Sky images vary slowly in the high byte and
//! noisily in the low byte; interleaved, the noise hides the high bytes' redundancy from
//! zstd. Within one chunk the shuffle writes all first bytes of the byte pairs, then all
//! second bytes (for a chunk of odd length the last byte stays last):
//!
//! ```text
//! raw       h0 l0 h1 l1 h2 l2 … h(n-1) l(n-1) [t]
//! shuffled  h0 h1 h2 … h(n-1) l0 l1 l2 … l(n-1) [t]
//! ```
//!
//! Every chunk of a file starts at an even offset (chunk sizes are powers of two) and a
//! FITS data unit starts at a multiple of 2880 bytes, so the pairs are the file's 16-bit
//! samples wherever the chunk falls; header bytes are shuffled too, which costs a little
//! ratio and nothing else.
//!
//! Neither side ever holds the shuffled chunk whole: the encoder feeds zstd the shuffled
//! bytes in [`PIECE`]-sized pieces, the decoder scatters zstd's output as it comes. The
//! frame's window is at most 2^[`WINDOW_LOG`] bytes, so decoding costs about that much
//! memory besides the output, whatever a peer sends (a frame asking for more is
//! refused by zstd).

use zstd::zstd_safe::{self, CParameter, DParameter, InBuffer, OutBuffer};

/// Bytes of shuffled data handed to zstd (or taken from it) at a time.
pub const PIECE: usize = 64 * 1024;
/// The zstd window of a shuffled frame, and the largest a decoder accepts: 1 MiB
/// (zstd's level 1 would pick 512 KiB for a 4 MiB chunk, higher levels up to 8 MiB).
pub const WINDOW_LOG: u32 = 20;

/// Writes the shuffled bytes of `raw` from shuffled position `start` into `out` (all of
/// `out` that the data fills; returns how many bytes were written).
pub fn shuffled_piece(raw: &[u8], start: usize, out: &mut [u8]) -> usize {
    let pairs = raw.len() / 2;
    let mut at = start;
    let mut written = 0;
    while written < out.len() && at < raw.len() {
        let dst = &mut out[written..];
        let n = if at < pairs {
            // First bytes of pairs at..
            let n = dst.len().min(pairs - at);
            for (d, s) in dst[..n].iter_mut().zip(raw[2 * at..].iter().step_by(2)) {
                *d = *s;
            }
            n
        } else if at < 2 * pairs {
            let k = at - pairs;
            let n = dst.len().min(pairs - k);
            for (d, s) in dst[..n].iter_mut().zip(raw[2 * k + 1..].iter().step_by(2)) {
                *d = *s;
            }
            n
        } else {
            // The odd last byte.
            dst[0] = raw[at];
            1
        };
        at += n;
        written += n;
    }
    written
}

/// Writes `piece`, the shuffled bytes from shuffled position `start`, to their places in
/// the unshuffled chunk `out` (of the chunk's full length). `start + piece.len()` must
/// not exceed `out.len()`.
pub fn unshuffle_piece(piece: &[u8], start: usize, out: &mut [u8]) {
    let pairs = out.len() / 2;
    let mut at = start;
    let mut read = 0;
    while read < piece.len() && at < out.len() {
        let src = &piece[read..];
        let n = if at < pairs {
            let n = src.len().min(pairs - at);
            for (d, s) in out[2 * at..].iter_mut().step_by(2).zip(&src[..n]) {
                *d = *s;
            }
            n
        } else if at < 2 * pairs {
            let k = at - pairs;
            let n = src.len().min(pairs - k);
            for (d, s) in out[2 * k + 1..].iter_mut().step_by(2).zip(&src[..n]) {
                *d = *s;
            }
            n
        } else {
            out[at] = src[0];
            1
        };
        at += n;
        read += n;
    }
}

/// The whole chunk shuffled (for tests and the benchmark; the codec streams instead).
pub fn shuffle(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0; raw.len()];
    shuffled_piece(raw, 0, &mut out);
    out
}

/// The whole chunk unshuffled.
pub fn unshuffle(shuffled: &[u8]) -> Vec<u8> {
    let mut out = vec![0; shuffled.len()];
    unshuffle_piece(shuffled, 0, &mut out);
    out
}

/// Whether a file that begins with `head` (its first 2880 bytes or fewer) is FITS with
/// 16-bit integer pixels: a primary header whose mandatory first cards say `SIMPLE = T`,
/// `BITPIX = 16` and `NAXIS` ≥ 1. The FITS standard fixes those cards in that order, so
/// the first three 80-byte cards decide.
pub fn is_fits_16bit(head: &[u8]) -> bool {
    let card = |i: usize| head.get(i * 80..(i + 1) * 80);
    let value = |card: &[u8], key: &str| -> Option<String> {
        let (name, rest) = card.split_at(8);
        if name != format!("{key:<8}").as_bytes() || rest.get(..2) != Some(b"= ") {
            return None;
        }
        let text = std::str::from_utf8(&rest[2..]).ok()?;
        let v = text.split('/').next()?.trim();
        Some(v.to_owned())
    };
    let (Some(simple), Some(bitpix), Some(naxis)) = (card(0), card(1), card(2)) else {
        return false;
    };
    value(simple, "SIMPLE").as_deref() == Some("T")
        && value(bitpix, "BITPIX").as_deref() == Some("16")
        && value(naxis, "NAXIS")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 1)
}

/// Compresses chunks with the shuffle, reusing one zstd context and one piece buffer.
pub struct ShuffleEncoder {
    cctx: zstd_safe::CCtx<'static>,
    piece: Vec<u8>,
}

impl ShuffleEncoder {
    pub fn new(level: i32) -> Option<ShuffleEncoder> {
        let mut cctx = zstd_safe::CCtx::try_create()?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        // After the level, which would set its own window.
        cctx.set_parameter(CParameter::WindowLog(WINDOW_LOG)).ok()?;
        cctx.set_parameter(CParameter::ContentSizeFlag(true)).ok()?;
        Some(ShuffleEncoder {
            cctx,
            piece: vec![0; PIECE],
        })
    }

    /// One zstd frame of `raw` shuffled, into `out` (cleared; its capacity must be at
    /// least `compress_bound(raw.len())`). `None` if zstd failed or `out` was too small:
    /// the caller sends the chunk raw.
    pub fn compress(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Option<()> {
        out.clear();
        self.cctx
            .reset(zstd_safe::ResetDirective::SessionOnly)
            .ok()?;
        self.cctx
            .set_pledged_src_size(Some(raw.len() as u64))
            .ok()?;
        let mut out = OutBuffer::around(out);
        let mut at = 0;
        loop {
            let n = shuffled_piece(raw, at, &mut self.piece);
            at += n;
            let last = at >= raw.len();
            let mut input = InBuffer::around(&self.piece[..n]);
            let op = if last {
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end
            } else {
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue
            };
            loop {
                let before = (input.pos(), out.pos());
                let left = self.cctx.compress_stream2(&mut out, &mut input, op).ok()?;
                let done = if last { left == 0 } else { input.pos() == n };
                if done {
                    break;
                }
                if (input.pos(), out.pos()) == before {
                    return None; // no room left in `out`
                }
            }
            if last {
                return Some(());
            }
        }
    }
}

impl std::fmt::Debug for ShuffleEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShuffleEncoder")
    }
}

/// Decompresses shuffled frames, reusing one zstd context (window at most
/// 2^[`WINDOW_LOG`]) and one piece buffer.
pub struct ShuffleDecoder {
    dctx: zstd_safe::DCtx<'static>,
    piece: Vec<u8>,
}

/// Why a shuffled frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShuffleError {
    /// zstd refused it (the name of its error).
    Zstd(&'static str),
    /// It decoded to more or fewer bytes than the chunk has.
    Length { produced: usize },
}

impl ShuffleDecoder {
    pub fn new() -> Option<ShuffleDecoder> {
        let mut dctx = zstd_safe::DCtx::try_create()?;
        dctx.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
            .ok()?;
        Some(ShuffleDecoder {
            dctx,
            piece: vec![0; PIECE],
        })
    }

    /// Decodes one frame (`payload`, already checked to be exactly one frame declaring
    /// `out.len()` bytes) into `out`, unshuffled.
    pub fn decompress(&mut self, payload: &[u8], out: &mut [u8]) -> Result<(), ShuffleError> {
        let zstd = |code: usize| ShuffleError::Zstd(zstd_safe::get_error_name(code));
        self.dctx
            .reset(zstd_safe::ResetDirective::SessionOnly)
            .map_err(zstd)?;
        let mut input = InBuffer::around(payload);
        let mut produced = 0;
        loop {
            let mut piece = OutBuffer::around(&mut self.piece[..]);
            let left = self
                .dctx
                .decompress_stream(&mut piece, &mut input)
                .map_err(zstd)?;
            let n = piece.pos();
            if produced + n > out.len() {
                return Err(ShuffleError::Length {
                    produced: produced + n,
                });
            }
            unshuffle_piece(&self.piece[..n], produced, out);
            produced += n;
            if left == 0 {
                break; // the frame is complete
            }
            if n == 0 && input.pos() == payload.len() {
                return Err(ShuffleError::Zstd("truncated frame"));
            }
        }
        if produced != out.len() {
            return Err(ShuffleError::Length { produced });
        }
        Ok(())
    }
}

impl std::fmt::Debug for ShuffleDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShuffleDecoder")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The shuffle by its definition, one byte at a time.
    fn reference(raw: &[u8]) -> Vec<u8> {
        let pairs = raw.len() / 2;
        let mut out: Vec<u8> = (0..pairs).map(|i| raw[2 * i]).collect();
        out.extend((0..pairs).map(|i| raw[2 * i + 1]));
        if raw.len() % 2 == 1 {
            out.push(raw[raw.len() - 1]);
        }
        out
    }

    #[test]
    fn small_cases_by_hand() {
        assert_eq!(shuffle(b""), b"");
        assert_eq!(shuffle(b"a"), b"a");
        assert_eq!(shuffle(b"ab"), b"ab");
        assert_eq!(shuffle(b"abc"), b"abc");
        assert_eq!(shuffle(b"aAbB"), b"abAB");
        assert_eq!(shuffle(b"aAbBc"), b"abABc");
        assert_eq!(unshuffle(b"abABc"), b"aAbBc");
    }

    /// A 16-bit sky-like image: a smooth background with noise in the low byte.
    fn sky(pixels: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(pixels * 2);
        for i in 0..pixels {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 1000u16 + (i % 2000) as u16 / 50 + (x % 64) as u16;
            out.extend_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn round_trip(raw: &[u8]) -> Vec<u8> {
        let mut z = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
        ShuffleEncoder::new(1)
            .unwrap()
            .compress(raw, &mut z)
            .unwrap();
        let mut out = vec![0; raw.len()];
        ShuffleDecoder::new()
            .unwrap()
            .decompress(&z, &mut out)
            .unwrap();
        out
    }

    #[test]
    fn the_codec_round_trips_and_beats_plain_zstd_on_16_bit_pixels() {
        let raw = sky(1 << 20, 5); // 2 MiB: bigger than the window
        let mut z = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
        ShuffleEncoder::new(1)
            .unwrap()
            .compress(&raw, &mut z)
            .unwrap();
        let plain = zstd::bulk::compress(&raw, 1).unwrap();
        assert!(
            z.len() < plain.len() * 9 / 10,
            "shuffled {} bytes, plain zstd {}",
            z.len(),
            plain.len()
        );
        let mut out = vec![0; raw.len()];
        ShuffleDecoder::new()
            .unwrap()
            .decompress(&z, &mut out)
            .unwrap();
        assert_eq!(out, raw);
        // One frame that declares its size and keeps to the window.
        let params = zstd_safe::get_frame_content_size(&z).unwrap();
        assert_eq!(params, Some(raw.len() as u64));
        assert_eq!(zstd_safe::find_frame_compressed_size(&z).unwrap(), z.len());
    }

    #[test]
    fn a_frame_with_a_larger_window_or_the_wrong_length_is_refused() {
        let raw = sky(1 << 20, 9);
        let big_window = {
            let mut c = zstd::bulk::Compressor::new(19).unwrap();
            c.set_parameter(CParameter::WindowLog(23)).unwrap();
            c.compress(&shuffle(&raw)).unwrap()
        };
        let mut out = vec![0; raw.len()];
        let mut d = ShuffleDecoder::new().unwrap();
        assert!(matches!(
            d.decompress(&big_window, &mut out),
            Err(ShuffleError::Zstd(_))
        ));
        // The same decoder still works afterwards.
        let mut z = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
        ShuffleEncoder::new(1)
            .unwrap()
            .compress(&raw, &mut z)
            .unwrap();
        let mut short = vec![0; raw.len() - 2];
        assert!(matches!(
            d.decompress(&z, &mut short),
            Err(ShuffleError::Length { .. })
        ));
        let mut long = vec![0; raw.len() + 2];
        assert!(matches!(
            d.decompress(&z, &mut long),
            Err(ShuffleError::Length { .. })
        ));
        assert!(d.decompress(&z[..z.len() - 3], &mut out).is_err());
        d.decompress(&z, &mut out).unwrap();
        assert_eq!(out, raw);
    }

    #[test]
    fn recognises_16_bit_fits_by_its_first_cards() {
        let card = |s: &str| format!("{s:<80}");
        let head = |bitpix: &str, naxis: &str| {
            [
                card("SIMPLE  =                    T / conforms to FITS"),
                card(&format!("BITPIX  = {bitpix:>20} / bits per pixel")),
                card(&format!("NAXIS   = {naxis:>20}")),
                card("END"),
            ]
            .concat()
            .into_bytes()
        };
        assert!(is_fits_16bit(&head("16", "2")));
        assert!(is_fits_16bit(&head("16", "3")));
        assert!(!is_fits_16bit(&head("-32", "2")));
        assert!(!is_fits_16bit(&head("8", "0")));
        assert!(!is_fits_16bit(&head("16", "0")), "no data");
        assert!(!is_fits_16bit(&head("16", "2")[..200]), "too short");
        assert!(!is_fits_16bit(b""));
        assert!(!is_fits_16bit(&[0xff; 2880]));
        let mut other = head("16", "2");
        other[..6].copy_from_slice(b"XTENSI");
        assert!(!is_fits_16bit(&other));
    }

    proptest! {
        #[test]
        fn shuffle_matches_its_definition_and_inverts(raw in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(shuffle(&raw), reference(&raw));
            prop_assert_eq!(unshuffle(&shuffle(&raw)), raw);
        }

        #[test]
        fn pieces_of_any_size_make_the_whole(
            raw in proptest::collection::vec(any::<u8>(), 0..3000),
            piece in 1usize..700,
        ) {
            let whole = shuffle(&raw);
            let mut joined = Vec::new();
            let mut buf = vec![0; piece];
            loop {
                let n = shuffled_piece(&raw, joined.len(), &mut buf);
                if n == 0 { break; }
                joined.extend_from_slice(&buf[..n]);
            }
            prop_assert_eq!(&joined, &whole);
            let mut out = vec![0; raw.len()];
            for (i, p) in whole.chunks(piece).enumerate() {
                unshuffle_piece(p, i * piece, &mut out);
            }
            prop_assert_eq!(out, raw);
        }

        #[test]
        fn the_codec_round_trips_any_length(
            len in prop_oneof![0usize..300, (PIECE - 3)..(PIECE + 3), (2 * PIECE - 2)..(2 * PIECE + 2)],
            seed in any::<u64>(),
        ) {
            let raw = sky(len / 2 + 1, seed)[..len].to_vec();
            prop_assert_eq!(round_trip(&raw), raw);
        }
    }
}
