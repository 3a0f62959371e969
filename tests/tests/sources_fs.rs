//! The filesystem source end to end: a large tree present before the start, a slow
//! writer, a file replaced or deleted while queued, the blocklist and its reload on
//! SIGHUP, and `check-config` on bad globs. Then what the watch cannot do (an unreadable
//! directory, the inotify watch limit) and sources that change while they are sent
//! (temporary names, a writer that re-opens and appends, a file deleted or renamed
//! mid-transfer).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use skyferry_tests::faults::{content, must_write as write_atomic};
use skyferry_tests::redis::{metric, metrics_table, start_pair_with, wait_until};
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
    // The directory is new: the first writes may come before its watch exists, and then
    // only the quiet period (longer than the writer's pauses) tells the writer is at work.
    let mut pair = Pair::start(PairOptions {
        quiet_period: Some("1s".into()),
        ..PairOptions::default()
    })
    .expect("pair");
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

fn sighup(pair: &Pair) {
    let pid = pair.agent_pid().expect("pid");
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
}

fn wait_log(pair: &Pair, what: &str, timeout: Duration) {
    wait_until(timeout, &format!("{what:?} in the agent's log"), || {
        Ok(pair.agent_log()?.contains(what))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

fn wait_published(pair: &Pair, rel: &str, timeout: Duration) {
    let path = pair.published().join(rel);
    wait_until(timeout, &format!("{rel} published"), || Ok(path.exists()))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

/// Every published file of the agent, relative to its directory, sorted (BTreeMap).
fn published_files(pair: &Pair) -> Vec<String> {
    skyferry_tests::tree::list_files(&pair.published())
        .unwrap_or_default()
        .into_keys()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// Root can read any directory; this wrapper drops the capabilities that allow it
/// (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that a mode-000 directory is unreadable
/// for the agent as it is for a service user. Nothing for an unprivileged test run.
fn without_dac_override() -> Vec<String> {
    let root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        return Vec::new();
    }
    [
        "setpriv",
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs the agent in its own user namespace whose inotify watch limit is `watches`
/// (`/proc/sys/user/max_inotify_watches`, counted for that namespace only): the real
/// limit reached, without touching the machine's `fs.inotify.max_user_watches`.
fn with_inotify_watch_limit(watches: u32) -> Vec<String> {
    vec![
        "unshare".into(),
        "--user".into(),
        "--map-root-user".into(),
        "sh".into(),
        "-c".into(),
        format!("echo {watches} > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\""),
    ]
}

/// Gives a directory its permissions back, even when the test fails.
struct Readable(PathBuf);

impl Drop for Readable {
    fn drop(&mut self) {
        let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
    }
}

#[test]
fn an_unreadable_directory_is_reported_and_the_rest_of_the_tree_is_shipped() {
    let (metrics, addr) = metrics_table().expect("port");
    let opts = PairOptions {
        agent_wrapper: without_dac_override(),
        ..PairOptions::default()
    };
    let mut locked = None;
    let mut pair = start_pair_with(opts, &metrics, |p| {
        let src = p.source();
        fs::create_dir_all(src.join("n/locked/deeper"))?;
        fs::write(src.join("n/before.fits"), content(10_000, 1))?;
        fs::write(src.join("n/locked/hidden.fits"), content(10_000, 2))?;
        fs::write(src.join("n/locked/deeper/deep.fits"), content(10_000, 3))?;
        locked = Some(Readable(src.join("n/locked")));
        fs::set_permissions(src.join("n/locked"), fs::Permissions::from_mode(0o000))?;
        Ok(())
    })
    .expect("pair");
    let locked = locked.expect("locked");
    wait_published(&pair, "n/before.fits", Duration::from_secs(30));
    wait_watching(&pair);
    // The rest of the tree is still watched: a file written now arrives.
    write_atomic(&pair.source().join("n/after.fits"), &content(10_000, 4));
    write_atomic(&pair.source().join("m/new-dir.fits"), &content(10_000, 5));
    wait_published(&pair, "n/after.fits", Duration::from_secs(20));
    wait_published(&pair, "m/new-dir.fits", Duration::from_secs(20));
    let log = pair.agent_log().expect("log");
    let named = format!("dir={}", locked.0.display());
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("cannot read directory")
            && l.contains(&named)),
        "a WARN names the unreadable directory:\n{log}"
    );
    let series = "skyferry_agent_fs_unreadable_dirs{watch=\"0\"}";
    assert_eq!(metric(&addr, series).expect("metric"), 1.0);
    assert_eq!(
        metric(&addr, "skyferry_agent_fs_watch_active{watch=\"0\"}").expect("metric"),
        1.0
    );
    assert!(
        metric(&addr, "skyferry_agent_fs_errors_total{kind=\"read_dir\"}").expect("metric") >= 1.0
    );
    assert!(!pair.published().join("n/locked/hidden.fits").exists());

    // Readable again: a SIGHUP rescan ships what it held, and the gauge drops.
    drop(locked);
    sighup(&pair);
    wait_published(&pair, "n/locked/hidden.fits", Duration::from_secs(20));
    wait_published(&pair, "n/locked/deeper/deep.fits", Duration::from_secs(20));
    wait_log(
        &pair,
        "directory is readable again",
        Duration::from_secs(10),
    );
    assert_eq!(metric(&addr, series).expect("metric"), 0.0);
    let report = pair
        .wait_replicated(Duration::from_secs(30))
        .expect("replication");
    report.ensure_identical().expect("identical");
    assert_eq!(report.files, 5);
}

#[test]
fn a_watch_that_cannot_start_falls_back_to_rescans_at_the_fallback_interval() {
    let (metrics, addr) = metrics_table().expect("port");
    let opts = PairOptions {
        // The root and one directory can be watched, not the third directory.
        agent_wrapper: with_inotify_watch_limit(2),
        rescan_interval: "1h".into(),
        ..PairOptions::default()
    };
    let extra = format!("fallback_rescan_interval = \"1s\"\n{metrics}");
    let mut pair = start_pair_with(opts, &extra, |p| {
        for d in ["a", "b", "c"] {
            fs::create_dir_all(p.source().join(d))?;
        }
        Ok(())
    })
    .expect("pair");
    wait_log(&pair, "max_user_watches", Duration::from_secs(20));
    assert_eq!(
        metric(&addr, "skyferry_agent_fs_watch_active{watch=\"0\"}").expect("metric"),
        0.0
    );
    // Written after the watch failed: found by a rescan within the fallback interval.
    let written = Instant::now();
    write_atomic(&pair.source().join("c/late.fits"), &content(20_000, 1));
    write_atomic(&pair.source().join("a/late.fits"), &content(20_000, 2));
    pair.wait_replicated(Duration::from_secs(15))
        .expect("replication")
        .ensure_identical()
        .expect("identical");
    let took = written.elapsed();
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // The rescans go on, and the failure was logged at WARN once.
    wait_until(Duration::from_secs(20), "three more rescans", || {
        Ok(pair.agent_log()?.matches("rescan done").count() >= 4)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
    let log = pair.agent_log().expect("log");
    let warns: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot watch"))
        .collect();
    assert_eq!(warns.len(), 1, "{log}");
    assert!(
        warns[0].contains("sysctl fs.inotify.max_user_watches="),
        "the WARN says which sysctl to raise: {}",
        warns[0]
    );
    assert!(
        metric(
            &addr,
            "skyferry_agent_fs_errors_total{kind=\"watch_limit\"}"
        )
        .expect("metric")
            >= 1.0
    );
}

#[test]
fn sighup_rescans_at_once_while_the_watch_is_down() {
    let opts = PairOptions {
        agent_wrapper: with_inotify_watch_limit(0),
        rescan_interval: "1h".into(),
        ..PairOptions::default()
    };
    let mut pair =
        start_pair_with(opts, "fallback_rescan_interval = \"1h\"\n", |_| Ok(())).expect("pair");
    wait_log(&pair, "max_user_watches", Duration::from_secs(20));
    wait_log(&pair, "rescan done", Duration::from_secs(20));
    write_atomic(&pair.source().join("n/a.fits"), &content(20_000, 1));
    std::thread::sleep(Duration::from_millis(500)); // older than `settle`
    let asked = Instant::now();
    sighup(&pair);
    pair.wait_replicated(Duration::from_secs(10))
        .expect("replication")
        .ensure_identical()
        .expect("identical");
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        pair.agent_exit().expect("exit").is_none(),
        "agent still runs"
    );
}

#[test]
fn temporary_names_are_not_shipped_by_default() {
    let mut pair = Pair::new(PairOptions {
        include: Vec::new(), // everything
        ..PairOptions::default()
    })
    .expect("pair");
    // No `exclude` at all: the defaults apply.
    pair.write_agent_config(|t| {
        *t = t
            .lines()
            .filter(|l| !l.starts_with("exclude ="))
            .map(|l| format!("{l}\n"))
            .collect();
    })
    .expect("config");
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");
    wait_watching(&pair);
    let n = pair.source().join("n");
    fs::create_dir_all(&n).expect("mkdir");
    let temporaries = [
        "a.fits.part",
        ".b.fits.Xy12Ab", // rsync
        "c.fits~",
        ".c.fits.swp",
        ".#c.fits",
        "d.fits.tmp",
        "e.fits.partial",
    ];
    for (i, name) in temporaries.iter().enumerate() {
        fs::write(n.join(name), content(10_000, i as u64)).expect("write");
    }
    // Long past the quiet period: a shipped temporary would be on its way by now.
    std::thread::sleep(Duration::from_millis(1500));
    fs::rename(n.join("a.fits.part"), n.join("a.fits")).expect("rename");
    fs::rename(n.join(".b.fits.Xy12Ab"), n.join("b.fits")).expect("rename");
    wait_published(&pair, "n/a.fits", Duration::from_secs(20));
    wait_published(&pair, "n/b.fits", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(published_files(&pair), ["n/a.fits", "n/b.fits"]);
    assert_eq!(status(&pair, "done"), 2);
}

#[test]
fn a_file_reopened_and_appended_within_the_quiet_period_is_shipped_once() {
    let mut pair = Pair::start(PairOptions {
        quiet_period: Some("1s".into()),
        ..PairOptions::default()
    })
    .expect("pair");
    wait_watching(&pair);
    let path = pair.source().join("n/exp.fits");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let data = content(200_000, 3);
    // Header first, then the writer re-opens the file twice to append (closing each time).
    fs::write(&path, &data[..100_000]).expect("write");
    for piece in [&data[100_000..150_000], &data[150_000..]] {
        std::thread::sleep(Duration::from_millis(300));
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("reopen");
        f.write_all(piece).expect("append");
    }
    pair.wait_replicated(Duration::from_secs(30))
        .expect("replication")
        .ensure_identical()
        .expect("complete file");
    std::thread::sleep(Duration::from_secs(2)); // nothing else may follow
    let s = pair.agent_status().expect("status");
    assert_eq!(s["done"], 1, "shipped once: {s}");
    assert_eq!(s["superseded"], 0, "no prefix was queued: {s}");
    assert!(no_old_versions(&pair), "no prefix was stored");
}

/// A pair whose link is slow enough (20 ms each way, one 64 KiB chunk in flight) that a
/// 4 MiB file takes seconds to send; ships everything, no excludes.
fn slow_pair(metrics: &str) -> Pair {
    let mut pair = Pair::new(PairOptions {
        via_relay: true,
        include: Vec::new(),
        exclude: Vec::new(),
        ..PairOptions::default()
    })
    .expect("pair");
    pair.write_agent_config(|t| {
        t.push('\n');
        t.push_str(metrics);
    })
    .expect("config");
    pair.relay()
        .expect("relay")
        .set_delay(Duration::from_millis(20));
    pair.start_receiver().expect("receiver");
    pair.wait_receiver_listening(Duration::from_secs(10))
        .expect("listening");
    pair.start_agent().expect("agent");
    wait_watching(&pair);
    pair
}

/// Waits until the receiver holds a partial file: a transfer is under way.
fn wait_sending(pair: &Pair) {
    wait_until(Duration::from_secs(20), "a transfer under way", || {
        Ok(!pair.partial_files().is_empty())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pair.diagnostics()));
}

#[test]
fn a_file_deleted_while_it_is_sent_is_not_published() {
    let (metrics, addr) = metrics_table().expect("port");
    let pair = slow_pair(&metrics);
    let gone = pair.source().join("n/gone.fits");
    fs::create_dir_all(gone.parent().expect("parent")).expect("mkdir");
    fs::write(&gone, content(4 << 20, 1)).expect("write");
    wait_sending(&pair);
    fs::remove_file(&gone).expect("delete");
    wait_status(&pair, "vanished", 1);
    fs::write(pair.source().join("n/kept.fits"), content(10_000, 2)).expect("write");
    wait_published(&pair, "n/kept.fits", Duration::from_secs(30));
    assert_eq!(
        published_files(&pair),
        ["n/kept.fits"],
        "the deleted file was not published"
    );
    assert_eq!(
        metric(
            &addr,
            "skyferry_agent_files_abandoned_total{reason=\"deleted\"}"
        )
        .expect("metric"),
        1.0
    );
}

#[test]
fn a_temporary_file_renamed_while_it_is_sent_is_published_under_its_new_name_only() {
    let (metrics, addr) = metrics_table().expect("port");
    let pair = slow_pair(&metrics);
    let n = pair.source().join("n");
    fs::create_dir_all(&n).expect("mkdir");
    let data = content(4 << 20, 3);
    fs::write(n.join("movie.fits.tmp"), &data).expect("write");
    wait_sending(&pair);
    fs::rename(n.join("movie.fits.tmp"), n.join("movie.fits")).expect("rename");
    wait_published(&pair, "n/movie.fits", Duration::from_secs(60));
    wait_status(&pair, "done", 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        published_files(&pair),
        ["n/movie.fits"],
        "not under the temporary name"
    );
    assert_eq!(
        fs::read(pair.published().join("n/movie.fits")).expect("stored"),
        data
    );
    assert_eq!(status(&pair, "vanished"), 1, "the temporary's row");
    assert_eq!(
        metric(
            &addr,
            "skyferry_agent_files_abandoned_total{reason=\"moved\"}"
        )
        .expect("metric"),
        1.0
    );
}
