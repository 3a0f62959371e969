//! The filesystem source: an inotify watch (see [`super::watcher`]) for low latency, and
//! a full reconciling rescan at startup, every `rescan_interval`, whenever the watch may
//! have missed something (event queue overflow, watch error), and when asked (a Redis
//! pub/sub reconnect, SIGHUP). Whatever happens to the watch, the rescans go on: while
//! the watch is down (it could not start, or the inotify watch limit was reached) or a
//! directory cannot be watched, they run every `fallback_rescan_interval`. A directory
//! that cannot be read is reported (WARN when it becomes unreadable, INFO when it is
//! readable again, `skyferry_agent_fs_unreadable_dirs`) and skipped; the rest of the tree
//! is shipped as usual.
//!
//! When a file is ready: one the watch saw closed after writing, or renamed into place,
//! once no further change was seen for the root's `quiet_period` (a writer that re-opens
//! the file and appends within it yields one version); one the watch saw being written
//! and never closed, once unchanged for [`STALE_WRITER`](super::candidates::STALE_WRITER); one found by a rescan, once its
//! size and mtime held still for `settle` (and, in a directory that just appeared, the
//! quiet period passed without an event). Rescans leave candidates to these rules. A
//! file changed after it was queued is a new version (a new journal row); the upload
//! checks size and mtime before sending and the file's identity before committing, so
//! old and new bytes never mix.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skyferry_common::config::WatchConfig;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::candidates::{Candidate, Phase, Timing};
use super::watcher::{Added, DirWatch, Seen};
use super::{inspect, record, Context, Rejection, Rules};
use crate::journal::{Discovered, Durability};
use crate::metrics::WatchLabels;

/// Files per journal transaction during a rescan.
const BATCH: usize = 2000;

/// The state of one root's event loop besides its candidates.
struct Root {
    watch: WatchConfig,
    ctx: Arc<Context>,
    dirs: Arc<Mutex<DirWatch>>,
    label: WatchLabels,
    /// Directories that cannot be read (reported once each, until readable again).
    unreadable: HashSet<PathBuf>,
    /// Readable directories that cannot be watched (reported once each).
    unwatched: HashSet<PathBuf>,
    /// The current watch failure was logged at WARN.
    failure_reported: bool,
    /// The watch covers the root and its readable directories (and the first full
    /// rescan that established it is done).
    covered: bool,
}

/// Watches one root until shutdown. The watch's own problems never end this loop: it
/// ends only on shutdown.
pub async fn watch_root(
    watch: WatchConfig,
    index: usize,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) {
    let mut rescan_requests = ctx.rescan.subscribe();
    let (tx, mut rx) = mpsc::channel::<Seen>(8192);
    let overflow = Arc::new(AtomicBool::new(false));
    let mut root = Root {
        dirs: Arc::new(Mutex::new(DirWatch::new(tx, overflow.clone()))),
        label: WatchLabels {
            watch: index.to_string(),
        },
        unreadable: HashSet::new(),
        unwatched: HashSet::new(),
        failure_reported: false,
        covered: false,
        watch,
        ctx,
    };
    // Directories are watched by the first rescan's walk; the instance is created now.
    let _ = root.lock_dirs().start();

    let timing = root.timing();
    // Only for lost events: candidates are looked at when they need it (see
    // `candidates`), not on this tick.
    let mut tick = tokio::time::interval(timing.recheck);
    let mut period = root.rescan_period();
    let mut rescan = tokio::time::interval(period);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut candidates: HashMap<PathBuf, Candidate> = HashMap::new();

    loop {
        let next_look = next_look(&timing, &candidates);
        let full = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rescan.tick() => true,
            changed = rescan_requests.changed() => {
                if changed.is_err() {
                    return; // the context is gone: shutting down
                }
                root.retry_watch();
                true
            }
            Some(seen) = rx.recv() => {
                for seen in std::iter::once(seen).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    root.on_event(seen, &mut candidates).await;
                }
                false
            }
            _ = tokio::time::sleep_until(next_look.unwrap_or_else(tokio::time::Instant::now)), if next_look.is_some() => {
                root.settle_candidates(&mut candidates).await;
                false
            }
            _ = tick.tick() => {
                let lost = overflow.swap(false, Ordering::Relaxed);
                if lost {
                    root.ctx.metrics.fs_overflows.inc();
                    warn!(root = %root.watch.root.display(), "filesystem events were lost (event queue overflow or watch error); rescanning");
                }
                lost
            }
        };
        if full {
            let dir = root.watch.root.clone();
            root.scan(&dir, &mut candidates, true).await;
            let p = root.rescan_period();
            if p != period {
                period = p;
                rescan = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
            }
        }
    }
}

/// The earliest instant a candidate needs a look, if there is any candidate.
fn next_look(
    timing: &Timing,
    candidates: &HashMap<PathBuf, Candidate>,
) -> Option<tokio::time::Instant> {
    let (now, now_ns) = (Instant::now(), skyferry_common::unix_time::now_ns());
    candidates
        .values()
        .map(|c| c.next_look(timing, now, now_ns))
        .min()
        .map(tokio::time::Instant::from_std)
}

impl Root {
    fn timing(&self) -> Timing {
        Timing::new(self.watch.quiet_period, self.watch.settle)
    }

    fn lock_dirs(&self) -> std::sync::MutexGuard<'_, DirWatch> {
        self.dirs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rescans are the only source of files the watch does not cover: make them frequent.
    fn rescan_period(&self) -> Duration {
        let degraded = !self.lock_dirs().is_active() || !self.unwatched.is_empty();
        if degraded {
            self.watch
                .rescan_interval
                .min(self.watch.fallback_rescan_interval)
        } else {
            self.watch.rescan_interval
        }
    }

    /// A requested rescan (SIGHUP, a Redis reconnect) also tries to start a watch that
    /// is down, e.g. after the operator raised the inotify limit.
    fn retry_watch(&mut self) {
        let mut dirs = self.lock_dirs();
        if dirs.is_active() {
            return;
        }
        match dirs.start() {
            Ok(()) => {
                drop(dirs);
                info!(root = %self.watch.root.display(), "starting the filesystem watch again");
                self.covered = false;
            }
            Err(e) => {
                dirs.take_failure();
                drop(dirs);
                self.ctx.metrics.fs_error(e.kind());
                info!(root = %self.watch.root.display(), error = %e, "the filesystem watch still cannot start; rescanning");
            }
        }
    }

    /// Handles one event: files become candidates, new directories are scanned.
    async fn on_event(&mut self, seen: Seen, candidates: &mut HashMap<PathBuf, Candidate>) {
        let now = Instant::now();
        match seen {
            Seen::Changed(p, writing) => {
                let c = candidates.entry(p).or_insert(Candidate::new(
                    if writing {
                        Phase::Writing
                    } else {
                        Phase::Settling
                    },
                    now,
                ));
                if writing {
                    c.written(now);
                } else {
                    c.touched(now);
                }
            }
            Seen::Complete(p) => candidates
                .entry(p)
                .or_insert(Candidate::new(Phase::Closed, now))
                .closed(now),
            Seen::Gone(p) => {
                candidates.remove(&p);
                self.lock_dirs().forget(&p);
            }
            Seen::Dir(d) => self.scan(&d, candidates, false).await,
        }
    }

    /// Looks at the candidates that need it and queues those that became ready; stat()
    /// can block (slow or hung storage), so it runs off the runtime.
    async fn settle_candidates(&self, candidates: &mut HashMap<PathBuf, Candidate>) {
        if candidates.is_empty() {
            return;
        }
        let (w, rules, mut c) = (
            self.watch.clone(),
            self.ctx.rules.current(),
            std::mem::take(candidates),
        );
        let (c, ready) = tokio::task::spawn_blocking(move || {
            let ready = settle(&w, &rules, &mut c);
            (c, ready)
        })
        .await
        .unwrap_or_default();
        *candidates = c;
        enqueue(&self.ctx, ready).await;
    }

    /// Walks `dir` (the whole root when `full`, else a directory that appeared), adding
    /// watches as it goes: files the journal does not know are enqueued if settled, or
    /// become candidates. Candidates are left to their own rules. Then reports what the
    /// walk found wrong.
    async fn scan(&mut self, dir: &Path, candidates: &mut HashMap<PathBuf, Candidate>, full: bool) {
        let busy: HashSet<PathBuf> = candidates.keys().cloned().collect();
        let (w, d, c, dirs) = (
            self.watch.clone(),
            dir.to_owned(),
            self.ctx.clone(),
            self.dirs.clone(),
        );
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut dirs = dirs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if full {
                dirs.begin_full_scan();
            }
            let walked = walk_watching(&w, &d, &c, &busy, Some((&mut dirs, !full)));
            if full {
                dirs.end_full_scan();
            }
            walked
        })
        .await;
        let w = match result {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "rescan task failed");
                return;
            }
        };
        if w.new > 0 {
            self.ctx.wake.notify_one();
        }
        let now = Instant::now();
        for p in w.young {
            candidates
                .entry(p)
                .or_insert_with(|| Candidate::new(Phase::Settling, now));
        }
        self.report(&w.unreadable, &w.unwatched, full);
        if full {
            self.ctx.metrics.rescans.inc();
        }
        info!(dir = %dir.display(), files = w.seen, new = w.new, took = ?started.elapsed(), "rescan done");
        let (active, watched) = {
            let d = self.lock_dirs();
            (d.is_active(), d.len())
        };
        if full && active && !self.covered {
            self.covered = true;
            self.failure_reported = false;
            info!(root = %self.watch.root.display(), dirs = watched, "watching");
        }
    }

    /// Logs and counts what a walk could not read or watch, and the watch's state.
    fn report(
        &mut self,
        unreadable: &[(PathBuf, String)],
        unwatched: &[(PathBuf, String)],
        full: bool,
    ) {
        let root = self.watch.root.display().to_string();
        let metrics = &self.ctx.metrics;
        for (d, e) in unreadable {
            metrics.fs_error("read_dir");
            if self.unreadable.insert(d.clone()) {
                warn!(root = %root, dir = %d.display(), error = %e, "cannot read directory; its files are not shipped until it is readable (check its permissions)");
            }
        }
        for (d, e) in unwatched {
            metrics.fs_error("watch_dir");
            if self.unwatched.insert(d.clone()) {
                warn!(root = %root, dir = %d.display(), error = %e, "cannot watch directory; its files are found by rescans (every fallback_rescan_interval)");
            }
        }
        if full {
            let now_unreadable: HashSet<&PathBuf> = unreadable.iter().map(|(d, _)| d).collect();
            self.unreadable.retain(|d| {
                let still = now_unreadable.contains(d);
                if !still {
                    info!(root = %root, dir = %d.display(), "directory is readable again");
                }
                still
            });
            let now_unwatched: HashSet<&PathBuf> = unwatched.iter().map(|(d, _)| d).collect();
            self.unwatched.retain(|d| now_unwatched.contains(d));
        }
        metrics
            .fs_unreadable_dirs
            .get_or_create(&self.label)
            .set(self.unreadable.len() as i64);
        let (active, failure) = {
            let mut d = self.lock_dirs();
            (d.is_active(), d.take_failure())
        };
        if let Some(f) = failure {
            metrics.fs_error(f.kind());
            self.covered = false;
            if self.failure_reported {
                info!(root = %root, error = %f, "the filesystem watch failed again; rescanning instead");
            } else {
                self.failure_reported = true;
                warn!(root = %root, every = ?self.watch.fallback_rescan_interval.min(self.watch.rescan_interval),
                      "cannot watch: {f}; rescanning instead");
            }
        }
        metrics
            .fs_watch_active
            .get_or_create(&self.label)
            .set(i64::from(active));
    }
}

/// The journal entry for `path` under `root`, if the rules accept it and it is a regular
/// file whose name can cross the wire.
fn discovered(rules: &Rules, root: &Path, path: &Path) -> Option<Discovered> {
    match inspect(rules, root, path) {
        Ok(d) => Some(d),
        Err(Rejection::BadName(e)) => {
            warn!(path = %path.display(), error = %e, "skipping a file whose name cannot be shipped");
            None
        }
        Err(_) => None,
    }
}

/// Looks at the candidates whose next look is due and returns those that are ready
/// (see [`super::candidates`]); drops those that are gone, filtered or not files.
fn settle(
    watch: &WatchConfig,
    rules: &Rules,
    candidates: &mut HashMap<PathBuf, Candidate>,
) -> Vec<Discovered> {
    let timing = Timing::new(watch.quiet_period, watch.settle);
    let (now, now_ns) = (Instant::now(), skyferry_common::unix_time::now_ns());
    let mut ready = Vec::new();
    candidates.retain(|path, c| {
        if c.next_look(&timing, now, now_ns) > now {
            return true;
        }
        let Some(d) = discovered(rules, &watch.root, path) else {
            return false; // gone, filtered or not a file
        };
        if c.observe(d.size, d.mtime_ns, &timing, now, now_ns) {
            ready.push(d);
            return false;
        }
        true
    });
    ready
}

async fn enqueue(ctx: &Context, files: Vec<Discovered>) {
    let n = files.len();
    // The watch and rescans find a file again should a power loss roll the commit back.
    match record(ctx, files, Durability::Lazy).await {
        Ok(new) => {
            if n > 0 {
                debug!(seen = n, new, "files recorded");
            }
        }
        Err(e) => warn!(error = %e, "cannot record files in the journal; the next rescan retries"),
    }
}

/// What a walk found.
pub struct Walked {
    /// Files enqueued (new journal rows).
    pub new: usize,
    /// Files too young to be settled, or found in a directory that just appeared: they
    /// become candidates.
    pub young: Vec<PathBuf>,
    /// Files seen that the rules accept.
    pub seen: usize,
    /// Directories that could not be listed, with the error.
    pub unreadable: Vec<(PathBuf, String)>,
    /// Directories listed but not watched, with the error.
    pub unwatched: Vec<(PathBuf, String)>,
}

/// Blocking walk of `dir` under `watch.root`, skipping `busy` files (candidates).
/// Public for the benchmark (`skyferry-journal-bench`).
pub fn walk(watch: &WatchConfig, dir: &Path, ctx: &Context, busy: &HashSet<PathBuf>) -> Walked {
    walk_watching(watch, dir, ctx, busy, None)
}

/// [`walk`] that also watches every directory just before listing it, so that a file is
/// either listed or reported by the watch. With `force` (a directory that just appeared)
/// every directory is watched even if it was watched already, and every file found
/// becomes a candidate. Symbolic links are not followed.
fn walk_watching(
    watch: &WatchConfig,
    dir: &Path,
    ctx: &Context,
    busy: &HashSet<PathBuf>,
    mut dirs: Option<(&mut DirWatch, bool)>,
) -> Walked {
    let appeared = dirs.as_ref().is_some_and(|(_, force)| *force);
    let rules = ctx.rules.current();
    let journal = &ctx.journal;
    let settle_ns = watch.settle.as_nanos() as i64;
    let now = skyferry_common::unix_time::now_ns();
    let mut stack = vec![dir.to_owned()];
    let mut batch = Vec::new();
    let mut walked = Walked {
        new: 0,
        young: Vec::new(),
        seen: 0,
        unreadable: Vec::new(),
        unwatched: Vec::new(),
    };
    let flush = |batch: &mut Vec<Discovered>, new: &mut usize| {
        let mut j = journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unknown: Vec<Discovered> = batch
            .drain(..)
            .filter(|d| !j.contains(d).unwrap_or(false))
            .collect();
        match j.enqueue_with(&unknown, Durability::Lazy) {
            Ok(n) => *new += n,
            Err(e) => warn!(error = %e, "cannot record files in the journal"),
        }
    };
    while let Some(d) = stack.pop() {
        let watched = match dirs.as_mut() {
            Some((w, force)) => w.add(&d, *force),
            None => Added::Done,
        };
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != watch.root => continue,
            Err(e) => {
                walked.unreadable.push((d, e.to_string()));
                continue;
            }
        };
        if let Added::Failed(e) = watched {
            walked.unwatched.push((d.clone(), e));
        }
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    walked.unreadable.push((d.clone(), e.to_string()));
                    break;
                }
            };
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => {
                    if busy.contains(&path) {
                        continue;
                    }
                    let Some(found) = discovered(&rules, &watch.root, &path) else {
                        continue;
                    };
                    walked.seen += 1;
                    // In a directory that just appeared, files may have been written before
                    // its watch existed: a writer may still be at work, so let the
                    // candidate rules decide rather than a single look at the mtime.
                    if now - found.mtime_ns < settle_ns || appeared {
                        walked.young.push(path);
                    } else {
                        batch.push(found);
                        if batch.len() >= BATCH {
                            flush(&mut batch, &mut walked.new);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    flush(&mut batch, &mut walked.new);
    walked
}
