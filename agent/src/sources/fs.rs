//! The filesystem source: an inotify watch (via `notify`) for low latency, and a full
//! reconciling rescan at startup, periodically, and whenever the watch may have missed
//! something (event queue overflow, watch limit reached).
//!
//! A file is ready when it was closed after writing or renamed into place, or when its
//! size and mtime have not changed for the root's `settle` time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use skyferry_common::config::WatchConfig;
use skyferry_common::relpath::RelPath;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::journal::{Discovered, Journal};

/// Files per journal transaction during a rescan.
const BATCH: usize = 2000;

/// What the watch reports to the event loop.
enum Seen {
    /// Possibly still being written: wait for it to settle.
    Changed(PathBuf),
    /// Closed after writing or renamed into place: ready now.
    Complete(PathBuf),
    /// A directory appeared: scan it (files may predate its watch).
    Dir(PathBuf),
}

/// A file waiting to settle.
struct Candidate {
    size: u64,
    mtime_ns: i64,
}

/// Watches one root until shutdown.
pub async fn watch_root(
    watch: WatchConfig,
    journal: Arc<Mutex<Journal>>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let root = watch.root.clone();
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
                scan(&watch, &root, &journal, &wake, &mut candidates).await;
            }
            seen = rx.recv() => {
                let Some(seen) = seen else { return };
                let mut complete = Vec::new();
                for seen in std::iter::once(seen).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                    match seen {
                        Seen::Changed(p) => {
                            candidates.entry(p).or_insert(Candidate { size: u64::MAX, mtime_ns: i64::MIN });
                        }
                        Seen::Complete(p) => {
                            candidates.remove(&p);
                            complete.push(p);
                        }
                        Seen::Dir(d) => scan(&watch, &d, &journal, &wake, &mut candidates).await,
                    }
                }
                if !complete.is_empty() {
                    let w = watch.clone();
                    let ready = tokio::task::spawn_blocking(move || {
                        complete.iter().filter_map(|p| discovered(&w, p)).collect()
                    })
                    .await
                    .unwrap_or_default();
                    enqueue(&journal, &wake, ready).await;
                }
            }
            _ = tick.tick() => {
                if overflow.swap(false, Ordering::Relaxed) {
                    warn!(root = %root.display(), "filesystem event queue overflowed; rescanning");
                    scan(&watch, &root, &journal, &wake, &mut candidates).await;
                }
                if candidates.is_empty() {
                    continue;
                }
                // stat() can block (slow or hung storage): keep it off the runtime.
                let (w, mut c) = (watch.clone(), std::mem::take(&mut candidates));
                let (c, ready) = tokio::task::spawn_blocking(move || {
                    let ready = settle(&w, &mut c);
                    (c, ready)
                })
                .await
                .unwrap_or_default();
                candidates = c;
                enqueue(&journal, &wake, ready).await;
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
                EventKind::Create(_) | EventKind::Modify(_) => Seen::Changed(path),
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

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The journal entry for `path`, if it is a regular file under the root that the filters
/// accept and whose name can cross the wire.
fn discovered(watch: &WatchConfig, path: &Path) -> Option<Discovered> {
    let rel = path.strip_prefix(&watch.root).ok()?;
    if !watch.filter.matches(rel) {
        return None;
    }
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let rel = match RelPath::from_relative(rel) {
        Ok(r) => r,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "skipping a file whose name cannot be shipped");
            return None;
        }
    };
    Some(Discovered {
        root: watch.root.display().to_string(),
        path: rel.to_string(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
    })
}

/// Enqueues candidates whose size and mtime held still for the settle time.
fn settle(watch: &WatchConfig, candidates: &mut HashMap<PathBuf, Candidate>) -> Vec<Discovered> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let settle_ns = watch.settle.as_nanos() as i64;
    let mut ready = Vec::new();
    candidates.retain(|path, c| {
        let Some(d) = discovered(watch, path) else {
            return false; // gone, filtered or not a file
        };
        let unchanged = d.size == c.size && d.mtime_ns == c.mtime_ns;
        if unchanged && now - d.mtime_ns >= settle_ns {
            ready.push(d);
            return false;
        }
        c.size = d.size;
        c.mtime_ns = d.mtime_ns;
        true
    });
    ready
}

async fn enqueue(journal: &Arc<Mutex<Journal>>, wake: &Notify, files: Vec<Discovered>) {
    if files.is_empty() {
        return;
    }
    let journal = journal.clone();
    let n = files.len();
    let result = tokio::task::spawn_blocking(move || {
        let mut j = journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        j.enqueue(&files)
    })
    .await;
    match result {
        Ok(Ok(new)) => {
            debug!(seen = n, new, "files recorded");
            if new > 0 {
                wake.notify_one();
            }
        }
        Ok(Err(e)) => {
            warn!(error = %e, "cannot record files in the journal; the next rescan retries")
        }
        Err(e) => warn!(error = %e, "journal task failed"),
    }
}

/// Walks `dir` (the root or a new subdirectory): files the journal does not know are
/// enqueued if settled, or become candidates.
async fn scan(
    watch: &WatchConfig,
    dir: &Path,
    journal: &Arc<Mutex<Journal>>,
    wake: &Notify,
    candidates: &mut HashMap<PathBuf, Candidate>,
) {
    let (w, d, j) = (watch.clone(), dir.to_owned(), journal.clone());
    let started = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || walk(&w, &d, &j)).await;
    match result {
        Ok((new, young, files)) => {
            if new > 0 {
                wake.notify_one();
            }
            for p in young {
                candidates.entry(p).or_insert(Candidate {
                    size: u64::MAX,
                    mtime_ns: i64::MIN,
                });
            }
            info!(dir = %dir.display(), files, new, took = ?started.elapsed(), "rescan done");
        }
        Err(e) => warn!(error = %e, "rescan task failed"),
    }
}

/// Blocking walk. Returns (files enqueued, young files to settle, files seen).
fn walk(watch: &WatchConfig, dir: &Path, journal: &Mutex<Journal>) -> (usize, Vec<PathBuf>, usize) {
    let settle_ns = watch.settle.as_nanos() as i64;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
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
                    let Some(found) = discovered(watch, &path) else {
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
    (new, young, seen)
}
