//! `skyferry-journal-bench`: how fast the agent's journal and rescans are at scale. Not a
//! timed test; run it by hand (release build) and read the figures:
//!
//! ```text
//! cargo run --release -p skyferry-tests --bin skyferry-journal-bench -- [FILES] [TREE_DIR|-]
//! ```
//!
//! 1. Enqueue: FILES synthetic paths (default 1,000,000) into a fresh journal, in
//!    transactions of 2,000 (as a rescan does); then the same paths again (every one
//!    already known: the idempotent path).
//! 2. Rescan: a tree of FILES empty files under TREE_DIR (created once, kept and reused
//!    when it already holds them), walked by the agent's own rescan code: first into an
//!    empty journal (every file new), then again (every file known: the periodic rescan).
//!    Skipped when TREE_DIR is `-` (e.g. for a 10 M-row journal without 10 M files).
//! 3. Checks: `PRAGMA quick_check` and `PRAGMA integrity_check` on the journal of step 1
//!    (the agent runs the latter just after it starts), and opening it as the agent does.
//!
//! `skyferry-journal-bench --checks ROWS` only does step 3, on a journal of ROWS rows
//! filled by one SQL statement (90% done with a hash, 10% pending): minutes instead of
//! the hour that enqueueing 10 M rows one transaction of 2,000 at a time takes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context as _, Result};
use skyferry_agent::journal::{Discovered, Journal};
use skyferry_agent::metrics::Metrics;
use skyferry_agent::sources::{fs::walk, Context, Rules, SharedRules};
use skyferry_common::config::{Blocklist, PathFilter, WatchConfig};

const FILES_PER_DIR: usize = 1000;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "--checks") {
        args.next();
        let rows: usize = args
            .next()
            .context("--checks needs a number of rows")?
            .parse()
            .context("ROWS must be a number")?;
        let tmp = tempfile::tempdir()?;
        let journal = tmp.path().join("checks.sqlite");
        fill(&journal, rows)?;
        return check_bench(&journal, rows);
    }
    let files: usize = match args.next() {
        Some(n) => n.parse().context("FILES must be a number")?,
        None => 1_000_000,
    };
    let tmp = tempfile::tempdir()?;
    let tree = match args.next() {
        Some(d) if d == "-" => None,
        Some(d) => Some(PathBuf::from(d)),
        None => Some(tmp.path().join("tree")),
    };
    enqueue_bench(tmp.path(), files)?;
    check_bench(&tmp.path().join("enqueue.sqlite"), files)?;
    if let Some(tree) = tree {
        rescan_bench(tmp.path(), &tree, files)?;
    }
    Ok(())
}

/// A journal of `rows` rows shaped like the agent's (same schema, through
/// `Journal::open`), filled in one transaction.
fn fill(journal: &Path, rows: usize) -> Result<()> {
    drop(Journal::open(journal)?);
    let started = Instant::now();
    let db = rusqlite::Connection::open(journal)?;
    db.execute_batch(&format!(
        "BEGIN;
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {rows})
         INSERT INTO files (root, path, size, mtime_ns, hash, state, discovered_ns, finished_ns)
         SELECT '/data/tomoe/raw',
                printf('2024-05-%02d/exp%06d/det%02d.fits', i / 100000 % 31, i / 84, i % 84),
                4000000 + i, 1700000000000000000 + i * 1000,
                CASE WHEN i % 10 = 0 THEN NULL ELSE randomblob(32) END,
                CASE WHEN i % 10 = 0 THEN 0 ELSE 2 END,
                1700000000000000000 + i * 1000,
                CASE WHEN i % 10 = 0 THEN NULL ELSE 1700000000000000000 + i * 1000 END
         FROM n;
         COMMIT;"
    ))?;
    println!(
        "filled a journal with {rows} rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Times SQLite's two consistency checks and the agent's own open (which runs one).
fn check_bench(journal: &Path, files: usize) -> Result<()> {
    let bytes = std::fs::metadata(journal)?.len();
    println!("journal of {files} rows: {:.0} MB", bytes as f64 / 1e6);
    let db = rusqlite::Connection::open(journal)?;
    // Each twice: the first run may still be reading the file into the page cache.
    for pragma in [
        "quick_check",
        "integrity_check",
        "quick_check",
        "integrity_check",
    ] {
        let started = Instant::now();
        let verdict: String = db.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))?;
        println!(
            "PRAGMA {pragma}: {verdict} in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
    drop(db);
    let started = Instant::now();
    drop(Journal::open(journal)?);
    println!(
        "Journal::open (the agent's start): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rate(n: usize, secs: f64) -> String {
    format!("{:.0} files/s", n as f64 / secs.max(1e-9))
}

fn enqueue_bench(dir: &Path, files: usize) -> Result<()> {
    let mut journal = Journal::open(&dir.join("enqueue.sqlite"))?;
    let batch = |start: usize| -> Vec<Discovered> {
        (start..(start + 2000).min(files))
            .map(|i| Discovered {
                root: "/data/tomoe/raw".into(),
                path: format!(
                    "2024-05-{:02}/exp{:06}/det{:02}.fits",
                    i / 100_000,
                    i / 84,
                    i % 84
                ),
                size: 4_000_000 + i as u64,
                mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            })
            .collect()
    };
    for (label, expect_new) in [("new", true), ("already known", false)] {
        let started = Instant::now();
        let mut new = 0;
        for start in (0..files).step_by(2000) {
            new += journal.enqueue(&batch(start))?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "journal enqueue, {label}: {files} paths in {secs:.2} s = {} ({new} new rows)",
            rate(files, secs)
        );
        assert_eq!(new, if expect_new { files } else { 0 });
    }
    Ok(())
}

fn rescan_bench(dir: &Path, tree: &Path, files: usize) -> Result<()> {
    let dirs = files.div_ceil(FILES_PER_DIR);
    let marker = tree.join(format!(".complete-{files}"));
    if !marker.exists() {
        let started = Instant::now();
        for d in 0..dirs {
            let sub = tree.join(format!("night-{:02}/exp{d:05}", d % 30));
            std::fs::create_dir_all(&sub)?;
            for f in 0..FILES_PER_DIR.min(files - d * FILES_PER_DIR) {
                std::fs::File::create(sub.join(format!("det{f:03}.fits")))?;
            }
        }
        std::fs::write(&marker, b"")?;
        println!(
            "created {files} files in {dirs} directories under {} in {:.1} s",
            tree.display(),
            started.elapsed().as_secs_f64()
        );
    }
    let root = tree.canonicalize()?;
    let watch = WatchConfig {
        root: root.clone(),
        filter: PathFilter::new(&["**/*.fits".into()], &[])
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        settle: std::time::Duration::ZERO,
        quiet_period: std::time::Duration::ZERO,
        rescan_interval: std::time::Duration::from_secs(300),
        fallback_rescan_interval: std::time::Duration::from_secs(30),
    };
    let journal = Arc::new(Mutex::new(Journal::open(&dir.join("rescan.sqlite"))?));
    let ctx = Context {
        journal,
        wake: Arc::new(tokio::sync::Notify::new()),
        metrics: Arc::new(Metrics::default()),
        rules: SharedRules::new(Rules::new(
            vec![(root.clone(), watch.filter.clone())],
            Blocklist::default(),
        )),
        rescan: tokio::sync::watch::channel(0).0,
    };
    for label in ["first (every file new)", "again (every file known)"] {
        let started = Instant::now();
        let w = walk(&watch, &root, &ctx, &HashSet::new());
        let secs = started.elapsed().as_secs_f64();
        println!(
            "rescan, {label}: {} files seen, {} new, in {secs:.2} s = {}",
            w.seen,
            w.new,
            rate(w.seen, secs)
        );
    }
    Ok(())
}
