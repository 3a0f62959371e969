//! The filesystem source: an inotify watch (via `notify`) for low latency, and a full
//! reconciling rescan at startup, periodically, whenever the watch may have missed
//! something (event queue overflow, watch error), and when asked (a Redis pub/sub
//! reconnect, a SIGHUP reload). Without a watch (e.g. the inotify watch limit is reached)
//! rescans run at least every 30 s.
//!
//! A file is ready when it was closed after writing or renamed into place. A file the
//! watch saw being written is waited for until it is closed (or, should the close event
//! be lost, unchanged for [`STALE_WRITER`]); a file found by a rescan is ready when its
//! size and mtime have not changed for the root's `settle` time. Rescans skip the files
//! being written. A file changed after it was queued is a new version (a new journal
//! row); the upload checks size and mtime before sending, so old and new bytes never mix.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use skyferry_common::config::WatchConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{inspect, record, Context, Rejection, Rules};
use crate::journal::Discovered;

/// A file the watch saw being written is shipped when it is closed; should the close event
/// be lost, once it has not changed for this long (or the root's `settle`, if longer).
pub const STALE_WRITER: Duration = Duration::from_secs(60);

/// Files per journal transaction during a rescan.
const BATCH: usize = 2000;

/// What the watch reports to the event loop.
enum Seen {
    /// Possibly still being written (`true`: data was written, wait for the close), or
    /// only its metadata changed (`false`): wait for it to settle.
    Changed(PathBuf, bool),
    /// Closed after writing or renamed into place: ready now.
    Complete(PathBuf),
    /// A directory appeared: scan it (files may predate its watch).
    Dir(PathBuf),
}

/// A file waiting to settle.
#[derive(Clone)]
struct Candidate {
    size: u64,
    mtime_ns: i64,
    /// Seen being written by the watch: wait for its close event.
    writing: bool,
}

impl Candidate {
    fn new(writing: bool) -> Candidate {
        Candidate {
            size: u64::MAX,
            mtime_ns: i64::MIN,
            writing,
        }
    }
}

/// Watches one root until shutdown.
pub async fn watch_root(watch: WatchConfig, ctx: Arc<Context>, shutdown: CancellationToken) {
    let root = watch.root.clone();
    let mut rescan_requests = ctx.rescan.subscribe();
    let (tx, mut rx) = mpsc::channel::<Seen>(8192);
    let overflow = Arc::new(AtomicBool::new(false));
    let _watcher = start_watcher(&root, tx, overflow.clone());
    let watching = _watcher.is_some();

    let tick_every = (watch.settle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(tick_every);
    // Without a working watch, rescans are the only source: make them frequent.
    let rescan_every = if watching {
        watch.rescan_interval
    } else {
        watch.rescan_interval.min(Duration::from_secs(30))
    };
    let mut rescan = tokio::time::interval(rescan_every);
    let mut candidates: HashMap<PathBuf, Candidate> = HashMap::new();

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rescan.tick() => {
                scan(&watch, &root, &ctx, &mut candidates).await;
            }
            changed = rescan_requests.changed() => {
                if changed.is_err() {
                    return; // the context is gone: shutting down
                }
                scan(&watch, &root, &ctx, &mut candidates).await;
            }
            seen = rx.recv() => {
                let Some(seen) = seen else { return };
                let mut complete = Vec::new();
                for seen in std::iter::once(seen).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    match seen {
                        Seen::Changed(p, writing) => {
                            candidates.entry(p).or_insert(Candidate::new(writing)).writing |= writing;
                        }
                        Seen::Complete(p) => {
                            candidates.remove(&p);
                            complete.push(p);
                        }
                        Seen::Dir(d) => scan(&watch, &d, &ctx, &mut candidates).await,
                    }
                }
                if !complete.is_empty() {
                    let (rules, r) = (ctx.rules.current(), root.clone());
                    let ready = tokio::task::spawn_blocking(move || {
                        complete.iter().filter_map(|p| discovered(&rules, &r, p)).collect()
                    })
                    .await
                    .unwrap_or_default();
                    enqueue(&ctx, ready).await;
                }
            }
            _ = tick.tick() => {
                if overflow.swap(false, Ordering::Relaxed) {
                    ctx.metrics.fs_overflows.inc();
                    warn!(root = %root.display(), "filesystem events were lost (event queue overflow or watch error); rescanning");
                    scan(&watch, &root, &ctx, &mut candidates).await;
                }
                if candidates.is_empty() {
                    continue;
                }
                // stat() can block (slow or hung storage): keep it off the runtime.
                let (w, rules, mut c) = (watch.clone(), ctx.rules.current(), std::mem::take(&mut candidates));
                let (c, ready) = tokio::task::spawn_blocking(move || {
                    let ready = settle(&w, &rules, &mut c);
                    (c, ready)
                })
                .await
                .unwrap_or_default();
                candidates = c;
                enqueue(&ctx, ready).await;
            }
        }
    }
}

fn start_watcher(
    root: &Path,
    tx: mpsc::Sender<Seen>,
    overflow: Arc<AtomicBool>,
) -> Option<notify::RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "filesystem watch error; rescanning");
                overflow.store(true, Ordering::Relaxed);
                return;
            }
        };
        tracing::trace!(?event, "fs event");
        if event.need_rescan() {
            overflow.store(true, Ordering::Relaxed);
            return;
        }
        for path in event.paths {
            let seen = match event.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => Seen::Complete(path),
                EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                    if path.is_file() =>
                {
                    Seen::Complete(path)
                }
                EventKind::Create(CreateKind::Folder) => Seen::Dir(path),
                EventKind::Create(_) | EventKind::Modify(_) if path.is_dir() => Seen::Dir(path),
                EventKind::Create(CreateKind::File)
                | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                    Seen::Changed(path, true)
                }
                EventKind::Create(_) | EventKind::Modify(_) => Seen::Changed(path, false),
                _ => continue,
            };
            // Never block the watch thread: a full queue is an overflow, mended by a rescan.
            if tx.try_send(seen).is_err() {
                overflow.store(true, Ordering::Relaxed);
            }
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot start the filesystem watch; relying on periodic rescans");
            return None;
        }
    };
    match watcher.watch(root, RecursiveMode::Recursive) {
        Ok(()) => {
            info!(root = %root.display(), "watching");
            Some(watcher)
        }
        Err(e) => {
            let hint = match e.kind {
                notify::ErrorKind::MaxFilesWatch => {
                    " (inotify watch limit reached: raise it with `sysctl fs.inotify.max_user_watches=1048576`)"
                }
                _ => "",
            };
            warn!(root = %root.display(), error = %e, "cannot watch{hint}; relying on periodic rescans");
            None
        }
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

/// Enqueues candidates whose size and mtime held still for the settle time.
fn settle(
    watch: &WatchConfig,
    rules: &Rules,
    candidates: &mut HashMap<PathBuf, Candidate>,
) -> Vec<Discovered> {
    let now = skyferry_common::unix_time::now_ns();
    let settle_ns = watch.settle.as_nanos() as i64;
    let stale_ns = watch.settle.max(STALE_WRITER).as_nanos() as i64;
    let mut ready = Vec::new();
    candidates.retain(|path, c| {
        let Some(d) = discovered(rules, &watch.root, path) else {
            return false; // gone, filtered or not a file
        };
        let unchanged = d.size == c.size && d.mtime_ns == c.mtime_ns;
        let wait = if c.writing { stale_ns } else { settle_ns };
        if unchanged && now - d.mtime_ns >= wait {
            ready.push(d);
            return false;
        }
        c.size = d.size;
        c.mtime_ns = d.mtime_ns;
        true
    });
    ready
}

async fn enqueue(ctx: &Context, files: Vec<Discovered>) {
    let n = files.len();
    match record(ctx, files).await {
        Ok(new) => {
            if n > 0 {
                debug!(seen = n, new, "files recorded");
            }
        }
        Err(e) => warn!(error = %e, "cannot record files in the journal; the next rescan retries"),
    }
}

/// Walks `dir` (the root or a new subdirectory): files the journal does not know are
/// enqueued if settled, or become candidates. Files being written are left alone.
async fn scan(
    watch: &WatchConfig,
    dir: &Path,
    ctx: &Arc<Context>,
    candidates: &mut HashMap<PathBuf, Candidate>,
) {
    let busy: HashSet<PathBuf> = candidates
        .iter()
        .filter(|(_, c)| c.writing)
        .map(|(p, _)| p.clone())
        .collect();
    let (w, d, c) = (watch.clone(), dir.to_owned(), ctx.clone());
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || walk(&w, &d, &c, &busy)).await;
    match result {
        Ok(w) => {
            if w.new > 0 {
                ctx.wake.notify_one();
            }
            for p in w.young {
                candidates.entry(p).or_insert(Candidate::new(false));
            }
            if dir == watch.root {
                ctx.metrics.rescans.inc();
            }
            info!(dir = %dir.display(), files = w.seen, new = w.new, took = ?started.elapsed(), "rescan done");
        }
        Err(e) => warn!(error = %e, "rescan task failed"),
    }
}

/// What a walk found.
pub struct Walked {
    /// Files enqueued (new journal rows).
    pub new: usize,
    /// Files too young to be settled: they become candidates.
    pub young: Vec<PathBuf>,
    /// Files seen that the rules accept.
    pub seen: usize,
}

/// Blocking walk of `dir` under `watch.root`, skipping `busy` files (being written).
/// Public for the benchmark (`skyferry-journal-bench`).
pub fn walk(watch: &WatchConfig, dir: &Path, ctx: &Context, busy: &HashSet<PathBuf>) -> Walked {
    let rules = ctx.rules.current();
    let journal = &ctx.journal;
    let settle_ns = watch.settle.as_nanos() as i64;
    let now = skyferry_common::unix_time::now_ns();
    let mut stack = vec![dir.to_owned()];
    let mut batch = Vec::new();
    let mut young = Vec::new();
    let (mut new, mut seen) = (0, 0);
    let flush = |batch: &mut Vec<Discovered>, new: &mut usize| {
        let mut j = journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unknown: Vec<Discovered> = batch
            .drain(..)
            .filter(|d| !j.contains(d).unwrap_or(false))
            .collect();
        match j.enqueue(&unknown) {
            Ok(n) => *new += n,
            Err(e) => warn!(error = %e, "cannot record files in the journal"),
        }
    };
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %d.display(), error = %e, "cannot read directory");
                continue;
            }
        };
        for entry in entries.flatten() {
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
                    seen += 1;
                    if now - found.mtime_ns < settle_ns {
                        young.push(path);
                    } else {
                        batch.push(found);
                        if batch.len() >= BATCH {
                            flush(&mut batch, &mut new);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    flush(&mut batch, &mut new);
    Walked { new, young, seen }
}
