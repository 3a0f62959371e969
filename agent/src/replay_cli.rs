//! `skyferry-agent replay`: selects files (a tree walk of `--root`, or `--from-list`),
//! filters them by mtime and glob, and queues them in the journal in batches, next to a
//! running agent or while it is stopped. Memory does not grow with the number of files:
//! the walk holds a stack of directories, the queue one batch.
//!
//! Receiver paths: a file under a watch root is named relative to that watch root (as
//! the watch would name it: one journal row, one stored path); any other file relative
//! to `--root`. A file that is neither, or whose path the wire refuses, is reported and
//! skipped.

use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobMatcher};
use skyferry_common::config::AgentConfig;
use skyferry_common::relpath::RelPath;
use skyferry_common::unix_time::mtime_ns;

use crate::journal::{Discovered, Journal};
use crate::replay::Batch;

/// Rows per transaction.
pub const BATCH: usize = 4096;

/// What a replay selects.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub root: Option<PathBuf>,
    /// `--from-list`: a file of paths, `-` for stdin.
    pub from_list: Option<PathBuf>,
    /// mtime range `[since, until)` in ns since the epoch.
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub glob: Option<String>,
}

/// Where a walk ended up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Walked {
    pub selected: u64,
    pub selected_bytes: u64,
    pub batch: Batch,
    /// Files refused (outside every root, bad path), each reported on stderr.
    pub refused: u64,
}

struct Filter {
    since: Option<i64>,
    until: Option<i64>,
    glob: Option<GlobMatcher>,
}

impl Filter {
    fn keeps(&self, rel: &str, mtime: i64) -> bool {
        self.since.is_none_or(|s| mtime >= s)
            && self.until.is_none_or(|u| mtime < u)
            && self.glob.as_ref().is_none_or(|g| g.is_match(rel))
    }
}

/// Maps absolute paths to (root, receiver path).
struct Roots {
    /// Watch roots, canonical, longest first.
    watches: Vec<PathBuf>,
    root: Option<PathBuf>,
}

impl Roots {
    fn name(&self, file: &Path) -> Result<(String, String), String> {
        let (root, rel) = self
            .watches
            .iter()
            .chain(self.root.as_ref())
            .find_map(|r| file.strip_prefix(r).ok().map(|rel| (r, rel)))
            .ok_or_else(|| {
                format!(
                    "{}: under no watch root{}",
                    file.display(),
                    if self.root.is_some() {
                        " nor --root"
                    } else {
                        " (give --root)"
                    }
                )
            })?;
        let rel = RelPath::from_relative(rel)
            .map_err(|e| format!("{}: not a path the receiver takes: {e}", file.display()))?;
        Ok((root.display().to_string(), rel.as_str().to_owned()))
    }
}

/// Walks the selection, calling `sink` with each batch of files; returns the counts.
/// `sink` returns the batch's journal counts (`Batch::default()` for a dry run).
pub fn walk(
    config: &AgentConfig,
    sel: &Selection,
    mut sink: impl FnMut(&[Discovered]) -> anyhow::Result<Batch>,
) -> anyhow::Result<Walked> {
    let canonical =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let mut watches: Vec<PathBuf> = config
        .watches
        .iter()
        .filter_map(|w| std::fs::canonicalize(&w.root).ok())
        .collect();
    watches.sort_by_key(|w| std::cmp::Reverse(w.as_os_str().len()));
    let root = sel.root.as_deref().map(canonical).transpose()?;
    let roots = Roots { watches, root };
    let filter = Filter {
        since: sel.since_ns,
        until: sel.until_ns,
        glob: sel
            .glob
            .as_deref()
            .map(|g| {
                Glob::new(g)
                    .map(|g| g.compile_matcher())
                    .map_err(|e| anyhow::anyhow!("--glob {g:?}: {e}"))
            })
            .transpose()?,
    };
    let mut w = Walked::default();
    let mut batch: Vec<Discovered> = Vec::with_capacity(BATCH);
    let mut flush = |batch: &mut Vec<Discovered>, w: &mut Walked| -> anyhow::Result<()> {
        if !batch.is_empty() {
            let b = sink(batch)?;
            w.batch.queued += b.queued;
            w.batch.queued_bytes += b.queued_bytes;
            w.batch.skipped += b.skipped;
            batch.clear();
        }
        Ok(())
    };
    let consider = |path: &Path, meta: &std::fs::Metadata, w: &mut Walked| {
        let (root, rel) = match roots.name(path) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("skipped: {e}");
                w.refused += 1;
                return None;
            }
        };
        let mtime = mtime_ns(meta);
        if !filter.keeps(&rel, mtime) {
            return None;
        }
        w.selected += 1;
        w.selected_bytes += meta.len();
        Some(Discovered {
            root,
            path: rel,
            size: meta.len(),
            mtime_ns: mtime,
        })
    };
    let mut add = |d: Option<Discovered>, w: &mut Walked| -> anyhow::Result<()> {
        if let Some(d) = d {
            batch.push(d);
            if batch.len() >= BATCH {
                flush(&mut batch, w)?;
            }
        }
        Ok(())
    };
    if let Some(list) = &sel.from_list {
        let reader: Box<dyn BufRead> = if list.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(std::fs::File::open(list).map_err(
                |e| anyhow::anyhow!("--from-list {}: {e}", list.display()),
            )?))
        };
        for line in reader.lines() {
            let line = line.map_err(|e| anyhow::anyhow!("--from-list: {e}"))?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let given = PathBuf::from(line);
            let given = match (&sel.root, given.is_absolute()) {
                (Some(r), false) => r.join(given),
                _ => given,
            };
            match std::fs::canonicalize(&given)
                .and_then(|p| std::fs::symlink_metadata(&p).map(|m| (p, m)))
            {
                Ok((p, m)) if m.is_file() => add(consider(&p, &m, &mut w), &mut w)?,
                Ok(_) => {
                    eprintln!("skipped: {}: not a regular file", given.display());
                    w.refused += 1;
                }
                Err(e) => {
                    eprintln!("skipped: {}: {e}", given.display());
                    w.refused += 1;
                }
            }
        }
    } else if let Some(root) = roots.root.clone() {
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("skipped: {}: {e}", dir.display());
                    w.refused += 1;
                    continue;
                }
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let path = entry.path();
                if meta.is_dir() {
                    dirs.push(path);
                } else if meta.is_file() && meta.nlink() > 0 {
                    add(consider(&path, &meta, &mut w), &mut w)?;
                }
            }
        }
    } else {
        anyhow::bail!("nothing selected: give --root DIR or --from-list FILE");
    }
    flush(&mut batch, &mut w)?;
    Ok(w)
}

/// Queues a selection as replay `replay`.
pub fn enqueue(
    config: &AgentConfig,
    journal: &mut Journal,
    replay: i64,
    sel: &Selection,
    resend: bool,
) -> anyhow::Result<Walked> {
    let w = walk(config, sel, |files| {
        Ok(journal.enqueue_replay(replay, files, resend)?)
    })?;
    journal.replay_enqueued(replay)?;
    Ok(w)
}
