//! Machine-wide busy CPU time from `/proc/stat`, so that every process a tool starts (ssh,
//! sshd, rsync on both ends, kernel work for the copy) is counted, not only our children.

use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Reads busy CPU seconds (user + nice + system + irq + softirq over all CPUs).
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

    /// Busy CPU seconds since boot, summed over all CPUs.
    pub fn busy_seconds(&self) -> Result<f64> {
        let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no aggregate \"cpu\" line")?;
        // cpu user nice system idle iowait irq softirq steal guest guest_nice
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| {
                f.parse()
                    .with_context(|| format!("odd /proc/stat field {f:?}"))
            })
            .collect::<Result<_>>()?;
        if fields.len() < 7 {
            bail!(
                "/proc/stat cpu line has {} fields, expected at least 7",
                fields.len()
            );
        }
        let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
        Ok(busy as f64 / self.ticks_per_second)
    }
}
