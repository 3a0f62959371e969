//! `skyferry-bench`: how skyferry compares with the tools people use today, on the same
//! machine and the same data, in one run. Not a test: run it in a release build with
//! `cargo run --release --bin skyferry-bench [-- --quick --compression N]`.
//!
//! Data sets (Tomo-e Gozen-like FITS): one 2 GiB movie; one exposure of 84 single-frame
//! files; 8 movies of 18 frames (~81 MB each). `--quick` shrinks them for a smoke run.
//!
//! Tools, each run once on the same pre-written, page-cache-warm source tree:
//! - skyferry: a real receiver and agent on loopback (4 MiB chunks, 8 parallel files, zstd
//!   level 1 unless `--compression` says otherwise); the clock runs from starting the agent
//!   until every file is published;
//! - `rsync -a` over ssh to a private sshd on 127.0.0.1, followed by `sync`;
//! - `cp -r` followed by `sync`.
//!
//! skyferry fsyncs every file before it acknowledges it, hence `sync` after the others. CPU
//! per GB is reported twice: for the tool's own processes (immune to other load on this
//! shared machine) and machine-wide from /proc/stat (which also sees kernel writeback, and
//! everything else running: the idle background load is measured before and after).

mod cpu;
mod report;
mod sshd;
mod tools;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::binaries::binary;
use skyferry_tests::fits::{self, FitsParams};
use skyferry_tests::{compare_trees, Pair, PairOptions};

use cpu::CpuClock;
use report::{Outcome, Row};
use sshd::Sshd;

const USAGE: &str = "usage: skyferry-bench [--quick] [--compression N]
  --quick           smaller data sets (256 MiB movie, 1 exposure, 2 movies of 18 frames)
  --compression N   skyferry's zstd level (default 1; 0 = never compress)";

struct Args {
    quick: bool,
    compression: u32,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        quick: false,
        compression: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--compression" => {
                let value = it.next().context("--compression needs a level")?;
                args.compression = value
                    .parse()
                    .with_context(|| format!("--compression needs a number, got {value:?}"))?;
            }
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(args))
}

/// Bytes in one frame of one sensor.
const FRAME_BYTES: u64 = 2 * fits::WIDTH as u64 * fits::HEIGHT as u64;

/// A data set, written by the generator into a source directory.
enum Dataset {
    /// One movie file of this many frames.
    Movie { frames: u32 },
    /// Exposures of 84 single-frame files.
    Exposures { count: u32 },
    /// `files` movies of `frames` frames each.
    Movies { files: u8, frames: u32 },
}

impl Dataset {
    fn all(quick: bool) -> Vec<Dataset> {
        let movie_bytes: u64 = if quick { 256 << 20 } else { 2 << 30 };
        vec![
            Dataset::Movie {
                frames: movie_bytes.div_ceil(FRAME_BYTES) as u32,
            },
            Dataset::Exposures { count: 1 },
            Dataset::Movies {
                files: if quick { 2 } else { 8 },
                frames: 18,
            },
        ]
    }

    fn name(&self) -> String {
        match self {
            Dataset::Movie { frames } => format!("1 movie, {frames} frames"),
            Dataset::Exposures { count } => format!("{count} exposure(s), 84 files"),
            Dataset::Movies { files, frames } => format!("{files} movies, {frames} frames"),
        }
    }

    fn write(&self, dir: &Path) -> Result<()> {
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

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("skyferry-bench: {e:#}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("skyferry-bench: some runs failed (see the table)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("skyferry-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` if a tool failed.
fn run(args: &Args) -> Result<bool> {
    if cfg!(debug_assertions) {
        println!("warning: debug build; use `cargo run --release --bin skyferry-bench`");
    }
    binary("skyferry-agent")?; // build the daemons now, not while measuring the idle load
    let clock = CpuClock::new()?;
    let rsync_skip = sshd::ensure_tools();
    let sshd = match &rsync_skip {
        None => Some(Sshd::start().context("cannot start the private sshd for rsync")?),
        Some(reason) => {
            println!("skipping rsync: {reason}");
            None
        }
    };
    let background_before = background_load(&clock)?;
    let mut rows = Vec::new();
    for dataset in Dataset::all(args.quick) {
        println!("data set: {} …", dataset.name());
        rows.push(bench_dataset(
            &dataset,
            args.compression,
            &clock,
            sshd.as_ref(),
            rsync_skip.as_deref(),
        )?);
    }
    let background = (background_before, background_load(&clock)?);
    report::print(&rows, args.compression, background);
    let failed = |(_, outcome): &(&str, Outcome)| matches!(outcome, Outcome::Failed(_));
    Ok(!rows.iter().any(|row| row.tools.iter().any(failed)))
}

/// Writes the data set into a fresh pair's source tree and runs every tool on it.
fn bench_dataset(
    dataset: &Dataset,
    compression: u32,
    clock: &CpuClock,
    sshd: Option<&Sshd>,
    rsync_skip: Option<&str>,
) -> Result<Row> {
    let mut pair = Pair::new(PairOptions {
        chunk_size: "4 MiB".into(),
        parallel_files: 8,
        compression_level: compression,
        ..PairOptions::default()
    })?;
    let src = pair.source();
    let started = Instant::now();
    dataset.write(&src)?;
    let tree = compare_trees(&src, &src)?;
    println!(
        "  wrote {} files, {:.1} MB in {:.1} s",
        tree.files,
        tree.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    let timeout = Duration::from_secs(120 + tree.bytes / 10_000_000);
    let mb = tree.bytes as f64 / 1e6;

    let skyferry = outcome("skyferry", mb, tools::skyferry(&mut pair, clock, timeout));
    let rsync = match (sshd, rsync_skip) {
        (Some(sshd), _) => outcome(
            "rsync+ssh",
            mb,
            tools::rsync(clock, sshd, &src, &pair.dir().join("rsync-dst")),
        ),
        (None, reason) => Outcome::Skipped(reason.unwrap_or("not available").to_string()),
    };
    let cp = outcome(
        "cp+sync",
        mb,
        tools::cp(clock, &src, &pair.dir().join("cp-dst")),
    );
    Ok(Row {
        dataset: dataset.name(),
        files: tree.files,
        bytes: tree.bytes,
        tools: vec![
            ("skyferry", skyferry),
            ("rsync+ssh", rsync),
            ("cp+sync", cp),
        ],
    })
}

/// Prints one progress line and turns the result into a table cell.
fn outcome(tool: &str, mb: f64, result: Result<tools::Measurement>) -> Outcome {
    match result {
        Ok(m) => {
            println!(
                "  {tool:<10} {:>7.2} s {:>8.1} MB/s  (verified)",
                m.seconds,
                mb / m.seconds
            );
            Outcome::Done(m)
        }
        Err(e) => {
            println!("  {tool:<10} FAILED: {e:#}");
            Outcome::Failed(format!("{e:#}"))
        }
    }
}

/// Busy CPU seconds per second while the benchmark is idle, over 2 s: the load of
/// everything else on this (shared) machine.
fn background_load(clock: &CpuClock) -> Result<f64> {
    let (cpu0, t0) = (clock.busy_seconds()?, Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    Ok((clock.busy_seconds()? - cpu0) / t0.elapsed().as_secs_f64())
}
