//! The agent's view of the link, as an SRE sees it in Prometheus: quinn's statistics
//! (`skyferry_agent_quic_*`) checked against what the harness's relay really did, and
//! counters that keep growing across a reconnect.

use std::time::Duration;

use skyferry_tests::faults::{content, seed, write_atomic};
use skyferry_tests::redis::{metric, metrics_table, start_pair_with, wait_until};
use skyferry_tests::relay::Direction;
use skyferry_tests::{Pair, PairOptions};

const SENT: &str = "skyferry_agent_quic_sent_packets_total";
const LOST: &str = "skyferry_agent_quic_lost_packets_total";
const DATAGRAMS: &str = "skyferry_agent_quic_udp_tx_datagrams_total";
const TX_BYTES: &str = "skyferry_agent_quic_udp_tx_bytes_total";
const CONGESTION: &str = "skyferry_agent_quic_congestion_events_total";
const COUNTERS: [&str; 5] = [SENT, LOST, DATAGRAMS, TX_BYTES, CONGESTION];

/// `count` files of 1 MB (about half of it compressible) under `dir`.
fn burst(pair: &Pair, dir: &str, count: usize) {
    for i in 0..count {
        write_atomic(
            &pair.source().join(format!("{dir}/det{i:02}.fits")),
            &content(1_000_000, (dir.len() * 100 + i) as u64),
        )
        .expect("write source file");
    }
}

fn read(addr: &str, series: &str) -> f64 {
    metric(addr, series).expect("metrics endpoint")
}

#[test]
fn quic_metrics_match_the_relays_drops_and_never_go_backwards_across_a_reconnect() {
    let (metrics, addr) = metrics_table().expect("port");
    let opts = PairOptions {
        via_relay: true,
        relay_seed: seed("quic_metrics", 11),
        ..PairOptions::default()
    };
    let mut pair = start_pair_with(opts, &metrics, |p| {
        let relay = p.relay().expect("relay");
        relay.set_loss(0.02);
        relay.set_delay(Duration::from_millis(2));
        Ok(())
    })
    .expect("pair");

    // First connection: a lossy burst.
    burst(&pair, "first", 24);
    pair.wait_replicated(Duration::from_secs(120))
        .expect("first burst")
        .ensure_identical()
        .expect("identical trees");
    let relay = pair.relay().expect("relay");
    let dropped_up = relay.stats().dropped[Direction::Up as usize] as f64;
    assert!(dropped_up > 0.0, "the relay dropped agent datagrams");
    // Quinn declares a dropped packet lost once later ones are acknowledged; the metrics
    // copy its statistics every second.
    wait_until(
        Duration::from_secs(15),
        "lost packets to reach half the relay's drops",
        || Ok(read(&addr, LOST) >= dropped_up / 2.0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    std::thread::sleep(Duration::from_millis(1500)); // one more copy of quinn's numbers
    let (lost, datagrams) = (read(&addr, LOST), read(&addr, DATAGRAMS));
    let stats = relay.stats();
    // The agent's datagrams that never reached the relay: sends that failed in the agent
    // (nothing else drops on loopback but a full socket buffer).
    let unseen = (datagrams - stats.received[Direction::Up as usize] as f64).max(0.0);
    eprintln!("quinn: lost {lost} of {datagrams} datagrams; relay: {stats:?}");
    // Every loss quinn counts is one the relay made or a datagram that never reached it;
    // a few may be spurious (declared lost, acknowledged late).
    assert!(
        lost <= stats.dropped[Direction::Up as usize] as f64 + unseen + 10.0,
        "quinn lost {lost} packets; the relay dropped {dropped_up} of the agent's datagrams \
         and {unseen} never reached it: {stats:?}"
    );
    assert!(read(&addr, SENT) > lost * 10.0, "sent packets counted");
    assert!(read(&addr, DATAGRAMS) > 0.0 && read(&addr, TX_BYTES) > 0.0);
    assert!(read(&addr, CONGESTION) >= 1.0, "2% loss reduces the window");
    let mtu = read(&addr, "skyferry_agent_quic_mtu_bytes");
    assert!((1200.0..=65_535.0).contains(&mtu), "path mtu {mtu}");
    let rtt = read(&addr, "skyferry_agent_quic_rtt_seconds");
    assert!(
        rtt >= 0.004,
        "rtt {rtt} s includes the relay's 2 ms each way"
    );
    assert!(read(&addr, "skyferry_agent_quic_congestion_window_bytes") > 0.0);

    // Reconnect: the receiver restarts; a much smaller second burst on the new connection.
    relay.set_loss(0.0);
    let status = pair.stop_receiver().expect("stop receiver");
    assert!(status.success(), "receiver exit {status}");
    let before: Vec<f64> = COUNTERS.iter().map(|c| read(&addr, c)).collect();
    pair.start_receiver().expect("restart receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    wait_until(Duration::from_secs(30), "the agent to reconnect", || {
        Ok(read(&addr, "skyferry_agent_connects_total") >= 2.0)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    burst(&pair, "second", 1);
    pair.wait_replicated(Duration::from_secs(60))
        .expect("second burst")
        .ensure_identical()
        .expect("identical trees");
    // The second connection sent far fewer packets than the first: a counter that showed
    // only the current connection would now be lower than before the reconnect.
    wait_until(
        Duration::from_secs(10),
        "packets of the second connection",
        || Ok(read(&addr, SENT) > before[0] + 30.0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    for (name, was) in COUNTERS.iter().zip(&before) {
        let now = read(&addr, name);
        assert!(
            now >= *was,
            "{name} went from {was} to {now} across a reconnect"
        );
    }
}
