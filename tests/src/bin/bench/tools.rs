//! The contenders, each timed on the same source tree and checked afterwards (every file
//! present with the same BLAKE3), then their copy is removed.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::tree::list_files;
use skyferry_tests::{compare_trees, Pair};

use crate::cpu::{peak_rss_bytes, CpuClock};
use crate::flask::FlaskServer;
use crate::scrape;
use crate::sshd::Sshd;

/// One tool run: wall time, and CPU time two ways (see the `cpu` module).
#[derive(Clone, Copy, Debug)]
pub struct Measurement {
    pub seconds: f64,
    /// Machine-wide busy CPU seconds during the run.
    pub machine_cpu: f64,
    /// CPU seconds of the tool's own processes.
    pub process_cpu: f64,
    /// skyferry only: peak RSS (VmHWM) of the agent and of the receiver, in bytes.
    pub peak_rss: Option<[u64; 2]>,
}

/// What a skyferry run leaves besides its measurement.
pub struct SkyferryRun {
    pub measurement: Measurement,
    /// The agent's metrics after the transfer (its counters count from the agent's start,
    /// which is the start of this run).
    pub metrics: HashMap<String, f64>,
}

/// How long after the last file arrives the agent's metrics are read: quinn's statistics
/// are copied into them every second.
const METRICS_SETTLE: Duration = Duration::from_millis(1200);

/// skyferry: starts from empty storage and an empty journal; the receiver is started and
/// listening first; the clock runs from starting the agent until every file is published.
/// `metrics` is the agent's metrics address (see [`crate::config::Skyferry::apply`]).
pub fn skyferry(
    pair: &mut Pair,
    clock: &CpuClock,
    timeout: Duration,
    metrics: &str,
) -> Result<SkyferryRun> {
    reset(pair)?;
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    let receiver = pid(pair.receiver_pid())?;
    let receiver_before = clock.process_seconds(&receiver.to_string())?.0;
    let (seconds, machine_cpu) = timed(clock, || {
        pair.start_agent()?;
        pair.wait_arrived(timeout)
    })?;
    let agent = pid(pair.agent_pid())?;
    let process_cpu = clock.process_seconds(&agent.to_string())?.0
        + clock.process_seconds(&receiver.to_string())?.0
        - receiver_before;
    std::thread::sleep(METRICS_SETTLE);
    let metrics = scrape::scrape(metrics)?;
    let peak_rss = Some([peak_rss_bytes(agent)?, peak_rss_bytes(receiver)?]);

    let report = compare_trees(&pair.source(), &pair.published())?;
    report
        .ensure_identical()
        .map_err(|e| e.context(pair.diagnostics()))?;
    pair.stop_both()?;
    Ok(SkyferryRun {
        measurement: Measurement {
            seconds,
            machine_cpu,
            process_cpu,
            peak_rss,
        },
        metrics,
    })
}

/// Empties the receiver's storage (published files, partial files, catalog) and the
/// agent's journal, so that a run ships everything again.
fn reset(pair: &Pair) -> Result<()> {
    let storage = pair.storage();
    if storage.exists() {
        remove(&storage)?;
    }
    fs::create_dir_all(&storage).with_context(|| format!("cannot create {}", storage.display()))?;
    let journal = pair.journal();
    let dir = journal.parent().context("the journal has no directory")?;
    remove(dir)?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// `rsync -a` over ssh to the private sshd, then `sync`.
pub fn rsync(clock: &CpuClock, sshd: &Sshd, src: &Path, dst: &Path) -> Result<Measurement> {
    let mut rsync = Command::new("rsync");
    rsync
        .args(["-a", "-e", &sshd.ssh_command()])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", sshd.remote(dst)));
    copy(clock, Some(sshd.pid()), src, dst, || {
        run(&mut rsync).map(drop)
    })
}

/// `cp -r`, then `sync`.
pub fn cp(clock: &CpuClock, src: &Path, dst: &Path) -> Result<Measurement> {
    copy(clock, None, src, dst, || {
        run(Command::new("cp").arg("-r").arg(src).arg(dst)).map(drop)
    })
}

/// One `wget` per file from the Flask server (as the far side does per notification),
/// one after the other, then `sync`.
pub fn wget(clock: &CpuClock, flask: &FlaskServer, src: &Path, dst: &Path) -> Result<Measurement> {
    let files = list_files(src)?;
    copy(clock, Some(flask.pid()), src, dst, || {
        for rel in files.keys() {
            // -x -nH: the URL's path becomes the path under dst.
            run(Command::new("wget")
                .args(["-q", "-x", "-nH", "-P"])
                .arg(dst)
                .arg(flask.url(rel)))?;
        }
        Ok(())
    })
}

/// Runs `body` (which runs its commands as children of this process, so that their CPU
/// time is this process's children time) and `sync`, plus the CPU used meanwhile by
/// `server` and its children, if any.
fn copy(
    clock: &CpuClock,
    server: Option<u32>,
    src: &Path,
    dst: &Path,
    body: impl FnOnce() -> Result<()>,
) -> Result<Measurement> {
    let server_cpu = || -> Result<f64> {
        match server {
            Some(pid) => clock
                .process_seconds(&pid.to_string())
                .map(|(own, kids)| own + kids),
            None => Ok(0.0),
        }
    };
    let (children_before, server_before) = (clock.process_seconds("self")?.1, server_cpu()?);
    let (seconds, machine_cpu) = timed(clock, || {
        body()?;
        sync()
    })?;
    std::thread::sleep(Duration::from_millis(200)); // let sshd reap its session processes
    let process_cpu =
        clock.process_seconds("self")?.1 - children_before + server_cpu()? - server_before;

    compare_trees(src, dst)?.ensure_identical()?;
    remove(dst)?;
    Ok(Measurement {
        seconds,
        machine_cpu,
        process_cpu,
        peak_rss: None,
    })
}

/// Wall seconds and machine-wide busy CPU seconds of `body`, after a `sync` so that earlier
/// dirty pages are not charged to it.
fn timed(clock: &CpuClock, body: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    sync()?;
    let (cpu0, t0) = (clock.busy_seconds()?, Instant::now());
    body()?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok((seconds, clock.busy_seconds()? - cpu0))
}

fn pid(pid: Option<u32>) -> Result<u32> {
    pid.context("daemon not running")
}

/// Runs `cmd` to completion; a failure names the command and its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out: Output = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("{cmd:?} failed ({}): {}", out.status, stderr.trim());
    }
    Ok(out)
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
