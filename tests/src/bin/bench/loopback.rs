//! The loopback comparison: on each data set, skyferry, rsync over ssh, cp + sync and
//! Flask + wget, each `runs` times on the same page-cache-warm source tree. The runs are
//! interleaved (run 1 of every tool, then run 2, ...) so that a change in the machine's
//! background load spreads over all tools instead of hitting one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use skyferry_tests::{compare_trees, Pair, PairOptions};

use crate::config::Skyferry;
use crate::cpu::CpuClock;
use crate::datasets::Dataset;
use crate::flask::{self, FlaskServer};
use crate::report::{Outcome, Row};
use crate::sshd::{self, Sshd};
use crate::tools::{self, Measurement};

/// The tools, in table order (skyferry first: the ratios are skyferry's).
pub const TOOLS: [&str; 4] = ["skyferry", "rsync+ssh", "cp+sync", "flask+wget"];
/// With `--catalog-cost`: skyferry again with the receiver's catalog off, so that the
/// ratio shows what cataloguing costs replication.
pub const NO_CATALOG: &str = "no catalog";

/// What the other tools need, set up once.
pub struct Others {
    sshd: std::result::Result<Sshd, String>,
    flask: std::result::Result<PathBuf, String>,
}

impl Others {
    /// Starts the private sshd and makes sure Flask and wget are there; a tool that cannot
    /// be had is skipped with the reason printed.
    pub fn set_up() -> Result<Others> {
        let sshd = match sshd::ensure_tools() {
            None => Ok(Sshd::start().context("cannot start the private sshd for rsync")?),
            Some(reason) => Err(reason),
        };
        let flask = flask::ensure();
        for (tool, skip) in [
            ("rsync+ssh", sshd.as_ref().err()),
            ("flask+wget", flask.as_ref().err()),
        ] {
            if let Some(reason) = skip {
                println!("skipping {tool}: {reason}");
            }
        }
        Ok(Others { sshd, flask })
    }
}

/// Writes the data set into a fresh pair's source tree and runs every tool on it.
pub fn bench_dataset(
    dataset: &Dataset,
    skyferry: &Skyferry,
    runs: usize,
    clock: &CpuClock,
    others: &Others,
    catalog_cost: bool,
    only: &[String],
) -> Result<Row> {
    let mut pair = Pair::new(PairOptions::default())?;
    let metrics = skyferry.apply(&pair, "")?;
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
    let flask = match &others.flask {
        Ok(python) => Ok(FlaskServer::start(python, &src)?),
        Err(reason) => Err(reason.clone()),
    };

    let mut names = TOOLS.to_vec();
    // `--tool`: skyferry and the chosen others.
    names.retain(|&t| t == TOOLS[0] || only.is_empty() || only.iter().any(|o| o == t));
    if catalog_cost {
        names.insert(1, NO_CATALOG);
    }
    let mut results: Vec<Vec<Result<Measurement>>> = names.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for (i, tool) in names.iter().enumerate() {
            let result = match *tool {
                "skyferry" => {
                    tools::skyferry(&mut pair, clock, timeout, &metrics).map(|r| r.measurement)
                }
                NO_CATALOG => {
                    set_catalog(&pair, false)?;
                    let run = tools::skyferry(&mut pair, clock, timeout, &metrics);
                    set_catalog(&pair, true)?;
                    run.map(|r| r.measurement)
                }
                "rsync+ssh" => match &others.sshd {
                    Ok(sshd) => tools::rsync(clock, sshd, &src, &pair.dir().join("rsync-dst")),
                    Err(_) => continue,
                },
                "cp+sync" => tools::cp(clock, &src, &pair.dir().join("cp-dst")),
                _ => match &flask {
                    Ok(server) => tools::wget(clock, server, &src, &pair.dir().join("wget-dst")),
                    Err(_) => continue,
                },
            };
            progress(tool, run, runs, mb, &result);
            results[i].push(result);
        }
    }
    let skipped = |tool: &str| match tool {
        "rsync+ssh" => others.sshd.as_ref().err().cloned(),
        "flask+wget" => flask.as_ref().err().cloned(),
        _ => None,
    };
    let tools = names
        .iter()
        .zip(results)
        .map(|(tool, results)| {
            let outcome = match skipped(tool) {
                Some(reason) => Outcome::Skipped(reason),
                None => Outcome::from_runs(results),
            };
            (*tool, outcome)
        })
        .collect();
    Ok(Row {
        dataset: dataset.name(),
        files: tree.files,
        bytes: tree.bytes,
        tools,
    })
}

/// Turns the receiver's catalog off (a `[catalog]` table appended to its config) or back
/// on (the table removed); takes effect at the receiver's next start.
fn set_catalog(pair: &Pair, enabled: bool) -> Result<()> {
    const OFF: &str = "\n[catalog]\nenabled = false\n";
    let path = pair.receiver_config_path();
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path:?}"))?;
    let text = text.replace(OFF, "");
    let text = if enabled { text } else { text + OFF };
    std::fs::write(&path, text).with_context(|| format!("cannot write {path:?}"))
}

/// One progress line per run.
fn progress(tool: &str, run: usize, runs: usize, mb: f64, result: &Result<Measurement>) {
    match result {
        Ok(m) => println!(
            "  {tool:<10} run {run}/{runs} {:>7.2} s {:>8.1} MB/s  (verified)",
            m.seconds,
            mb / m.seconds
        ),
        Err(e) => println!("  {tool:<10} run {run}/{runs} FAILED: {e:#}"),
    }
}
