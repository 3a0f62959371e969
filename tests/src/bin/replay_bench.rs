//! `skyferry-replay-bench`: a replay at backfill scale. Not a timed test; run it by hand
//! (release build) and read the figures:
//!
//! ```text
//! cargo run --release --bin skyferry-replay-bench -- [FILES] [TREE_DIR]
//! ```
//!
//! 1. A tree of FILES empty files (default 10,000,000) under TREE_DIR (default a
//!    directory under /tmp), 84 per exposure directory and 1,000 exposures per night
//!    directory, like an archive volume; created once and reused when it already holds
//!    them (10 M files need 10 M free inodes: `df -i`; a loop-mounted ext4 made with
//!    `mkfs.ext4 -N 10500000` keeps them off the system disk).
//! 2. `skyferry-agent replay --root TREE_DIR` on a stopped agent's fresh journal, the
//!    real binary: wall time, enqueue rate and the process's peak RSS (VmHWM, polled).
//! 3. With all of them queued: `skyferry-agent status`, `replay list` and `replay show
//!    ID` (text and `--json`), each timed (best of three).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use skyferry_tests::binaries::binary;

const PER_EXPOSURE: usize = 84;
const EXPOSURES_PER_NIGHT: usize = 1000;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let files: usize = match args.next() {
        Some(n) => n.parse().context("FILES must be a number")?,
        None => 10_000_000,
    };
    let work = tempfile::tempdir()?;
    let tree = match args.next() {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("skyferry-replay-bench-{files}")),
    };
    let bin = binary("skyferry-agent")?;
    make_tree(&tree, files)?;
    let config = agent_config(work.path())?;
    // The journal, as the agent's first start leaves it (replay needs one).
    let journal = work.path().join("journal.sqlite");
    drop(
        skyferry_agent::journal::Journal::open(&journal)
            .map_err(|e| anyhow::anyhow!("creating the journal: {e}"))?,
    );

    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["replay", "--name", "bench", "--root"])
        .arg(&tree)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut peak = 0;
    loop {
        if let Some(hwm) = vm_hwm(child.id()) {
            peak = peak.max(hwm);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "replay failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "replay --root: {files} files queued in {secs:.1} s = {:.0} files/s (goal >= 50000), \
         peak RSS {:.1} MiB (goal <= 150)",
        files as f64 / secs,
        peak as f64 / (1 << 20) as f64
    );
    let id = replay_id(&String::from_utf8_lossy(&out.stdout))?;

    println!(
        "journal: {:.0} MiB",
        std::fs::metadata(&journal)?.len() as f64 / (1 << 20) as f64
    );
    for cmd in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["replay", "list"],
        vec!["replay", "show", &id],
        vec!["replay", "show", &id, "--json"],
    ] {
        let mut best = f64::MAX;
        let mut text = String::new();
        for _ in 0..3 {
            let t = Instant::now();
            let out = Command::new(&bin)
                .args(&cmd)
                .arg("--config")
                .arg(&config)
                .output()?;
            best = best.min(t.elapsed().as_secs_f64());
            if !out.status.success() {
                bail!(
                    "`skyferry-agent {}` failed: {}",
                    cmd.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
        println!(
            "`skyferry-agent {}` with {files} queued: {:.3} s (goal < 1 s)",
            cmd.join(" "),
            best
        );
        if cmd.len() == 1 || cmd[1] == "show" && cmd.len() == 3 {
            for line in text.lines().take(12) {
                println!("    {line}");
            }
        }
    }
    Ok(())
}

/// `FILES` empty files in night/exposure directories, unless the tree already has them
/// (its marker file says how many).
fn make_tree(tree: &Path, files: usize) -> Result<()> {
    let marker = tree.join(".bench-files");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&files.to_string()) {
        println!("tree: reusing {files} files under {}", tree.display());
        return Ok(());
    }
    let started = Instant::now();
    let mut made = 0;
    'all: for night in 0.. {
        for exp in 0..EXPOSURES_PER_NIGHT {
            let dir = tree.join(format!(
                "2019-{:02}-{:02}/exp{:07}",
                night / 28 % 12 + 1,
                night % 28 + 1,
                night * EXPOSURES_PER_NIGHT + exp
            ));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for det in 0..PER_EXPOSURE {
                if made == files {
                    break 'all;
                }
                std::fs::File::create(dir.join(format!("det{det:02}.fits")))
                    .with_context(|| format!("creating a file in {}", dir.display()))?;
                made += 1;
            }
        }
    }
    std::fs::write(&marker, files.to_string())?;
    println!(
        "tree: created {files} files under {} in {:.1} s",
        tree.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A stopped agent: TLS identity from `skyferry-receiver certs`, a journal in `dir`, an
/// empty watch root beside it (the replay's tree is an archive volume outside every
/// watch root, so its files are named relative to `--root`).
fn agent_config(dir: &Path) -> Result<PathBuf> {
    let receiver = binary("skyferry-receiver")?;
    let tls = dir.join("tls");
    for args in [
        vec!["certs", "init", "--out", "tls", "--name", "receiver.bench"],
        vec![
            "certs",
            "issue-agent",
            "--ca-dir",
            "tls",
            "--name",
            "bench-agent",
            "--out",
            "tls",
        ],
    ] {
        let out = Command::new(&receiver)
            .args(&args)
            .current_dir(dir)
            .output()
            .with_context(|| format!("running {}", receiver.display()))?;
        if !out.status.success() {
            bail!(
                "`skyferry-receiver {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let watch = dir.join("watch");
    std::fs::create_dir_all(&watch)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"bench-agent\"\njournal = {:?}\n\n[receiver]\n\
             address = \"127.0.0.1:9\"\nserver_name = \"receiver.bench\"\n\
             ca = {:?}\ncert = {:?}\nkey = {:?}\n\n[[watch]]\nroot = {:?}\n",
            dir.join("journal.sqlite").display().to_string(),
            tls.join("ca.pem").display().to_string(),
            tls.join("bench-agent.pem").display().to_string(),
            tls.join("bench-agent.key").display().to_string(),
            watch.display().to_string(),
        ),
    )?;
    Ok(config)
}

/// The replay id that `replay` printed (`replay 1 "bench": …`).
fn replay_id(out: &str) -> Result<String> {
    out.split_whitespace()
        .skip_while(|w| *w != "replay")
        .nth(1)
        .map(|w| w.trim_end_matches(':').to_owned())
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty())
        .with_context(|| format!("no replay id in the output of replay: {out:?}"))
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}
