//! `--codecs`: what each way of compressing the benchmark's FITS data costs and saves, on
//! one core: skyferry's plain zstd (at the configured `compression_level`) and its
//! FITS-aware codec (16-bit byte-shuffle, then zstd), chunk by chunk as the agent sends
//! them, next to `fpack` (Rice, the astronomers' tool; Debian `libcfitsio-bin`) and
//! `funpack`, on the same files.
//!
//! skyferry's codecs run in this process on data already in memory, one thread, and are
//! timed by that thread's CPU time (immune to the other load on a shared machine) and by
//! wall time; every chunk is decoded again and compared with the original. `fpack` and
//! `funpack` run once per file on page-cache-warm files; their times are the wall time
//! of all runs and the CPU time of the children (process start included, as a user pays
//! it). Ratios are original bytes / compressed bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use skyferry_common::compress::shuffle::{ShuffleDecoder, ShuffleEncoder};
use skyferry_tests::fits::{self, FitsParams};

use crate::cpu::CpuClock;
use crate::report::median;
use crate::tools;

pub struct CodecOptions {
    pub quick: bool,
    pub runs: usize,
    pub level: i32,
    pub chunk_size: usize,
}

/// One measured way of compressing one data set.
struct Reading {
    ratio: f64,
    /// MB/s of original bytes per CPU second: compress, decompress.
    cpu_mb_s: (f64, f64),
    /// MB/s of original bytes per wall second: compress, decompress.
    wall_mb_s: (f64, f64),
}

/// Runs every codec on every data set and prints one table; `Ok(false)` if fpack was
/// missing (its rows then say so).
pub fn run(opts: &CodecOptions, clock: &CpuClock) -> Result<bool> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let sets = datasets(opts.quick);
    let fpack = which("fpack") && which("funpack");
    let mut table = Vec::new();
    for (name, files) in &sets {
        println!("codecs: writing {name} …");
        let set_dir = dir.path().join(name.replace(' ', "_"));
        let paths = files
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let path = set_dir.join(format!("f{i:03}.fits"));
                fits::write_fits(&path, p).map(|_| path)
            })
            .collect::<Result<Vec<_>>>()?;
        let raw_bytes: u64 = files.iter().map(FitsParams::file_size).sum();
        println!(
            "codecs: {name}: {} files, {:.0} MB …",
            paths.len(),
            raw_bytes as f64 / 1e6
        );
        // Plain zstd as the agent's `Compressor` calls it: one bulk frame per chunk, one
        // context reused.
        let mut plain = zstd::bulk::Compressor::new(opts.level).context("zstd context")?;
        let mut zstd_compress = |raw: &[u8], out: &mut Vec<u8>| -> Result<()> {
            plain.compress_to_buffer(raw, out).context("zstd failed")?;
            Ok(())
        };
        let zstd = repeat(opts.runs, || {
            in_process(
                &paths,
                opts.chunk_size,
                clock,
                &mut zstd_compress,
                zstd_decompress,
            )
        })?;
        let mut enc = ShuffleEncoder::new(opts.level).context("cannot create a zstd context")?;
        let mut dec = ShuffleDecoder::new().context("cannot create a zstd context")?;
        let shuffled = repeat(opts.runs, || {
            in_process(
                &paths,
                opts.chunk_size,
                clock,
                |raw, out| enc.compress(raw, out).context("shuffle codec failed"),
                |z, out| dec.decompress(z, out).map_err(|e| anyhow::anyhow!("{e:?}")),
            )
        })?;
        let rice = if fpack {
            Some(repeat(opts.runs, || with_fpack(&paths, &set_dir, clock))?)
        } else {
            None
        };
        table.push((name.clone(), raw_bytes, zstd, shuffled, rice));
    }
    print(&table, opts, fpack);
    Ok(fpack)
}

/// The benchmark's FITS data: one exposure (84 single-frame files of 4.5 MB) and the
/// movies of the loopback mode (8 files of 18 frames, ~81 MB each); `quick`: a quarter
/// of the exposure and 2 movies.
fn datasets(quick: bool) -> Vec<(String, Vec<FitsParams>)> {
    let sensors = if quick { 21 } else { fits::DETECTORS };
    let movies = if quick { 2 } else { 8 };
    vec![
        (
            format!("exposure {sensors} x 4.5 MB"),
            (1..=sensors).map(|d| FitsParams::new(1, d, 1)).collect(),
        ),
        (
            format!("movies {movies} x 81 MB"),
            (1..=movies).map(|d| FitsParams::new(2, d, 18)).collect(),
        ),
    ]
}

fn which(tool: &str) -> bool {
    Command::new(tool).arg("-V").output().is_ok()
}

/// The median reading of `runs` runs (by compress speed; the ratio is the same each run).
fn repeat(runs: usize, mut one: impl FnMut() -> Result<Reading>) -> Result<Reading> {
    let mut all = (0..runs).map(|_| one()).collect::<Result<Vec<_>>>()?;
    let pick =
        |f: fn(&Reading) -> f64, all: &[Reading]| median(&all.iter().map(f).collect::<Vec<_>>());
    let r = Reading {
        ratio: all[0].ratio,
        cpu_mb_s: (pick(|r| r.cpu_mb_s.0, &all), pick(|r| r.cpu_mb_s.1, &all)),
        wall_mb_s: (pick(|r| r.wall_mb_s.0, &all), pick(|r| r.wall_mb_s.1, &all)),
    };
    all.clear();
    Ok(r)
}

/// Compresses every chunk of every file with `compress` (all files in memory first, so
/// that only the codec is timed), then decodes each with `decompress`, and checks that
/// every chunk came back as it was.
fn in_process(
    paths: &[PathBuf],
    chunk_size: usize,
    clock: &CpuClock,
    mut compress: impl FnMut(&[u8], &mut Vec<u8>) -> Result<()>,
    mut decompress: impl FnMut(&[u8], &mut [u8]) -> Result<()>,
) -> Result<Reading> {
    let files = paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read {}", p.display())))
        .collect::<Result<Vec<_>>>()?;
    let chunks: Vec<&[u8]> = files.iter().flat_map(|f| f.chunks(chunk_size)).collect();
    let mut frames: Vec<Vec<u8>> = chunks
        .iter()
        .map(|c| Vec::with_capacity(zstd::zstd_safe::compress_bound(c.len())))
        .collect();
    let cpu = || clock.process_seconds("self").map(|(own, _)| own);

    let (cpu0, t0) = (cpu()?, Instant::now());
    for (chunk, out) in chunks.iter().zip(frames.iter_mut()) {
        compress(chunk, out)?;
    }
    let (c_wall, c_cpu) = (t0.elapsed().as_secs_f64(), cpu()? - cpu0);

    let mut back = vec![0u8; chunk_size];
    let (cpu0, t0) = (cpu()?, Instant::now());
    for (chunk, z) in chunks.iter().zip(&frames) {
        decompress(z, &mut back[..chunk.len()])?;
    }
    let (d_wall, d_cpu) = (t0.elapsed().as_secs_f64(), cpu()? - cpu0);

    for (i, (chunk, z)) in chunks.iter().zip(&frames).enumerate() {
        decompress(z, &mut back[..chunk.len()])?;
        if back[..chunk.len()] != **chunk {
            bail!("chunk {i} of the data set did not decode to its original bytes");
        }
    }
    let raw: usize = chunks.iter().map(|c| c.len()).sum();
    let packed: usize = frames.iter().map(Vec::len).sum();
    let mb = raw as f64 / 1e6;
    Ok(Reading {
        ratio: raw as f64 / packed as f64,
        cpu_mb_s: (mb / c_cpu.max(0.01), mb / d_cpu.max(0.01)),
        wall_mb_s: (mb / c_wall, mb / d_wall),
    })
}

/// `fpack` (Rice, lossless for integer pixels) and `funpack` on each file; checks that
/// funpack's output has the original pixels (its BLAKE3 equals the source's when the
/// header round-trips, else the data part).
fn with_fpack(paths: &[PathBuf], dir: &Path, clock: &CpuClock) -> Result<Reading> {
    let mut raw_total = 0u64;
    let mut packed_total = 0u64;
    let (mut c_cpu, mut c_wall, mut d_cpu, mut d_wall) = (0.0, 0.0, 0.0, 0.0);
    for path in paths {
        let fz = dir.join("out.fits.fz");
        let back = dir.join("back.fits");
        let _ = std::fs::remove_file(&fz);
        let _ = std::fs::remove_file(&back);
        let (cpu0, t0) = (clock.process_seconds("self")?.1, Instant::now());
        tools::run(Command::new("fpack").arg("-O").arg(&fz).arg(path))?;
        c_wall += t0.elapsed().as_secs_f64();
        c_cpu += clock.process_seconds("self")?.1 - cpu0;
        let (cpu0, t0) = (clock.process_seconds("self")?.1, Instant::now());
        tools::run(Command::new("funpack").arg("-O").arg(&back).arg(&fz))?;
        d_wall += t0.elapsed().as_secs_f64();
        d_cpu += clock.process_seconds("self")?.1 - cpu0;
        let original = std::fs::read(path)?;
        let unpacked = std::fs::read(&back)?;
        if data_unit(&original) != data_unit(&unpacked) {
            bail!("funpack did not restore the pixels of {}", path.display());
        }
        raw_total += original.len() as u64;
        packed_total += std::fs::metadata(&fz)?.len();
    }
    let _ = std::fs::remove_file(dir.join("out.fits.fz"));
    let _ = std::fs::remove_file(dir.join("back.fits"));
    let mb = raw_total as f64 / 1e6;
    Ok(Reading {
        ratio: raw_total as f64 / packed_total as f64,
        cpu_mb_s: (mb / c_cpu.max(0.01), mb / d_cpu.max(0.01)),
        wall_mb_s: (mb / c_wall, mb / d_wall),
    })
}

/// The primary data unit of a FITS file: what follows the header's END card block.
fn data_unit(file: &[u8]) -> &[u8] {
    let block = fits::BLOCK as usize;
    let mut at = 0;
    while at + block <= file.len() {
        let end = file[at..at + block]
            .chunks(80)
            .any(|card| card.starts_with(b"END") && card[3..].iter().all(|&b| b == b' '));
        at += block;
        if end {
            return &file[at..];
        }
    }
    &[]
}

type Row = (String, u64, Reading, Reading, Option<Reading>);

fn print(table: &[Row], opts: &CodecOptions, fpack: bool) {
    println!();
    println!(
        "== codecs: ratio and speed on one core, median of {} runs ==",
        opts.runs
    );
    println!(
        "skyferry: {} KiB chunks, zstd level {} (compression_level); MB/s of original bytes per CPU second (per wall second);",
        opts.chunk_size / 1024,
        opts.level
    );
    println!("fpack/funpack: Rice, one process per file on page-cache-warm files, process start included.");
    if !fpack {
        println!("fpack/funpack: not installed (apt-get install libcfitsio-bin); their rows are missing.");
    }
    println!();
    println!(
        "{:<22} {:<18} {:>6} {:>22} {:>22}",
        "data set", "codec", "ratio", "compress MB/s", "decompress MB/s"
    );
    for (name, bytes, zstd, shuffled, rice) in table {
        let name = format!("{name} ({:.0} MB)", *bytes as f64 / 1e6);
        let mut rows = vec![
            (format!("zstd -{}", opts.level), zstd),
            (format!("shuffle16+zstd -{}", opts.level), shuffled),
        ];
        if let Some(r) = rice {
            rows.push(("fpack (Rice)".into(), r));
        }
        for (i, (codec, r)) in rows.iter().enumerate() {
            println!(
                "{:<22} {:<18} {:>6.3} {:>10.0} ({:>8.0}) {:>10.0} ({:>8.0})",
                if i == 0 { name.as_str() } else { "" },
                codec,
                r.ratio,
                r.cpu_mb_s.0,
                r.wall_mb_s.0,
                r.cpu_mb_s.1,
                r.wall_mb_s.1
            );
        }
    }
}

fn zstd_decompress(z: &[u8], out: &mut [u8]) -> Result<()> {
    let n = zstd::bulk::decompress_to_buffer(z, out).context("zstd failed")?;
    anyhow::ensure!(
        n == out.len(),
        "zstd decoded {n} bytes, expected {}",
        out.len()
    );
    Ok(())
}
