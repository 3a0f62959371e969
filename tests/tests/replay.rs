//! `skyferry-agent replay` with the real binaries: a tree outside the watch roots with
//! three observatory nights of 84 files plus unrelated files; `--night` selects one
//! night (noon to noon, Asia/Tokyo) by mtime, `--dry-run` counts what a replay then
//! queues, `--from-list -` reads a pipe, and exactly the selected files arrive, once,
//! byte-identical; `--resend` of done files sends nothing the receiver still holds.

// A panic here is a failed test.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use skyferry_tests::faults::{content, must_write};
use skyferry_tests::{Pair, PairOptions};

const NIGHTS: [&str; 3] = ["2024-05-01", "2024-05-02", "2024-05-03"];
const PER_NIGHT: usize = 84;

/// Unix seconds of 2024-05-01 12:00 Asia/Tokyo (03:00 UTC): the start of night 05-01.
const NIGHT0_START: u64 = 1_714_532_400;

fn set_mtime(path: &Path, unix: u64) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(unix))
        .unwrap();
}

/// Writes the archive: night n's files carry mtimes from its first second to its last
/// (the edges of the rule), and unrelated files the night before and after. Returns the
/// relative paths per night.
fn write_archive(archive: &Path) -> Vec<Vec<PathBuf>> {
    let mut nights = Vec::new();
    for (n, _) in NIGHTS.iter().enumerate() {
        let start = NIGHT0_START + n as u64 * 86_400;
        let mut files = Vec::new();
        for i in 0..PER_NIGHT {
            let rel = PathBuf::from(format!("n{n}/det{:02}/frame{i:03}.fits", i % 12));
            let path = archive.join(&rel);
            must_write(&path, &content(20_000 + i * 37 + n, (n * 1000 + i) as u64));
            // First file at the night's first second, last at its last second.
            let t = match i {
                0 => start,
                i if i == PER_NIGHT - 1 => start + 86_399,
                i => start + 8 * 3600 + i as u64 * 60,
            };
            set_mtime(&path, t);
            files.push(rel);
        }
        nights.push(files);
    }
    // Unrelated: one second before night 0 and at the first second after night 2.
    for (name, t) in [
        ("n0/det00/before.fits", NIGHT0_START - 1),
        ("n2/det00/after.fits", NIGHT0_START + 3 * 86_400),
        ("misc/readme.txt", NIGHT0_START - 86_400),
    ] {
        let path = archive.join(name);
        must_write(&path, b"not part of any replay");
        set_mtime(&path, t);
    }
    nights
}

fn agent(pair: &Pair, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(pair.agent_bin());
    cmd.arg("replay").args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    succeeded(
        &format!("replay {args:?}"),
        child.wait_with_output().unwrap(),
    )
}

/// A command's stdout, once it is known to have exited 0 (else a panic with `what`, its
/// status and both outputs).
fn succeeded(what: &str, out: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Every file under `dir`, relative.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent is past its start: its journal is created and migrated (the
/// file alone appears a moment before its schema), and it writes its state.
fn wait_for_agent(pair: &Pair) {
    wait_for("the agent started", Duration::from_secs(30), || {
        pair.agent_status()
            .is_ok_and(|s| s["daemon"]["running"] == true)
    });
}

#[test]
fn replay_selects_by_night_and_list_and_exactly_those_files_arrive_once() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    let archive = pair.dir().join("archive");
    let nights = write_archive(&archive);
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap();
    let root = archive.to_str().unwrap();
    // The journal exists once the agent has started.
    wait_for_agent(&pair);

    let dry = agent(
        &pair,
        &[
            "-c",
            config,
            "--root",
            root,
            "--night",
            "20240502",
            "--dry-run",
        ],
        None,
    );
    let bytes: u64 = nights[1]
        .iter()
        .map(|r| fs::metadata(archive.join(r)).unwrap().len())
        .sum();
    assert!(
        dry.starts_with(&format!("would queue {PER_NIGHT} files, {bytes} bytes")),
        "{dry}"
    );
    assert!(
        tree(&pair.published()).is_empty(),
        "a dry run queues nothing"
    );

    let out = agent(
        &pair,
        &[
            "-c",
            config,
            "--root",
            root,
            "--night",
            "2024-05-02",
            "--name",
            "night 2",
        ],
        None,
    );
    assert!(
        out.contains(&format!("queued {PER_NIGHT} files ({bytes} bytes)")),
        "{out}"
    );
    pair.wait_done(PER_NIGHT as u64, Duration::from_secs(120))
        .expect("status");
    wait_for("night 2 stored", Duration::from_secs(60), || {
        tree(&pair.published()).len() == PER_NIGHT
    });
    let mut want = nights[1].clone();
    want.sort();
    assert_eq!(
        tree(&pair.published()),
        want,
        "exactly night 2, named relative to --root"
    );

    // Night 3 from a pipe, paths relative to --root.
    let list: String = nights[2]
        .iter()
        .map(|r| format!("{}\n", r.display()))
        .collect();
    let out = agent(
        &pair,
        &["-c", config, "--root", root, "--from-list", "-"],
        Some(&list),
    );
    assert!(out.contains(&format!("queued {PER_NIGHT} files")), "{out}");
    pair.wait_done(2 * PER_NIGHT as u64, Duration::from_secs(120))
        .expect("status");
    wait_for("night 3 stored", Duration::from_secs(60), || {
        tree(&pair.published()).len() == 2 * PER_NIGHT
    });
    for rel in nights[1].iter().chain(&nights[2]) {
        assert_eq!(
            fs::read(archive.join(rel)).unwrap(),
            fs::read(pair.published().join(rel)).unwrap(),
            "{} byte-identical",
            rel.display()
        );
    }
    // The same night again: nothing new to queue (once); with --resend it is queued,
    // and the receiver, which holds every file, takes no data.
    let out = agent(
        &pair,
        &["-c", config, "--root", root, "--night", "2024-05-02"],
        None,
    );
    assert!(
        out.contains(&format!(
            "queued 0 files (0 bytes), {PER_NIGHT} already queued or done"
        )),
        "{out}"
    );
    let sent_before = pair.agent_status().unwrap()["sent_bytes"].as_u64().unwrap();
    let out = agent(
        &pair,
        &[
            "-c",
            config,
            "--root",
            root,
            "--night",
            "2024-05-02",
            "--resend",
        ],
        None,
    );
    assert!(out.contains(&format!("queued {PER_NIGHT} files")), "{out}");
    let list = agent(&pair, &["list", "-c", config, "--json"], None);
    let replays: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(replays.as_array().unwrap().len(), 4, "{list}");
    wait_for("the resend done", Duration::from_secs(120), || {
        let show = agent(&pair, &["show", "-c", config, "4", "--json"], None);
        show.contains("\"state\":\"done\"")
    });
    let sent_after = pair.agent_status().unwrap()["sent_bytes"].as_u64().unwrap();
    assert_eq!(
        sent_after, sent_before,
        "the receiver holds them all: no data sent"
    );
    assert_eq!(tree(&pair.published()).len(), 2 * PER_NIGHT);
    let show = agent(&pair, &["show", "-c", config, "2"], None);
    assert!(show.contains("queued 84 files"), "{show}");
    assert!(pair.stop_agent().expect("stop agent").success());
}

/// Pause holds a replay's files while it is paused; cancel unqueues the rest.
#[test]
fn pause_holds_and_cancel_unqueues() {
    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let archive = pair.dir().join("archive");
    write_archive(&archive);
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap();
    let root = archive.to_str().unwrap();
    wait_for_agent(&pair);
    // A slow replay (100 kB/s of its own): pause it at once.
    let out = agent(
        &pair,
        &[
            "-c",
            config,
            "--root",
            root,
            "--night",
            "2024-05-01",
            "--max-rate",
            "100kB/s",
        ],
        None,
    );
    assert!(out.contains("queued 84 files"), "{out}");
    agent(&pair, &["pause", "-c", config, "1"], None);
    std::thread::sleep(Duration::from_secs(2));
    let held = tree(&pair.published()).len();
    // Live files still flow while it is paused.
    must_write(&pair.source().join("live/now.fits"), &content(50_000, 7));
    wait_for("the live file", Duration::from_secs(30), || {
        pair.published().join("live/now.fits").is_file()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tree(&pair.published()).len(),
        held + 1,
        "paused: only the live file moved"
    );
    agent(&pair, &["resume", "-c", config, "1"], None);
    wait_for("more of the replay", Duration::from_secs(30), || {
        tree(&pair.published()).len() > held + 2
    });
    agent(&pair, &["cancel", "-c", config, "1"], None);
    std::thread::sleep(Duration::from_secs(3));
    let stored = tree(&pair.published()).len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tree(&pair.published()).len(),
        stored,
        "cancelled: nothing more arrives"
    );
    assert!(stored < 84 + 1, "cancel left files unsent: {stored}");
    let status = pair.agent_status().unwrap();
    assert_eq!(status["pending"], 0, "{status}");
    let _ = SystemTime::now();
}

/// Bytes published so far.
fn stored_bytes(dir: &Path) -> u64 {
    tree(dir)
        .iter()
        .filter_map(|r| fs::metadata(dir.join(r)).ok())
        .map(|m| m.len())
        .sum()
}

/// Rate at the receiver over `secs` seconds, in MB/s.
fn measured_rate(dir: &Path, secs: u64) -> f64 {
    let before = stored_bytes(dir);
    std::thread::sleep(Duration::from_secs(secs));
    (stored_bytes(dir) - before) as f64 / secs as f64 / 1e6
}

/// `transfer.max_rate = "20MB/s"` holds within ±10 % over 30 s at the receiver, and a
/// SIGHUP to 40 MB/s is in force within 5 s.
#[test]
fn the_rate_cap_holds_and_follows_sighup() {
    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let cap = |rate: &str| {
        let rate = rate.to_owned();
        move |c: &mut String| {
            *c = c.replace(
                "[transfer]\n",
                &format!("[transfer]\nmax_rate = \"{rate}\"\n"),
            )
        }
    };
    let hup = |pair: &Pair| {
        let pid = pair.agent_pid().unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    wait_for_agent(&pair);
    pair.write_agent_config(cap("20MB/s")).unwrap();
    hup(&pair);
    let archive = pair.dir().join("archive");
    // 1.2 GB in 1 MB files: more than 35 s at 20 MB/s and 10 s at 40 MB/s.
    for i in 0..1200usize {
        must_write(
            &archive.join(format!("d{}/f{i:04}.fits", i % 10)),
            &content(1_000_000, i as u64),
        );
    }
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap();
    wait_for_agent(&pair);
    agent(
        &pair,
        &["-c", config, "--root", archive.to_str().unwrap()],
        None,
    );
    std::thread::sleep(Duration::from_secs(3));
    let rate = measured_rate(&pair.published(), 30);
    assert!(
        (18.0..=22.0).contains(&rate),
        "20 MB/s cap: measured {rate:.2} MB/s"
    );
    pair.write_agent_config(cap("40MB/s")).unwrap();
    let pid = pair.agent_pid().unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_secs(5));
    let rate = measured_rate(&pair.published(), 8);
    assert!(
        (34.0..=46.0).contains(&rate),
        "40 MB/s after SIGHUP: measured {rate:.2} MB/s"
    );
    assert!(pair
        .agent_log()
        .unwrap()
        .contains("reloaded transfer.max_rate"));
}

/// `replay --root <watch root> --resend`: queues every file of the watch again.
fn resend_source(pair: &Pair) -> String {
    let config = pair.agent_config_path();
    let source = pair.source();
    agent(
        pair,
        &[
            "-c",
            config.to_str().unwrap(),
            "--root",
            source.to_str().unwrap(),
            "--resend",
        ],
        None,
    )
}

/// `replay show ID --json`, parsed.
fn show(pair: &Pair, id: u32) -> serde_json::Value {
    let config = pair.agent_config_path();
    let text = agent(
        pair,
        &[
            "show",
            "-c",
            config.to_str().unwrap(),
            &id.to_string(),
            "--json",
        ],
        None,
    );
    serde_json::from_str(text.trim()).unwrap()
}

/// Waits until the agent the harness runs now writes its state (it has opened the
/// journal and returned interrupted transfers to pending).
fn wait_for_restart(pair: &Pair) {
    let pid = pair.agent_pid().unwrap();
    wait_for("the agent up again", Duration::from_secs(20), || {
        pair.agent_status()
            .is_ok_and(|s| s["daemon"]["pid"].as_u64() == Some(u64::from(pid)))
    });
}

/// Files in flight when their replay is cancelled and then interrupted (kill -9 of the
/// agent; the restart returns them to pending) are unqueued like the rest: nothing of
/// the cancelled replay stays pending, and a later replay of the same tree sends every
/// file still missing. (Before the fix they stayed pending forever, never claimed, and
/// the later replay skipped them as "already queued".)
#[test]
fn files_in_flight_at_cancel_are_not_stranded_by_a_restart() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    let archive = pair.dir().join("archive");
    let files: Vec<PathBuf> = (0..12)
        .map(|i| {
            let rel = PathBuf::from(format!("old/f{i:02}.fits"));
            must_write(&archive.join(&rel), &content(2_000_000, 500 + i));
            rel
        })
        .collect();
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap().to_owned();
    let root = archive.to_str().unwrap().to_owned();
    wait_for_agent(&pair);
    // 200 kB/s: each 2 MB file is in flight for seconds.
    agent(
        &pair,
        &["-c", &config, "--root", &root, "--max-rate", "200kB/s"],
        None,
    );
    wait_for("a file in flight", Duration::from_secs(30), || {
        show(&pair, 1)["progress"]["inflight_files"].as_u64() > Some(0)
    });
    agent(&pair, &["cancel", "-c", &config, "1"], None);
    pair.kill_agent().unwrap();
    pair.start_agent().unwrap();
    wait_for_restart(&pair);
    let shown = show(&pair, 1);
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert_eq!(shown["progress"]["pending_files"], 0, "{shown}");
    let status = pair.agent_status().unwrap();
    assert_eq!(status["pending"], 0, "nothing stays queued: {status}");

    // A new replay of the tree queues what is not stored yet, and all of it arrives.
    let out = agent(&pair, &["-c", &config, "--root", &root], None);
    assert!(out.contains("replay 2"), "{out}");
    wait_for("every file stored", Duration::from_secs(60), || {
        files
            .iter()
            .all(|r| fs::read(pair.published().join(r)).ok() == fs::read(archive.join(r)).ok())
    });
    wait_for("replay 2 done", Duration::from_secs(30), || {
        show(&pair, 2)["state"] == "done"
    });
}

/// The receiver lost 10 of 84 stored files (files and inventory rows gone, as after a
/// restore from an old backup): `replay --resend` over all 84 sends exactly those 10
/// with data; the other 74 are acknowledged without data. The agent's bytes-sent
/// counter grows by the 10 files' bytes, not the 84, and all 84 are byte-identical.
#[test]
fn resend_after_storage_loss_sends_only_what_the_receiver_lost() {
    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let rels: Vec<PathBuf> = (0..84)
        .map(|i| PathBuf::from(format!("2024-05-01/exp{:02}/det{:02}.fits", i / 12, i % 84)))
        .collect();
    for (i, rel) in rels.iter().enumerate() {
        must_write(
            &pair.source().join(rel),
            &content(150_000 + i * 1_001, 9_000 + i as u64),
        );
    }
    wait_for_agent(&pair);
    pair.wait_done(84, Duration::from_secs(120))
        .expect("status");
    let sent_before = pair.agent_status().unwrap()["sent_bytes"].as_u64().unwrap();
    let all_bytes: u64 = rels
        .iter()
        .map(|r| fs::metadata(pair.source().join(r)).unwrap().len())
        .sum();
    assert!(sent_before >= all_bytes, "first pass sent everything");

    // Storage loss: every 8th file, from the tree and from the inventory.
    let lost: Vec<&PathBuf> = rels.iter().step_by(8).take(10).collect();
    let inventory =
        rusqlite::Connection::open(pair.storage().join(".skyferry/inventory.sqlite")).unwrap();
    inventory.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut lost_bytes = 0;
    for rel in &lost {
        let stored = pair.published().join(rel);
        lost_bytes += fs::metadata(&stored).unwrap().len();
        fs::remove_file(&stored).unwrap();
        let rows = inventory
            .execute(
                "DELETE FROM stored WHERE agent = ?1 AND path = ?2",
                rusqlite::params![pair.options().agent_id, rel.to_str().unwrap()],
            )
            .unwrap();
        assert_eq!(rows, 1, "{} had an inventory row", rel.display());
    }
    drop(inventory);

    let out = resend_source(&pair);
    assert!(out.contains("queued 84 files"), "{out}");
    wait_for("the resend done", Duration::from_secs(120), || {
        show(&pair, 1)["state"] == "done"
    });
    let sent = pair.agent_status().unwrap()["sent_bytes"].as_u64().unwrap() - sent_before;
    assert!(
        sent >= lost_bytes && sent <= lost_bytes + lost_bytes / 10,
        "sent {sent} bytes for the 10 lost files of {lost_bytes} bytes (all 84: {all_bytes})"
    );
    let shown = show(&pair, 1);
    assert_eq!(shown["progress"]["done_files"], 84, "{shown}");
    assert_eq!(shown["progress"]["present_files"], 74, "{shown}");
    assert_eq!(tree(&pair.published()).len(), 84);
    for rel in &rels {
        assert_eq!(
            fs::read(pair.source().join(rel)).unwrap(),
            fs::read(pair.published().join(rel)).unwrap(),
            "{} byte-identical",
            rel.display()
        );
    }
}

/// kill -9 of the agent in the middle of a replay: the restarted agent resumes it by
/// itself; every selected file arrives exactly once (one stored file and one inventory
/// row per path, nothing else in the tree), byte-identical, and the replay ends done.
#[test]
fn a_replay_survives_kill_9_of_the_agent() {
    let mut pair = Pair::start(PairOptions::default()).expect("start pair");
    let archive = pair.dir().join("archive");
    let nights = write_archive(&archive);
    // Bigger files than write_archive's: 84 × ~600 kB at 4 MB/s is ~12 s of sending.
    for (i, rel) in nights[0].iter().enumerate() {
        must_write(
            &archive.join(rel),
            &content(600_000 + i * 997, 77 + i as u64),
        );
        set_mtime(&archive.join(rel), NIGHT0_START + 3600 + i as u64);
    }
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap().to_owned();
    let root = archive.to_str().unwrap().to_owned();
    wait_for_agent(&pair);
    let out = agent(
        &pair,
        &[
            "-c",
            &config,
            "--root",
            &root,
            "--night",
            "2024-05-01",
            "--max-rate",
            "4MB/s",
        ],
        None,
    );
    assert!(out.contains("queued 84 files"), "{out}");
    wait_for(
        "a quarter of the replay stored",
        Duration::from_secs(60),
        || tree(&pair.published()).len() >= 21,
    );
    let shown = show(&pair, 1);
    assert_eq!(shown["state"], "active", "killed mid-replay: {shown}");
    assert!(
        shown["progress"]["pending_files"].as_u64() > Some(0),
        "{shown}"
    );
    pair.kill_agent().unwrap();
    pair.start_agent().unwrap();
    wait_for_restart(&pair);
    wait_for("the replay done", Duration::from_secs(120), || {
        show(&pair, 1)["state"] == "done"
    });
    let shown = show(&pair, 1);
    assert_eq!(shown["progress"]["done_files"], 84, "{shown}");
    assert_eq!(shown["progress"]["failed_files"], 0, "{shown}");
    let mut want = nights[0].clone();
    want.sort();
    assert_eq!(tree(&pair.published()), want, "exactly night 1, once each");
    for rel in &want {
        assert_eq!(
            fs::read(archive.join(rel)).unwrap(),
            fs::read(pair.published().join(rel)).unwrap(),
            "{} byte-identical",
            rel.display()
        );
    }
    let inventory =
        rusqlite::Connection::open(pair.storage().join(".skyferry/inventory.sqlite")).unwrap();
    let rows: i64 = inventory
        .query_row("SELECT COUNT(*) FROM stored", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 84, "one inventory row per file");
    assert!(pair
        .agent_log()
        .unwrap()
        .contains("resuming transfers interrupted"));
}

/// `replay show ID --follow` with stdout a pipe: plain progress lines until the replay
/// ends, then its summary; returns what it printed (panics after `timeout`).
fn follow(pair: &Pair, id: u32, timeout: Duration) -> String {
    let config = pair.agent_config_path();
    let mut child = Command::new(pair.agent_bin())
        .args(["replay", "show", "-c"])
        .arg(&config)
        .args([&id.to_string(), "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "show --follow did not end within {timeout:?}:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    succeeded("show --follow", child.wait_with_output().unwrap())
}

/// A replay of 12 files followed to its end: `--follow` on a pipe prints plain progress
/// lines and then a summary line with the files sent and their bytes; `show --json`
/// has the same numbers as fields, and `show` without `--follow` the same summary.
#[test]
fn a_followed_replay_ends_with_a_summary_of_what_it_sent() {
    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let archive = pair.dir().join("archive");
    let mut bytes = 0;
    for i in 0..12usize {
        let data = content(200_000 + i * 1_111, 300 + i as u64);
        bytes += data.len() as u64;
        must_write(
            &archive.join(format!("2023-01-0{}/f{i:02}.fits", i % 3 + 1)),
            &data,
        );
    }
    let config = pair.agent_config_path();
    let config = config.to_str().unwrap();
    wait_for_agent(&pair);
    // 500 kB/s: ~5 s of sending, long enough for progress lines.
    let out = agent(
        &pair,
        &[
            "-c",
            config,
            "--root",
            archive.to_str().unwrap(),
            "--max-rate",
            "500kB/s",
            "--name",
            "jan",
        ],
        None,
    );
    assert!(out.contains("queued 12 files"), "{out}");
    let followed = follow(&pair, 1, Duration::from_secs(120));
    let progress = followed
        .lines()
        .filter(|l| l.starts_with("replay 1 \"jan\" "))
        .count();
    assert!(
        progress >= 2,
        "progress lines, then the last one:\n{followed}"
    );
    let summary = format!("12 files sent ({bytes} bytes, ");
    let line = followed
        .lines()
        .find(|l| l.starts_with("summary: done after "))
        .unwrap_or_else(|| panic!("no summary line:\n{followed}"));
    assert!(line.contains(&summary), "{summary:?} in {line:?}");
    assert!(
        line.contains("0 already present at the receiver (0 bytes), 0 failed"),
        "{line}"
    );
    let shown = show(&pair, 1);
    let s = &shown["summary"];
    assert_eq!(s["over"], true, "{shown}");
    assert_eq!(s["files_sent"], 12, "{shown}");
    assert_eq!(s["bytes_sent"], bytes, "{shown}");
    assert_eq!(s["files_present"], 0, "{shown}");
    assert_eq!(s["files_failed"], 0, "{shown}");
    assert!(s["duration_seconds"].as_f64().unwrap() > 0.0, "{shown}");
    let again = agent(&pair, &["show", "-c", config, "1"], None);
    assert!(again.contains(&summary), "{again}");
    assert_eq!(stored_bytes(&pair.published()), bytes);
}

/// `--resend` of files the receiver holds: the summary says all of them were already
/// present at the receiver and none was sent.
#[test]
fn a_resend_of_stored_files_is_summarised_as_already_present() {
    let pair = Pair::start(PairOptions::default()).expect("start pair");
    let mut bytes = 0;
    for i in 0..10usize {
        let data = content(100_000 + i * 997, 700 + i as u64);
        bytes += data.len() as u64;
        must_write(&pair.source().join(format!("n/f{i:02}.fits")), &data);
    }
    wait_for_agent(&pair);
    pair.wait_done(10, Duration::from_secs(120))
        .expect("status");
    let out = resend_source(&pair);
    assert!(out.contains("queued 10 files"), "{out}");
    let followed = follow(&pair, 1, Duration::from_secs(120));
    let want = format!(
        "0 files sent (0 bytes, 0 B), 10 already present at the receiver ({bytes} bytes), 0 failed"
    );
    assert!(
        followed
            .lines()
            .any(|l| l.starts_with("summary: done after ") && l.contains(&want)),
        "{want:?} in:\n{followed}"
    );
    let shown = show(&pair, 1);
    let s = &shown["summary"];
    assert_eq!(
        (s["files_sent"].as_u64(), s["bytes_sent"].as_u64()),
        (Some(0), Some(0)),
        "{shown}"
    );
    assert_eq!(s["files_present"], 10, "{shown}");
    assert_eq!(s["bytes_present"], bytes, "{shown}");
}
