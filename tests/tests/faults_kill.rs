//! kill -9 of either daemon at seeded random moments during a multi-file transfer, a source
//! file appended to while it is sent, and a corrupt journal. Every run ends with both trees
//! byte-identical.
//!
//! `SKYFERRY_KILLS` sets the number of kills (default 5) and `SKYFERRY_KILL_MB` the data
//! size in MB (default 48); the full run is `SKYFERRY_KILLS=20 SKYFERRY_KILL_MB=1024`.

use std::fs;
use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, env_count, seed, write_atomic, SeededRng};
use skyferry_tests::{Moment, Pair, PairOptions, Side};

const MB: u64 = 1_000_000;
/// The kill tests' chunk size: 1 MiB, so that 1 GiB moves in reasonable time in a debug
/// build while every kill still lands in the middle of files.
const CHUNK: u64 = 1 << 20;
/// The kill tests' per-file window: two chunks, smaller than most files (1..4 MB), so that
/// the re-send bound below is tighter than "the whole file again".
const WINDOW: u64 = 2 * CHUNK;

/// Kills `side` at seeded random moments while files are being sent (20 kills over 1 GiB
/// unless SKYFERRY_KILLS / SKYFERRY_KILL_MB say otherwise), restarting it each time, then
/// checks that everything arrived byte for byte and that each kill cost at most one window
/// re-sent per file in flight, by the agent's own lifetime counter.
fn kill_repeatedly(side: Side, name: &str) {
    let kills = env_count("SKYFERRY_KILLS", 20);
    let total = env_count("SKYFERRY_KILL_MB", 1024) * MB;
    let seed = seed(name, 20);
    let mut rng = SeededRng::new(seed);
    // Straight over loopback: the kills are the fault here, and 1 GiB must move in a
    // debug build within the CI budget.
    let mut pair = Pair::start(PairOptions {
        heartbeat_interval: "1s".into(),
        chunk_size: "1 MiB".into(),
        window: "2 MiB".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    // Incompressible files of 1..4 MB (so that compression does not hide re-sends),
    // written up front.
    let mut written = 0;
    let mut i = 0;
    while written < total {
        let len = (MB + rng.below(3 * MB)).min(total - written);
        let data = rng.bytes(len as usize);
        write_atomic(
            &pair.source().join(format!("n{}/f{i:04}.fits", i % 7)),
            &data,
        )
        .expect("write source");
        written += len;
        i += 1;
    }
    let files = i;
    let started = Instant::now();
    let mut mid_transfer = 0;
    // Files in flight at each kill: the bound on what the kill may cost in re-sends (one
    // window each). After an agent kill the journal's
    // `inflight` rows are exactly those; while the receiver dies the agent keeps at most
    // `parallel_files` in flight.
    let parallel = u64::from(PairOptions::default().parallel_files);
    let mut in_flight_at_kills = 0u64;
    for k in 0..kills {
        // A seeded moment 100..700 ms after the (re)start, taken only while a file is in
        // flight (the receiver holds a partial): a kill between files proves less.
        let delay = Moment::Random {
            seed: rng.next_u64(),
            earliest: Duration::from_millis(100),
            latest: Duration::from_millis(700),
        }
        .delay();
        let since = Instant::now();
        let done = |p: &Pair| {
            skyferry_tests::tree::list_files(&p.published())
                .map(|f| f.len() as u64)
                .unwrap_or(0)
                >= files
        };
        pair.kill_when(side, Duration::from_secs(120), |p| {
            done(p) || (since.elapsed() >= delay && !p.partial_files().is_empty())
        })
        .expect("kill");
        in_flight_at_kills += match side {
            Side::Agent => pair
                .agent_status()
                .ok()
                .and_then(|s| s["inflight"].as_u64())
                .unwrap_or(parallel),
            Side::Receiver => parallel,
        };
        let arrived = skyferry_tests::tree::list_files(&pair.published())
            .map(|f| f.len())
            .unwrap_or(0);
        if (arrived as u64) < files {
            mid_transfer += 1;
        }
        eprintln!(
            "{name}: kill {k} after {:?}; {arrived} of {files} files published",
            since.elapsed()
        );
        pair.restart(side).expect("restart");
        if done(&pair) {
            break;
        }
    }
    let report = pair
        .wait_replicated(Duration::from_secs(600))
        .expect("replication after the kills");
    report.ensure_identical().expect("identical trees");
    eprintln!(
        "{name}: {kills} kills ({mid_transfer} mid-transfer), {files} files, {} bytes in {:?}",
        report.bytes,
        started.elapsed(),
    );
    assert!(
        mid_transfer > 0,
        "at least one kill hit a transfer in progress"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = pair.agent_status().expect("status");
        if status["done"] == files || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["done"], files, "journal: {status}");
    // The agent's own lifetime counter (bytes of chunks sent, re-sends included): every
    // kill costs at most one window per file in flight.
    let sent = status["sent_bytes"]
        .as_u64()
        .expect("status reports sent_bytes");
    let resent = sent.saturating_sub(report.bytes);
    eprintln!(
        "{name}: the agent counted {sent} bytes sent, {resent} re-sent ({:.1} chunks per kill; bound {in_flight_at_kills} windows of {WINDOW} bytes for the files in flight at the kills)",
        resent as f64 / CHUNK as f64 / kills.max(1) as f64
    );
    assert!(
        resent <= in_flight_at_kills * WINDOW,
        "{name}: {resent} bytes re-sent, more than one {WINDOW}-byte window for each of the \
         {in_flight_at_kills} files in flight at the kills"
    );
    assert!(
        pair.partial_files().is_empty(),
        "{:?}",
        pair.partial_files()
    );
}

#[test]
fn receiver_killed_at_random_moments_and_every_file_still_arrives() {
    kill_repeatedly(Side::Receiver, "receiver-kills");
}

#[test]
fn agent_killed_at_random_moments_and_every_file_still_arrives() {
    kill_repeatedly(Side::Agent, "agent-kills");
}

#[test]
fn a_file_appended_to_while_it_is_sent_is_stored_as_one_consistent_version() {
    // A small window over a 40 ms RTT (about 3 MB/s) keeps each version in flight for
    // seconds, so that every append lands mid-transfer.
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        window: "128 KiB".into(),
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_millis(20));
    let path = pair.source().join("movie/m.fits");
    let mut data = content((8 * MB) as usize, 77);
    write_atomic(&path, &data).expect("write");
    // Append while the receiver holds a partial of it, three times.
    let mut versions = vec![data.len()];
    for round in 0..3u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while pair.partial_files().is_empty() {
            assert!(
                Instant::now() < deadline,
                "no transfer started\n{}",
                pair.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let more = content((MB / 2) as usize, 100 + round);
        use std::io::Write;
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&more))
            .expect("append");
        data.extend_from_slice(&more);
        versions.push(data.len());
        // Let the partial of this version go (published, or discarded as superseded).
        std::thread::sleep(Duration::from_millis(400));
    }
    pair.relay().expect("relay").clear();
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("the final version arrives");
    report.ensure_identical().expect("identical trees");
    // Older versions kept aside are each a complete earlier version of the source.
    let kept = skyferry_tests::faults::files_under(&pair.storage().join(".skyferry/versions"));
    for k in &kept {
        let bytes = fs::read(k).expect("read kept version");
        assert!(
            versions.contains(&bytes.len()) && data.starts_with(&bytes),
            "{} is not a version the source ever had ({} bytes)",
            k.display(),
            bytes.len()
        );
    }
    eprintln!("appended 3 times; {} earlier version(s) kept", kept.len());
}

#[test]
fn a_corrupt_journal_stops_the_agent_with_exit_65_and_a_pointer_to_the_docs() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    for i in 0..5 {
        write_atomic(
            &pair.source().join(format!("j/f{i}.fits")),
            &content(300_000, i),
        )
        .expect("write");
    }
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
    assert!(pair.stop_agent().expect("stop").success());

    // Garbage over the journal's pages after the header.
    let journal = pair.journal();
    let len = fs::metadata(&journal).expect("journal").len();
    assert!(len > 4096, "the journal has pages to corrupt ({len} bytes)");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("open");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0xA5; (len - 4096) as usize], 4096)
        .expect("corrupt");
    drop(f);

    pair.start_agent().expect("start agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = pair.agent_exit().expect("exit") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running on a corrupt journal"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(65), "exit status {status}");
    let log = pair.agent_log().expect("log");
    assert!(
        log.contains(&journal.display().to_string()) && log.contains("docs/operations.md"),
        "the message names the journal and the docs:\n{log}"
    );

    // The documented rebuild: move the journal aside and start again; nothing is sent twice.
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", journal.display()));
        if p.exists() {
            fs::rename(&p, format!("{}.corrupt", p.display())).expect("move aside");
        }
    }
    pair.start_agent().expect("start agent on a new journal");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The new journal may not have its tables yet.
        let s = pair.agent_status().unwrap_or_default();
        if s["done"] == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "journal not rebuilt: {s}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = pair.receiver_log().expect("log");
    assert_eq!(
        log.matches("already stored; acknowledged without transfer")
            .count(),
        5,
        "every file was recognised, none re-sent"
    );
}
