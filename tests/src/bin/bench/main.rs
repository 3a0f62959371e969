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
//! is machine-wide busy time from /proc/stat, so it includes every process involved (and
//! anything else running on the machine: the background load is measured before and after).
//! "busy CPUs" is CPU seconds per wall second: near the CPU count, a tool is CPU-bound.

mod cpu;
mod sshd;

use std::fs;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::fits::{self, FitsParams};
use skyferry_tests::{compare_trees, Pair, PairOptions};

use cpu::CpuClock;
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

/// Wall and machine-wide busy CPU time of one tool run.
#[derive(Clone, Copy)]
struct Measurement {
    seconds: f64,
    cpu_seconds: f64,
}

enum Outcome {
    Done(Measurement),
    Skipped(String),
    Failed(String),
}

struct Row {
    dataset: String,
    files: usize,
    bytes: u64,
    tools: [(&'static str, Outcome); 3],
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
        println!(
            "warning: this is a debug build; run with `cargo run --release --bin skyferry-bench`"
        );
    }
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
    print_report(&rows, args.compression, background);
    Ok(rows.iter().all(|r| {
        r.tools
            .iter()
            .all(|(_, o)| !matches!(o, Outcome::Failed(_)))
    }))
}

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

    let skyferry = outcome(run_skyferry(&mut pair, clock, timeout));
    let rsync = match (sshd, rsync_skip) {
        (Some(sshd), _) => outcome(run_copy(
            clock,
            "rsync+ssh",
            &src,
            &pair.dir().join("rsync-dst"),
            |dst| {
                Command::new("rsync")
                    .args(["-a", "-e", &sshd.ssh_command()])
                    .arg(format!("{}/", src.display()))
                    .arg(format!("{}/", sshd.remote(dst)))
                    .output()
            },
        )),
        (None, reason) => Outcome::Skipped(reason.unwrap_or("not available").to_string()),
    };
    let cp = outcome(run_copy(
        clock,
        "cp+sync",
        &src,
        &pair.dir().join("cp-dst"),
        |dst| Command::new("cp").arg("-r").arg(&src).arg(dst).output(),
    ));
    Ok(Row {
        dataset: dataset.name(),
        files: tree.files,
        bytes: tree.bytes,
        tools: [
            ("skyferry", skyferry),
            ("rsync+ssh", rsync),
            ("cp+sync", cp),
        ],
    })
}

fn outcome(result: Result<Measurement>) -> Outcome {
    match result {
        Ok(m) => Outcome::Done(m),
        Err(e) => {
            println!("  FAILED: {e:#}");
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

/// Times `body` in wall-clock and machine-wide busy CPU seconds.
fn measure(clock: &CpuClock, body: impl FnOnce() -> Result<()>) -> Result<Measurement> {
    sync()?; // leftover dirty pages are not this tool's work
    let (cpu0, t0) = (clock.busy_seconds()?, Instant::now());
    body()?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Measurement {
        seconds,
        cpu_seconds: clock.busy_seconds()? - cpu0,
    })
}

fn run_skyferry(pair: &mut Pair, clock: &CpuClock, timeout: Duration) -> Result<Measurement> {
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?; // not part of the transfer
    let m = measure(clock, || {
        pair.start_agent()?;
        pair.wait_arrived(timeout)
    })?;
    let report = compare_trees(&pair.source(), &pair.published())?;
    report
        .ensure_identical()
        .map_err(|e| e.context(pair.diagnostics()))?;
    for (name, status) in [
        ("agent", pair.stop_agent()?),
        ("receiver", pair.stop_receiver()?),
    ] {
        if !status.success() {
            bail!(
                "the {name} exited with {status} after SIGTERM\n{}",
                pair.diagnostics()
            );
        }
    }
    report_line("skyferry", m, report.bytes);
    remove(&pair.storage())?;
    Ok(m)
}

/// Times `copy(dst)` plus `sync`, checks the copy, removes it.
fn run_copy(
    clock: &CpuClock,
    tool: &str,
    src: &Path,
    dst: &Path,
    copy: impl FnOnce(&Path) -> std::io::Result<std::process::Output>,
) -> Result<Measurement> {
    let m = measure(clock, || {
        let out = copy(dst).context("cannot start the copy")?;
        if !out.status.success() {
            bail!(
                "copy failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        sync()
    })?;
    let report = compare_trees(src, dst)?;
    report.ensure_identical()?;
    report_line(tool, m, report.bytes);
    remove(dst)?;
    Ok(m)
}

fn report_line(tool: &str, m: Measurement, bytes: u64) {
    println!(
        "  {tool:<10} {:>7.2} s  {:>8.1} MB/s  (verified)",
        m.seconds,
        bytes as f64 / 1e6 / m.seconds
    );
}

fn sync() -> Result<()> {
    let status = Command::new("sync").status().context("cannot run sync")?;
    if !status.success() {
        bail!("sync failed ({status})");
    }
    Ok(())
}

fn remove(dir: &Path) -> Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

fn print_report(rows: &[Row], compression: u32, background: (f64, f64)) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!("skyferry benchmark: loopback, {cpus} CPUs (shared with anything else running).");
    println!(
        "skyferry: 4 MiB chunks, 8 parallel files, zstd level {compression}. Every tool reads"
    );
    println!("the same page-cache-warm source tree; rsync and cp are followed by `sync`");
    println!("(skyferry fsyncs each file itself). CPU = machine-wide busy time from /proc/stat;");
    println!(
        "background load (idle benchmark): {:.2} CPU-s/s before, {:.2} after.",
        background.0, background.1
    );
    println!();
    println!(
        "{:<28} {:>5} {:>9}  {:<10} {:>8} {:>9} {:>9} {:>9}",
        "data set", "files", "MB", "tool", "seconds", "MB/s", "CPU-s/GB", "busy CPUs"
    );
    for row in rows {
        let mb = row.bytes as f64 / 1e6;
        for (i, (tool, outcome)) in row.tools.iter().enumerate() {
            let lead = if i == 0 {
                format!("{:<28} {:>5} {:>9.1}", row.dataset, row.files, mb)
            } else {
                format!("{:<28} {:>5} {:>9}", "", "", "")
            };
            let figures = match outcome {
                Outcome::Done(m) => format!(
                    "{:>8.2} {:>9.1} {:>9.2} {:>9.2}",
                    m.seconds,
                    mb / m.seconds,
                    m.cpu_seconds / (row.bytes as f64 / 1e9),
                    m.cpu_seconds / m.seconds
                ),
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::Failed(e) => {
                    let first = e.lines().next().unwrap_or_default();
                    format!("FAILED: {}", first.chars().take(70).collect::<String>())
                }
            };
            println!("{lead}  {tool:<10} {figures}");
        }
    }
    println!();
    println!("skyferry relative to the others (speed: >1 is faster; CPU per GB: <1 is cheaper)");
    println!(
        "{:<28} {:>14} {:>14} {:>12} {:>12}",
        "data set", "speed/rsync", "CPU/GB/rsync", "speed/cp", "CPU/GB/cp"
    );
    for row in rows {
        let done = |i: usize| match &row.tools[i].1 {
            Outcome::Done(m) => Some(*m),
            _ => None,
        };
        let ratios = |other: Option<Measurement>| match (done(0), other) {
            (Some(s), Some(o)) => (
                format!("{:.2}x", o.seconds / s.seconds),
                format!("{:.2}x", s.cpu_seconds / o.cpu_seconds),
            ),
            _ => ("-".into(), "-".into()),
        };
        let (speed_rsync, cpu_rsync) = ratios(done(1));
        let (speed_cp, cpu_cp) = ratios(done(2));
        println!(
            "{:<28} {speed_rsync:>14} {cpu_rsync:>14} {speed_cp:>12} {cpu_cp:>12}",
            row.dataset
        );
    }
}
