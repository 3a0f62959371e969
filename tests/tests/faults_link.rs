//! A bad link between agent and receiver, made by the harness's UDP relay: datagram loss
//! with delay, and a partition in the middle of a burst. Every test ends with both trees
//! byte-identical and each file stored exactly once.

use std::path::Path;
use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, env_count, seed, write_atomic};
use skyferry_tests::{Pair, PairOptions};

/// Files written as a burst: `count` files of 150..450 kB under `dir`, from index `from`.
fn burst(root: &Path, dir: &str, from: usize, count: usize) -> u64 {
    let mut bytes = 0;
    for i in from..from + count {
        let len = 150_000 + (i * 7919) % 300_000;
        write_atomic(
            &root.join(format!("{dir}/det{:02}.fits", i)),
            &content(len, i as u64),
        )
        .expect("write source file");
        bytes += len as u64;
    }
    bytes
}

/// Each published file was stored exactly once: one "stored" line per file in the
/// receiver's log, and no earlier version kept aside (which a second store of a changed
/// file would leave).
fn assert_stored_once(pair: &Pair, files: usize) {
    // The last acknowledgements may still be on their way to the journal.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair.agent_status().expect("agent status")["done"] != files && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = pair.receiver_log().expect("receiver log");
    let stored = log
        .lines()
        .filter(|l| l.contains("}: stored agent="))
        .count();
    assert_eq!(stored, files, "one store per file:\n{log}");
    let versions = pair.storage().join(".skyferry/versions");
    let kept = skyferry_tests::faults::files_under(&versions);
    assert!(kept.is_empty(), "no file was replaced: {kept:?}");
    assert!(
        pair.partial_files().is_empty(),
        "no partial left: {:?}",
        pair.partial_files()
    );
    let status = pair
        .wait_done(files as u64, Duration::from_secs(10))
        .expect("agent status");
    assert_eq!(status["done"], files, "journal: {status}");
    assert_eq!(status["pending"], 0, "journal: {status}");
}

#[test]
fn five_percent_loss_and_20ms_delay_each_way_still_complete() {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        relay_seed: seed("loss", 5),
        ..PairOptions::default()
    })
    .expect("start pair");
    let relay = pair.relay().expect("relay");
    relay.set_loss(0.05);
    relay.set_delay(Duration::from_millis(20));
    let started = Instant::now();
    let bytes = burst(&pair.source(), "lossy", 0, 16);
    let report = pair
        .wait_replicated(Duration::from_secs(180))
        .expect("replication over a lossy link");
    report.ensure_identical().expect("identical trees");
    let stats = pair.relay().expect("relay").stats();
    eprintln!(
        "{bytes} bytes in {:?} over 5% loss + 20 ms each way; relay: {stats:?}",
        started.elapsed()
    );
    assert!(
        stats.dropped[0] > 0 && stats.dropped[1] > 0,
        "the relay really dropped datagrams both ways: {stats:?}"
    );
    assert_stored_once(&pair, 16);
}

/// Files keep arriving during a partition; the agent journals them, notices the dead link
/// (three missed heartbeats), reconnects once the link heals and ships everything once.
fn partition_in_a_burst(heartbeat: &str, partition: Duration) {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        heartbeat_interval: heartbeat.into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    let src = pair.source();
    burst(&src, "before", 0, 20);
    // Partition while the first files are still on the way.
    std::thread::sleep(Duration::from_millis(300));
    pair.relay().expect("relay").partition();
    let cut = Instant::now();
    burst(&src, "during", 20, 20);
    while cut.elapsed() < partition {
        pair.ensure_alive().expect("daemons survive the partition");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = pair.agent_log().expect("agent log");
    assert!(
        log.contains("disconnected from the receiver"),
        "the agent noticed the partition:\n{log}"
    );
    pair.relay().expect("relay").heal();
    let healed = Instant::now();
    burst(&src, "after", 40, 10);
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication after the partition");
    report.ensure_identical().expect("identical trees");
    eprintln!(
        "partition of {partition:?}: all {} files arrived {:?} after healing; relay: {:?}",
        report.files,
        healed.elapsed(),
        pair.relay().expect("relay").stats()
    );
    let log = pair.agent_log().expect("agent log");
    let after_cut = &log[log.find("disconnected from the receiver").unwrap_or(0)..];
    assert!(
        after_cut.contains("connected receiver="),
        "the agent logged the reconnect:\n{log}"
    );
    assert_eq!(report.files, 50);
    assert_stored_once(&pair, 50);
}

#[test]
fn a_partition_in_a_burst_heals_and_every_file_arrives_once() {
    let secs = env_count("SKYFERRY_PARTITION_SECS", 8);
    partition_in_a_burst("1s", Duration::from_secs(secs));
}

/// The scenario as it is: a full minute of partition with the production heartbeat
/// of 5 s, so both sides declare the peer dead, reconnect attempts back off, and the pair
/// converges after healing. About 70 s.
#[test]
fn a_sixty_second_partition_heals_and_every_file_arrives_once() {
    partition_in_a_burst("5s", Duration::from_secs(60));
}

/// Quinn's path statistics as the agent logs them when a connection ends.
fn connection_stats(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("connection ended"))?;
    let field = |name: &str| -> Option<u64> {
        let rest = &line[line.find(&format!("{name}="))? + name.len() + 1..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((field("lost_packets")?, field("mtu")?))
}

/// Jumbo-sized datagrams in full GSO batches once exceeded what one `sendmsg` may carry:
/// the kernel refused every full batch (EMSGSIZE), quinn-udp dropped it silently, quinn
/// counted thousands of packets lost that no network dropped, and black-hole detection
/// pinned the MTU at 1200 bytes (3 MB/s at 15 ms RTT). Through a relay that drops nothing,
/// every packet quinn counts lost must have been lost somewhere we can see, and the MTU
/// stays jumbo to the loopback receiver.
///
/// Where the rest went: quinn counted 1.5–5 % lost here and the relay dropped none; the
/// kernel dropped exactly that many datagrams at the receiver's UDP socket (its receive
/// buffer, capped by `net.core.rmem_max`, overflowed: `RcvbufErrors` in /proc/net/snmp,
/// `drops` of that socket in /proc/net/udp) while the receiver was slower than the
/// relay's bursts. Those are real losses at the receiving host, so they are counted, not
/// excused: quinn's count must match the relay's drops plus the receiver socket's.
#[test]
fn a_lossless_long_link_shows_no_phantom_loss_and_keeps_its_mtu() {
    let mut pair = Pair::new(PairOptions {
        via_relay: true,
        chunk_size: "4 MiB".into(),
        ..PairOptions::default()
    })
    .expect("pair");
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_micros(7500));
    let bytes = 96usize << 20;
    std::fs::write(pair.source().join("movie.fits"), content(bytes, 3)).expect("source");
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    // The receiver's socket, and the relay's own socket towards the agent.
    let ports = [pair.port(), pair.relay().expect("relay").addr().port()];
    let drops = || ports.map(|p| skyferry_tests::sockets::udp_drops(p).unwrap_or(0));
    let drops_before = drops();
    pair.start_agent().expect("agent");
    pair.wait_replicated(Duration::from_secs(240))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
    pair.stop_agent().expect("stop agent");
    let [receiver_drops, relay_socket_drops] = {
        let after = drops();
        [after[0] - drops_before[0], after[1] - drops_before[1]]
    };
    let log = pair.agent_log().expect("agent log");
    let (lost, mtu) = connection_stats(&log).expect("the agent logged its connection stats");
    let relay = pair.relay().expect("relay").stats();
    eprintln!(
        "quinn lost {lost} packets, mtu {mtu}; the receiver's socket dropped {receiver_drops}, \
         the relay's socket {relay_socket_drops}; relay {relay:?}"
    );
    assert_eq!(relay.dropped, [0, 0], "the relay dropped nothing");
    // Alone on the machine quinn's count matched these drops exactly (0 of 0, 53 of 53,
    // 103 of 103, 186 of 186); under the full suite's load up to 1.4 % more were counted
    // lost without a drop we can see (not explained yet: the agent's own send path, or
    // time-threshold declarations while its runtime was starved). Allow 2.5 % unexplained,
    // against 12.5 % of everything before; the GSO failure lost about 40 %.
    let seen = receiver_drops
        + relay_socket_drops
        + relay.dropped[0]
        + relay.overflowed[0]
        + relay.send_failed[0];
    assert!(
        lost <= seen + relay.forwarded[0] / 40,
        "quinn counted {lost} packets lost of {} sent; the relay and the sockets dropped {seen}",
        relay.forwarded[0]
    );
    assert_eq!(
        mtu, 8952,
        "MTU discovery keeps jumbo datagrams to a loopback receiver"
    );
}

/// One of four connections loses its path in the middle of a burst (the relay
/// black-holes that one agent socket both ways): the agent notices that lane's silence,
/// returns only its files to the queue, the other lanes ship them, and every file arrives
/// once while the lane stays cut.
#[test]
fn a_lane_whose_path_dies_requeues_only_its_files_and_the_others_ship_them_once() {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        connections: 4,
        parallel_files: 4,
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    let relay = pair.relay().expect("relay");
    relay.set_delay(Duration::from_millis(5));
    // A bottleneck (16 Mbit/s), so that the burst (~18 MB: ~9 s) outlasts the three heartbeats it
    // takes to notice the cut and every lane has a file in flight when it comes.
    relay.set_rate(16_000_000, Duration::from_millis(50));
    // Every lane says hello before the burst, so that each has a socket to cut.
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.clients().len() < 4 {
        assert!(
            Instant::now() < deadline,
            "four lanes: {:?}",
            relay.clients()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let src = pair.source();
    burst(&src, "striped", 0, 60);
    std::thread::sleep(Duration::from_millis(800));
    let victim = relay.clients()[1];
    relay.cut(victim);
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication with one lane cut");
    report.ensure_identical().expect("identical trees");
    let log = pair.agent_log().expect("agent log");
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnected from the receiver"))
        .collect();
    let lanes: std::collections::BTreeSet<&str> = lost
        .iter()
        .filter_map(|l| l.split("lane{lane=").nth(1)?.split('}').next())
        .collect();
    assert_eq!(lanes.len(), 1, "exactly one lane was lost: {lost:?}\n{log}");
    // Its file in flight went back to the queue, and other lanes stored files after.
    let victim = format!(
        "lane{{lane={}}}",
        lanes.iter().next().copied().unwrap_or_default()
    );
    let cut_at = log.find(lost[0]).unwrap_or(0);
    assert!(
        log[cut_at..]
            .lines()
            .any(|l| l.contains(": stored path=") && !l.contains(&victim)),
        "other lanes stored files after the loss:\n{log}"
    );
    let stats = pair.relay().expect("relay").stats();
    assert!(
        stats.blackholed[0] > 0,
        "the cut lane tried to send: {stats:?}"
    );
    eprintln!(
        "one lane cut: {} files arrived; relay {stats:?}",
        report.files
    );
    assert_eq!(report.files, 60);
    assert_stored_once(&pair, 60);
}

/// A file that keeps the link full (a bottleneck, one large live file queued for the
/// whole transfer) does not silence the connection: the agent's heartbeats leave before
/// file data, so neither side drops the connection as dead. They once waited behind the
/// live file's data (its stream had the higher priority), and the receiver closed the
/// connection after three intervals of silence, again and again.
#[test]
fn heartbeats_leave_while_a_large_file_fills_the_link() {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        heartbeat_interval: "1s".into(),
        ..PairOptions::default()
    })
    .expect("start pair");
    let relay = pair.relay().expect("relay");
    relay.set_delay(Duration::from_millis(5));
    // 80 Mbit/s: 64 MiB take about 7 s, more than twice the 3 s that count as silence.
    relay.set_rate(80_000_000, Duration::from_millis(50));
    let len = 64 << 20;
    write_atomic(&pair.source().join("big/exposure.fits"), &content(len, 5))
        .expect("write the file");
    let report = pair
        .wait_replicated(Duration::from_secs(120))
        .expect("replication through the bottleneck");
    report.ensure_identical().expect("identical trees");
    assert_eq!((report.files, report.bytes), (1, len as u64));
    let receiver = pair.receiver_log().expect("receiver log");
    assert!(
        !receiver.contains("no heartbeat from agent"),
        "the receiver heard the agent all along:\n{receiver}"
    );
    let agent = pair.agent_log().expect("agent log");
    assert!(
        !agent.contains("disconnected from the receiver"),
        "the agent kept its connection:\n{agent}"
    );
}
