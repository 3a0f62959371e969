//! The agent's journal from the outside: damage a user could cause or suffer (one byte
//! changed in a pending row), and two agents started on one journal.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, write_atomic};
use skyferry_tests::{Pair, PairOptions};

/// Flips one byte of `needle` where it is stored in a table leaf page of the SQLite file
/// `db` (not where an index stores the same value): the row then says something else
/// than its index entries, the damage `PRAGMA quick_check` does not see.
fn flip_in_table_row(db: &Path, needle: &[u8]) {
    let mut bytes = fs::read(db).expect("read journal");
    let page = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => usize::from(n),
    };
    let at: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .filter(|i| {
            let start = i / page * page;
            let header = if start == 0 { 100 } else { start };
            bytes[header] == 0x0D // b-tree leaf page of a table
        })
        .collect();
    assert_eq!(at.len(), 1, "exactly one table row holds {needle:?}");
    bytes[at[0] + needle.len() - 1] ^= 0x01;
    fs::write(db, bytes).expect("write journal");
}

/// Waits for the agent to exit on its own; its status, or a failure after `timeout`.
fn wait_exit(pair: &mut Pair, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = pair.agent_exit().expect("exit status") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the agent still runs after {timeout:?}\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_byte_changed_in_a_pending_row_stops_the_agent_with_exit_65_and_the_file_ships_after_the_rebuild(
) {
    // No receiver yet: the file stays pending.
    let mut pair = Pair::new(PairOptions::default()).expect("pair");
    pair.start_agent().expect("agent");
    write_atomic(
        &pair.source().join("night/det07.fits"),
        &content(200_000, 7),
    )
    .expect("write");
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair.agent_status().unwrap_or_default()["pending"] != 1 {
        assert!(
            Instant::now() < deadline,
            "not journaled\n{}",
            pair.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pair.stop_agent().expect("stop").success());

    // Everything in the database file itself, then one byte of the row's path changed.
    let journal = pair.journal();
    let db = rusqlite::Connection::open(&journal).expect("open journal");
    db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(db);
    flip_in_table_row(&journal, b"night/det07.fits");

    pair.start_agent().expect("agent on the damaged journal");
    let status = wait_exit(&mut pair, Duration::from_secs(20), "damaged journal");
    assert_eq!(status.code(), Some(65), "exit status {status}");
    let log = pair.agent_log().expect("log");
    assert!(
        log.contains(&format!("journal {} is corrupt", journal.display()))
            && log.contains("integrity_check")
            && log.contains("docs/operations.md"),
        "the message names the journal, the check and the docs:\n{log}"
    );

    // The documented rebuild, and the file is shipped.
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", journal.display()));
        if p.exists() {
            fs::rename(&p, format!("{}.damaged", p.display())).expect("move aside");
        }
    }
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent on a new journal");
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
}

#[test]
fn a_second_agent_on_the_same_journal_refuses_to_start_naming_the_journal_and_the_first() {
    let mut pair = Pair::start(PairOptions::default()).expect("pair");
    write_atomic(&pair.source().join("a.fits"), &content(100_000, 1)).expect("write");
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
    let first = pair.agent_pid().expect("agent pid");

    let started = Instant::now();
    let mut second = Command::new(pair.agent_bin())
        .args(["run", "--config"])
        .arg(pair.agent_config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a second agent");
    // Bounded: a second agent that keeps running is killed and the test fails.
    while second.try_wait().expect("second agent").is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second agent still runs after 10 s on a journal in use");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = second.wait_with_output().expect("second agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", out.status);
    let journal = pair.journal().display().to_string();
    assert!(
        stderr.contains(&format!("journal {journal} is in use by another agent"))
            && stderr.contains(&format!("pid {first}")),
        "names the journal and the running agent: {stderr}"
    );

    // The first one is unharmed, and `status` reads the journal while it runs.
    pair.ensure_alive().expect("first agent alive");
    let status = pair
        .wait_done(1, Duration::from_secs(10))
        .expect("status while running");
    assert_eq!(status["done"], 1, "{status}");
    write_atomic(&pair.source().join("b.fits"), &content(100_000, 2)).expect("write");
    pair.wait_replicated(Duration::from_secs(60))
        .expect("replicated")
        .ensure_identical()
        .expect("identical");
}
