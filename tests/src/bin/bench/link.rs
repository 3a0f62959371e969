//! `--link`: skyferry through the harness's UDP relay (tests/src/relay.rs) with an added
//! round-trip time of 0, 5 and 15 ms (half each way), without and with 0.1 % random loss
//! (each way), optionally a rate cap (`--rate MBIT`). For the single large file and the
//! 84-file exposure it reports throughput, the relay's own counts of what it forwarded
//! and dropped, the agent's quinn counters (lost packets, congestion events, path MTU,
//! RTT) and, for lossy rows, the Mathis bound of one loss-based congestion controller:
//! MSS/RTT · 1.22/√p.
//!
//! The relay runs in this process and copies every datagram in user space; its busiest
//! thread's CPU share is printed per row, since at high rates the relay itself can be the
//! limit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use skyferry_tests::relay::{Direction, RelayStats};
use skyferry_tests::{compare_trees, Pair, PairOptions};

use crate::config::Skyferry;
use crate::cpu::CpuClock;
use crate::datasets::Dataset;
use crate::report::{median, mib};
use crate::scrape::get;
use crate::tools;

/// Added round-trip times, in milliseconds.
const RTTS_MS: [u64; 3] = [0, 5, 15];
/// Random loss per datagram, each way.
const LOSSES: [f64; 2] = [0.0, 0.001];
/// QUIC bytes in a full packet besides stream data, assumed for the Mathis bound: short
/// header (1 flag byte, 8-byte connection id, up to 4-byte packet number), 16-byte AEAD
/// tag, STREAM frame header (type, stream id, offset, length: up to ~19 bytes).
const QUIC_OVERHEAD: u64 = 48;
/// A relay thread busier than this share of one CPU was probably the limit.
const RELAY_SATURATED: f64 = 0.85;

pub struct LinkOptions {
    pub quick: bool,
    pub runs: usize,
    /// Rate cap in Mbit/s, each way.
    pub rate_mbit: Option<f64>,
    /// `transfer.connections` to compare with the default, if the agent accepts it.
    pub connections: Option<u32>,
    /// Added RTTs to run (empty: [`RTTS_MS`]).
    pub rtts_ms: Vec<u64>,
    /// Losses to run (empty: [`LOSSES`]).
    pub losses: Vec<f64>,
}

/// One row: a data set through one link setting, medians over the runs.
struct LinkRow {
    dataset: &'static str,
    rtt_ms: u64,
    loss: f64,
    /// `None`: the agent's default connection count.
    connections: Option<u32>,
    bytes: u64,
    outcome: Result<LinkFigures, String>,
}

struct LinkFigures {
    seconds: f64,
    relay: RelayStats,
    lost: f64,
    /// Datagrams quinn sent (UDP segments).
    datagrams: f64,
    congestion_events: f64,
    mtu: f64,
    rtt_s: f64,
    /// UDP datagrams the kernel dropped for a full socket receive buffer during the run
    /// (any socket of the machine: the relay's, the daemons'), `None` if unreadable.
    overflows: Option<u64>,
    /// Busiest relay thread: its name and CPU share of one core.
    relay_busiest: (String, f64),
    peak_rss: [u64; 2],
}

/// Runs the link matrix and prints its tables; `Ok(false)` if a run failed.
pub fn run(opts: &LinkOptions, skyferry: &Skyferry, clock: &CpuClock) -> Result<bool> {
    let mut variants = vec![None];
    if let Some(n) = opts.connections {
        variants.push(Some(n));
    }
    let mut rows = Vec::new();
    for (name, dataset) in [
        ("large file", Dataset::movie(opts.quick)),
        ("84 files", Dataset::exposure()),
    ] {
        println!("link: data set {} …", dataset.name());
        let pair = Pair::new(PairOptions {
            via_relay: true,
            ..PairOptions::default()
        })?;
        dataset.write(&pair.source())?;
        let bytes = compare_trees(&pair.source(), &pair.source())?.bytes;
        let mut pair = pair;
        let rtts = if opts.rtts_ms.is_empty() {
            RTTS_MS.to_vec()
        } else {
            opts.rtts_ms.clone()
        };
        let losses = if opts.losses.is_empty() {
            LOSSES.to_vec()
        } else {
            opts.losses.clone()
        };
        for &rtt_ms in &rtts {
            for &loss in &losses {
                for &connections in &variants {
                    let mut config = skyferry.clone();
                    if let Some(n) = connections {
                        config.set("connections", &n.to_string());
                    }
                    let outcome = measure(&mut pair, &config, clock, opts, rtt_ms, loss, bytes)
                        .map_err(|e| format!("{e:#}"));
                    rows.push(LinkRow {
                        dataset: name,
                        rtt_ms,
                        loss,
                        connections,
                        bytes,
                        outcome,
                    });
                }
            }
        }
    }
    print(&rows, opts, skyferry);
    Ok(rows.iter().all(|r| r.outcome.is_ok()))
}

/// `opts.runs` transfers of the pair's tree through the relay set to one link setting.
fn measure(
    pair: &mut Pair,
    config: &Skyferry,
    clock: &CpuClock,
    opts: &LinkOptions,
    rtt_ms: u64,
    loss: f64,
    bytes: u64,
) -> Result<LinkFigures> {
    let metrics = config.apply(pair, "")?;
    if let Some(relay) = pair.relay() {
        relay.clear();
        relay.set_delay(Duration::from_micros(rtt_ms * 500));
        relay.set_loss(loss);
        if let Some(mbit) = opts.rate_mbit {
            relay.set_rate((mbit * 1e6) as u64, queue(rtt_ms));
        }
    }
    // Slow lossy links get time for a rate far below the Mathis bound.
    let timeout = Duration::from_secs(300 + bytes / 2_000_000);
    let mut runs = Vec::new();
    for run in 1..=opts.runs {
        let before = pair.relay().map(|r| r.stats()).unwrap_or_default();
        let threads_before = clock.threads("relay-")?;
        let overflows_before = udp_rcvbuf_errors();
        let started = Instant::now();
        let result = tools::skyferry(pair, clock, timeout, &metrics)?;
        let wall = started.elapsed().as_secs_f64();
        let after = pair.relay().map(|r| r.stats()).unwrap_or_default();
        let overflows = udp_rcvbuf_errors()
            .zip(overflows_before)
            .map(|(a, b)| a.saturating_sub(b));
        let busiest = busiest(&threads_before, &clock.threads("relay-")?, wall);
        let m = &result.metrics;
        let figures = LinkFigures {
            seconds: result.measurement.seconds,
            relay: delta(&before, &after),
            lost: get(m, "skyferry_agent_quic_lost_packets_total"),
            datagrams: get(m, "skyferry_agent_quic_udp_tx_datagrams_total"),
            congestion_events: get(m, "skyferry_agent_quic_congestion_events_total"),
            mtu: get(m, "skyferry_agent_quic_mtu_bytes"),
            rtt_s: get(m, "skyferry_agent_quic_rtt_seconds"),
            overflows,
            relay_busiest: busiest,
            peak_rss: result.measurement.peak_rss.unwrap_or_default(),
        };
        println!(
            "  RTT {rtt_ms:>2} ms, loss {:.1}%: run {run}/{}: {:.2} s, {:.1} MB/s; relay dropped {} up, {} never reached it, {} in full receive buffers, quinn lost {}",
            loss * 100.0,
            opts.runs,
            figures.seconds,
            bytes as f64 / 1e6 / figures.seconds,
            figures.relay.dropped[Direction::Up as usize],
            figures.unseen(),
            figures.overflows.map_or("?".into(), |n| n.to_string()),
            figures.lost
        );
        runs.push(figures);
    }
    Ok(median_figures(runs))
}

impl LinkFigures {
    /// Datagrams the agent sent that the relay never received: lost in the agent's own
    /// sends (or a full socket buffer), before the link.
    fn unseen(&self) -> f64 {
        (self.datagrams - self.relay.received[Direction::Up as usize] as f64).max(0.0)
    }
}

/// The kernel's count of UDP datagrams dropped for a full receive buffer
/// (`RcvbufErrors` in /proc/net/snmp).
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The queue behind a rate cap: about one round trip, at least 10 ms.
fn queue(rtt_ms: u64) -> Duration {
    Duration::from_millis(rtt_ms.max(10))
}

fn delta(before: &RelayStats, after: &RelayStats) -> RelayStats {
    let d = |a: [u64; 2], b: [u64; 2]| [b[0] - a[0], b[1] - a[1]];
    RelayStats {
        forwarded: d(before.forwarded, after.forwarded),
        forwarded_bytes: d(before.forwarded_bytes, after.forwarded_bytes),
        dropped: d(before.dropped, after.dropped),
        duplicated: d(before.duplicated, after.duplicated),
        blackholed: d(before.blackholed, after.blackholed),
        overflowed: d(before.overflowed, after.overflowed),
        received: d(before.received, after.received),
        send_failed: d(before.send_failed, after.send_failed),
    }
}

/// The relay thread that used the most CPU between the two readings, as a share of
/// `wall` seconds.
fn busiest(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
    wall: f64,
) -> (String, f64) {
    after
        .iter()
        .map(|(tid, (name, cpu))| {
            let was = before.get(tid).map_or(0.0, |(_, c)| *c);
            (name.clone(), (cpu - was) / wall.max(1e-9))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_else(|| ("-".into(), 0.0))
}

/// The run with the median time stands for the row (its counters belong with it).
fn median_figures(mut runs: Vec<LinkFigures>) -> LinkFigures {
    let m = median(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>());
    runs.sort_by(|a, b| (a.seconds - m).abs().total_cmp(&(b.seconds - m).abs()));
    let peak = runs.iter().fold([0u64; 2], |p, r| {
        [p[0].max(r.peak_rss[0]), p[1].max(r.peak_rss[1])]
    });
    let mut row = runs.swap_remove(0);
    row.peak_rss = peak;
    row
}

/// Mathis et al.: the throughput of one loss-based congestion controller, in MB/s.
fn mathis_mb_s(mtu: f64, rtt_ms: u64, loss: f64) -> Option<f64> {
    if rtt_ms == 0 || loss <= 0.0 || mtu <= QUIC_OVERHEAD as f64 {
        return None;
    }
    let mss = mtu - QUIC_OVERHEAD as f64;
    Some(mss / (rtt_ms as f64 / 1e3) * 1.22 / loss.sqrt() / 1e6)
}

fn print(rows: &[LinkRow], opts: &LinkOptions, skyferry: &Skyferry) {
    println!();
    println!("== link: through the UDP relay, {} ==", skyferry.describe());
    let rate = opts.rate_mbit.map_or("no rate cap".to_string(), |r| {
        format!("rate cap {r} Mbit/s each way, queue ≈ 1 RTT (≥ 10 ms)")
    });
    println!(
        "Delay RTT/2 each way, random loss each way, {rate}; median of {} run(s).",
        opts.runs
    );
    println!("vs 0ms: MB/s relative to the same row with no added delay. Mathis: MSS/RTT·1.22/√p");
    println!(
        "with MSS = quinn's path MTU − {QUIC_OVERHEAD} B (QUIC header, AEAD tag, STREAM frame), RTT the"
    );
    println!(
        "relay's added RTT and p its loss, for one connection; with N connections (conns) files"
    );
    println!("spread over them and a large file stripes over all of them, so both data sets can");
    println!("reach N times the bound.");
    println!();
    println!(
        "{:<10} {:>4} {:>5} {:>5} {:>8} {:>7} {:>8} {:>7} {:>8}",
        "data set", "RTT", "loss", "conns", "MB/s", "vs 0ms", "Mathis", "x Mathis", "vs 1conn"
    );
    println!(
        "{:<10} {:>4} {:>5} {:>5} {:>8} {:>7} {:>8} {:>7} {:>8}",
        "", "ms", "%", "", "", "", "MB/s", "", ""
    );
    let throughput = |r: &LinkRow| {
        r.outcome
            .as_ref()
            .ok()
            .map(|f| r.bytes as f64 / 1e6 / f.seconds)
    };
    let find = |r: &LinkRow, rtt: u64, conns: Option<u32>| {
        rows.iter().find(|o| {
            o.dataset == r.dataset && o.rtt_ms == rtt && o.loss == r.loss && o.connections == conns
        })
    };
    for r in rows {
        let conns = r.connections.map_or("dflt".into(), |n| n.to_string());
        let lead = format!(
            "{:<10} {:>4} {:>5.1} {:>5}",
            r.dataset,
            r.rtt_ms,
            r.loss * 100.0,
            conns
        );
        let (f, mb_s) = match (&r.outcome, throughput(r)) {
            (Ok(f), Some(t)) => (f, t),
            (Err(e), _) => {
                println!("{lead} FAILED: {}", e.lines().next().unwrap_or_default());
                continue;
            }
            _ => continue,
        };
        let ratio = |other: Option<&LinkRow>| {
            other
                .and_then(throughput)
                .map_or("-".into(), |o| format!("{:.2}", mb_s / o))
        };
        let vs_zero = ratio(find(r, 0, r.connections));
        let mathis = mathis_mb_s(f.mtu, r.rtt_ms, r.loss);
        let vs_one = if r.connections.is_some() {
            ratio(find(r, r.rtt_ms, None))
        } else {
            "-".into()
        };
        println!(
            "{lead} {:>8.1} {:>7} {:>8} {:>7} {:>8}",
            mb_s,
            vs_zero,
            mathis.map_or("-".into(), |m| format!("{m:.1}")),
            mathis.map_or("-".into(), |m| format!("{:.2}", mb_s / m)),
            vs_one
        );
    }
    println!();
    println!("Counters of the median run: the relay's datagrams (up = agent to receiver) and");
    println!("the agent's quinn statistics (skyferry_agent_quic_*): lost packets (q lost) vs what");
    println!("the relay dropped of the agent's datagrams (up drop) plus the datagrams quinn");
    println!("counted as sent that never reached the relay (unseen: lost in the agent's own");
    println!("sends or a full socket buffer, before the link), the datagrams the kernel dropped");
    println!("for a full socket receive buffer (rcvbuf full: any socket, relay's or receiver's;");
    println!("RcvbufErrors in /proc/net/snmp); congestion events, path MTU, smoothed RTT.");
    println!(
        "relay CPU: its busiest thread's share of one core (≥ {:.0}%: the relay was the limit).",
        RELAY_SATURATED * 100.0
    );
    println!();
    let header = [
        [
            "data set", "RTT", "loss", "conns", "up fwd", "up drop", "unseen", "rcvbuf", "q lost",
        ],
        ["", "ms", "%", "", "", "", "", "full", ""],
    ];
    let header2 = [
        ["dn drop", "cong", "mtu", "rtt", "relay CPU", "RSS MiB"],
        ["", "events", "B", "ms", "busiest thread", "agt/rcv"],
    ];
    for (h, h2) in header.iter().zip(&header2) {
        println!(
            "{:<10} {:>4} {:>5} {:>5} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>6} {:>17} {:>8}",
            h[0],
            h[1],
            h[2],
            h[3],
            h[4],
            h[5],
            h[6],
            h[7],
            h[8],
            h2[0],
            h2[1],
            h2[2],
            h2[3],
            h2[4],
            h2[5]
        );
    }
    let mut saturated = false;
    for r in rows {
        let Ok(f) = &r.outcome else { continue };
        let (up, down) = (Direction::Up as usize, Direction::Down as usize);
        let drop_up = f.relay.dropped[up] + f.relay.overflowed[up] + f.relay.send_failed[up];
        let (thread, share) = &f.relay_busiest;
        let flag = if *share >= RELAY_SATURATED {
            saturated = true;
            "!"
        } else {
            ""
        };
        println!(
            "{:<10} {:>4} {:>5.1} {:>5} {:>8} {:>7} {:>7.0} {:>7} {:>7.0} {:>7} {:>6.0} {:>5.0} {:>6.1} {:>17} {:>8}",
            r.dataset,
            r.rtt_ms,
            r.loss * 100.0,
            r.connections.map_or("dflt".into(), |n| n.to_string()),
            f.relay.forwarded[up],
            drop_up,
            f.unseen(),
            f.overflows.map_or("-".into(), |n| n.to_string()),
            f.lost,
            f.relay.dropped[down] + f.relay.overflowed[down] + f.relay.send_failed[down],
            f.congestion_events,
            f.mtu,
            f.rtt_s * 1e3,
            format!("{thread} {:.0}%{flag}", share * 100.0),
            format!("{:.0}/{:.0}", mib(f.peak_rss[0]), mib(f.peak_rss[1])),
        );
    }
    if saturated {
        println!("!: a relay thread was (nearly) saturated: that row measures the relay as much as skyferry.");
    } else {
        println!("No relay thread was saturated: the relay was not the limit.");
    }
}
