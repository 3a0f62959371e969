//! A fast, deterministic generator of Tomo-e Gozen-like FITS files.
//!
//! Each file is one primary HDU of unsigned 16-bit pixels (BITPIX=16, BZERO=32768): a sky of
//! ~1000 counts with gaussian noise (σ≈30, about the Poisson noise of that sky), a few hundred
//! point sources with a gaussian PSF (some saturated), and the header cards the receiver's
//! catalog reads. A movie has NAXIS3 = frames; the sources stay put (the telescope tracks)
//! and flicker slightly, the noise is new in every frame. The data compress about as well
//! as real raw frames do (the low byte of every pixel is noise), so transfer figures are
//! honest.
//!
//! Speed matters (a 2 GiB movie must take seconds): pixels come from a small xorshift RNG
//! indexing a precomputed table of noise values, rows are encoded into one buffer and written
//! through a `BufWriter`; no file is ever held in memory. Files are written under a hidden
//! temporary name in the target directory and renamed into place, as a real pipeline does, so
//! a watcher only ever sees complete files.

mod header;
mod pixels;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use header::{dec_sexagesimal, ra_sexagesimal};
use header::{header, header_len, night};
use pixels::{splitmix64, Pixels};

/// Sensor width in pixels (NAXIS1).
pub const WIDTH: u32 = 2000;
/// Sensor height in pixels (NAXIS2).
pub const HEIGHT: u32 = 1128;
/// Sensors on the camera; one file per sensor per exposure.
pub const DETECTORS: u8 = 84;
/// FITS block size: headers and data are padded to a multiple of it.
pub const BLOCK: u64 = 2880;

/// What to write into one FITS file.
#[derive(Clone, Debug, PartialEq)]
pub struct FitsParams {
    pub width: u32,
    pub height: u32,
    /// Frames (NAXIS3); 1 writes a plain 2-D image.
    pub frames: u32,
    pub exposure_id: u32,
    /// Detector id, 1..=84.
    pub detector: u8,
    /// Number of point sources.
    pub sources: u32,
    /// Seed of the pixel RNG; the same parameters always give the same bytes.
    pub seed: u64,
    /// Which header dialect to write.
    pub style: HeaderStyle,
}

/// The header dialect: textbook FITS, or what real Tomo-e Gozen files carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HeaderStyle {
    /// ISO `DATE-OBS` with the time, `MJD-OBS`, RA/DEC in degrees, `EXP-ID`, `DET-ID`.
    #[default]
    Plain,
    /// `DATE-OBS` a date only with the time in `UTC` and `TIME-OBS`, RA/DEC sexagesimal
    /// strings of the telescope pointing, `EXP_ID`, `DET_ID` (odd detectors) or `DET-ID`
    /// (even ones), `DATA-FPS`, `TFRAME`; no `MJD-OBS`.
    TomoE,
}

impl FitsParams {
    /// A full-size sensor file for `detector` of exposure `exposure_id`.
    pub fn new(exposure_id: u32, detector: u8, frames: u32) -> FitsParams {
        let seed = splitmix64(u64::from(exposure_id) << 8 | u64::from(detector));
        FitsParams {
            width: WIDTH,
            height: HEIGHT,
            frames,
            exposure_id,
            detector,
            sources: 200 + (seed % 200) as u32,
            seed,
            style: HeaderStyle::Plain,
        }
    }

    /// [`FitsParams::new`] with a Tomo-e Gozen-style header.
    pub fn tomoe(exposure_id: u32, detector: u8, frames: u32) -> FitsParams {
        FitsParams {
            style: HeaderStyle::TomoE,
            ..FitsParams::new(exposure_id, detector, frames)
        }
    }

    /// Bytes of pixel data, without padding.
    pub fn data_bytes(&self) -> u64 {
        2 * u64::from(self.width) * u64::from(self.height) * u64::from(self.frames)
    }

    /// Size of the whole file: header and data, each padded to [`BLOCK`].
    pub fn file_size(&self) -> u64 {
        header_len(self) + padded(self.data_bytes())
    }
}

/// The file of `detector` in exposure `exposure_id`, relative to the data root:
/// `<night>/TMQ1<night><exposure:06>_<detector:02>.fits`, e.g.
/// `20240501/TMQ120240501000042_17.fits`. The night is the observatory's local date at the
/// start of the night (noon to noon JST).
pub fn exposure_file(exposure_id: u32, detector: u8) -> PathBuf {
    let night = night(exposure_id);
    PathBuf::from(&night).join(format!("TMQ1{night}{exposure_id:06}_{detector:02}.fits"))
}

/// Writes the 84 files of one exposure under `dir` (one per detector, `frames` frames each)
/// and returns their paths.
pub fn write_exposure(dir: &Path, exposure_id: u32, frames: u32) -> Result<Vec<PathBuf>> {
    write_exposure_styled(dir, exposure_id, frames, HeaderStyle::Plain)
}

/// [`write_exposure`] with headers of `style`.
pub fn write_exposure_styled(
    dir: &Path,
    exposure_id: u32,
    frames: u32,
    style: HeaderStyle,
) -> Result<Vec<PathBuf>> {
    (1..=DETECTORS)
        .map(|detector| {
            let path = dir.join(exposure_file(exposure_id, detector));
            let params = FitsParams {
                style,
                ..FitsParams::new(exposure_id, detector, frames)
            };
            write_fits(&path, &params)?;
            Ok(path)
        })
        .collect()
}

/// What the catalog should read from the header of `params` (the generator's truth).
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    pub object: String,
    pub exp_id: String,
    pub det_id: String,
    /// Degrees, as the header states them (sexagesimal rounded to 0.1 s / 1").
    pub ra: f64,
    pub dec: f64,
    pub mjd: f64,
    /// `YYYY-MM-DD` of the observatory night.
    pub night: String,
    pub frames: u32,
}

pub fn expected(params: &FitsParams) -> Expected {
    header::expected(params)
}

/// Writes one FITS file at `path` (creating its directory), through a temporary name in the
/// same directory and a rename. Returns the file size.
pub fn write_fits(path: &Path, params: &FitsParams) -> Result<u64> {
    if params.frames == 0 || params.width == 0 || params.height == 0 {
        bail!(
            "{}: a FITS image needs at least one frame, row and column",
            path.display()
        );
    }
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = write_contents(&tmp, params).and_then(|size| {
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        Ok(size)
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp); // best effort: the error below says what went wrong
    }
    written
}

fn write_contents(path: &Path, params: &FitsParams) -> Result<u64> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let header = header(params)?;
    let pixels = Pixels::new(params);
    let mut row = vec![0u8; 2 * params.width as usize];
    let io = |e| anyhow::Error::new(e).context(format!("cannot write {}", path.display()));
    out.write_all(&header).map_err(io)?;
    for frame in 0..params.frames {
        let mut frame_pixels = pixels.frame(frame);
        for y in 0..params.height {
            frame_pixels.encode_row(y, &mut row);
            out.write_all(&row).map_err(io)?;
        }
    }
    let data_padding = padded(params.data_bytes()) - params.data_bytes();
    out.write_all(&vec![0u8; data_padding as usize])
        .map_err(io)?;
    out.flush().map_err(io)?;
    Ok(header.len() as u64 + padded(params.data_bytes()))
}

fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cards(bytes: &[u8]) -> Vec<String> {
        bytes
            .chunks(80)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }

    fn value<'a>(cards: &'a [String], key: &str) -> Option<&'a str> {
        cards
            .iter()
            .find(|c| c[..8].trim_end() == key && &c[8..10] == "= ")
            .map(|c| c[10..].split(" / ").next().unwrap_or("").trim())
    }

    #[test]
    fn movie_file_is_valid_fits_with_expected_sizes() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("night/movie.fits");
        let params = FitsParams::new(42, 17, 2);
        let size = write_fits(&path, &params)?;
        let bytes = fs::read(&path)?;
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(size, params.file_size());
        assert_eq!(size % BLOCK, 0);

        let end = bytes
            .chunks(80)
            .position(|c| c.starts_with(b"END") && c[3..].iter().all(|&b| b == b' '))
            .context("header has no END card")?;
        let header_len = padded((end as u64 + 1) * 80) as usize;
        let cards = cards(&bytes[..header_len]);
        assert!(bytes[..header_len]
            .iter()
            .all(|b| (b' '..=b'~').contains(b)));
        assert!(
            cards[end + 1..].iter().all(|c| c.trim().is_empty()),
            "header padded with spaces"
        );
        assert!(cards[0].starts_with("SIMPLE  =                    T"));
        for (key, want) in [
            ("BITPIX", "16"),
            ("NAXIS", "3"),
            ("NAXIS1", "2000"),
            ("NAXIS2", "1128"),
            ("NAXIS3", "2"),
            ("BZERO", "32768"),
            ("BSCALE", "1"),
            ("DET-ID", "17"),
            ("EXP-ID", "42"),
            ("TELESCOP", "'Kiso 105cm Schmidt'"),
            ("INSTRUME", "'Tomo-e Gozen'"),
            ("DATE-OBS", "'2024-05-01T10:40:30.000'"),
        ] {
            assert_eq!(value(&cards, key), Some(want), "card {key}");
        }
        for key in ["MJD-OBS", "EXPTIME", "RA", "DEC", "OBJECT", "PROJECT"] {
            assert!(value(&cards, key).is_some(), "card {key} missing");
        }

        let data_len = 2 * 2000 * 1128 * 2;
        assert_eq!(bytes.len(), header_len + padded(data_len as u64) as usize);
        assert!(
            bytes[header_len + data_len..].iter().all(|&b| b == 0),
            "data padded with zeros"
        );
        let pixels: Vec<u16> = bytes[header_len..header_len + data_len]
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) ^ 0x8000)
            .collect();
        let median = {
            let mut sample: Vec<u16> = pixels.iter().step_by(97).copied().collect();
            sample.sort_unstable();
            sample[sample.len() / 2]
        };
        assert!((900..1100).contains(&median), "sky level {median}");
        assert!(pixels.contains(&u16::MAX), "some sources saturate");
        let names: Vec<_> = fs::read_dir(dir.path().join("night"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names, ["movie.fits"], "temporary file renamed away");
        Ok(())
    }

    #[test]
    fn output_is_deterministic_and_single_frames_are_2d() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut params = FitsParams::new(7, 3, 1);
        params.width = 300;
        params.height = 200;
        let (a, b) = (dir.path().join("a.fits"), dir.path().join("b.fits"));
        write_fits(&a, &params)?;
        write_fits(&b, &params)?;
        let bytes = fs::read(&a)?;
        assert_eq!(bytes, fs::read(&b)?);
        let cards = cards(&bytes[..2880]);
        assert_eq!(value(&cards, "NAXIS"), Some("2"));
        assert_eq!(value(&cards, "NAXIS3"), None);
        assert_eq!(bytes.len() as u64, 2880 + padded(2 * 300 * 200));
        Ok(())
    }
}
