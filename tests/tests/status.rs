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

fn set_mtime(path: &std::path::Path, unix: u64) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(unix))
        .expect("set mtime");
}

/// The queue per class while the receiver is down (an outage): 3 live files, 10 old
/// ones (backlog) and a paused replay of 7; `status --json` counts each class as the
/// journal holds it, and once the receiver is back the backlog drains (capped) with a
/// drain ETA that `status` shows.
#[test]
fn status_reports_the_queue_per_class_and_the_backlog_drain_eta() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    pair.write_agent_config(|c| c.push_str("\n[transfer.rates]\nbacklog = \"400kB/s\"\n"))
        .expect("config");
    let mut rng = SeededRng::new(seed("status-classes", 5));
    let mut backlog_bytes = 0;
    for i in 0..10 {
        let data = rng.bytes(300_000);
        backlog_bytes += data.len() as u64;
        let p = pair.source().join(format!("old/f{i:02}.fits"));
        write_atomic(&p, &data).expect("write");
        set_mtime(&p, 1_600_000_000 + i);
    }
    for i in 0..3 {
        write_atomic(
            &pair.source().join(format!("new/f{i}.fits")),
            &rng.bytes(1000),
        )
        .expect("write");
    }
    let archive = pair.dir().join("archive");
    let mut replay_bytes = 0;
    for i in 0..7 {
        let data = rng.bytes(2000 + i);
        replay_bytes += data.len() as u64;
        write_atomic(&archive.join(format!("a{i}.fits")), &data).expect("write");
    }
    // The receiver is down: everything stays queued.
    pair.start_agent().expect("agent");
    // Past its start (journal created and migrated): it writes its state.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&pair, false, true).1.contains("\"running\":true") {
        assert!(Instant::now() < deadline, "{}", pair.diagnostics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let replay = |args: &[&str]| {
        let out = Command::new(pair.agent_bin())
            .arg("replay")
            .args(args)
            .arg("-c")
            .arg(pair.agent_config_path())
            .output()
            .expect("run replay");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = replay(&["--root", archive.to_str().expect("utf-8")]);
    assert!(out.contains("queued 7 files"), "{out}");
    replay(&["pause", "1"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (s, q) = loop {
        let s = json_status(&pair, false);
        let q = s["daemon"]["queues"].clone();
        let files = |c: &str| q[c]["pending_files"].as_u64();
        if (
            files("live"),
            files("backlog"),
            s["daemon"]["replays"][0]["state"].as_str(),
        ) == (Some(3), Some(10), Some("paused"))
        {
            break (s, q);
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the queue by class: {s}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(q["replay"]["pending_files"], 7, "{s}");
    assert_eq!(q["replay"]["pending_bytes"], replay_bytes, "{s}");
    assert_eq!(q["backlog"]["pending_bytes"], backlog_bytes, "{s}");
    assert_eq!(q["live"]["pending_bytes"], 3000, "{s}");
    assert_eq!(q["all"]["pending_files"], 20, "{s}");
    assert_eq!(s["pending"], 20, "the journal's count agrees: {s}");
    assert!(q["backlog"]["eta_seconds"].is_null(), "nothing moves: {s}");
    let r = &s["daemon"]["replays"][0];
    assert_eq!(
        (r["id"].as_u64(), r["queued_files"].as_u64()),
        (Some(1), Some(7)),
        "{s}"
    );
    let (_, text) = status(&pair, false, false);
    for needle in [
        "queue backlog 10 files, 0 in flight, 3.00 MB, lag ",
        "queue replay  7 files, 0 in flight",
        "queue live    3 files",
        "replay 1 ",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
    assert!(text.contains("paused: 0/7 files"), "{text}");

    // The outage ends: the backlog drains at 400 kB/s, ~7 s, and status shows its ETA.
    pair.start_receiver().expect("receiver");
    let deadline = Instant::now() + Duration::from_secs(60);
    let eta = loop {
        let s = json_status(&pair, false);
        let b = &s["daemon"]["queues"]["backlog"];
        if let (Some(eta), Some(files)) = (b["eta_seconds"].as_u64(), b["pending_files"].as_u64()) {
            if eta > 0 && files > 0 {
                assert!(b["throughput_bytes_per_second"].as_f64() > Some(0.0), "{s}");
                break eta;
            }
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the backlog's drain ETA: {s}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(eta < 60, "3 MB at 400 kB/s: {eta} s");
    pair.wait_done(13, Duration::from_secs(120)).expect("done");
    let s = json_status(&pair, false);
    assert_eq!(
        s["done"], 13,
        "live and backlog sent, the paused replay held: {s}"
    );
    assert_eq!(s["pending"], 7, "{s}");
}
