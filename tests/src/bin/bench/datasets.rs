//! The data sets (Tomo-e Gozen-like FITS, from the harness's generator): one 2 GiB movie;
//! one exposure of 84 single-frame files (4.5 MB each); 8 movies of 18 frames (~81 MB
//! each). `--quick` shrinks them for a smoke run.

use std::path::Path;

use anyhow::Result;
use skyferry_tests::fits::{self, FitsParams};

/// Bytes in one frame of one sensor.
pub const FRAME_BYTES: u64 = 2 * fits::WIDTH as u64 * fits::HEIGHT as u64;

/// A data set, written by the generator into a source directory.
pub enum Dataset {
    /// One movie file of this many frames.
    Movie { frames: u32 },
    /// Exposures of 84 single-frame files.
    Exposures { count: u32 },
    /// `files` movies of `frames` frames each.
    Movies { files: u8, frames: u32 },
}

impl Dataset {
    /// The single large file: 2 GiB (`quick`: 256 MiB).
    pub fn movie(quick: bool) -> Dataset {
        let movie_bytes: u64 = if quick { 256 << 20 } else { 2 << 30 };
        Dataset::Movie {
            frames: movie_bytes.div_ceil(FRAME_BYTES) as u32,
        }
    }

    /// One exposure: 84 files of 4.5 MB.
    pub fn exposure() -> Dataset {
        Dataset::Exposures { count: 1 }
    }

    /// The loopback comparison's three data sets.
    pub fn all(quick: bool) -> Vec<Dataset> {
        vec![
            Dataset::movie(quick),
            Dataset::exposure(),
            Dataset::Movies {
                files: if quick { 2 } else { 8 },
                frames: 18,
            },
        ]
    }

    /// The `--dataset` names, in the order of [`Dataset::all`].
    pub const NAMES: [&str; 3] = ["movie", "exposure", "movies"];

    /// This data set's `--dataset` name.
    pub fn key(&self) -> &'static str {
        match self {
            Dataset::Movie { .. } => Dataset::NAMES[0],
            Dataset::Exposures { .. } => Dataset::NAMES[1],
            Dataset::Movies { .. } => Dataset::NAMES[2],
        }
    }

    pub fn name(&self) -> String {
        match self {
            Dataset::Movie { frames } => format!("1 movie, {frames} frames"),
            Dataset::Exposures { count } => format!("{count} exposure(s), 84 files"),
            Dataset::Movies { files, frames } => format!("{files} movies, {frames} frames"),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        match *self {
            Dataset::Movie { frames } => {
                fits::write_fits(
                    &dir.join(fits::exposure_file(1, 1)),
                    &FitsParams::new(1, 1, frames),
                )?;
            }
            Dataset::Exposures { count } => {
                for exposure in 1..=count {
                    fits::write_exposure(dir, exposure, 1)?;
                }
            }
            Dataset::Movies { files, frames } => {
                for detector in 1..=files {
                    let params = FitsParams::new(2, detector, frames);
                    fits::write_fits(&dir.join(fits::exposure_file(2, detector)), &params)?;
                }
            }
        }
        Ok(())
    }
}
