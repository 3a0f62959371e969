//! The benchmark's final table and the skyferry-to-others ratios.

use crate::tools::Measurement;

pub enum Outcome {
    Done(Measurement),
    Skipped(String),
    Failed(String),
}

/// One data set: its size and each tool's outcome (skyferry first).
pub struct Row {
    pub dataset: String,
    pub files: usize,
    pub bytes: u64,
    pub tools: Vec<(&'static str, Outcome)>,
}

impl Row {
    fn done(&self, tool: &str) -> Option<Measurement> {
        self.tools.iter().find_map(|(name, outcome)| match outcome {
            Outcome::Done(m) if *name == tool => Some(*m),
            _ => None,
        })
    }
}

pub fn print(rows: &[Row], compression: u32, background: (f64, f64)) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    println!("skyferry benchmark: loopback, {cpus} CPUs. skyferry: 4 MiB chunks, 8 parallel");
    println!("files, zstd level {compression}. Every tool reads the same page-cache-warm source");
    println!("tree; rsync and cp are followed by `sync` (skyferry fsyncs each file itself).");
    println!("CPU/GB: CPU seconds per GB moved. \"own\" = the tool's processes (agent+receiver;");
    println!("rsync+ssh+sshd; cp+sync); \"machine\" = all busy CPU (/proc/stat), which also");
    println!("counts kernel writeback and anything else running: background load while idle");
    println!(
        "was {:.2} CPU-s/s before and {:.2} after the run.",
        background.0, background.1
    );
    println!();
    println!(
        "{:<24} {:>5} {:>8}  {:<10} {:>8} {:>8} {:>8} {:>8}",
        "data set", "files", "MB", "tool", "seconds", "MB/s", "CPU/GB", "CPU/GB"
    );
    println!(
        "{:<24} {:>5} {:>8}  {:<10} {:>8} {:>8} {:>8} {:>8}",
        "", "", "", "", "", "", "own", "machine"
    );
    for row in rows {
        let (mb, gb) = (row.bytes as f64 / 1e6, row.bytes as f64 / 1e9);
        for (i, (tool, outcome)) in row.tools.iter().enumerate() {
            let lead = if i == 0 {
                format!("{:<24} {:>5} {:>8.1}", row.dataset, row.files, mb)
            } else {
                format!("{:<24} {:>5} {:>8}", "", "", "")
            };
            let figures = match outcome {
                Outcome::Done(m) => format!(
                    "{:>8.2} {:>8.1} {:>8.2} {:>8.2}",
                    m.seconds,
                    mb / m.seconds,
                    m.process_cpu / gb,
                    m.machine_cpu / gb
                ),
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::Failed(e) => {
                    let first = e.lines().next().unwrap_or_default();
                    format!("FAILED: {}", first.chars().take(60).collect::<String>())
                }
            };
            println!("{lead}  {tool:<10} {figures}");
        }
    }
    println!();
    println!("skyferry relative to the others: speed >1 = skyferry faster; CPU/GB <1 = cheaper");
    println!(
        "{:<24} {:-^26}   {:-^26}",
        "", " vs rsync+ssh ", " vs cp+sync "
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8}   {:>8} {:>8} {:>8}",
        "data set", "speed", "CPU own", "CPU mach", "speed", "CPU own", "CPU mach"
    );
    for row in rows {
        let ratios = |other: &str| match (row.done("skyferry"), row.done(other)) {
            (Some(s), Some(o)) => format!(
                "{:>7.2}x {:>7.2}x {:>7.2}x",
                o.seconds / s.seconds,
                s.process_cpu / o.process_cpu,
                s.machine_cpu / o.machine_cpu
            ),
            _ => format!("{:>8} {:>8} {:>8}", "-", "-", "-"),
        };
        println!(
            "{:<24} {}   {}",
            row.dataset,
            ratios("rsync+ssh"),
            ratios("cp+sync")
        );
    }
}
