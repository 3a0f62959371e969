//! Node load as the kernel shows it to a VM that cannot see its neighbours: CPU steal
//! (`/proc/stat`), pressure stall information (`/proc/pressure/{cpu,io,memory}`), load
//! averages (`/proc/loadavg`) and one block device's I/O (`/proc/diskstats`).
//!
//! This module holds the pure parsers (text in, numbers out, unit-tested on fixture
//! text); [`sampler`] reads the files and [`metrics`] exports a sample. Not every kernel
//! has PSI, and `cpu` has no `full` line before Linux 5.13: both are `None`, never an error.

pub mod metrics;
pub mod sampler;

/// Why a node-load file could not be read as expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeLoadError {
    #[error("{file}: no {what} line")]
    Missing {
        file: &'static str,
        what: &'static str,
    },
    #[error("{file}: field {field} is not a number: {value:?}")]
    NotNumber {
        file: &'static str,
        field: &'static str,
        value: String,
    },
}

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks (USER_HZ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// Time a runnable vCPU waited for the hypervisor.
    pub steal: u64,
    /// All columns of the line except guest time (already counted in user).
    pub total: u64,
}

impl CpuTicks {
    /// Steal as a fraction (0..=1) of the CPU time between `earlier` and `self`; `None`
    /// when no time passed or the counters went backwards.
    pub fn steal_ratio_since(&self, earlier: &CpuTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| (steal as f64 / total as f64).min(1.0))
    }
}

/// Parses `/proc/stat`'s `cpu ` line: user nice system idle iowait irq softirq steal
/// [guest guest_nice]. Kernels before 2.6.11 have no steal column: it reads as 0.
pub fn parse_stat(text: &str) -> Result<CpuTicks, NodeLoadError> {
    const FILE: &str = "/proc/stat";
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .ok_or(NodeLoadError::Missing {
            file: FILE,
            what: "aggregate \"cpu\"",
        })?;
    let mut cols = Vec::with_capacity(10);
    for v in line.split_whitespace() {
        cols.push(number(FILE, "cpu", v)?);
    }
    if cols.len() < 4 {
        return Err(NodeLoadError::Missing {
            file: FILE,
            what: "complete \"cpu\"",
        });
    }
    Ok(CpuTicks {
        steal: cols.get(7).copied().unwrap_or(0),
        total: cols.iter().take(8).sum(),
    })
}

/// One line of a PSI file.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PsiLine {
    /// Percent of the last 10 s in which tasks waited.
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total waiting time since boot, microseconds.
    pub total_us: u64,
}

/// A `/proc/pressure/<resource>` file: `some` (at least one task waited) and `full` (all
/// non-idle tasks waited at once); `full` is absent for `cpu` on older kernels.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Psi {
    pub some: PsiLine,
    pub full: Option<PsiLine>,
}

/// Parses a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.00 total=0`, and maybe a
/// `full` line of the same shape). Unknown keys are ignored (the format may grow).
pub fn parse_pressure(file: &'static str, text: &str) -> Result<Psi, NodeLoadError> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let mut p = PsiLine::default();
        for kv in words {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "avg10" => p.avg10 = float(file, "avg10", v)?,
                "avg60" => p.avg60 = float(file, "avg60", v)?,
                "avg300" => p.avg300 = float(file, "avg300", v)?,
                "total" => p.total_us = number(file, "total", v)?,
                _ => {}
            }
        }
        *slot = Some(p);
    }
    Ok(Psi {
        some: some.ok_or(NodeLoadError::Missing { file, what: "some" })?,
        full,
    })
}

/// `/proc/loadavg`'s first three fields.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadAvg {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

pub fn parse_loadavg(text: &str) -> Result<LoadAvg, NodeLoadError> {
    const FILE: &str = "/proc/loadavg";
    let mut w = text.split_whitespace();
    let mut next = |field| {
        let v = w.next().ok_or(NodeLoadError::Missing {
            file: FILE,
            what: field,
        })?;
        float(FILE, field, v)
    };
    Ok(LoadAvg {
        load1: next("load1")?,
        load5: next("load5")?,
        load15: next("load15")?,
    })
}

/// One device's line of `/proc/diskstats` (the fields this daemon exports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    pub writes_completed: u64,
    /// Milliseconds spent on writes (summed over concurrent requests).
    pub write_time_ms: u64,
    /// Requests issued to the device and not yet completed.
    pub io_in_flight: u64,
}

/// The line of device `major:minor` in `/proc/diskstats`, `None` when it has none.
/// Fields after the name: reads, reads merged, sectors read, ms reading, writes, writes
/// merged, sectors written, ms writing, in flight, ... (Documentation/admin-guide/iostats).
pub fn parse_diskstats(
    text: &str,
    major: u32,
    minor: u32,
) -> Result<Option<DiskStats>, NodeLoadError> {
    const FILE: &str = "/proc/diskstats";
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(ma), Some(mi), Some(_name)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        if ma.parse() != Ok(major) || mi.parse() != Ok(minor) {
            continue;
        }
        let cols: Vec<&str> = w.collect();
        let field = |i: usize, name: &'static str| match cols.get(i) {
            Some(v) => number(FILE, name, v),
            None => Err(NodeLoadError::Missing {
                file: FILE,
                what: name,
            }),
        };
        return Ok(Some(DiskStats {
            writes_completed: field(4, "writes completed")?,
            write_time_ms: field(7, "ms writing")?,
            io_in_flight: field(8, "I/Os in progress")?,
        }));
    }
    Ok(None)
}

fn number(file: &'static str, field: &'static str, v: &str) -> Result<u64, NodeLoadError> {
    v.parse().map_err(|_| NodeLoadError::NotNumber {
        file,
        field,
        value: v.chars().take(40).collect(),
    })
}

fn float(file: &'static str, field: &'static str, v: &str) -> Result<f64, NodeLoadError> {
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f),
        _ => Err(NodeLoadError::NotNumber {
            file,
            field,
            value: v.chars().take(40).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 356 584 3699176 23060 0 277 1234 0 0\n\
                        cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0\n\
                        intr 1462898 0\nctxt 115\n";

    #[test]
    fn stat_steal_and_total() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t.steal, 1234);
        assert_eq!(t.total, 4705 + 356 + 584 + 3699176 + 23060 + 277 + 1234);
        // Without a steal column (very old kernels) steal is 0, not an error.
        let old = parse_stat("cpu 1 2 3 4\n").unwrap();
        assert_eq!((old.steal, old.total), (0, 10));
        assert!(matches!(
            parse_stat("cpu0 1 2 3 4\n"),
            Err(NodeLoadError::Missing { .. })
        ));
        assert!(matches!(
            parse_stat("cpu 1 x 3 4\n"),
            Err(NodeLoadError::NotNumber { .. })
        ));
    }

    #[test]
    fn steal_ratio_between_samples() {
        let a = CpuTicks {
            steal: 100,
            total: 1000,
        };
        let b = CpuTicks {
            steal: 125,
            total: 1100,
        };
        assert_eq!(b.steal_ratio_since(&a), Some(0.25));
        assert_eq!(a.steal_ratio_since(&a), None, "no time passed");
        assert_eq!(a.steal_ratio_since(&b), None, "counters went backwards");
    }

    #[test]
    fn pressure_some_and_full() {
        let io = "some avg10=1.50 avg60=0.25 avg300=0.05 total=123456789\n\
                  full avg10=0.75 avg60=0.10 avg300=0.00 total=2000000\n";
        let p = parse_pressure("/proc/pressure/io", io).unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.avg60, 0.25);
        assert_eq!(p.some.total_us, 123_456_789);
        let full = p.full.unwrap();
        assert_eq!((full.avg10, full.total_us), (0.75, 2_000_000));
    }

    #[test]
    fn pressure_without_full_line_is_not_an_error() {
        let cpu = "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n";
        let p = parse_pressure("/proc/pressure/cpu", cpu).unwrap();
        assert_eq!(p.some.total_us, 42);
        assert_eq!(p.full, None);
        let e = parse_pressure("/proc/pressure/cpu", "").unwrap_err();
        assert_eq!(e.to_string(), "/proc/pressure/cpu: no some line");
        let e = parse_pressure("/proc/pressure/io", "some avg10=nan total=1\n").unwrap_err();
        assert!(e.to_string().contains("avg10"), "{e}");
    }

    #[test]
    fn loadavg_fields() {
        let l = parse_loadavg("0.52 1.25 2.00 3/412 9876\n").unwrap();
        assert_eq!((l.load1, l.load5, l.load15), (0.52, 1.25, 2.0));
        assert!(parse_loadavg("0.52\n").is_err());
    }

    #[test]
    fn diskstats_picks_the_device_and_its_partitions_apart() {
        let text = "   8       0 sda 100 0 800 50 200 10 1600 300 2 400 700 0 0 0 0\n\
                    \x20  8       1 sda1 90 0 700 40 150 5 1200 250 1 300 600 0 0 0 0\n\
                    \x20  7       3 loop3 5 0 40 1 17 0 136 9 0 12 10\n";
        let disk = parse_diskstats(text, 8, 0).unwrap().unwrap();
        assert_eq!(
            disk,
            DiskStats {
                writes_completed: 200,
                write_time_ms: 300,
                io_in_flight: 2
            }
        );
        let part = parse_diskstats(text, 8, 1).unwrap().unwrap();
        assert_eq!(
            part,
            DiskStats {
                writes_completed: 150,
                write_time_ms: 250,
                io_in_flight: 1
            }
        );
        // Old-style short loop line (11 fields) still has the ones we need.
        let l = parse_diskstats(text, 7, 3).unwrap().unwrap();
        assert_eq!(
            (l.writes_completed, l.write_time_ms, l.io_in_flight),
            (17, 9, 0)
        );
        assert_eq!(parse_diskstats(text, 9, 9).unwrap(), None);
        assert!(parse_diskstats("8 0 sda 1 2 3\n", 8, 0).is_err());
    }
}
