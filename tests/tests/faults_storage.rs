//! Faults of the receiver's storage: a filesystem that fills up, a chunk corrupted in a
//! partial file on disk while the receiver is down, and partial files of an agent that
//! never comes back. Each ends byte-identical, with nothing partial ever published.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use skyferry_tests::faults::{seed, write_atomic, SeededRng, Tmpfs};
use skyferry_tests::tree::compare_trees;
use skyferry_tests::{Pair, PairOptions, Side};

const MB: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

/// Header of a partial chunk log (docs/protocol.md §8) before the path.
const LOG_HEADER: u64 = 4 + 1 + 8 + 8 + 1 + 32 + 4 + 2;
/// One chunk slot; slots sit at fixed positions, so the log's length (header, path,
/// slots up to the highest written) tells how far a file received in order got.
const LOG_RECORD: u64 = 33;

/// Every published file equals its source: nothing partial or foreign is visible.
fn assert_published_are_complete(pair: &Pair) {
    let report = compare_trees(&pair.source(), &pair.published()).expect("compare");
    assert!(
        report.differing.is_empty() && report.extra.is_empty(),
        "a published file is partial or foreign: {report}"
    );
}

/// Chunks recorded in the (only) partial log of the pair.
fn logged_chunks(pair: &Pair) -> u64 {
    pair.partial_files()
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len().saturating_sub(LOG_HEADER + 8) / LOG_RECORD)
        .max()
        .unwrap_or(0)
}

#[test]
fn a_full_filesystem_is_reported_nothing_partial_is_published_and_all_arrives_after() {
    let mut pair = Pair::new(PairOptions {
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("pair");
    let Some(tmpfs) = Tmpfs::mount(&pair.storage(), 40 * MIB).expect("mount") else {
        return; // skipped, with the reason printed
    };
    let mut rng = SeededRng::new(seed("storage-full", 11));
    // Four big files first (they are claimed first, together): 48 MB cannot fit in
    // 40 MiB, so writes fail with ENOSPC halfway; then small ones.
    for i in 0..4 {
        write_atomic(
            &pair.source().join(format!("big/b{i}.fits")),
            &rng.bytes((12 * MB) as usize),
        )
        .expect("write");
    }
    for i in 0..6 {
        write_atomic(
            &pair.source().join(format!("small/s{i}.fits")),
            &rng.bytes((2 * MB) as usize),
        )
        .expect("write");
    }
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");

    pair.wait_for(Duration::from_secs(60), "storage full reported", |p| {
        let r = p.receiver_log().unwrap_or_default();
        let a = p.agent_log().unwrap_or_default();
        r.contains("storage full") && (a.contains("storage_full") || a.contains("storage=Full"))
    });
    let receiver_log = pair.receiver_log().expect("log");
    assert!(
        receiver_log.contains("No space left on device")
            || receiver_log.contains("needs")
            || receiver_log.contains("disk is full"),
        "a write (file or inventory) hit ENOSPC or an offer was refused for lack of space:\n{receiver_log}"
    );
    // Either a write hit ENOSPC, the heartbeat says full (nothing but space clears that
    // mark) and the agent pauses; or (when the first files filled the disk before the
    // others were offered) every remaining file is refused on its own at its offer. The
    // agent stops sending either way.
    pair.wait_for(
        Duration::from_secs(30),
        "agent paused or every file refused",
        |p| {
            let paused = p
                .receiver_log()
                .unwrap_or_default()
                .contains("heartbeats tell agents to pause")
                && p.agent_log().unwrap_or_default().contains("pausing sends");
            let refused = p
                .agent_log()
                .unwrap_or_default()
                .matches("code=storage_full")
                .count()
                >= 8;
            paused || refused
        },
    );
    let paused = pair.agent_log().expect("log").contains("pausing sends");
    // While full: whatever is published is complete, and it stays so.
    assert_published_are_complete(&pair);
    std::thread::sleep(Duration::from_secs(2));
    assert_published_are_complete(&pair);
    let before = compare_trees(&pair.source(), &pair.published()).expect("compare");
    assert!(
        !before.missing.is_empty(),
        "the filesystem really filled up"
    );

    // Space returns.
    tmpfs.resize(256 * MIB).expect("grow the filesystem");
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("every file arrives once there is space");
    report.ensure_identical().expect("identical");
    assert_eq!(report.files, 10);
    let agent_log = pair.agent_log().expect("log");
    assert!(
        !paused || agent_log.contains("resuming sends"),
        "{agent_log}"
    );
    // Stop before the filesystem is unmounted.
    pair.stop_agent().expect("stop agent");
    pair.stop_receiver().expect("stop receiver");
    drop(tmpfs);
}

#[test]
fn a_chunk_corrupted_in_a_partial_on_disk_is_detected_and_sent_again() {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("pair");
    // A slow link, so that the receiver can be killed with the file half received.
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_millis(30));
    let mut rng = SeededRng::new(seed("corrupt-chunk", 3));
    let data = rng.bytes((12 * MB) as usize);
    write_atomic(&pair.source().join("n/frame.fits"), &data).expect("write");
    pair.kill_when(Side::Receiver, Duration::from_secs(60), |p| {
        logged_chunks(p) >= 20
    })
    .expect("kill the receiver mid-file");
    let logged = logged_chunks(&pair);
    let part = pair
        .partial_files()
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "part"))
        .expect("a partial file");
    // Flip bytes in chunk 3, which the log records as verified.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part)
        .expect("open partial");
    let offset = 3 * 64 * 1024 + 1000;
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, offset).expect("read");
    for x in &mut b {
        *x = !*x;
    }
    f.write_all_at(&b, offset).expect("corrupt");
    drop(f);
    eprintln!(
        "corrupted chunk 3 of {} ({logged} chunks logged)",
        part.display()
    );

    pair.relay().expect("relay").clear();
    pair.restart(Side::Receiver).expect("restart receiver");
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replicated");
    report.ensure_identical().expect("identical");
    // The resumed partial is read back before the receiver answers the offer: chunk 3 no
    // longer matches its recorded value and is asked for again, with no failed commit.
    let receiver_log = pair.receiver_log().expect("log");
    assert!(
        receiver_log.contains("do not match their recorded values")
            && receiver_log.contains("chunks=[3]"),
        "the receiver found exactly chunk 3:\n{receiver_log}"
    );
    let agent_log = pair.agent_log().expect("log");
    assert!(!agent_log.contains("hash_mismatch"), "{agent_log}");
}

#[test]
fn partials_of_an_agent_that_never_comes_back_are_removed() {
    // A small window over a 60 ms RTT keeps the file in flight long enough to be killed
    // in the middle.
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        window: "128 KiB".into(),
        heartbeat_interval: "1s".into(),
        partial_max_age: Some("2s".into()),
        ..PairOptions::default()
    })
    .expect("pair");
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_millis(30));
    let mut rng = SeededRng::new(seed("partial-sweep", 4));
    write_atomic(
        &pair.source().join("gone/frame.fits"),
        &rng.bytes((12 * MB) as usize),
    )
    .expect("write");
    pair.kill_when(Side::Agent, Duration::from_secs(60), |p| {
        logged_chunks(p) >= 5
    })
    .expect("kill the agent mid-file");
    assert!(!pair.partial_files().is_empty());
    pair.wait_for(Duration::from_secs(20), "partial removed", |p| {
        p.partial_files().is_empty()
    });
    let log = pair.receiver_log().expect("log");
    assert!(log.contains("removed an abandoned partial file"), "{log}");
    assert!(!pair.published().join("gone/frame.fits").exists());

    // The agent comes back after all: the file is sent again from the start.
    pair.relay().expect("relay").clear();
    pair.start_agent().expect("restart agent");
    pair.wait_replicated(Duration::from_secs(120))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
}
