//! CPU time, two ways. Machine-wide busy time from `/proc/stat` counts every process a tool
//! starts (ssh, sshd, rsync on both ends) and kernel work such as writeback, but also anything
//! else running on the machine. Per-process time from `/proc/<pid>/stat` counts only the
//! processes we name (and the children they waited for), so it is immune to other load.
//! Per-thread time of this process (`/proc/self/task`) tells whether the in-process relay
//! was the limit. Peak memory (VmHWM) is read here too: it is the same kind of reading.

use std::collections::HashMap;
use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct CpuClock {
    ticks_per_second: f64,
}

impl CpuClock {
    pub fn new() -> Result<CpuClock> {
        let out = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .context("cannot run `getconf CLK_TCK`")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ticks: f64 = text
            .trim()
            .parse()
            .with_context(|| format!("`getconf CLK_TCK` printed {text:?}, not a number"))?;
        if !out.status.success() || ticks <= 0.0 {
            bail!("`getconf CLK_TCK` failed ({}): {text:?}", out.status);
        }
        Ok(CpuClock {
            ticks_per_second: ticks,
        })
    }

    /// Busy CPU seconds since boot (user + nice + system + irq + softirq), all CPUs.
    pub fn busy_seconds(&self) -> Result<f64> {
        let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no aggregate \"cpu\" line")?;
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let fields = numbers(line.split_whitespace().skip(1), "/proc/stat")?;
        if fields.len() < 7 {
            bail!(
                "/proc/stat cpu line has {} fields, expected at least 7",
                fields.len()
            );
        }
        let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
        Ok(busy as f64 / self.ticks_per_second)
    }

    /// CPU seconds of process `pid` ("self" for this one): (own, waited-for children).
    pub fn process_seconds(&self, pid: &str) -> Result<(f64, f64)> {
        let path = format!("/proc/{pid}/stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        let after_comm = stat
            .rfind(')')
            .map(|i| &stat[i + 1..])
            .with_context(|| format!("odd {path}: {stat:?}"))?;
        // Fields 14..=17 of proc(5): utime stime cutime cstime; field 3 is first here.
        let fields = numbers(after_comm.split_whitespace().skip(11).take(4), &path)?;
        let [utime, stime, cutime, cstime] = fields[..] else {
            bail!("{path} has too few fields");
        };
        let seconds = |ticks: u64| ticks as f64 / self.ticks_per_second;
        Ok((seconds(utime + stime), seconds(cutime + cstime)))
    }
}

impl CpuClock {
    /// CPU seconds of each thread of this process whose name starts with `prefix`, by
    /// thread id, with the thread's name.
    pub fn threads(&self, prefix: &str) -> Result<HashMap<u32, (String, f64)>> {
        let mut out = HashMap::new();
        let dir = fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
        for entry in dir {
            let entry = entry.context("cannot list /proc/self/task")?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let task = format!("self/task/{tid}");
            // A thread that ended meanwhile has no files any more: skip it.
            let Ok(name) = fs::read_to_string(format!("/proc/{task}/comm")) else {
                continue;
            };
            let name = name.trim().to_string();
            if !name.starts_with(prefix) {
                continue;
            }
            if let Ok((own, _)) = self.process_seconds(&task) {
                out.insert(tid, (name, own));
            }
        }
        Ok(out)
    }
}

/// Peak resident set size of process `pid` so far (VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .with_context(|| format!("{path} has no VmHWM line"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("odd {path} line {line:?}"))?;
    Ok(kib * 1024)
}

fn numbers<'a>(fields: impl Iterator<Item = &'a str>, source: &str) -> Result<Vec<u64>> {
    fields
        .map(|f| {
            f.parse()
                .with_context(|| format!("odd {source} field {f:?}"))
        })
        .collect()
}
