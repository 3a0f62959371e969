//! Storage operations in progress: every write, fsync, rename and catalog commit
//! registers here while it runs ([`Ops::begin`] returns a guard; dropping it ends the
//! operation and records its duration in the latency histogram). [`Ops::oldest`] names
//! the operation that has been running longest: a histogram only sees operations that
//! ended, so a write stuck for minutes shows only here (and in
//! `skyferry_receiver_storage_oldest_operation_start_timestamp_seconds`). A stall
//! watchdog reads it without touching the storage itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use crate::metrics::StorageLatency;

/// The kind of a storage operation (the `operation` label of the latency histogram).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Writing chunk bytes (and their slot in the partial log).
    Write,
    /// fsync of a file or directory.
    Fsync,
    /// Publishing rename (or moving an old version aside).
    Rename,
    /// Inserting and committing a catalog row.
    CatalogCommit,
    /// The stall watchdog's periodic probe: write + fsync of a small file (`health::stall`).
    Probe,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::Write,
        OpKind::Fsync,
        OpKind::Rename,
        OpKind::CatalogCommit,
        OpKind::Probe,
    ];

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InProgress {
    pub kind: OpKind,
    pub started: Instant,
    /// The same moment on the wall clock (for logs and the "since" metric).
    pub started_at: SystemTime,
}

/// The operations in progress and their latency histogram. Shared (`Arc`) by the
/// storage, the catalog and whoever watches for stalls.
#[derive(Default)]
pub struct Ops {
    /// Keyed by a sequence number taken at the start: the first entry is the oldest.
    running: Mutex<BTreeMap<u64, InProgress>>,
    next: AtomicU64,
    latency: StorageLatency,
}

/// One operation in progress; dropping it ends the operation.
#[must_use = "the operation ends when the guard is dropped"]
pub struct OpGuard<'a> {
    ops: &'a Ops,
    id: u64,
    kind: OpKind,
    started: Instant,
}

impl Ops {
    /// Operations timed into `latency` (the receiver's metric; a default one elsewhere).
    pub fn new(latency: StorageLatency) -> Ops {
        Ops {
            latency,
            ..Ops::default()
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, InProgress>> {
        // Plain values: a panicking holder cannot leave the map inconsistent.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The histogram the operations are timed into.
    pub fn latency(&self) -> &StorageLatency {
        &self.latency
    }

    /// Registers an operation of `kind` starting now.
    pub fn begin(&self, kind: OpKind) -> OpGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.running().insert(
            id,
            InProgress {
                kind,
                started,
                started_at: SystemTime::now(),
            },
        );
        OpGuard {
            ops: self,
            id,
            kind,
            started,
        }
    }

    /// The operation in progress that started first: its kind and when it started
    /// (wall clock, for metrics and logs). `None` when nothing runs.
    pub fn oldest(&self) -> Option<(OpKind, SystemTime)> {
        self.oldest_running().map(|r| (r.kind, r.started_at))
    }

    /// How long the oldest operation in progress has been running (monotonic clock).
    pub fn oldest_age(&self, now: Instant) -> Option<std::time::Duration> {
        self.oldest_running()
            .map(|r| now.saturating_duration_since(r.started))
    }

    /// The operation in progress that started first, in full (for the stall watchdog).
    pub fn oldest_in_progress(&self) -> Option<InProgress> {
        self.oldest_running()
    }

    fn oldest_running(&self) -> Option<InProgress> {
        // Sequence numbers are taken in start order, but two threads can insert in the
        // other order: the smallest key is still the earliest `begin` call.
        self.running().values().next().copied()
    }

    /// Operations in progress.
    pub fn in_progress(&self) -> usize {
        self.running().len()
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.ops.running().remove(&self.id);
        self.ops
            .latency
            .observe(self.kind, self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_operation_is_the_first_still_running_and_none_when_idle() {
        let ops = Ops::default();
        assert!(ops.oldest().is_none());
        let write = ops.begin(OpKind::Write);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let fsync = ops.begin(OpKind::Fsync);
        let (kind, at) = ops.oldest().unwrap();
        assert_eq!(kind, OpKind::Write);
        assert_eq!(ops.in_progress(), 2);
        drop(write);
        let (kind, later) = ops.oldest().unwrap();
        assert_eq!(kind, OpKind::Fsync);
        assert!(later > at);
        drop(fsync);
        assert!(ops.oldest().is_none());
        assert_eq!(ops.in_progress(), 0);
    }

    #[test]
    fn an_ended_operation_is_counted_in_its_histogram() {
        let latency = StorageLatency::default();
        let ops = Ops::new(latency.clone());
        drop(ops.begin(OpKind::Rename));
        drop(ops.begin(OpKind::Rename));
        drop(ops.begin(OpKind::CatalogCommit));
        assert_eq!(latency.count(OpKind::Rename), 2);
        assert_eq!(latency.count(OpKind::CatalogCommit), 1);
        assert_eq!(latency.count(OpKind::Write), 0);
    }
}
