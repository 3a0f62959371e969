//! The three contenders, each timed on the same source tree and checked afterwards (every
//! file present with the same BLAKE3), then their copy is removed.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::{compare_trees, Pair};

use crate::cpu::CpuClock;
use crate::sshd::Sshd;

/// One tool run: wall time, and CPU time two ways (see the `cpu` module).
#[derive(Clone, Copy)]
pub struct Measurement {
    pub seconds: f64,
    /// Machine-wide busy CPU seconds during the run.
    pub machine_cpu: f64,
    /// CPU seconds of the tool's own processes.
    pub process_cpu: f64,
}

/// skyferry: the receiver is started and listening first; the clock runs from starting the
/// agent until every file is published.
pub fn skyferry(pair: &mut Pair, clock: &CpuClock, timeout: Duration) -> Result<Measurement> {
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    let receiver = pid(pair.receiver_pid())?;
    let receiver_before = clock.process_seconds(&receiver)?.0;
    let (seconds, machine_cpu) = timed(clock, || {
        pair.start_agent()?;
        pair.wait_arrived(timeout)
    })?;
    let agent = clock.process_seconds(&pid(pair.agent_pid())?)?.0;
    let process_cpu = agent + clock.process_seconds(&receiver)?.0 - receiver_before;

    let report = compare_trees(&pair.source(), &pair.published())?;
    report
        .ensure_identical()
        .map_err(|e| e.context(pair.diagnostics()))?;
    pair.stop_both()?;
    remove(&pair.storage())?;
    Ok(Measurement {
        seconds,
        machine_cpu,
        process_cpu,
    })
}

/// `rsync -a` over ssh to the private sshd, then `sync`.
pub fn rsync(clock: &CpuClock, sshd: &Sshd, src: &Path, dst: &Path) -> Result<Measurement> {
    let mut rsync = Command::new("rsync");
    rsync
        .args(["-a", "-e", &sshd.ssh_command()])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", sshd.remote(dst)));
    copy(clock, &mut rsync, Some(sshd.pid()), src, dst)
}

/// `cp -r`, then `sync`.
pub fn cp(clock: &CpuClock, src: &Path, dst: &Path) -> Result<Measurement> {
    copy(
        clock,
        Command::new("cp").arg("-r").arg(src).arg(dst),
        None,
        src,
        dst,
    )
}

/// Runs `cmd` and `sync` as children of this process (so their CPU time is this process's
/// children time), plus the CPU used meanwhile by `server` and its children, if any.
fn copy(
    clock: &CpuClock,
    cmd: &mut Command,
    server: Option<u32>,
    src: &Path,
    dst: &Path,
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
        let out: Output = cmd
            .output()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("{cmd:?} failed ({}): {}", out.status, stderr.trim());
        }
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

fn pid(pid: Option<u32>) -> Result<String> {
    pid.map(|p| p.to_string()).context("daemon not running")
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
