//! Node-load metrics, the same set on both daemons under their own prefix (each crate's
//! `metrics.rs` registers them: `skyferry_<agent|receiver>_node_*`). Names follow
//! node_exporter where they mean the same. Counters mirror kernel totals: each sample
//! raises them to the kernel's value (never down; a counter reset would be a reboot).

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::sampler::Sample;
use super::Psi;

/// USER_HZ: the unit of `/proc/stat`, fixed at 100 by the kernel ABI on the
/// architectures this runs on (x86_64, aarch64) whatever the kernel's HZ.
const USER_HZ: f64 = 100.0;

#[derive(Default, Clone)]
struct PressureMetrics {
    waiting: Counter<f64, AtomicU64>,
    stalled: Counter<f64, AtomicU64>,
}

/// Which parts this node offers (PSI files, a block device): the rest is not exported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Availability {
    pub pressure_cpu: bool,
    pub pressure_cpu_full: bool,
    pub pressure_io: bool,
    pub pressure_memory: bool,
    pub disk: bool,
}

impl Availability {
    pub fn of(s: &Sample) -> Availability {
        Availability {
            pressure_cpu: s.pressure_cpu.is_some(),
            pressure_cpu_full: s.pressure_cpu.is_some_and(|p| p.full.is_some()),
            pressure_io: s.pressure_io.is_some(),
            pressure_memory: s.pressure_memory.is_some(),
            disk: s.disk.is_some(),
        }
    }
}

#[derive(Default, Clone)]
pub struct NodeLoadMetrics {
    cpu_steal: Counter<f64, AtomicU64>,
    cpu: PressureMetrics,
    io: PressureMetrics,
    memory: PressureMetrics,
    load1: Gauge<f64, AtomicU64>,
    load5: Gauge<f64, AtomicU64>,
    load15: Gauge<f64, AtomicU64>,
    disk_io_now: Gauge,
    disk_write_time: Counter<f64, AtomicU64>,
    disk_writes_completed: Counter,
    /// What to register: set from the first sample ([`NodeLoadMetrics::set_available`]).
    available: std::sync::Arc<std::sync::Mutex<Availability>>,
}

impl NodeLoadMetrics {
    /// What this node offers; call before [`NodeLoadMetrics::register`].
    pub fn set_available(&self, a: Availability) {
        *self
            .available
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = a;
    }

    /// Registers under `r`'s prefix what [`NodeLoadMetrics::set_available`] said this
    /// node has.
    pub fn register(&self, r: &mut Registry) {
        let available = *self
            .available
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.register(
            "node_cpu_steal_seconds",
            "CPU time the hypervisor gave to others while this VM was runnable (/proc/stat steal)",
            self.cpu_steal.clone(),
        );
        for (name, on, full, m) in [
            (
                "cpu",
                available.pressure_cpu,
                available.pressure_cpu_full,
                &self.cpu,
            ),
            ("io", available.pressure_io, available.pressure_io, &self.io),
            (
                "memory",
                available.pressure_memory,
                available.pressure_memory,
                &self.memory,
            ),
        ] {
            if on {
                r.register(
                    format!("node_pressure_{name}_waiting_seconds"),
                    format!("Time some task waited for {name} (PSI some total)"),
                    m.waiting.clone(),
                );
            }
            if full {
                r.register(
                    format!("node_pressure_{name}_stalled_seconds"),
                    format!("Time all non-idle tasks waited for {name} at once (PSI full total)"),
                    m.stalled.clone(),
                );
            }
        }
        r.register("node_load1", "1-minute load average", self.load1.clone());
        r.register("node_load5", "5-minute load average", self.load5.clone());
        r.register("node_load15", "15-minute load average", self.load15.clone());
        if available.disk {
            r.register(
                "node_disk_io_now",
                "I/O requests in flight on the storage device",
                self.disk_io_now.clone(),
            );
            r.register(
                "node_disk_write_time_seconds",
                "Time spent on writes by the storage device (summed over requests)",
                self.disk_write_time.clone(),
            );
            r.register(
                "node_disk_writes_completed",
                "Writes completed by the storage device",
                self.disk_writes_completed.clone(),
            );
        }
    }

    /// Brings the metrics to `s`'s values.
    pub fn observe(&self, s: &Sample) {
        if let Some(c) = s.cpu {
            raise(&self.cpu_steal, c.steal as f64 / USER_HZ);
        }
        for (p, m) in [
            (s.pressure_cpu, &self.cpu),
            (s.pressure_io, &self.io),
            (s.pressure_memory, &self.memory),
        ] {
            if let Some(Psi { some, full }) = p {
                raise(&m.waiting, some.total_us as f64 / 1e6);
                if let Some(f) = full {
                    raise(&m.stalled, f.total_us as f64 / 1e6);
                }
            }
        }
        if let Some(l) = s.load {
            self.load1.set(l.load1);
            self.load5.set(l.load5);
            self.load15.set(l.load15);
        }
        if let Some(d) = s.disk {
            self.disk_io_now
                .set(i64::try_from(d.io_in_flight).unwrap_or(i64::MAX));
            raise(&self.disk_write_time, d.write_time_ms as f64 / 1e3);
            let done = self.disk_writes_completed.get();
            self.disk_writes_completed
                .inc_by(d.writes_completed.saturating_sub(done));
        }
    }
}

fn raise(c: &Counter<f64, AtomicU64>, total: f64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_load::{LoadAvg, PsiLine};

    #[test]
    fn counters_follow_kernel_totals_and_absent_parts_are_not_exported() {
        let m = NodeLoadMetrics::default();
        let mut s = Sample {
            cpu: Some(crate::node_load::CpuTicks {
                steal: 250,
                total: 1000,
            }),
            pressure_io: Some(Psi {
                some: PsiLine {
                    total_us: 3_000_000,
                    ..Default::default()
                },
                full: Some(PsiLine {
                    total_us: 1_000_000,
                    ..Default::default()
                }),
            }),
            load: Some(LoadAvg {
                load1: 0.5,
                load5: 0.25,
                load15: 0.125,
            }),
            ..Default::default()
        };
        m.observe(&s);
        m.observe(&s);
        let mut reg = Registry::default();
        m.set_available(Availability::of(&s));
        m.register(reg.sub_registry_with_prefix("skyferry_agent"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("skyferry_agent_node_cpu_steal_seconds_total 2.5\n"),
            "{text}"
        );
        assert!(
            text.contains("skyferry_agent_node_pressure_io_waiting_seconds_total 3.0\n"),
            "{text}"
        );
        assert!(
            text.contains("skyferry_agent_node_pressure_io_stalled_seconds_total 1.0\n"),
            "{text}"
        );
        assert!(text.contains("skyferry_agent_node_load1 0.5\n"), "{text}");
        assert!(
            !text.contains("pressure_cpu"),
            "no PSI cpu file, no series: {text}"
        );
        assert!(!text.contains("node_disk"), "no device, no series: {text}");
        s.pressure_io = None;
        m.observe(&s);
        assert_eq!(
            m.io.waiting.get(),
            3.0,
            "a missing reading leaves the counter"
        );
    }
}
