//! A real storage stall: the receiver's storage root on a loop-mounted ext4 image,
//! frozen with `fsfreeze -f` for 30 s during a transfer. The receiver must report the
//! stall (log, heartbeat: the agent's log and its metric of the receiver's state) within
//! `stall_after` + one heartbeat, the agent must start no new file while frozen, both
//! daemons' memory stays flat, and after `fsfreeze -u` everything arrives intact without
//! a restart.

use std::time::{Duration, Instant};

use skyferry_tests::faults::{rss_bytes, seed, write_atomic, LoopExt4, SeededRng};
use skyferry_tests::redis::{metric, metrics_table};
use skyferry_tests::{Pair, PairOptions};

const MB: usize = 1_000_000;
const STALL_AFTER: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_secs(1);
const FREEZE: Duration = Duration::from_secs(30);
/// RSS may grow this much while frozen (allocator noise, a log line buffer), far below
/// the data that would pile up if either side kept buffering (files here are 16 MB each).
const RSS_SLACK: u64 = 24 << 20;

/// Files the agent has started (in flight or done), from its journal.
fn started(pair: &Pair) -> u64 {
    let s = pair.agent_status().expect("status");
    s["inflight"].as_u64().unwrap_or(0) + s["done"].as_u64().unwrap_or(0)
}

#[test]
fn a_frozen_storage_is_reported_stalled_the_agent_waits_and_all_arrives_after() {
    let mut pair = Pair::new(PairOptions {
        heartbeat_interval: "1s".into(),
        parallel_files: 2,
        ..PairOptions::default()
    })
    .expect("pair");
    let image = pair.dir().join("storage.img");
    let Some(mut fs) = LoopExt4::mount(&image, &pair.storage(), 512 << 20).expect("mount") else {
        return; // skipped, with the reason printed
    };
    eprintln!("storage on {}", fs.device());
    let (metrics, agent_metrics) = metrics_table().expect("port");
    pair.write_agent_config(|t| {
        t.push('\n');
        t.push_str(&metrics);
    })
    .expect("agent config");
    // The receiver's status file off the frozen storage, as the shipped systemd setup
    // has it (its runtime directory): status stays current through the stall.
    let state_file = pair.dir().join("run").join("state.json");
    pair.write_receiver_config(|t| {
        *t = t.replacen(
            "[receiver]\n",
            &format!(
                "[receiver]\nstate_file = {:?}\n",
                state_file.display().to_string()
            ),
            1,
        );
        // A small connection window (the `[limits]` table ends the file): the file data
        // the stalled receiver does not read fills it at once, and heartbeats must get
        // through all the same.
        t.push_str("receive_window = \"2 MiB\"\n");
        t.push_str(&format!(
            "\n[health]\nstall_after = \"{}s\"\nprobe_interval = \"1s\"\n",
            STALL_AFTER.as_secs()
        ));
    })
    .expect("receiver config");
    let mut rng = SeededRng::new(seed("storage-stall", 5));
    for i in 0..8 {
        write_atomic(
            &pair.source().join(format!("night/f{i}.fits")),
            &rng.bytes(16 * MB),
        )
        .expect("write");
    }
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");
    // A transfer is running: some files stored, others still to come.
    pair.wait_for(Duration::from_secs(60), "a first file done", |p| {
        p.agent_status()
            .is_ok_and(|s| s["done"].as_u64().unwrap_or(0) >= 1)
    });
    fs.freeze(FREEZE + Duration::from_secs(60)).expect("freeze");
    let frozen_at = Instant::now();
    eprintln!("frozen with {} files started", started(&pair));

    // Reported within stall_after + one heartbeat (+ the watchdog's period and a
    // scheduling margin).
    let bound = STALL_AFTER + HEARTBEAT + Duration::from_secs(2);
    pair.wait_for(bound, "stall reported by receiver and seen by agent", |p| {
        let r = p.receiver_log().unwrap_or_default();
        let a = p.agent_log().unwrap_or_default();
        r.contains("storage stalled") && a.contains("storage=Stalled")
    });
    let detected = frozen_at.elapsed();
    eprintln!("stall reported after {detected:?}");
    let r = pair.receiver_log().expect("log");
    let line = r
        .lines()
        .find(|l| l.contains("storage stalled"))
        .expect("the stall line");
    assert!(
        line.contains("operation=") && line.contains("since="),
        "{line}"
    );
    let agent_addr = agent_metrics.clone();
    assert_eq!(
        metric(
            &agent_addr,
            "skyferry_agent_receiver_storage_state{state=\"stalled\"}"
        )
        .expect("scrape"),
        1.0
    );
    assert!(
        metric(
            &agent_addr,
            "skyferry_agent_receiver_storage_stalled_since_timestamp_seconds"
        )
        .expect("scrape")
            > 1.7e9
    );

    // While frozen: new files appear at the source, the agent queues them but starts
    // none, and neither daemon's memory grows.
    for i in 0..4 {
        write_atomic(
            &pair.source().join(format!("late/l{i}.fits")),
            &rng.bytes(4 * MB),
        )
        .expect("write");
    }
    std::thread::sleep(Duration::from_secs(2));
    let started_then = started(&pair);
    let (agent_pid, receiver_pid) = (
        pair.agent_pid().expect("pid"),
        pair.receiver_pid().expect("pid"),
    );
    let rss0 = (
        rss_bytes(agent_pid).expect("rss"),
        rss_bytes(receiver_pid).expect("rss"),
    );
    let mut rss_max = rss0;
    while frozen_at.elapsed() < FREEZE {
        pair.ensure_alive().expect("daemons alive while frozen");
        let now = (
            rss_bytes(agent_pid).unwrap_or(0),
            rss_bytes(receiver_pid).unwrap_or(0),
        );
        rss_max = (rss_max.0.max(now.0), rss_max.1.max(now.1));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The receiver's own status answers now, current, and shows the ongoing stall.
    let s = pair.receiver_status().expect("receiver status");
    assert_eq!(s["running"], true, "{s}");
    assert!(
        s["state_age_seconds"].as_f64().is_some_and(|a| a < 3.0),
        "the receiver's status is current during the stall: {s}"
    );
    assert_eq!(s["storage"], "stalled", "{s}");
    let ongoing = s["stalls"].as_array().and_then(|a| a.last()).cloned();
    assert!(
        ongoing
            .is_some_and(|st| st["duration_seconds"].is_null() && st["since_unix_s"].is_number()),
        "the ongoing stall is listed without an end: {s}"
    );
    let status = pair.agent_status().expect("status");
    assert_eq!(
        started(&pair),
        started_then,
        "the agent started files while the storage was stalled: {status}"
    );
    assert!(
        status["pending"].as_u64().unwrap_or(0) >= 4,
        "the late files are queued: {status}"
    );
    assert_eq!(
        status["daemon"]["receiver"]["storage"], "stalled",
        "agent status shows the receiver's stall: {status}"
    );
    assert!(
        status["daemon"]["receiver"]["stalled_since_unix_s"]
            .as_u64()
            .is_some(),
        "{status}"
    );
    eprintln!(
        "RSS while frozen: agent {} -> max {} KiB, receiver {} -> max {} KiB",
        rss0.0 >> 10,
        rss_max.0 >> 10,
        rss0.1 >> 10,
        rss_max.1 >> 10
    );
    assert!(
        rss_max.0 <= rss0.0 + RSS_SLACK,
        "agent memory grew while stalled"
    );
    assert!(
        rss_max.1 <= rss0.1 + RSS_SLACK,
        "receiver memory grew while stalled"
    );
    assert_eq!(
        metric(
            &agent_addr,
            "skyferry_agent_receiver_storage_state{state=\"stalled\"}"
        )
        .expect("scrape"),
        1.0,
        "still stalled at the end of the freeze"
    );

    // Thawed: it ends by itself and everything arrives intact, no restart.
    fs.thaw().expect("thaw");
    pair.wait_for(Duration::from_secs(20), "stall end logged and seen", |p| {
        p.receiver_log()
            .unwrap_or_default()
            .contains("storage stall ended")
            && p.agent_log().unwrap_or_default().contains("resuming sends")
    });
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("all files arrive after the thaw");
    assert!(report.is_identical(), "{report}");
    assert_eq!(
        metric(
            &agent_addr,
            "skyferry_agent_receiver_storage_state{state=\"ok\"}"
        )
        .expect("scrape"),
        1.0
    );
    // The receiver's status keeps the stall with its length.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = pair.receiver_status().unwrap_or_default();
        let lasted = s["stalls"]
            .as_array()
            .and_then(|a| a.last())
            .and_then(|st| st["duration_seconds"].as_f64());
        if let Some(d) = lasted {
            assert!(
                d >= (FREEZE - detected).as_secs_f64(),
                "stall of {d} s: {s}"
            );
            assert_eq!(s["storage"], "ok", "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "receiver status shows no finished stall: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        (pair.agent_pid(), pair.receiver_pid()),
        (Some(agent_pid), Some(receiver_pid)),
        "the same processes: no restart was needed"
    );
    pair.stop_both().expect("stop");
}
