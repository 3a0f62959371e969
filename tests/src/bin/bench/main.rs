//! `skyferry-bench`: how skyferry compares with the tools people use today, on the same
//! machine and the same data, in one run; how it fares on a link with delay and loss; and
//! how long one file takes to arrive. Not a test: run it in a release build with
//! `cargo run --release --bin skyferry-bench [-- OPTIONS]` (see `--help`).
//!
//! Modes, each printing its own table:
//! - loopback (the default, [`loopback`]): on one 2 GiB movie, one 84-file exposure and 8
//!   movies of ~81 MB ([`datasets`]), skyferry against `rsync -a` over ssh to a private
//!   sshd, `cp -r` + `sync`, and Flask + `wget` (the observatory's current path), the
//!   median of `--runs` runs each, with skyferry's ratios to each;
//! - `--link` ([`link`]): skyferry through the harness's UDP relay with added RTT and loss;
//! - `--latency` ([`latency`]): one file at a time, from close (or Redis publish) to done;
//! - `--live-first` ([`live_first`]): live files' latency while a replay fills a capped
//!   link, next to the same files with the link idle;
//! - `--codecs` ([`codecs`]): compression ratio and speed of skyferry's codecs next to
//!   `fpack`/`funpack` on the benchmark's FITS data.
//!
//! skyferry runs with the `[transfer]` defaults that `systemd/agent.toml.example` ships
//! ([`config`]); flags override single keys and the report says so.

mod codecs;
mod config;
mod cpu;
mod datasets;
mod flask;
mod latency;
mod link;
mod live_first;
mod loopback;
mod memory;
mod report;
mod scrape;
mod sshd;
mod tools;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::binaries::binary;
use skyferry_tests::{Pair, PairOptions};

use cpu::CpuClock;
use datasets::Dataset;
use report::Outcome;

const USAGE: &str = "usage: skyferry-bench [MODES] [OPTIONS]
modes (default: --loopback):
  --loopback           skyferry vs rsync+ssh, cp+sync, flask+wget on three data sets
  --link               through the UDP relay: RTT 0/5/15 ms, loss 0/0.1 %
  --latency            one 4.5 MB file at a time: close (or Redis publish) to done
  --live-first         live files' latency while a >= 2 GB replay fills a capped relay
                       (--rate, default 400 Mbit/s; --rtt, default 10 ms)
  --codecs             compression ratio and speed: zstd, shuffle16+zstd, fpack/funpack
options:
  --catalog-cost       loopback mode: also run skyferry with the receiver's catalog off
  --dataset NAME       loopback mode: only this data set (movie, exposure, movies;
                       repeatable; default all three)
  --tool NAME          loopback mode: skyferry and only this other tool (rsync+ssh,
                       cp+sync, flask+wget; repeatable; default all)
  --quick              smaller data (256 MiB movie, 2 movies of 18 frames; 20 latency files)
  --runs N             runs per tool and per link setting, median reported (default 3)
  --compression N      skyferry's compression_level instead of the example's
  --connections N      link mode: also run with [transfer] connections = N, if the agent
                       accepts that key
  --transfer KEY=VAL   set any [transfer] key of the agent (repeatable)
  --rate MBIT          link mode: cap the relay at MBIT Mbit/s each way
  --rtt MS             link mode: only this added RTT (repeatable; default 0, 5, 15)
  --loss FRACTION      link mode: only this loss each way (repeatable; default 0, 0.001)
  --latency-files N    latency mode: files per series (default 100); live-first mode:
                       live files per series (default 20)
  --quiet-period D     latency mode: [[watch]] quiet_period instead of the example's";

struct Args {
    loopback: bool,
    link: bool,
    latency: bool,
    live_first: bool,
    codecs: bool,
    quick: bool,
    catalog_cost: bool,
    datasets: Vec<String>,
    tools: Vec<String>,
    runs: usize,
    compression: Option<String>,
    connections: Option<u32>,
    transfer: Vec<(String, String)>,
    rate_mbit: Option<f64>,
    rtts_ms: Vec<u64>,
    losses: Vec<f64>,
    latency_files: Option<usize>,
    quiet_period: Option<String>,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args {
        loopback: false,
        link: false,
        latency: false,
        live_first: false,
        codecs: false,
        quick: false,
        catalog_cost: false,
        datasets: Vec::new(),
        tools: Vec::new(),
        runs: 3,
        compression: None,
        connections: None,
        transfer: Vec::new(),
        rate_mbit: None,
        rtts_ms: Vec::new(),
        losses: Vec::new(),
        latency_files: None,
        quiet_period: None,
    };
    let mut it = std::env::args().skip(1);
    fn number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T> {
        let value = value.with_context(|| format!("{flag} needs a value"))?;
        value
            .parse()
            .map_err(|_| anyhow::anyhow!("{flag} needs a number, got {value:?}"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--loopback" => args.loopback = true,
            "--link" => args.link = true,
            "--latency" => args.latency = true,
            "--live-first" => args.live_first = true,
            "--codecs" => args.codecs = true,
            "--quick" => args.quick = true,
            "--catalog-cost" => args.catalog_cost = true,
            "--dataset" => {
                let name = it.next().context("--dataset needs a name")?;
                if !Dataset::NAMES.contains(&name.as_str()) {
                    bail!("--dataset: {name:?} is not one of {:?}", Dataset::NAMES);
                }
                args.datasets.push(name);
            }
            "--tool" => {
                let name = it.next().context("--tool needs a name")?;
                if !loopback::TOOLS[1..].contains(&name.as_str()) {
                    bail!("--tool: {name:?} is not one of {:?}", &loopback::TOOLS[1..]);
                }
                args.tools.push(name);
            }
            "--runs" => args.runs = number::<usize>("--runs", it.next())?.max(1),
            "--compression" => {
                args.compression = Some(number::<u32>("--compression", it.next())?.to_string())
            }
            "--connections" => args.connections = Some(number("--connections", it.next())?),
            "--rate" => args.rate_mbit = Some(number("--rate", it.next())?),
            "--rtt" => args.rtts_ms.push(number("--rtt", it.next())?),
            "--loss" => args.losses.push(number("--loss", it.next())?),
            "--latency-files" => args.latency_files = Some(number("--latency-files", it.next())?),
            "--quiet-period" => {
                let d = it.next().context("--quiet-period needs a duration")?;
                config::duration(&d)?;
                args.quiet_period = Some(d);
            }
            "--transfer" => {
                let kv = it.next().context("--transfer needs KEY=VALUE")?;
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--transfer needs KEY=VALUE, got {kv:?}"))?;
                args.transfer.push((k.trim().into(), v.trim().into()));
            }
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !(args.link || args.latency || args.live_first || args.codecs) {
        args.loopback = true;
    }
    Ok(Some(args))
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
            eprintln!("skyferry-bench: some runs failed or were skipped (see the tables)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("skyferry-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen modes; `Ok(false)` if something failed.
fn run(args: &Args) -> Result<bool> {
    if cfg!(debug_assertions) {
        println!("warning: debug build; use `cargo run --release --bin skyferry-bench`");
    }
    let clock = CpuClock::new()?;
    let skyferry = skyferry_config(args)?;
    println!("skyferry: {}", skyferry.describe());
    let mut ok = true;
    if args.codecs {
        let opts = codecs::CodecOptions {
            quick: args.quick,
            runs: args.runs,
            level: skyferry.compression_level()?,
            chunk_size: skyferry.chunk_size()?,
        };
        ok &= codecs::run(&opts, &clock)?;
    }
    if !(args.loopback || args.link || args.latency || args.live_first) {
        return Ok(ok);
    }
    binary("skyferry-agent")?; // build the daemons now, not while measuring
    let touched = memory::prefault_free_memory()?;
    println!(
        "touched {:.1} GiB of free memory first, so that no tool pays the first-touch cost of fresh pages for the others",
        touched as f64 / f64::from(1u32 << 30)
    );
    if args.loopback {
        ok &= loopback(args, &skyferry, &clock)?;
    }
    if args.link {
        let mut connections = args.connections;
        if let Some(n) = connections {
            let probe = Pair::new(PairOptions::default())?;
            let mut with = skyferry.clone();
            with.set("connections", &n.to_string());
            if let Err(why) = with.accepted(&probe, "connections")? {
                println!(
                    "--connections {n}: unsupported by this agent ({why}); the link mode runs without it"
                );
                connections = None;
            }
        }
        let opts = link::LinkOptions {
            quick: args.quick,
            runs: args.runs,
            rate_mbit: args.rate_mbit,
            connections,
            rtts_ms: args.rtts_ms.clone(),
            losses: args.losses.clone(),
        };
        ok &= link::run(&opts, &skyferry, &clock)?;
    }
    if args.latency {
        let opts = latency::LatencyOptions {
            count: args
                .latency_files
                .unwrap_or(if args.quick { 20 } else { 100 }),
            quiet_period: args.quiet_period.clone(),
        };
        ok &= latency::run(&opts, &skyferry)?;
    }
    if args.live_first {
        let opts = live_first::LiveFirstOptions {
            quick: args.quick,
            live_files: args.latency_files.unwrap_or(20),
            rate_mbit: args.rate_mbit.unwrap_or(400.0),
            rtt_ms: args.rtts_ms.first().copied().unwrap_or(10),
        };
        ok &= live_first::run(&opts, &skyferry)?;
    }
    Ok(ok)
}

/// The examples' defaults with the flags' overrides, each checked by the agent itself.
fn skyferry_config(args: &Args) -> Result<config::Skyferry> {
    let mut skyferry = config::Skyferry::from_examples()?;
    if let Some(level) = &args.compression {
        skyferry.set("compression_level", level);
    }
    for (k, v) in &args.transfer {
        skyferry.set(k, v);
    }
    if skyferry.overridden.is_empty() {
        return Ok(skyferry);
    }
    let probe = Pair::new(PairOptions::default())?;
    if let Err(why) = skyferry.accepted(&probe, "transfer")? {
        bail!("the agent refuses the overridden [transfer] settings: {why}");
    }
    Ok(skyferry)
}

fn loopback(args: &Args, skyferry: &config::Skyferry, clock: &CpuClock) -> Result<bool> {
    let others = loopback::Others::set_up()?;
    let background_before = background_load(clock)?;
    let mut rows = Vec::new();
    let chosen = |d: &Dataset| args.datasets.is_empty() || args.datasets.contains(&d.key().into());
    for dataset in Dataset::all(args.quick).into_iter().filter(chosen) {
        println!("data set: {} …", dataset.name());
        rows.push(loopback::bench_dataset(
            &dataset,
            skyferry,
            args.runs,
            clock,
            &others,
            args.catalog_cost,
            &args.tools,
        )?);
    }
    let background = (background_before, background_load(clock)?);
    report::print(&rows, args.runs, &skyferry.describe(), background);
    let failed = |(_, outcome): &(&str, Outcome)| matches!(outcome, Outcome::Failed(_));
    Ok(!rows.iter().any(|row| row.tools.iter().any(failed)))
}

/// Busy CPU seconds per second while the benchmark is idle, over 2 s: the load of
/// everything else on this (shared) machine.
fn background_load(clock: &CpuClock) -> Result<f64> {
    let (cpu0, t0) = (clock.busy_seconds()?, Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    Ok((clock.busy_seconds()? - cpu0) / t0.elapsed().as_secs_f64())
}
