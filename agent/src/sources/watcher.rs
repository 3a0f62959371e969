//! The inotify watch of one root (via `notify`), kept as one non-recursive watch per
//! directory and added by the walk of [`super::fs`] just before it lists the directory.
//! Watching directory by directory is what lets a directory that cannot be watched
//! (unreadable, or a filesystem without inotify) cost only itself: the rest of the tree
//! stays watched. Hitting the inotify watch limit ends the whole watch (its watches are
//! released for other programs) and the root falls back to periodic rescans; a requested
//! rescan (SIGHUP) tries to start the watch again.
//!
//! The event handler runs on `notify`'s thread: it only classifies events and never
//! blocks (a full queue counts as an overflow, mended by a rescan).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::event::{
    AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind, RenameMode,
};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::warn;

/// What the watch reports to the event loop.
pub enum Seen {
    /// Possibly still being written (`true`: data was written, wait for the close), or
    /// only its metadata changed (`false`).
    Changed(PathBuf, bool),
    /// Closed after writing, or renamed into place: ready after the quiet period.
    Complete(PathBuf),
    /// A directory appeared: watch and scan it (files may predate its watch).
    Dir(PathBuf),
    /// A path was removed or renamed away: forget it (and its watches, if a directory).
    Gone(PathBuf),
}

/// Why the whole watch stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchFailure {
    /// The inotify watch limit (`fs.inotify.max_user_watches`) was reached.
    Limit(String),
    /// No inotify instance (e.g. `fs.inotify.max_user_instances` reached).
    Start(String),
}

impl WatchFailure {
    /// Metric label (`skyferry_agent_fs_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            WatchFailure::Limit(_) => "watch_limit",
            WatchFailure::Start(_) => "watch_start",
        }
    }
}

impl std::fmt::Display for WatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchFailure::Limit(e) => write!(
                f,
                "inotify watch limit reached ({e}; fs.inotify.max_user_watches = {}): raise it with \
                 `sysctl fs.inotify.max_user_watches=1048576` (persist it in /etc/sysctl.d/), then \
                 reload the agent (SIGHUP) to watch again",
                sysctl("fs/inotify/max_user_watches")
            ),
            WatchFailure::Start(e) => write!(
                f,
                "cannot start the inotify watch ({e}; fs.inotify.max_user_instances = {}): raise \
                 it with `sysctl fs.inotify.max_user_instances=1024`, then reload the agent (SIGHUP)",
                sysctl("fs/inotify/max_user_instances")
            ),
        }
    }
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// What adding one directory's watch did.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Watched now or already; or there is no watch to add to.
    Done,
    /// This directory alone cannot be watched (the error): rescans cover it.
    Failed(String),
}

/// The watches of one root.
pub struct DirWatch {
    watcher: Option<RecommendedWatcher>,
    /// Kept so that the event channel never closes while the watch is down, and to build
    /// a new watcher.
    tx: mpsc::Sender<Seen>,
    /// Set by the handler when events were lost; the event loop rescans.
    overflow: Arc<AtomicBool>,
    /// Directories with a watch.
    watched: HashSet<PathBuf>,
    /// During a full rescan: the directories watched before it, not yet seen again.
    previous: HashSet<PathBuf>,
    /// Why the watch stopped, until the event loop takes it to report it.
    failure: Option<WatchFailure>,
}

impl DirWatch {
    /// An inactive watch; [`DirWatch::start`] starts it.
    pub fn new(tx: mpsc::Sender<Seen>, overflow: Arc<AtomicBool>) -> DirWatch {
        DirWatch {
            watcher: None,
            tx,
            overflow,
            watched: HashSet::new(),
            previous: HashSet::new(),
            failure: None,
        }
    }

    /// Creates the inotify instance; directories are added by walks. Does nothing if
    /// already active.
    pub fn start(&mut self) -> Result<(), WatchFailure> {
        if self.watcher.is_some() {
            return Ok(());
        }
        let handler = handler(self.tx.clone(), self.overflow.clone());
        match notify::recommended_watcher(handler) {
            Ok(w) => {
                self.watcher = Some(w);
                self.watched.clear();
                self.previous.clear();
                Ok(())
            }
            Err(e) => {
                let failure = WatchFailure::Start(e.to_string());
                self.failure = Some(failure.clone());
                Err(failure)
            }
        }
    }

    pub fn is_active(&self) -> bool {
        self.watcher.is_some()
    }

    /// How many directories are watched.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }

    /// Why the watch stopped since the last call, if it did.
    pub fn take_failure(&mut self) -> Option<WatchFailure> {
        self.failure.take()
    }

    /// A full rescan starts: the set of watched directories is rebuilt from what it
    /// visits, so that directories deleted meanwhile are forgotten.
    pub fn begin_full_scan(&mut self) {
        self.previous = std::mem::take(&mut self.watched);
    }

    pub fn end_full_scan(&mut self) {
        self.previous.clear();
    }

    /// Watches `dir` (not its subdirectories) unless it is watched already; `force`
    /// adds it again anyway (a directory that just appeared may reuse a stale name).
    pub fn add(&mut self, dir: &Path, force: bool) -> Added {
        let Some(watcher) = self.watcher.as_mut() else {
            return Added::Done;
        };
        if !force && (self.watched.contains(dir) || self.previous.remove(dir)) {
            self.watched.insert(dir.to_owned());
            return Added::Done;
        }
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched.insert(dir.to_owned());
                Added::Done
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                // Release every watch: partial coverage would look healthy while
                // missing files, and the watches are a resource shared with other
                // programs of this user.
                self.stop(WatchFailure::Limit(format!("at {}", dir.display())));
                Added::Done
            }
            Err(e) => match &e.kind {
                notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    Added::Done // gone meanwhile
                }
                _ => Added::Failed(e.to_string()),
            },
        }
    }

    /// Forgets a path that was removed or renamed away (its watches died with it).
    pub fn forget(&mut self, path: &Path) {
        if self.watched.remove(path) {
            self.watched.retain(|p| !p.starts_with(path));
        }
    }

    fn stop(&mut self, failure: WatchFailure) {
        self.watcher = None; // dropping it removes every watch
        self.watched.clear();
        self.previous.clear();
        self.failure = Some(failure);
    }
}

/// The `notify` event handler: classifies events for the event loop.
fn handler(
    tx: mpsc::Sender<Seen>,
    overflow: Arc<AtomicBool>,
) -> impl FnMut(notify::Result<notify::Event>) + Send + 'static {
    move |res: notify::Result<notify::Event>| {
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
        let both = matches!(
            event.kind,
            EventKind::Modify(ModifyKind::Name(RenameMode::Both))
        );
        for (i, path) in event.paths.into_iter().enumerate() {
            let seen = match event.kind {
                // A rename's first path is where the file was.
                _ if both && i == 0 => Seen::Gone(path),
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => Seen::Complete(path),
                EventKind::Modify(ModifyKind::Name(RenameMode::From))
                | EventKind::Remove(RemoveKind::Folder) => Seen::Gone(path),
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
            if tx.try_send(seen).is_err() {
                overflow.store(true, Ordering::Relaxed);
            }
        }
    }
}
