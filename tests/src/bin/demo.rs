//! `skyferry-demo`: the five-minute tour. Starts a real receiver and agent on loopback in a
//! temporary directory, writes one Tomo-e Gozen exposure (84 FITS files, one per sensor)
//! into the watched directory, waits until every file is stored, checks every BLAKE3 hash
//! and prints what happened.
//!
//! Run it with `cargo run --release --bin skyferry-demo [-- --keep --frames N --exposures N]`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::fits::{self, FitsParams, DETECTORS, HEIGHT, WIDTH};
use skyferry_tests::{compare_trees, Pair, PairOptions};

const USAGE: &str = "usage: skyferry-demo [--keep] [--frames N] [--exposures N]
  --keep          keep the temporary directory (configs, logs, certificates, data)
  --frames N      frames per FITS file (default 1; one frame is 2000x1128 16-bit pixels)
  --exposures N   exposures of 84 files to write (default 1)";

struct Args {
    keep: bool,
    frames: u32,
    exposures: u32,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        keep: false,
        frames: 1,
        exposures: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u32> {
            let value = it
                .next()
                .with_context(|| format!("{name} needs a number"))?;
            match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{name} needs a positive number, got {value:?}"),
            }
        };
        match arg.as_str() {
            "--keep" => args.keep = true,
            "--frames" => args.frames = number("--frames")?,
            "--exposures" => args.exposures = number("--exposures")?,
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(Some(args)) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("skyferry-demo: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("skyferry-demo: {e:#}\n{USAGE}");
            ExitCode::from(64)
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut pair = Pair::new(PairOptions {
        chunk_size: "4 MiB".into(),
        parallel_files: 8,
        compression_level: 1,
        ..PairOptions::default()
    })?;
    if args.keep {
        pair.keep();
    }
    let files = u64::from(DETECTORS) * u64::from(args.exposures);
    let expected_bytes = files * FitsParams::new(1, 1, args.frames).file_size();
    println!(
        "skyferry demo: receiver and agent on 127.0.0.1:{} in {}",
        pair.port(),
        pair.dir().display()
    );
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    pair.start_agent()?;

    println!(
        "writing {} exposure(s) x {DETECTORS} FITS files ({WIDTH}x{HEIGHT} px, 16-bit, {} frame(s) each, {:.1} MB) into {}",
        args.exposures,
        args.frames,
        mb(expected_bytes),
        pair.source().display()
    );
    let started = Instant::now();
    for exposure in 1..=args.exposures {
        fits::write_exposure(&pair.source(), exposure, args.frames)?;
    }
    let written = started.elapsed();
    pair.wait_arrived(Duration::from_secs(60 + expected_bytes / 5_000_000))?;
    let elapsed = started.elapsed();

    let report = compare_trees(&pair.source(), &pair.published())?;
    if !report.is_identical() {
        bail!(
            "stored files differ from the source: {report}\n{}",
            pair.diagnostics()
        );
    }
    let status = pair.agent_status();
    pair.stop_both()?;

    println!();
    println!("  files        {}", report.files);
    println!("  total        {:.1} MB", mb(report.bytes));
    println!(
        "  wall time    {:.2} s from first write to last stored file (writing took {:.2} s)",
        elapsed.as_secs_f64(),
        written.as_secs_f64()
    );
    println!(
        "  throughput   {:.1} MB/s",
        mb(report.bytes) / elapsed.as_secs_f64()
    );
    println!(
        "  integrity    all {} BLAKE3 hashes verified (source = stored)",
        report.files
    );
    match status {
        Ok(json) => println!("  agent status {json}"),
        Err(e) => println!("  agent status unavailable: {e:#}"),
    }
    println!("  stored at    {}", pair.published().display());
    println!("  shutdown     agent and receiver exited 0 on SIGTERM");
    if args.keep {
        println!(
            "\nkept {} (configs, logs, certificates, source and storage)",
            pair.dir().display()
        );
    } else {
        println!(
            "\n{} will be removed now; run with --keep to keep it",
            pair.dir().display()
        );
    }
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}
