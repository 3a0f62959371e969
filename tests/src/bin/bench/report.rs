//! The loopback comparison's table (medians over the runs) and skyferry's ratios to the
//! others; the order statistics the other modes use too.

use anyhow::Result;

use crate::tools::Measurement;

/// The memory bound for each daemon with the default configuration.
pub const RSS_LIMIT: u64 = 256 << 20;

pub enum Outcome {
    Done(Summary),
    Skipped(String),
    Failed(String),
}

impl Outcome {
    /// All runs, or the first failure.
    pub fn from_runs(results: Vec<Result<Measurement>>) -> Outcome {
        let mut runs = Vec::new();
        for r in results {
            match r {
                Ok(m) => runs.push(m),
                Err(e) => return Outcome::Failed(format!("{e:#}")),
            }
        }
        if runs.is_empty() {
            return Outcome::Failed("no run".into());
        }
        Outcome::Done(Summary { runs })
    }
}

/// The runs of one tool on one data set.
pub struct Summary {
    pub runs: Vec<Measurement>,
}

impl Summary {
    fn median(&self, f: impl Fn(&Measurement) -> f64) -> f64 {
        median(&self.runs.iter().map(f).collect::<Vec<_>>())
    }
    pub fn seconds(&self) -> f64 {
        self.median(|m| m.seconds)
    }
    pub fn process_cpu(&self) -> f64 {
        self.median(|m| m.process_cpu)
    }
    pub fn machine_cpu(&self) -> f64 {
        self.median(|m| m.machine_cpu)
    }
    fn spread(&self) -> (f64, f64) {
        let s = self.runs.iter().map(|m| m.seconds);
        (s.clone().fold(f64::MAX, f64::min), s.fold(0.0, f64::max))
    }
    /// Highest peak RSS over the runs, per daemon.
    pub fn peak_rss(&self) -> Option<[u64; 2]> {
        self.runs
            .iter()
            .filter_map(|m| m.peak_rss)
            .reduce(|a, b| [a[0].max(b[0]), a[1].max(b[1])])
    }
}

/// Median (mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The `q` quantile (0..=1) by nearest rank; NaN for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// One data set: its size and each tool's outcome (skyferry first).
pub struct Row {
    pub dataset: String,
    pub files: usize,
    pub bytes: u64,
    pub tools: Vec<(&'static str, Outcome)>,
}

impl Row {
    fn done(&self, tool: &str) -> Option<&Summary> {
        self.tools.iter().find_map(|(name, outcome)| match outcome {
            Outcome::Done(s) if *name == tool => Some(s),
            _ => None,
        })
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub fn print(rows: &[Row], runs: usize, config: &str, background: (f64, f64)) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!("== loopback: skyferry vs rsync+ssh, cp+sync, flask+wget ({cpus} CPUs) ==");
    println!("skyferry: {config}.");
    println!("Median of {runs} run(s) per tool, interleaved; \"range\" = fastest..slowest run.");
    println!("Every tool reads the same page-cache-warm tree; rsync, cp and wget are followed");
    println!("by `sync` (skyferry fsyncs each file itself). flask+wget: Flask's threaded server");
    println!("and one `wget` per file, one after the other.");
    println!("CPU/GB: CPU seconds per GB moved. \"own\" = the tool's processes (agent+receiver;");
    println!("rsync+ssh+sshd; cp+sync; Flask+wget+sync); \"machine\" = all busy CPU");
    println!("(/proc/stat), which also counts kernel writeback and anything else running:");
    println!(
        "background load while idle was {:.2} CPU-s/s before and {:.2} after the run.",
        background.0, background.1
    );
    println!("RSS: skyferry's peak resident memory (VmHWM) agent/receiver, MiB, highest run.");
    println!();
    println!(
        "{:<24} {:>5} {:>8}  {:<10} {:>7} {:>7} {:>13} {:>6} {:>6} {:>9}",
        "data set", "files", "MB", "tool", "seconds", "MB/s", "range s", "CPU/GB", "CPU/GB", "RSS"
    );
    println!(
        "{:<24} {:>5} {:>8}  {:<10} {:>7} {:>7} {:>13} {:>6} {:>6} {:>9}",
        "", "", "", "", "", "", "", "own", "mach", "MiB"
    );
    let mut peak = [0u64; 2];
    for row in rows {
        let (mb, gb) = (row.bytes as f64 / 1e6, row.bytes as f64 / 1e9);
        for (i, (tool, outcome)) in row.tools.iter().enumerate() {
            let lead = if i == 0 {
                format!("{:<24} {:>5} {:>8.1}", row.dataset, row.files, mb)
            } else {
                format!("{:<24} {:>5} {:>8}", "", "", "")
            };
            let figures = match outcome {
                Outcome::Done(s) => {
                    let (lo, hi) = s.spread();
                    let rss = match s.peak_rss() {
                        Some(r) => {
                            peak = [peak[0].max(r[0]), peak[1].max(r[1])];
                            format!("{:.0}/{:.0}", mib(r[0]), mib(r[1]))
                        }
                        None => "-".into(),
                    };
                    format!(
                        "{:>7.2} {:>7.1} {:>13} {:>6.2} {:>6.2} {:>9}",
                        s.seconds(),
                        mb / s.seconds(),
                        format!("{lo:.2}..{hi:.2}"),
                        s.process_cpu() / gb,
                        s.machine_cpu() / gb,
                        rss
                    )
                }
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::Failed(e) => {
                    let first = e.lines().next().unwrap_or_default();
                    format!("FAILED: {}", first.chars().take(60).collect::<String>())
                }
            };
            println!("{lead}  {tool:<10} {figures}");
        }
    }
    if peak != [0, 0] {
        let verdict = |b: u64| if b <= RSS_LIMIT { "ok" } else { "OVER" };
        println!(
            "peak RSS over all data sets: agent {:.0} MiB ({}), receiver {:.0} MiB ({}); bound {} MiB each",
            mib(peak[0]),
            verdict(peak[0]),
            mib(peak[1]),
            verdict(peak[1]),
            RSS_LIMIT >> 20
        );
    }
    println!();
    println!("skyferry / other: throughput >1 = skyferry faster; CPU/GB <1 = skyferry cheaper");
    println!(
        "{:<24} {:<10} {:>10} {:>10} {:>10}",
        "data set", "vs", "throughput", "CPU own", "CPU mach"
    );
    for row in rows {
        let Some(s) = row.done("skyferry") else {
            continue;
        };
        let mut first = true;
        for (tool, _) in row.tools.iter().skip(1) {
            let lead = if first { row.dataset.as_str() } else { "" };
            let figures = match row.done(tool) {
                Some(o) => format!(
                    "{:>9.2}x {:>9.2}x {:>9.2}x",
                    o.seconds() / s.seconds(),
                    s.process_cpu() / o.process_cpu(),
                    s.machine_cpu() / o.machine_cpu()
                ),
                None => format!("{:>10} {:>10} {:>10}", "-", "-", "-"),
            };
            println!("{lead:<24} {tool:<10} {figures}");
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_nearest_rank_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&hundred, 0.5), 50.0);
        assert_eq!(quantile(&hundred, 0.99), 99.0);
        assert_eq!(quantile(&hundred, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }
}
