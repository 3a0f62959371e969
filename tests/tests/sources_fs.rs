//! The filesystem source end to end: a large tree present before the start, a slow
//! writer, a file replaced or deleted while queued, the blocklist and its reload on
//! SIGHUP, and `check-config` on bad globs.

use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, must_write as write_atomic};
use skyferry_tests::redis::{start_pair_with, wait_until};
use skyferry_tests::{Pair, PairOptions};

/// No older version was moved aside on the receiver: nothing was stored twice.
fn no_old_versions(pair: &Pair) -> bool {
    let dir = pair.storage().join(".skyferry/versions");
    skyferry_tests::tree::list_files(&dir).is_ok_and(|files| files.is_empty())
}

/// The journal's count of `state`; 0 while the agent has not created its journal yet.
fn status(pair: &Pair, state: &str) -> u64 {
    pair.agent_status()
        .map(|s| s[state].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

/// Waits until the agent's watch is up (files written before it are found by a rescan,
/// which cannot tell a paused writer from a finished one).
fn wait_watching(pair: &Pair) {
    wait_until(Duration::from_secs(20), "the agent's watch", || {
        Ok(pair.agent_log()?.contains("INFO watching"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

fn wait_status(pair: &Pair, state: &str, n: u64) {
    wait_until(Duration::from_secs(30), &format!("{n} {state}"), || {
        Ok(status(pair, state) == n)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

#[test]
fn ten_thousand_files_present_before_the_start_are_all_shipped() {
    let opts = PairOptions {
        parallel_files: 64,
        ..PairOptions::default()
    };
    let started = Instant::now();
    let mut pair = start_pair_with(opts, "", |p| {
        for i in 0..10_000usize {
            let path = p.source().join(format!(
                "night-{}/exp{:03}/det{:02}.fits",
                i % 2,
                i / 84,
                i % 84
            ));
            fs::create_dir_all(path.parent().expect("parent"))?;
            fs::write(&path, content(64 + i % 512, i as u64))?;
        }
        Ok(())
    })
    .expect("pair");
    let report = pair
        .wait_replicated(Duration::from_secs(240))
        .expect("replication");
    report.ensure_identical().expect("identical");
    assert_eq!(report.files, 10_000);
    assert_eq!(status(&pair, "done"), 10_000);
    eprintln!("10,000 files shipped in {:?}", started.elapsed());
}

#[test]
fn a_file_written_slowly_is_shipped_once_and_complete() {
    let mut pair = Pair::start(PairOptions::default()).expect("pair");
    wait_watching(&pair);
    let path = pair.source().join("slow/movie.fits");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let data = content(300_000, 7);
    let mut f = fs::File::create(&path).expect("create");
    // 12 writes over ~3.3 s: much longer than the 200 ms settle time.
    for piece in data.chunks(25_000) {
        f.write_all(piece).expect("write");
        f.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(f);
    let report = pair
        .wait_replicated(Duration::from_secs(60))
        .expect("replication");
    report.ensure_identical().expect("complete file");
    std::thread::sleep(Duration::from_secs(1)); // nothing else may follow
    assert_eq!(status(&pair, "done"), 1, "shipped once");
    assert_eq!(status(&pair, "superseded"), 0, "no partial version queued");
    assert!(no_old_versions(&pair), "no partial version was stored");
}

#[test]
fn a_file_replaced_after_being_queued_is_stored_as_the_new_version() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    pair.start_agent().expect("agent"); // the receiver is down: files stay queued
    wait_watching(&pair);
    let path = pair.source().join("n/a.fits");
    write_atomic(&path, &content(100_000, 1));
    wait_status(&pair, "pending", 1);
    let v2 = content(150_000, 2);
    write_atomic(&path, &v2);
    wait_status(&pair, "superseded", 1);
    pair.start_receiver().expect("receiver");
    let report = pair
        .wait_replicated(Duration::from_secs(60))
        .expect("replication");
    report.ensure_identical().expect("identical");
    assert_eq!(
        fs::read(pair.published().join("n/a.fits")).expect("stored"),
        v2
    );
    assert!(no_old_versions(&pair), "the old version was never stored");
}

#[test]
fn a_file_deleted_before_it_was_shipped_ends_vanished() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    pair.start_agent().expect("agent");
    wait_watching(&pair);
    let gone = pair.source().join("n/gone.fits");
    write_atomic(&gone, &content(10_000, 1));
    wait_status(&pair, "pending", 1);
    fs::remove_file(&gone).expect("delete");
    write_atomic(&pair.source().join("n/kept.fits"), &content(10_000, 2));
    pair.start_receiver().expect("receiver");
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replication")
        .ensure_identical()
        .expect("identical");
    wait_status(&pair, "vanished", 1);
    std::thread::sleep(Duration::from_secs(2));
    let s = pair.agent_status().expect("status");
    assert_eq!(s["vanished"], 1, "{s}");
    assert_eq!(s["pending"], 0, "not retried: {s}");
    assert_eq!(s["done"], 1, "{s}");
}

#[test]
fn blocklisted_files_are_never_shipped_and_sighup_adds_patterns_without_restart() {
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    let blocklist = pair.dir().join("blocklist");
    fs::write(&blocklist, "# never ship\n**/secret-*.fits\n").expect("blocklist");
    pair.write_agent_config(|t| {
        *t = t.replacen(
            "[agent]\n",
            &format!(
                "[agent]\nblocklist = {:?}\n",
                blocklist.display().to_string()
            ),
            1,
        );
    })
    .expect("config");
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");

    let src = pair.source();
    write_atomic(&src.join("a/secret-1.fits"), &content(1000, 1));
    write_atomic(&src.join("a/ok-1.fits"), &content(1000, 2));
    let published = pair.published();
    wait_until(Duration::from_secs(30), "ok-1 stored", || {
        Ok(published.join("a/ok-1.fits").exists())
    })
    .expect("ok-1");

    // Block a whole directory from now on; SIGHUP, no restart.
    let pid = pair.agent_pid().expect("pid");
    fs::write(&blocklist, "**/secret-*.fits\nb/**\n").expect("blocklist");
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    wait_until(Duration::from_secs(10), "the reload", || {
        Ok(pair.agent_log()?.contains("SIGHUP: reloaded"))
    })
    .expect("reloaded");
    write_atomic(&src.join("b/blocked.fits"), &content(1000, 3));
    write_atomic(&src.join("c/ok-2.fits"), &content(1000, 4));
    wait_until(Duration::from_secs(30), "ok-2 stored", || {
        Ok(published.join("c/ok-2.fits").exists())
    })
    .expect("ok-2");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!published.join("a/secret-1.fits").exists(), "blocklisted");
    assert!(
        !published.join("b/blocked.fits").exists(),
        "blocked after SIGHUP"
    );
    assert_eq!(pair.agent_pid(), Some(pid), "same process");
    assert!(
        pair.agent_exit().expect("exit").is_none(),
        "agent still runs"
    );
    assert_eq!(status(&pair, "done"), 2);

    // A broken blocklist on reload is refused; the rules in force stay.
    fs::write(&blocklist, "b/**\n[unclosed\n").expect("blocklist");
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    wait_until(Duration::from_secs(10), "the refusal", || {
        Ok(pair.agent_log()?.contains("keeping the rules in force"))
    })
    .expect("refused");
    write_atomic(&src.join("b/blocked-2.fits"), &content(1000, 5));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !published.join("b/blocked-2.fits").exists(),
        "old rules kept"
    );
}

#[test]
fn check_config_reports_every_bad_glob() {
    let pair = Pair::new(PairOptions {
        include: vec!["**/*.{fits".into()],
        ..PairOptions::default()
    })
    .expect("pair");
    let blocklist = pair.dir().join("blocklist");
    fs::write(&blocklist, "ok/*.fits\n[oops\n").expect("blocklist");
    pair.write_agent_config(|t| {
        *t = t.replacen(
            "[agent]\n",
            &format!(
                "[agent]\nblocklist = {:?}\n",
                blocklist.display().to_string()
            ),
            1,
        );
        t.push_str("\n[[redis]]\nurl = \"http://x\"\nchannel = \"c\"\nstream = \"s\"\n");
    })
    .expect("config");
    let out = Command::new(pair.agent_bin())
        .args(["check-config", "--config"])
        .arg(pair.agent_config_path())
        .output()
        .expect("check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("bad glob \"**/*.{fits\""), "{stderr}");
    assert!(
        stderr.contains("line 2: bad glob \"[oops\""),
        "the blocklist line is named: {stderr}"
    );
    assert!(
        stderr.contains("not a redis:// or rediss:// URL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("exactly one of channel, pattern"),
        "{stderr}"
    );
}
