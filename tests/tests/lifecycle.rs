//! Connection lifecycle with the real binaries: a refusal reaches the agent with its
//! reason, a TLS misconfiguration is named for what it is, a restarted receiver is
//! noticed at the agent's next packet (stateless reset), and a SIGTERM drain delivers
//! the verdict of the file in flight.

use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, write_atomic};
use skyferry_tests::{Pair, PairOptions};

/// Waits until `log()` holds a line for which `wanted` is true; returns that line.
fn wait_for_line(
    pair: &Pair,
    what: &str,
    timeout: Duration,
    log: impl Fn(&Pair) -> String,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = log(pair);
        if let Some(line) = text.lines().find(|l| wanted(l)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line {what} within {timeout:?}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agent_log(pair: &Pair) -> String {
    pair.agent_log().unwrap_or_default()
}

fn receiver_log(pair: &Pair) -> String {
    pair.receiver_log().unwrap_or_default()
}

/// The receiver refuses an agent whose id is not a name in its certificate with a
/// `Refuse` frame; the agent gets that frame (not only the close after it) and logs the
/// code and reason as an ERROR.
#[test]
fn an_agent_whose_id_is_not_in_its_certificate_gets_the_refusal_and_logs_it() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    // A certificate from the right CA, for another agent name than `agent.id`.
    let other = pair.issue_agent_identity("kiso-02").expect("identity");
    pair.set_agent_identity(other).expect("use identity");
    pair.start_receiver().expect("start receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("start agent");

    let line = wait_for_line(
        &pair,
        "with the refusal",
        Duration::from_secs(20),
        agent_log,
        |l| l.contains("the receiver refused this agent"),
    );
    assert!(line.contains(" ERROR "), "logged as an ERROR: {line}");
    assert!(line.contains("code=unauthorized"), "names the code: {line}");
    assert!(
        line.contains("is not the name in the agent's certificate"),
        "carries the receiver's reason: {line}"
    );
    assert!(
        line.contains("via=\"refuse frame\""),
        "the Refuse frame itself arrived: {line}"
    );
    // The old symptom: a refusal reported as a TLS problem.
    let log = agent_log(&pair);
    assert!(!log.contains("TLS handshake failed"), "{log}");
    let receiver = receiver_log(&pair);
    assert!(
        receiver.contains("agent refused") && receiver.contains("code=unauthorized"),
        "{receiver}"
    );
    assert!(
        pair.agent_exit().expect("exit").is_none(),
        "the agent keeps trying"
    );
}

/// A wrong `receiver.server_name` is reported as exactly that on the agent (with the
/// names the receiver's certificate does carry), and the receiver says the agent
/// rejected its certificate, not that the agent's certificate is bad.
#[test]
fn a_wrong_server_name_is_named_on_both_sides() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    pair.write_agent_config(|text| {
        *text = text.replace(
            "server_name = \"skyferry-receiver\"",
            "server_name = \"archive.example.org\"",
        );
    })
    .expect("config");
    pair.start_receiver().expect("start receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("start agent");

    let line = wait_for_line(
        &pair,
        "naming server_name",
        Duration::from_secs(20),
        agent_log,
        |l| l.contains("cannot connect to the receiver"),
    );
    assert!(
        line.contains("the receiver's certificate is not valid for server_name")
            && line.contains("archive.example.org")
            && line.contains("skyferry-receiver"),
        "names server_name, its value and the certificate's names: {line}"
    );
    let line = wait_for_line(
        &pair,
        "about the rejected certificate",
        Duration::from_secs(20),
        receiver_log,
        |l| l.contains("agent handshake failed"),
    );
    assert!(
        line.contains("the agent rejected our certificate (alert bad_certificate)")
            && line.contains("receiver.server_name"),
        "{line}"
    );
    assert!(
        !line.contains("the agent's certificate"),
        "does not blame the agent's certificate: {line}"
    );
}

/// kill -9 of the receiver and a new one on the same port: the agent's connection to
/// the dead process is reset at the agent's next packet (the reset key comes from the
/// receiver's TLS key file), so a file written after the restart is stored well before
/// the three heartbeat intervals (15 s) after which the agent would otherwise give up
/// on the connection.
#[test]
fn a_restarted_receiver_is_noticed_at_the_agents_next_packet() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    assert_eq!(pair.options().heartbeat_interval, "5s");
    write_atomic(&pair.source().join("before.fits"), &content(200_000, 1)).expect("write");
    pair.wait_arrived(Duration::from_secs(30))
        .expect("first file");

    pair.kill_receiver().expect("kill -9");
    pair.start_receiver().expect("restart");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening again");
    let restarted = Instant::now();
    write_atomic(&pair.source().join("after.fits"), &content(200_000, 2)).expect("write");
    // Two heartbeat intervals: without the reset the old connection is only given up
    // after three.
    pair.wait_arrived(Duration::from_secs(10))
        .expect("the file written after the restart arrives within two heartbeat intervals");
    eprintln!(
        "restart: file stored {:?} after the new receiver listened",
        restarted.elapsed()
    );
    let log = agent_log(&pair);
    let reset = log
        .lines()
        .find(|l| l.contains("disconnected from the receiver"))
        .unwrap_or_default();
    assert!(
        reset.contains("stateless reset"),
        "the agent learnt of the restart from a stateless reset: {reset:?}\n{log}"
    );
}

/// SIGTERM while a file is in flight: the receiver finishes it within its grace period
/// and only closes once the agent has the `Ack`, so the agent's journal says done (and
/// nothing is offered again after the restart). Five rounds, all must pass.
#[test]
fn sigterm_drain_delivers_the_verdict_of_the_file_in_flight() {
    let mut pair = Pair::start(PairOptions {
        via_relay: true,
        ..PairOptions::default()
    })
    .expect("start pair");
    // 2 × 5 ms per chunk round trip: an 8 MB file (123 chunks) is in flight for over a
    // second, and the last Ack is still on its way when the receiver's sessions end.
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_millis(5));
    const ROUNDS: u64 = 5;
    let mut in_flight = 0;
    for round in 0..ROUNDS {
        let name = format!("drain/f{round}.fits");
        write_atomic(&pair.source().join(&name), &content(8_000_000, 10 + round)).expect("write");
        let deadline = Instant::now() + Duration::from_secs(60);
        while pair.partial_files().is_empty() && !pair.published().join(&name).exists() {
            assert!(
                Instant::now() < deadline,
                "round {round}: the transfer never started\n{}",
                pair.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if !pair.partial_files().is_empty() {
            in_flight += 1;
        }
        let status = pair.stop_receiver().expect("SIGTERM");
        assert!(status.success(), "round {round}: receiver exited {status}");
        assert!(
            pair.published().join(&name).exists(),
            "round {round}: the drain finished the file in flight\n{}",
            pair.diagnostics()
        );
        // The receiver is gone: whatever the journal says now, it heard before the close.
        let deadline = Instant::now() + Duration::from_secs(5);
        let done = loop {
            let done = pair.agent_status().expect("status")["done"]
                .as_u64()
                .unwrap_or(0);
            if done == round + 1 || Instant::now() >= deadline {
                break done;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            done,
            round + 1,
            "round {round}: the agent did not get the Ack of {name} before the receiver closed\n{}",
            pair.diagnostics()
        );
        pair.start_receiver().expect("restart");
        pair.wait_receiver_listening(Duration::from_secs(10))
            .expect("listening");
    }
    let report = pair
        .wait_replicated(Duration::from_secs(60))
        .expect("replicated");
    report.ensure_identical().expect("identical");
    let offers = receiver_log(&pair)
        .matches("already stored; acknowledged without transfer")
        .count();
    assert_eq!(offers, 0, "no file was offered again after a restart");
    eprintln!("drain: {ROUNDS} rounds, {in_flight} with the file in flight at SIGTERM");
    assert!(
        in_flight > 0,
        "at least one SIGTERM hit a transfer in progress"
    );
}
