//! Storage operations in progress: each write, fsync, rename, catalog commit and probe
//! holds an [`OpGuard`] from [`Ops::begin`] while it runs, and [`Ops::oldest`] tells how
//! long the oldest one has been running. A histogram only sees an operation once it
//! ends; this sees one that has not ended, which is what a storage stall is.
//!
//! Begin and end take a short lock and touch no storage, so the stall watchdog can read
//! [`Ops::oldest`] while every storage thread is blocked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

/// What kind of storage operation is in progress (a fixed set: used as a label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Write,
    Fsync,
    Rename,
    CatalogCommit,
    /// The periodic probe's write + fsync (see `health::stall`).
    Probe,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Write => "write",
            OpKind::Fsync => "fsync",
            OpKind::Rename => "rename",
            OpKind::CatalogCommit => "catalog_commit",
            OpKind::Probe => "probe",
        }
    }
}

/// An operation in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InProgress {
    pub kind: OpKind,
    pub started: Instant,
    /// The same moment on the wall clock (for logs and the "since" metric).
    pub started_at: SystemTime,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    /// By begin order: the first entry is the oldest.
    running: BTreeMap<u64, InProgress>,
}

/// The tracker, shared (cheap to clone) by storage, catalog, probe and watchdog.
#[derive(Debug, Clone, Default)]
pub struct Ops {
    table: Arc<Mutex<Table>>,
}

impl Ops {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Plain values: a panicking holder cannot leave them inconsistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks an operation of `kind` as started; it ends when the guard is dropped.
    pub fn begin(&self, kind: OpKind) -> OpGuard {
        self.begin_at(kind, Instant::now(), SystemTime::now())
    }

    fn begin_at(&self, kind: OpKind, started: Instant, started_at: SystemTime) -> OpGuard {
        let mut t = self.table();
        let id = t.next;
        t.next += 1;
        t.running.insert(
            id,
            InProgress {
                kind,
                started,
                started_at,
            },
        );
        OpGuard {
            ops: self.clone(),
            id,
        }
    }

    /// The operation in progress for longest, if any.
    pub fn oldest(&self) -> Option<InProgress> {
        self.table().running.values().next().copied()
    }

    /// How many operations are in progress.
    pub fn in_progress(&self) -> usize {
        self.table().running.len()
    }
}

/// Ends its operation when dropped (also on an error path or a panic).
#[derive(Debug)]
#[must_use = "the operation ends when the guard is dropped"]
pub struct OpGuard {
    ops: Ops,
    id: u64,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.ops.table().running.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn oldest_is_the_earliest_still_running() {
        let ops = Ops::default();
        assert_eq!(ops.oldest(), None);
        let t0 = Instant::now();
        let w = ops.begin_at(OpKind::Write, t0, SystemTime::UNIX_EPOCH);
        let f = ops.begin_at(
            OpKind::Fsync,
            t0 + Duration::from_secs(1),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(ops.oldest().map(|o| o.kind), Some(OpKind::Write));
        assert_eq!(ops.in_progress(), 2);
        drop(w);
        assert_eq!(ops.oldest().map(|o| o.kind), Some(OpKind::Fsync));
        drop(f);
        assert_eq!(ops.oldest(), None);
        assert_eq!(ops.in_progress(), 0);
    }

    #[test]
    fn a_guard_held_across_threads_ends_on_drop_there() {
        let ops = Ops::default();
        let g = ops.begin(OpKind::Rename);
        std::thread::spawn(move || drop(g)).join().unwrap();
        assert_eq!(ops.oldest(), None);
    }
}
