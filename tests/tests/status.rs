//! `status` of both daemons, from the state files the running daemons rewrite every
//! second: the fields are present and plausible during a transfer, and `status` of a
//! stopped daemon says so.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use skyferry_tests::faults::{seed, write_atomic, SeededRng};
use skyferry_tests::{Pair, PairOptions};

fn status(pair: &Pair, receiver: bool, json: bool) -> (bool, String) {
    let (bin, config) = if receiver {
        (pair.receiver_bin(), pair.receiver_config_path())
    } else {
        (pair.agent_bin(), pair.agent_config_path())
    };
    let mut c = Command::new(bin);
    c.args(["status", "--config"]).arg(config);
    if json {
        c.arg("--json");
    }
    let out = c.output().expect("run status");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn json_status(pair: &Pair, receiver: bool) -> Value {
    let (ok, text) = status(pair, receiver, true);
    assert!(ok, "status failed: {text}");
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn status_of_both_daemons_during_a_transfer_and_after_they_stopped() {
    let mut pair = Pair::new(PairOptions {
        heartbeat_interval: "1s".into(),
        parallel_files: 2,
        ..PairOptions::default()
    })
    .expect("pair");
    let mut rng = SeededRng::new(seed("status", 3));
    for i in 0..30 {
        write_atomic(
            &pair.source().join(format!("n/f{i:02}.fits")),
            &rng.bytes(8_000_000),
        )
        .expect("write");
    }
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");

    // During the transfer: connected, a heartbeat from the receiver, moving bytes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let agent = loop {
        // The journal's tables appear a moment after the agent starts.
        let (ok, text) = status(&pair, false, true);
        let s: Value = if ok {
            serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
        } else {
            Value::Null
        };
        let d = &s["daemon"];
        let moving = d["throughput_bytes_per_second"].as_f64().unwrap_or(0.0) > 0.0;
        if d["connection"] == "connected" && d["receiver"]["storage"] == "ok" && moving {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent status never showed a transfer: {s}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let d = &agent["daemon"];
    assert_eq!(d["running"], true, "{agent}");
    assert!(
        d["state_age_seconds"].as_f64().expect("age") < 3.0,
        "{agent}"
    );
    let q = &d["queues"]["all"];
    for key in ["pending_files", "inflight_files", "pending_bytes"] {
        assert!(q[key].is_u64(), "{key}: {agent}");
    }
    assert!(
        q["pending_bytes"].as_u64().expect("bytes") <= 30 * 8_000_000,
        "{agent}"
    );
    assert!(
        d["receiver"]["free_bytes"].as_u64().expect("free") > 0,
        "{agent}"
    );
    let load1 = d["node_load"]["load1"].as_f64().expect("load1 on Linux");
    assert!((0.0..10_000.0).contains(&load1), "{agent}");
    assert!(d["receiver"]["node_load"]["load1"].is_f64(), "{agent}");
    let (_, text) = status(&pair, false, false);
    for needle in [
        "agent running",
        "connection  connected",
        "throughput",
        "queue all",
        "receiver    storage ok",
        "node load",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    let receiver = loop {
        let s = json_status(&pair, true);
        if s["agents"]["kiso-01"]["last_heartbeat"].is_object() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "receiver status never showed the agent: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(receiver["running"], true, "{receiver}");
    assert_eq!(receiver["storage"], "ok", "{receiver}");
    assert!(
        receiver["agents"]["kiso-01"]["connections"]
            .as_u64()
            .expect("connections")
            >= 1,
        "{receiver}"
    );
    assert!(
        receiver["stalls"].as_array().is_some_and(|s| s.is_empty()),
        "{receiver}"
    );
    assert!(receiver["node_load"]["load1"].is_f64(), "{receiver}");
    let (_, text) = status(&pair, true, false);
    for needle in [
        "receiver running",
        "storage     ok",
        "agent \"kiso-01\": 1 connection(s), heartbeat",
        "stalls      none",
        "node load",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }

    pair.wait_replicated(Duration::from_secs(120))
        .expect("replicated");
    pair.stop_both().expect("stop");
    let agent = json_status(&pair, false);
    assert_eq!(agent["daemon"]["running"], false, "{agent}");
    assert_eq!(agent["done"], 30, "{agent}");
    let (_, text) = status(&pair, false, false);
    assert!(text.contains("agent not running (last state at "), "{text}");
    let receiver = json_status(&pair, true);
    assert_eq!(receiver["running"], false, "{receiver}");
    let (_, text) = status(&pair, true, false);
    assert!(
        text.contains("receiver not running (last state at "),
        "{text}"
    );
}
