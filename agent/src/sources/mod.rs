//! Sources of files to ship. Each source only discovers files and records them in the
//! journal; the journal's idempotent enqueue makes overlapping sources harmless (the same
//! file from the watch, a rescan and ten Redis messages is one row and one transfer).
//!
//! What every source shares lives here: the [`Rules`] deciding what may be shipped
//! (include/exclude globs per root and the blocklist, swapped as a whole on SIGHUP), the
//! [`inspect`] check that turns a path into a journal entry, the rescan trigger (Redis
//! pub/sub asks for a rescan after a reconnect, SIGHUP after a reload), and [`record`].

pub mod candidates;
pub mod fs;
pub mod message;
pub mod redis;
pub mod watcher;

use skyferry_common::unix_time::mtime_ns;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use skyferry_common::config::{AgentConfig, Blocklist, PathFilter};
use skyferry_common::relpath::RelPath;
use tokio::sync::{watch, Notify};

use crate::journal::{Discovered, Durability, Journal, JournalError};
use crate::metrics::Metrics;

/// What may be shipped: per-root filters and the blocklist. Immutable; a reload builds a
/// new one.
#[derive(Debug, Default)]
pub struct Rules {
    roots: Vec<(PathBuf, PathFilter)>,
    blocklist: Blocklist,
}

/// Why a path is not journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Not under any watch root (or it climbs out with `..`).
    OutsideRoots,
    /// Does not exist (yet).
    NotFound,
    /// Exists but is not a regular file (a directory, a symlink, a device...).
    NotAFile,
    /// Excluded by the root's include/exclude globs.
    Filtered,
    /// Matched by the blocklist.
    Blocked,
    /// Its name cannot cross the wire (see `RelPath`).
    BadName(String),
}

impl Rejection {
    /// Metric label (bounded).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::OutsideRoots => "outside_roots",
            Rejection::NotFound => "not_found",
            Rejection::NotAFile => "not_a_file",
            Rejection::Filtered => "filtered",
            Rejection::Blocked => "blocked",
            Rejection::BadName(_) => "bad_name",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::OutsideRoots => f.write_str("not under any watch root"),
            Rejection::NotFound => f.write_str("no such file"),
            Rejection::NotAFile => f.write_str("not a regular file"),
            Rejection::Filtered => f.write_str("excluded by the root's include/exclude globs"),
            Rejection::Blocked => f.write_str("blocklisted"),
            Rejection::BadName(e) => write!(f, "name cannot be shipped: {e}"),
        }
    }
}

impl Rules {
    /// Rules for `roots` (absolute, canonical) with their filters, and a blocklist.
    pub fn new(roots: Vec<(PathBuf, PathFilter)>, blocklist: Blocklist) -> Rules {
        Rules { roots, blocklist }
    }

    pub fn from_config(config: &AgentConfig) -> Rules {
        Rules {
            roots: config
                .watches
                .iter()
                .map(|w| (w.root.clone(), w.filter.clone()))
                .collect(),
            blocklist: config
                .blocklist
                .as_ref()
                .map(|(_, b)| b.clone())
                .unwrap_or_default(),
        }
    }

    /// The watch roots (absolute, canonical).
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|(r, _)| r.as_path())
    }

    pub fn blocklist_len(&self) -> usize {
        self.blocklist.len()
    }

    /// Whether the file `rel` under `root` may be shipped (by name only).
    pub fn check(&self, root: &Path, rel: &Path) -> Result<(), Rejection> {
        let Some((_, filter)) = self.roots.iter().find(|(r, _)| r == root) else {
            return Err(Rejection::OutsideRoots);
        };
        if !filter.matches(rel) {
            return Err(Rejection::Filtered);
        }
        if self.blocklist.blocks(&root.join(rel), rel) {
            return Err(Rejection::Blocked);
        }
        Ok(())
    }

    /// The root holding the absolute `path`, and the path relative to it.
    pub fn split<'a>(&'a self, path: &'a Path) -> Option<(&'a Path, &'a Path)> {
        self.roots
            .iter()
            .filter_map(|(r, _)| Some((r.as_path(), path.strip_prefix(r).ok()?)))
            // Nested roots: the innermost wins.
            .max_by_key(|(r, _)| r.as_os_str().len())
    }
}

/// The current [`Rules`], replaced as a whole on reload; readers take a snapshot.
#[derive(Debug, Default)]
pub struct SharedRules(RwLock<Arc<Rules>>);

impl SharedRules {
    pub fn new(rules: Rules) -> SharedRules {
        SharedRules(RwLock::new(Arc::new(rules)))
    }

    pub fn current(&self) -> Arc<Rules> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, rules: Rules) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(rules);
    }
}

/// What the sources share.
pub struct Context {
    pub journal: Arc<Mutex<Journal>>,
    /// Wakes the sender when new rows were journaled.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pub rules: SharedRules,
    /// Bumped to ask every filesystem source for an immediate rescan.
    pub rescan: watch::Sender<u64>,
}

impl Context {
    pub fn new(
        config: &AgentConfig,
        journal: Arc<Mutex<Journal>>,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Context {
        Context {
            journal,
            wake,
            metrics,
            rules: SharedRules::new(Rules::from_config(config)),
            rescan: watch::channel(0).0,
        }
    }

    /// Asks every filesystem source to rescan its root now.
    pub fn request_rescan(&self, why: &'static str) {
        tracing::info!(reason = why, "rescan of all roots requested");
        self.rescan.send_modify(|n| *n += 1);
    }
}

/// The journal entry for the absolute `path` under `root`, if the rules accept it and it
/// is a regular file whose name can cross the wire. Blocking: it stats the file.
pub fn inspect(rules: &Rules, root: &Path, path: &Path) -> Result<Discovered, Rejection> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| Rejection::OutsideRoots)?;
    rules.check(root, rel)?;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejection::NotFound),
        Err(_) => return Err(Rejection::NotFound),
    };
    if !meta.is_file() {
        return Err(Rejection::NotAFile);
    }
    let rel = RelPath::from_relative(rel).map_err(|e| Rejection::BadName(e.to_string()))?;
    Ok(Discovered {
        root: root.display().to_string(),
        path: rel.to_string(),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
    })
}

/// Records `files` in the journal (one transaction, off the runtime, as durable as
/// `sync` says: see [`Durability`]) and wakes the sender if any was new. Returns how many were
/// new; an error is the journal's, as text.
pub async fn record(
    ctx: &Context,
    files: Vec<Discovered>,
    sync: Durability,
) -> Result<usize, String> {
    if files.is_empty() {
        return Ok(0);
    }
    let journal = ctx.journal.clone();
    let new = tokio::task::spawn_blocking(move || {
        journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .enqueue_with(&files, sync)
            .map_err(|e: JournalError| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("journal task failed: {e}")))?;
    if new > 0 {
        ctx.wake.notify_one();
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(root: &Path, include: &[&str], blocklist: &str) -> Rules {
        let include: Vec<String> = include.iter().map(|s| s.to_string()).collect();
        Rules {
            roots: vec![(
                root.to_owned(),
                PathFilter::new(&include, &["**/*.tmp".into()]).unwrap(),
            )],
            blocklist: Blocklist::parse(blocklist).unwrap(),
        }
    }

    #[test]
    fn rules_apply_filters_then_the_blocklist() {
        let root = Path::new("/data/raw");
        let r = rules(
            root,
            &["**/*.fits"],
            "bad/*.fits\n/data/raw/x/secret.fits\n",
        );
        assert_eq!(r.check(root, Path::new("n/a.fits")), Ok(()));
        assert_eq!(
            r.check(root, Path::new("n/a.tmp")),
            Err(Rejection::Filtered)
        );
        assert_eq!(
            r.check(root, Path::new("n/a.txt")),
            Err(Rejection::Filtered)
        );
        assert_eq!(
            r.check(root, Path::new("bad/a.fits")),
            Err(Rejection::Blocked)
        );
        assert_eq!(
            r.check(root, Path::new("x/secret.fits")),
            Err(Rejection::Blocked)
        );
        assert_eq!(
            r.check(Path::new("/elsewhere"), Path::new("a.fits")),
            Err(Rejection::OutsideRoots)
        );
    }

    #[test]
    fn default_excludes_catch_temporary_names_and_nothing_else() {
        let defaults: Vec<String> = skyferry_common::config::DEFAULT_EXCLUDES
            .iter()
            .map(|g| (*g).to_owned())
            .collect();
        let filter = PathFilter::new(&[], &defaults).unwrap();
        for temporary in [
            "n/a.fits.tmp",
            "n/a.fits.part",
            "n/a.fits.partial",
            "n/a.fits~",
            "n/.a.fits.swp",
            "n/.#a.fits",
            "n/.a.fits.Xy12Ab",
            "a.fits.temp",
        ] {
            assert!(!filter.matches(Path::new(temporary)), "{temporary}");
        }
        for kept in [
            "n/a.fits",
            "n/a.fits.fz",
            "n/a.fits.gz",
            "2024-05-01/exp001/det07.fits",
            "n/catalog.arrow",
        ] {
            assert!(filter.matches(Path::new(kept)), "{kept}");
        }
    }

    #[test]
    fn inspect_reports_missing_and_non_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("d.fits")).unwrap();
        std::fs::write(root.join("f.fits"), b"abc").unwrap();
        let r = rules(&root, &[], "");
        assert_eq!(
            inspect(&r, &root, &root.join("nope.fits")),
            Err(Rejection::NotFound)
        );
        assert_eq!(
            inspect(&r, &root, &root.join("d.fits")),
            Err(Rejection::NotAFile)
        );
        let d = inspect(&r, &root, &root.join("f.fits")).unwrap();
        assert_eq!((d.path.as_str(), d.size), ("f.fits", 3));
    }
}
