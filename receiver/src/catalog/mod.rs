//! The catalog: every stored file version becomes a row, queryable by night, object, time
//! and sky position (docs/catalog.md).
//!
//! - [`header`] reads a FITS header (plain, gzip, fpack) without touching the data;
//! - [`row`] derives the columns from the cards by the configured key mapping;
//! - [`night`] times and the noon-to-noon night rule; [`sky`] coordinates and HEALPix;
//! - [`staging`] the durable SQLite truth (all of the catalog's SQL);
//! - [`arrow_file`] the Arrow IPC night files and `nights.arrow`; [`export`] the thread
//!   that rewrites them, batched;
//! - [`query`] reading them back (`catalog query`, `catalog nights`);
//! - [`rebuild`] re-deriving the catalog from the stored tree.
//!
//! At publish, [`Catalog::record`] reads the header and commits the row (fsynced) before
//! the session acknowledges the file; a re-offer of a stored file goes through
//! [`Catalog::ensure`], which adds the row if a crash lost it. Night files are rewritten
//! by the exporter `catalog.flush_delay` after the first new row, once for all rows that
//! arrived meanwhile.

pub mod arrow_file;
pub mod export;
pub mod header;
pub mod night;
pub mod projected;
pub mod query;
pub mod rebuild;
pub mod row;
pub mod sky;
pub mod staging;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use skyferry_common::config::CatalogConfig;
use skyferry_common::protocol::{ErrorCode, Reject};
use skyferry_common::session::reject;

use crate::metrics::{CatalogMetrics, FormatLabels};
use crate::storage::ops::{OpKind, Ops};
use row::Row;
use staging::{Inserted, Staging};

/// Where the staging database lives: next to the inventory.
pub fn staging_path(storage_root: &Path) -> PathBuf {
    storage_root.join(".skyferry").join("catalog.sqlite")
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database: {0}")]
    Staging(#[from] rusqlite::Error),
    #[error("catalog: {doing} {path}: {source}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CatalogError {
    /// SQLite's "database or disk is full", or ENOSPC.
    pub fn is_full(&self) -> bool {
        match self {
            CatalogError::Staging(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            CatalogError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// Rows waiting to be committed, and the results of committed ones by ticket.
#[derive(Default)]
struct CommitQueue {
    rows: Vec<(u64, Row)>,
    next: u64,
    running: bool,
    results: HashMap<u64, rusqlite::Result<Inserted>>,
}

/// The end of one group commit: hands every row of the batch its result (an error for
/// all when the transaction failed or panicked) and wakes the waiters.
struct CommitEnded<'a> {
    catalog: &'a Catalog,
    tickets: Vec<u64>,
    results: Option<rusqlite::Result<Vec<rusqlite::Result<Inserted>>>>,
}

impl Drop for CommitEnded<'_> {
    fn drop(&mut self) {
        let mut q = self.catalog.commit_queue();
        q.running = false;
        let tickets = std::mem::take(&mut self.tickets);
        match self.results.take() {
            Some(Ok(results)) => q.results.extend(tickets.into_iter().zip(results)),
            Some(Err(e)) => {
                for t in tickets {
                    q.results.insert(t, Err(copy_error(&e)));
                }
            }
            None => {
                for t in tickets {
                    q.results.insert(
                        t,
                        Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                            Some("the catalog commit panicked".into()),
                        )),
                    );
                }
            }
        }
        drop(q);
        self.catalog.committed.notify_all();
    }
}

/// The same SQLite failure again, for every row of a batch whose commit failed (so that
/// `is_full` still tells a full disk).
fn copy_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// A stored file version, as the catalog needs it.
#[derive(Clone, Debug)]
pub struct StoredFile<'a> {
    pub agent: &'a str,
    /// The path under the agent's tree.
    pub path: &'a str,
    pub hash: [u8; 32],
    pub size: u64,
    /// The source mtime the published file carries; read from the file when `None`.
    pub mtime_ns: Option<i64>,
}

pub struct Catalog {
    config: CatalogConfig,
    storage_root: PathBuf,
    staging: Mutex<Staging>,
    /// Rows waiting for the next staging transaction (see [`Catalog::commit`]).
    queue: Mutex<CommitQueue>,
    committed: Condvar,
    metrics: CatalogMetrics,
    exporter: export::Exporter,
    /// Test hook for crash tests: `SKYFERRY_CATALOG_KILL_BEFORE_ROW=N` makes the process
    /// SIGKILL itself before writing its N-th new row (the file is published, its row
    /// not written: the moment the kill -9 test needs). Unset in production.
    kill_before_row: Option<u64>,
    rows_started: std::sync::atomic::AtomicU64,
    /// Row commits are storage operations (timed, and watched for stalls).
    ops: Arc<Ops>,
}

impl Catalog {
    /// Opens the staging database and starts the exporter thread, which first rewrites
    /// any night a crash left out of date.
    pub fn open(
        config: &CatalogConfig,
        storage_root: &Path,
        metrics: CatalogMetrics,
        ops: Arc<Ops>,
    ) -> Result<Catalog, CatalogError> {
        std::fs::create_dir_all(&config.dir).map_err(|source| CatalogError::Io {
            doing: "creating",
            path: config.dir.clone(),
            source,
        })?;
        let db = staging_path(storage_root);
        let staging = Staging::open(&db)?;
        let exporter =
            export::Exporter::start(config.clone(), Staging::open(&db)?, metrics.clone())?;
        Ok(Catalog {
            config: config.clone(),
            storage_root: storage_root.to_owned(),
            staging: Mutex::new(staging),
            queue: Mutex::default(),
            committed: Condvar::new(),
            metrics,
            ops,
            exporter,
            kill_before_row: std::env::var("SKYFERRY_CATALOG_KILL_BEFORE_ROW")
                .ok()
                .and_then(|v| v.parse().ok()),
            rows_started: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        // A poisoned lock means a panic mid-query elsewhere; SQLite stays consistent.
        self.staging.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the row of a file just published (blocking: reads the header, commits
    /// with fsync). Idempotent: a version that has its row already is left alone.
    pub fn record(&self, file: &StoredFile<'_>) -> Result<(), CatalogError> {
        let published = self.storage_root.join(file.agent).join(file.path);
        let row = read_row(&published, file, now_us(), &self.config);
        self.insert(&row)
    }

    /// Makes sure the stored version `file` has its current row: a re-offer of a stored
    /// file lands here, and after a crash between publication and the catalog write this
    /// is where the missing row is added. The common case is one primary-key lookup.
    pub fn ensure(&self, file: &StoredFile<'_>) -> Result<(), CatalogError> {
        if self
            .staging()
            .has_current(file.agent, file.path, &file.hash)?
        {
            return Ok(());
        }
        self.record(file)
    }

    fn insert(&self, row: &Row) -> Result<(), CatalogError> {
        if let Some(n) = self.kill_before_row {
            let started = self
                .rows_started
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if started + 1 == n {
                kill_self();
            }
        }
        let inserted = self.commit(row.clone());
        match inserted {
            Ok(Inserted::New { .. }) => {
                self.metrics.rows.inc();
                if let Some(format) = unreadable_label(&row.fields.data_format) {
                    self.metrics
                        .unreadable
                        .get_or_create(&FormatLabels { format })
                        .inc();
                    tracing::warn!(agent = ?row.agent, path = ?row.path, data_format = format,
                                   reason = ?row.fields.format_error,
                                   "stored and catalogued without a usable FITS header");
                }
                self.exporter.wake();
                Ok(())
            }
            Ok(Inserted::Present) => Ok(()),
            Err(e) => {
                self.metrics.errors.inc();
                Err(e.into())
            }
        }
    }

    fn commit_queue(&self) -> std::sync::MutexGuard<'_, CommitQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Group commit: the rows of files published at the same time share one staging
    /// transaction, so one fsync. The caller that finds no commit running commits every
    /// row queued so far (its own included); the others wait for their row's result,
    /// and whoever is left over when a commit ends starts the next one.
    fn commit(&self, row: Row) -> rusqlite::Result<Inserted> {
        let mut q = self.commit_queue();
        let ticket = q.next;
        q.next += 1;
        q.rows.push((ticket, row));
        loop {
            if let Some(r) = q.results.remove(&ticket) {
                return r;
            }
            if q.running {
                q = self
                    .committed
                    .wait(q)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            q.running = true;
            let (tickets, rows): (Vec<u64>, Vec<Row>) =
                std::mem::take(&mut q.rows).into_iter().unzip();
            drop(q);
            // Also when the commit panics: the batch's callers get an error, the next
            // caller may commit.
            let mut ended = CommitEnded {
                catalog: self,
                tickets,
                results: None,
            };
            ended.results = Some({
                let _op = self.ops.begin(OpKind::CatalogCommit);
                self.staging().insert_all(&rows, now_us())
            });
            drop(ended);
            q = self.commit_queue();
        }
    }

    /// [`Catalog::ensure`] on the blocking pool, for a file session: a failure is the
    /// rejection the agent gets (it offers the file again, and the row is written then).
    pub async fn ensure_stored(
        self: &Arc<Self>,
        agent: &str,
        path: &str,
        hash: [u8; 32],
        size: u64,
        mtime_ns: Option<i64>,
    ) -> Result<(), Reject> {
        let (catalog, a, p) = (self.clone(), agent.to_owned(), path.to_owned());
        let result = tokio::task::spawn_blocking(move || {
            catalog.ensure(&StoredFile {
                agent: &a,
                path: &p,
                hash,
                size,
                mtime_ns,
            })
        })
        .await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(e) => CatalogError::Io {
                doing: "running the catalog task for",
                path: path.into(),
                source: std::io::Error::other(e.to_string()),
            },
        };
        tracing::warn!(agent = ?agent, path = ?path, error = %error,
                       "stored, but the catalog row could not be written; not acknowledged");
        let code = if error.is_full() {
            ErrorCode::StorageFull
        } else {
            ErrorCode::StorageError
        };
        Err(reject(
            code,
            format!("{path:?}: stored, but its catalog row could not be written ({error}); offer it again"),
        ))
    }

    /// Writes the night files still out of date and stops the exporter (at shutdown).
    pub fn close(&self) {
        self.exporter.stop();
    }
}

/// The row of a stored file: its header read from its bytes at `bytes` (only the header
/// bytes), or what is known without one.
pub fn read_row(
    bytes: &Path,
    file: &StoredFile<'_>,
    received_at_us: i64,
    config: &CatalogConfig,
) -> Row {
    let mut mtime_ns = file.mtime_ns;
    let read = match File::open(bytes) {
        Ok(f) => {
            if mtime_ns.is_none() {
                mtime_ns = f
                    .metadata()
                    .ok()
                    .map(|m| skyferry_common::unix_time::mtime_ns(&m));
            }
            header::read(BufReader::with_capacity(64 * 1024, f), file.size)
        }
        Err(e) => header::HeaderRead::NotFits {
            reason: format!("cannot open the stored file: {e}"),
        },
    };
    let mtime_ns = mtime_ns.unwrap_or(0);
    let mtime = DateTime::from_timestamp_nanos(mtime_ns);
    let (fields, night) = row::derive(read, file.path, mtime, config);
    Row {
        agent: file.agent.to_owned(),
        path: file.path.to_owned(),
        blake3: file.hash,
        size_bytes: file.size,
        mtime_ns,
        received_at_us,
        version: 0,
        superseded_at_us: None,
        night,
        fields,
    }
}

/// SIGKILL to this process (through `kill`: no unsafe code), for the crash-test hook.
fn kill_self() -> ! {
    tracing::warn!("SKYFERRY_CATALOG_KILL_BEFORE_ROW: killing this process (-9) as asked");
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    // The signal is on its way; never go on to write the row.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn unreadable_label(format: &str) -> Option<&'static str> {
    match format {
        "not_fits" => Some("not_fits"),
        "fits_truncated" => Some("fits_truncated"),
        "fits_broken" => Some("fits_broken"),
        _ => None,
    }
}

fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::StorageLatency;

    #[test]
    fn rows_published_together_share_one_commit_and_each_lands_once() {
        let root = tempfile::tempdir().unwrap();
        let latency = StorageLatency::default();
        let catalog = Catalog::open(
            &CatalogConfig::defaults(root.path()),
            root.path(),
            CatalogMetrics::default(),
            Arc::new(Ops::new(latency.clone())),
        )
        .unwrap();
        const FILES: usize = 8;
        for i in 0..FILES {
            let dir = root.path().join("kiso");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}.dat")), [i as u8; 100]).unwrap();
        }
        let paths: Vec<String> = (0..FILES).map(|i| format!("f{i}.dat")).collect();
        std::thread::scope(|s| {
            // Hold the database while the eight files are recorded: one caller commits
            // (and waits here), the seven others queue behind it.
            let held = catalog.staging();
            let workers: Vec<_> = paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let catalog = &catalog;
                    s.spawn(move || {
                        catalog.record(&StoredFile {
                            agent: "kiso",
                            path: p,
                            hash: [i as u8 + 1; 32],
                            size: 100,
                            mtime_ns: Some(1),
                        })
                    })
                })
                .collect();
            while catalog.queue.lock().unwrap().rows.len() < FILES - 1 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(held);
            for w in workers {
                w.join().unwrap().expect("recorded");
            }
        });
        assert_eq!(
            latency.count(OpKind::CatalogCommit),
            2,
            "the first row alone, then the seven that queued meanwhile in one transaction"
        );
        let rows = catalog.staging().all_rows().unwrap();
        assert_eq!(rows.len(), FILES, "one row per file");
        // Again: every version has its row already, nothing is added.
        for (i, p) in paths.iter().enumerate() {
            catalog
                .ensure(&StoredFile {
                    agent: "kiso",
                    path: p,
                    hash: [i as u8 + 1; 32],
                    size: 100,
                    mtime_ns: Some(1),
                })
                .unwrap();
        }
        assert_eq!(catalog.staging().all_rows().unwrap().len(), FILES);
    }
}
