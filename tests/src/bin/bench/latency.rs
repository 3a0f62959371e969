//! `--latency`: how long one fresh 4.5 MB FITS file takes from the moment it exists to the
//! agent's durable done, with the pair running and idle. N times (default 100), one file at
//! a time: written and closed in the watched tree, timed until the agent counts it sent
//! (the inotify path, which waits the watch's `quiet_period` by design); then the same
//! with a Redis publish right after the close, timed from the publish (the observatory's
//! path). Two end points: "acked" is `skyferry_agent_files_sent_total` growing (the
//! receiver's Ack arrived, which it sends only after the file is fsynced, renamed into
//! place, its directory fsynced and recorded); "done" is `skyferry_agent_files_done_total`
//! growing (the agent's journal durably records it done: an fsynced commit after the
//! Ack). An agent without the second counter (older builds) is reported by the first.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skyferry_tests::fits::{self, FitsParams};
use skyferry_tests::redis::RedisServer;
use skyferry_tests::{Pair, PairOptions};

use crate::config::{duration, Skyferry};
use crate::report::{median, quantile};
use crate::scrape::{get, scrape};

const CHANNEL: &str = "skyferry-bench:files";
const SENT: &str = "skyferry_agent_files_sent_total";
const DONE: &str = "skyferry_agent_files_done_total";
/// Pause between two polls of the metrics.
const POLL: Duration = Duration::from_millis(1);
/// Longest wait for one file.
const FILE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LatencyOptions {
    pub count: usize,
    /// `[[watch]] quiet_period` instead of the example's.
    pub quiet_period: Option<String>,
}

struct Series {
    name: &'static str,
    /// Milliseconds per file.
    ms: Vec<f64>,
}

/// Milliseconds per file to the Ack and, if the agent counts it, to the durable done.
#[derive(Default)]
struct Timings {
    acked: Vec<f64>,
    done: Vec<f64>,
}

impl Timings {
    fn push(&mut self, (acked, done): (f64, Option<f64>)) {
        self.acked.push(acked);
        self.done.extend(done);
    }

    fn into_series(self, acked: &'static str, done: &'static str, series: &mut Vec<Series>) {
        series.push(Series {
            name: acked,
            ms: self.acked,
        });
        if !self.done.is_empty() {
            series.push(Series {
                name: done,
                ms: self.done,
            });
        }
    }
}

/// Runs both series and prints their table; `Ok(false)` if one could not run.
pub fn run(opts: &LatencyOptions, skyferry: &Skyferry) -> Result<bool> {
    let redis = match RedisServer::start() {
        Ok(r) => Some(r),
        Err(e) => {
            println!("latency: skipping the Redis series: {e:#}");
            None
        }
    };
    let quiet = opts
        .quiet_period
        .clone()
        .unwrap_or_else(|| skyferry.quiet_period.clone());
    let mut pair = Pair::new(PairOptions {
        quiet_period: Some(quiet.clone()),
        settle: skyferry.settle.clone(),
        rescan_interval: skyferry.rescan_interval.clone(),
        ..PairOptions::default()
    })?;
    let extra = match &redis {
        Some(r) => format!(
            "[[redis]]\nurl = \"{}\"\nchannel = \"{CHANNEL}\"\nformat = \"path\"\n",
            r.url()
        ),
        None => String::new(),
    };
    let metrics = skyferry.apply(&pair, &extra)?;
    start_connected(&mut pair, &metrics)?;
    let mut publisher = match &redis {
        Some(r) => {
            wait(&mut pair, "the agent to subscribe", || {
                Ok(r.subscribers(CHANNEL)? >= 1)
            })?;
            Some(Publisher::connect(r.port())?)
        }
        None => None,
    };
    let quiet_period = duration(&quiet)?;
    let mut polls = (0u64, Duration::ZERO);
    let mut series = Vec::new();

    println!(
        "latency: {} files through the watch (quiet_period {quiet}) …",
        opts.count
    );
    let counts_done = scrape(&metrics)?.contains_key(DONE);
    let mut ms = Timings::default();
    for i in 0..=opts.count {
        let path = file_path(&pair, 1, i);
        let base = bases(&metrics)?;
        write(&path, 1, i)?;
        let t0 = Instant::now();
        let took = until_sent(&mut pair, &metrics, base, counts_done, t0, &mut polls)?;
        if i > 0 {
            ms.push(took); // the first file warms up the connection
        }
    }
    ms.into_series("watch: close → acked", "watch: close → done", &mut series);

    if let Some(publisher) = publisher.as_mut() {
        println!(
            "latency: {} files announced by a Redis publish …",
            opts.count
        );
        let mut ms = Timings::default();
        for i in 0..=opts.count {
            let path = file_path(&pair, 2, i);
            // Let the watch's own event for the previous file pass (it finds the file
            // already sent), so that it is not counted as this file.
            std::thread::sleep(quiet_period + Duration::from_millis(300));
            let base = bases(&metrics)?;
            write(&path, 2, i)?;
            let t0 = Instant::now();
            publisher.publish(&path.to_string_lossy())?;
            let took = until_sent(&mut pair, &metrics, base, counts_done, t0, &mut polls)?;
            if i > 0 {
                ms.push(took);
            }
        }
        ms.into_series(
            "redis: publish → acked",
            "redis: publish → done",
            &mut series,
        );
    }
    pair.stop_both()?;
    let poll_ms = polls.1.as_secs_f64() * 1e3 / polls.0.max(1) as f64;
    print(&series, skyferry, &quiet, poll_ms);
    Ok(redis.is_some())
}

fn file_path(pair: &Pair, exposure: u32, i: usize) -> std::path::PathBuf {
    pair.source()
        .join(format!("latency{exposure}/file{i:04}.fits"))
}

/// One 4.5 MB single-frame FITS file, closed when this returns.
fn write(path: &Path, exposure: u32, i: usize) -> Result<()> {
    let detector = (i % usize::from(fits::DETECTORS)) as u8 + 1;
    let params = FitsParams::new(1000 * exposure + i as u32, detector, 1);
    fits::write_fits(path, &params)?;
    Ok(())
}

/// Files acked and done so far.
fn bases(metrics: &str) -> Result<(f64, f64)> {
    let samples = scrape(metrics)?;
    Ok((get(&samples, SENT), get(&samples, DONE)))
}

/// Polls the agent's metrics until files acked exceeds `base.0` and, with `counts_done`,
/// files done exceeds `base.1`; milliseconds since `t0` to each.
fn until_sent(
    pair: &mut Pair,
    metrics: &str,
    base: (f64, f64),
    counts_done: bool,
    t0: Instant,
    polls: &mut (u64, Duration),
) -> Result<(f64, Option<f64>)> {
    let mut acked = None;
    loop {
        let p = Instant::now();
        let samples = scrape(metrics)?;
        if acked.is_none() && get(&samples, SENT) > base.0 {
            acked = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        let done = counts_done && get(&samples, DONE) > base.1;
        if let Some(acked) = acked.filter(|_| done || !counts_done) {
            let took = t0.elapsed().as_secs_f64() * 1e3;
            polls.0 += 1;
            polls.1 += p.elapsed();
            return Ok((acked, counts_done.then_some(took)));
        }
        std::thread::sleep(POLL);
        polls.0 += 1;
        polls.1 += p.elapsed();
        if t0.elapsed() > FILE_TIMEOUT {
            pair.ensure_alive()?;
            bail!(
                "a file was not sent within {FILE_TIMEOUT:?}\n{}",
                pair.diagnostics()
            );
        }
    }
}

/// Starts the receiver, then the agent, and waits until the agent's metrics (at
/// `metrics`) say it is connected.
pub fn start_connected(pair: &mut Pair, metrics: &str) -> Result<()> {
    pair.start_receiver()?;
    pair.wait_receiver_listening(Duration::from_secs(10))?;
    pair.start_agent()?;
    wait(pair, "the agent to connect", || {
        Ok(get(&scrape(metrics)?, "skyferry_agent_connected") >= 1.0)
    })
}

/// Polls `cond` until it holds (30 s at most), failing early when a daemon died.
pub fn wait(pair: &mut Pair, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().unwrap_or(false) {
        pair.ensure_alive()?;
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}\n{}", pair.diagnostics());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One Redis connection kept open, so that a publish costs a round trip, not a process.
struct Publisher {
    conn: BufReader<TcpStream>,
}

impl Publisher {
    fn connect(port: u16) -> Result<Publisher> {
        let conn = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("cannot connect to redis on port {port}"))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Publisher {
            conn: BufReader::new(conn),
        })
    }

    /// `PUBLISH CHANNEL message` in RESP; fails unless someone received it.
    fn publish(&mut self, message: &str) -> Result<()> {
        let mut request = String::from("*3\r\n");
        for arg in ["PUBLISH", CHANNEL, message] {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.conn.get_mut().write_all(request.as_bytes())?;
        let mut reply = String::new();
        self.conn.read_line(&mut reply)?;
        match reply.trim().strip_prefix(':').map(str::parse::<u64>) {
            Some(Ok(n)) if n >= 1 => Ok(()),
            _ => bail!("PUBLISH answered {reply:?} (is the agent subscribed?)"),
        }
    }
}

fn print(series: &[Series], skyferry: &Skyferry, quiet: &str, poll_ms: f64) {
    println!();
    println!("== latency: one 4.5 MB file at a time, pair idle, loopback ==");
    println!("skyferry: {}.", skyferry.describe());
    println!(
        "watch: from the file's close; the agent waits quiet_period = {quiet} after a close by design."
    );
    println!("redis: from the PUBLISH (sent right after the close) on an open connection.");
    println!(
        "acked: skyferry_agent_files_sent_total grew (receiver's Ack: fsynced, renamed, dir fsynced, recorded);\ndone: skyferry_agent_files_done_total grew (the agent's journal row fsynced after the Ack),"
    );
    println!(
        "polled every {:.1} ms on average (1 ms pause + one scrape): that is the resolution.",
        poll_ms
    );
    println!();
    println!(
        "{:<24} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "path", "files", "min ms", "p50 ms", "p99 ms", "max ms", "mean ms"
    );
    for s in series {
        let mean = s.ms.iter().sum::<f64>() / s.ms.len().max(1) as f64;
        println!(
            "{:<24} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            s.name,
            s.ms.len(),
            quantile(&s.ms, 0.0),
            median(&s.ms),
            quantile(&s.ms, 0.99),
            quantile(&s.ms, 1.0),
            mean
        );
    }
}
