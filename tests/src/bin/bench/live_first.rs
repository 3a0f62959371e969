//! `--live-first`: whether tonight's files still arrive in seconds while a backfill keeps
//! the link busy. Through the harness's relay with a rate cap (default 50 MB/s) and an
//! added RTT (default 10 ms): `--live-files` live 4.5 MB FITS files (default 20), one
//! written into the watched tree every 2 s, each timed from its close until it is
//! published in the receiver's storage (the rename that makes it visible), first with the
//! pair otherwise idle, then while `skyferry-agent replay --root` sends an archive of
//! ≥ 2 GB (incompressible). Prints p50/p99/max of both series, the replay's throughput
//! meanwhile, and the bound docs/operations.md ("Live first") derives from the config.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_common::config::parse_size;
use skyferry_tests::fits::{self, FitsParams};
use skyferry_tests::{Pair, PairOptions};

use crate::config::{duration, Skyferry};
use crate::latency::{start_connected, wait};
use crate::report::{median, quantile};
use crate::scrape::{get, scrape};

/// Size of one archive file of the replay.
const ARCHIVE_FILE: u64 = 256 << 20;
/// Time between two live files.
const LIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait for one live file.
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LiveFirstOptions {
    pub quick: bool,
    pub live_files: usize,
    /// Relay cap, Mbit/s each way.
    pub rate_mbit: f64,
    pub rtt_ms: u64,
}

/// One series of live files: close → published, in milliseconds.
struct Series {
    name: &'static str,
    ms: Vec<f64>,
}

pub fn run(opts: &LiveFirstOptions, skyferry: &Skyferry) -> Result<bool> {
    let mut pair = Pair::new(PairOptions {
        via_relay: true,
        quiet_period: Some(skyferry.quiet_period.clone()),
        settle: skyferry.settle.clone(),
        rescan_interval: skyferry.rescan_interval.clone(),
        ..PairOptions::default()
    })?;
    let metrics = skyferry.apply(&pair, "")?;
    let relay = pair.relay().context("the pair has no relay")?;
    relay.set_delay(Duration::from_micros(opts.rtt_ms * 500));
    relay.set_rate(
        (opts.rate_mbit * 1e6) as u64,
        Duration::from_millis(opts.rtt_ms.max(10)),
    );
    let archive = pair.dir().join("archive");
    let archive_files = if opts.quick { 2 } else { 9 };
    println!(
        "live-first: writing an archive of {archive_files} × {} MiB (incompressible) …",
        ARCHIVE_FILE >> 20
    );
    write_archive(&archive, archive_files)?;
    let archive_bytes = archive_files * ARCHIVE_FILE;

    start_connected(&mut pair, &metrics)?;

    println!("live-first: {} live files, no replay …", opts.live_files);
    let idle = live_series(&mut pair, "live, link idle", 1, opts.live_files)?;

    println!(
        "live-first: replay of {:.2} GB …",
        archive_bytes as f64 / 1e9
    );
    let out = Command::new(pair.agent_bin())
        .args(["replay", "-c"])
        .arg(pair.agent_config_path())
        .arg("--root")
        .arg(&archive)
        .args(["--name", "bench backfill"])
        .output()
        .context("cannot run skyferry-agent replay")?;
    if !out.status.success() {
        bail!(
            "skyferry-agent replay failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The replay has the link before the first live file is written.
    let sent = || -> Result<f64> { Ok(get(&scrape(&metrics)?, "skyferry_agent_sent_bytes_total")) };
    let start_bytes = sent()?;
    wait(&mut pair, "the replay to send", || {
        Ok(sent()? > start_bytes + 16e6)
    })?;
    let (bytes0, t0) = (sent()?, Instant::now());
    let busy = live_series(&mut pair, "live, replay running", 2, opts.live_files)?;
    let replay_rate =
        (sent()? - bytes0 - busy.ms.len() as f64 * live_size() as f64) / t0.elapsed().as_secs_f64();
    let replay_left = !published_all(&pair, archive_files)?;
    pair.stop_both()?;

    print(opts, skyferry, &[idle, busy], replay_rate, replay_left)?;
    Ok(replay_left)
}

/// `count` archive files of [`ARCHIVE_FILE`] pseudo-random bytes (zstd cannot shrink
/// them, so compression does not make the backfill smaller than it looks).
fn write_archive(dir: &Path, count: u64) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..count {
        let path = dir.join(format!("old/night{i:02}.bin"));
        fs::create_dir_all(path.parent().unwrap_or(dir))?;
        let mut f = fs::File::create(&path).with_context(|| format!("cannot create {path:?}"))?;
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1);
        for _ in 0..ARCHIVE_FILE / block.len() as u64 {
            for word in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    Ok(())
}

fn published_all(pair: &Pair, archive_files: u64) -> Result<bool> {
    Ok((0..archive_files).all(|i| {
        pair.published()
            .join(format!("old/night{i:02}.bin"))
            .is_file()
    }))
}

fn live_size() -> u64 {
    FitsParams::new(0, 1, 1).file_size()
}

/// Writes `count` live files, one every [`LIVE_INTERVAL`], and times each from its close
/// until the receiver has published it. Files still in flight when the next is due stay
/// timed, so a slow file does not delay the schedule.
fn live_series(pair: &mut Pair, name: &'static str, exposure: u32, count: usize) -> Result<Series> {
    let size = live_size();
    let start = Instant::now();
    let mut outstanding: Vec<(PathBuf, Instant)> = Vec::new();
    let mut ms = Vec::new();
    let mut written = 0;
    while ms.len() < count {
        if written < count && start.elapsed() >= LIVE_INTERVAL * written as u32 {
            let rel = PathBuf::from(format!("live{exposure}/frame{written:03}.fits"));
            let params = FitsParams::new(5000 * exposure + written as u32, 1, 1);
            fits::write_fits(&pair.source().join(&rel), &params)?;
            outstanding.push((rel, Instant::now()));
            written += 1;
        }
        outstanding.retain(|(rel, closed)| {
            let stored = fs::metadata(pair.published().join(rel)).is_ok_and(|m| m.len() == size);
            if stored {
                ms.push(closed.elapsed().as_secs_f64() * 1e3);
            }
            !stored
        });
        if let Some((rel, closed)) = outstanding.first() {
            if closed.elapsed() > FILE_TIMEOUT {
                bail!(
                    "{} not stored {} s after its close\n{}",
                    rel.display(),
                    FILE_TIMEOUT.as_secs(),
                    pair.diagnostics()
                );
            }
        }
        pair.ensure_alive()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Series { name, ms })
}

fn print(
    opts: &LiveFirstOptions,
    skyferry: &Skyferry,
    series: &[Series],
    replay_rate: f64,
    replay_left: bool,
) -> Result<()> {
    let cap = opts.rate_mbit * 1e6 / 8.0;
    // The agent's default when the example does not set it.
    let bulk = parse_size(&skyferry.value("bulk_in_flight")).unwrap_or(32 << 20) as f64;
    let quiet = duration(&skyferry.quiet_period)?.as_secs_f64();
    let extra = bulk / cap + opts.rtt_ms as f64 / 1e3;
    println!();
    println!(
        "== live first through the relay: {} ==",
        skyferry.describe()
    );
    println!(
        "Relay: rate cap {:.0} MB/s each way, RTT {} ms; live: {} × {:.1} MB FITS, one every {} s, close → published at the receiver.",
        cap / 1e6,
        opts.rtt_ms,
        opts.live_files,
        live_size() as f64 / 1e6,
        LIVE_INTERVAL.as_secs()
    );
    println!(
        "{:<24} {:>9} {:>9} {:>9}",
        "series", "p50 ms", "p99 ms", "max ms"
    );
    for s in series {
        println!(
            "{:<24} {:>9.1} {:>9.1} {:>9.1}",
            s.name,
            median(&s.ms),
            quantile(&s.ms, 0.99),
            s.ms.iter().copied().fold(f64::NAN, f64::max)
        );
    }
    let worst = |s: &Series| s.ms.iter().copied().fold(f64::NAN, f64::max);
    let added = worst(&series[1]) - median(&series[0].ms);
    println!(
        "replay meanwhile: {:.1} MB/s of the {:.0} MB/s cap{}",
        replay_rate / 1e6,
        cap / 1e6,
        if replay_left {
            ""
        } else {
            " (it finished before the live series: make the archive larger)"
        }
    );
    println!(
        "bound (docs/operations.md \"Live first\"): idle latency + bulk_in_flight / rate + RTT = idle + {:.0} ms (quiet_period {:.1} s is in both series); worst added: {:.0} ms",
        extra * 1e3,
        quiet,
        added
    );
    Ok(())
}
