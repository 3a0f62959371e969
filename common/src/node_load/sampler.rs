//! Reads the node-load files (the I/O edge of [`super`]): one [`Sample`] per call, with
//! what this kernel offers. A missing file (no PSI, no block device under the storage)
//! is `None` and logged once at debug; a file that stops parsing is logged once at WARN.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{
    parse_diskstats, parse_loadavg, parse_pressure, parse_stat, CpuTicks, DiskStats, LoadAvg, Psi,
};
use crate::protocol::NodeLoadSummary;

/// The block device holding a path: its `major:minor` and kernel name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub major: u32,
    pub minor: u32,
    pub name: String,
}

impl BlockDevice {
    /// The device of the filesystem holding `path` (its `st_dev`), when that is a block
    /// device the kernel lists under `<sys>/dev/block/M:m` (a partition is its own
    /// device; a loop device too). `None` for tmpfs, overlayfs and other virtual mounts.
    pub fn holding(path: &Path, sys: &Path) -> Option<BlockDevice> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        let link = std::fs::read_link(sys.join(format!("dev/block/{major}:{minor}"))).ok()?;
        let name = link.file_name()?.to_string_lossy().into_owned();
        Some(BlockDevice { major, minor, name })
    }
}

/// One reading of everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub cpu: Option<CpuTicks>,
    /// Steal since the previous sample, 0..=1 (`None` on the first).
    pub steal_ratio: Option<f64>,
    pub pressure_cpu: Option<Psi>,
    pub pressure_io: Option<Psi>,
    pub pressure_memory: Option<Psi>,
    pub load: Option<LoadAvg>,
    pub disk: Option<DiskStats>,
}

impl Sample {
    /// The heartbeat's compact form.
    pub fn summary(&self) -> NodeLoadSummary {
        NodeLoadSummary {
            steal_bp: self.steal_ratio.map(NodeLoadSummary::bp_of_ratio),
            pressure_cpu_bp: self
                .pressure_cpu
                .map(|p| NodeLoadSummary::bp_of_percent(p.some.avg10)),
            pressure_io_bp: self
                .pressure_io
                .map(|p| NodeLoadSummary::bp_of_percent(p.some.avg10)),
            load1_centi: self.load.map(|l| NodeLoadSummary::centi(l.load1)),
        }
    }
}

/// Reads samples; remembers the previous CPU reading for the steal ratio.
#[derive(Debug)]
pub struct Sampler {
    proc_root: PathBuf,
    disk: Option<BlockDevice>,
    previous_cpu: Option<CpuTicks>,
    /// Files already complained about (each once).
    reported: HashSet<&'static str>,
}

impl Sampler {
    /// Reads `<proc_root>/stat`, `pressure/*`, `loadavg` and, for `disk`, `diskstats`.
    pub fn new(proc_root: impl Into<PathBuf>, disk: Option<BlockDevice>) -> Sampler {
        Sampler {
            proc_root: proc_root.into(),
            disk,
            previous_cpu: None,
            reported: HashSet::new(),
        }
    }

    /// The live `/proc`, and the device holding `storage` when given.
    pub fn live(storage: Option<&Path>) -> Sampler {
        let disk = storage.and_then(|p| {
            let d = BlockDevice::holding(p, Path::new("/sys"));
            match &d {
                Some(d) => tracing::info!(path = %p.display(), device = %d.name,
                    major = d.major, minor = d.minor, "storage device for disk load"),
                None => tracing::info!(path = %p.display(),
                    "storage is not on a block device; no disk load metrics"),
            }
            d
        });
        Sampler::new("/proc", disk)
    }

    pub fn disk(&self) -> Option<&BlockDevice> {
        self.disk.as_ref()
    }

    pub fn sample(&mut self) -> Sample {
        let cpu = self.read("stat", parse_stat);
        let steal_ratio = match (cpu, self.previous_cpu) {
            (Some(now), Some(before)) => now.steal_ratio_since(&before),
            _ => None,
        };
        if cpu.is_some() {
            self.previous_cpu = cpu;
        }
        let disk = match self.disk.clone() {
            Some(d) => self
                .read("diskstats", |t| parse_diskstats(t, d.major, d.minor))
                .flatten(),
            None => None,
        };
        Sample {
            cpu,
            steal_ratio,
            pressure_cpu: self.read("pressure/cpu", |t| parse_pressure("/proc/pressure/cpu", t)),
            pressure_io: self.read("pressure/io", |t| parse_pressure("/proc/pressure/io", t)),
            pressure_memory: self.read("pressure/memory", |t| {
                parse_pressure("/proc/pressure/memory", t)
            }),
            load: self.read("loadavg", parse_loadavg),
            disk,
        }
    }

    fn read<T>(
        &mut self,
        file: &'static str,
        parse: impl FnOnce(&str) -> Result<T, super::NodeLoadError>,
    ) -> Option<T> {
        let path = self.proc_root.join(file);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                if self.reported.insert(file) {
                    tracing::debug!(path = %path.display(), error = %e,
                        "node load: file unavailable; its metrics are left out");
                }
                return None;
            }
        };
        match parse(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                if self.reported.insert(file) {
                    tracing::warn!(error = %e, "node load: cannot parse; its metrics are left out");
                }
                None
            }
        }
    }
}

/// The latest summary, for heartbeats and status (shared with the sampling task).
pub type Latest = std::sync::Arc<std::sync::Mutex<Option<Sample>>>;

/// Samples every `period` until `shutdown`: metrics follow, and `latest` holds the last
/// sample. The first sample is taken here at once and decides which metrics exist.
pub async fn run(
    mut sampler: Sampler,
    metrics: super::metrics::NodeLoadMetrics,
    latest: Latest,
    period: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Reading /proc does not block on storage, but it is file I/O: off the runtime.
        let sampled = tokio::task::spawn_blocking(move || {
            let s = sampler.sample();
            (sampler, s)
        })
        .await;
        let Ok((back, sample)) = sampled else {
            return; // The runtime is shutting down.
        };
        sampler = back;
        metrics.observe(&sample);
        *latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sample);
    }
}

/// A sampler for the live node, its first sample (which decides the metrics that
/// exist: [`super::metrics::Availability`]) already taken and stored in `latest`.
pub fn start(
    storage: Option<&Path>,
    metrics: &super::metrics::NodeLoadMetrics,
    latest: &Latest,
) -> Sampler {
    let mut sampler = Sampler::live(storage);
    let first = sampler.sample();
    metrics.set_available(super::metrics::Availability::of(&first));
    metrics.observe(&first);
    *latest
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(first);
    sampler
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proc_without_pressure_files_gives_none_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stat"), "cpu 10 0 10 80 0 0 0 0\n").unwrap();
        std::fs::write(dir.path().join("loadavg"), "1.00 0.50 0.25 1/100 7\n").unwrap();
        let mut s = Sampler::new(dir.path(), None);
        let first = s.sample();
        assert_eq!(first.cpu.map(|c| c.total), Some(100));
        assert_eq!(first.steal_ratio, None);
        assert_eq!(first.pressure_io, None);
        assert_eq!(first.disk, None);
        std::fs::write(dir.path().join("stat"), "cpu 10 0 10 160 0 0 0 20\n").unwrap();
        let second = s.sample();
        assert_eq!(second.steal_ratio, Some(0.2));
        let sum = second.summary();
        assert_eq!(
            (sum.steal_bp, sum.load1_centi, sum.pressure_io_bp),
            (Some(2000), Some(100), None)
        );
    }

    /// The live kernel: values in plausible ranges (PSI only where the kernel has it).
    #[test]
    fn live_proc_is_plausible() {
        let mut s = Sampler::live(Some(Path::new("/")));
        let a = s.sample();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let b = s.sample();
        let cpu = b.cpu.expect("/proc/stat is readable on Linux");
        assert!(cpu.total > 0 && cpu.steal <= cpu.total, "{cpu:?}");
        if let Some(r) = b.steal_ratio {
            assert!((0.0..=1.0).contains(&r), "{r}");
        }
        let load = b.load.expect("/proc/loadavg is readable on Linux");
        for v in [load.load1, load.load5, load.load15] {
            assert!((0.0..10_000.0).contains(&v), "{load:?}");
        }
        for p in [b.pressure_cpu, b.pressure_io, b.pressure_memory]
            .into_iter()
            .flatten()
        {
            assert!((0.0..=100.0).contains(&p.some.avg10), "{p:?}");
            if let Some(f) = p.full {
                assert!(
                    f.total_us <= p.some.total_us,
                    "full cannot exceed some: {p:?}"
                );
            }
        }
        if let (Some(pa), Some(pb)) = (a.pressure_io, b.pressure_io) {
            assert!(pb.some.total_us >= pa.some.total_us, "PSI totals only grow");
        }
        if s.disk().is_some() {
            let d = b.disk.expect("the device of / has a diskstats line");
            assert!(d.io_in_flight < 1_000_000, "{d:?}");
        }
    }
}
