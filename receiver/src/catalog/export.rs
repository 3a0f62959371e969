//! The exporter: a thread that rewrites the Arrow file of every night with new rows, and
//! `nights.arrow`, `catalog.flush_delay` after the first new row (rows arriving in the
//! meantime share the rewrite, so an exposure of 84 files costs one or two rewrites, not
//! 84). It owns its own SQLite connection, so ingest never waits for an export.
//!
//! Which nights are out of date is durable (`staging::dirty_nights`), so a crash at any
//! point is repaired when the exporter starts again. A failed write is counted, logged,
//! and retried at the next flush (at the latest after [`RETRY`]).

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::NaiveDate;
use skyferry_common::config::CatalogConfig;

use super::arrow_file::{self, NightSummary};
use super::query;
use super::staging::Staging;
use super::CatalogError;
use crate::metrics::CatalogMetrics;

/// After a failed export, the next try comes at the latest this much later.
const RETRY: Duration = Duration::from_secs(30);

enum Msg {
    Dirty,
    Stop,
}

pub struct Exporter {
    tx: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Exporter {
    pub fn start(
        config: CatalogConfig,
        staging: Staging,
        metrics: CatalogMetrics,
    ) -> Result<Exporter, CatalogError> {
        // One pending wake-up is enough: the exporter reads every dirty night anyway.
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("catalog-export".into())
            .spawn(move || run(config, staging, metrics, rx))
            .map_err(|source| CatalogError::Io {
                doing: "starting the export thread for",
                path: "catalog".into(),
                source,
            })?;
        Ok(Exporter {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// New rows: export within the flush delay.
    pub fn wake(&self) {
        match self.tx.try_send(Msg::Dirty) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Exports what is out of date and ends the thread (blocking).
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(config: CatalogConfig, mut staging: Staging, metrics: CatalogMetrics, rx: Receiver<Msg>) {
    let mut summaries = load_summaries(&config, &staging);
    // Whatever a crash left out of date is written first.
    let mut failed = !flush(&config, &mut staging, &mut summaries, &metrics);
    loop {
        let first = if failed {
            rx.recv_timeout(RETRY)
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        match first {
            // The first new row starts the delay; rows arriving meanwhile share it.
            Ok(Msg::Dirty) => {
                if !sleep_unless_stopped(&rx, config.flush_delay) {
                    flush(&config, &mut staging, &mut summaries, &metrics);
                    return;
                }
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                flush(&config, &mut staging, &mut summaries, &metrics);
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        failed = !flush(&config, &mut staging, &mut summaries, &metrics);
    }
}

/// Waits `delay`, absorbing wake-ups; false if told to stop meanwhile.
fn sleep_unless_stopped(rx: &Receiver<Msg>, delay: Duration) -> bool {
    let deadline = std::time::Instant::now() + delay;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(left) {
            Ok(Msg::Dirty) => {}
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => return true,
        }
    }
}

/// The summaries of `nights.arrow`; if it cannot be read (first start, lost catalog
/// directory), every night is marked out of date and rewritten.
fn load_summaries(config: &CatalogConfig, staging: &Staging) -> BTreeMap<NaiveDate, NightSummary> {
    match query::read_summary(&config.dir) {
        Ok(list) => {
            let map: BTreeMap<_, _> = list.into_iter().map(|s| (s.night, s)).collect();
            // A night whose file is missing is rewritten too.
            let missing =
                staging.nights().unwrap_or_default().into_iter().any(|n| {
                    !map.contains_key(&n) || !arrow_file::night_file(&config.dir, n).exists()
                });
            if missing {
                let _ = staging.mark_all_dirty();
            }
            map
        }
        Err(_) => {
            if let Err(e) = staging.mark_all_dirty() {
                tracing::warn!(error = %e, "catalog: cannot mark nights for export");
            }
            BTreeMap::new()
        }
    }
}

/// Writes every dirty night and the summary; true if all went well.
pub fn flush(
    config: &CatalogConfig,
    staging: &mut Staging,
    summaries: &mut BTreeMap<NaiveDate, NightSummary>,
    metrics: &CatalogMetrics,
) -> bool {
    let nights = match staging.dirty_nights() {
        Ok(n) => n,
        Err(e) => {
            metrics.export_errors.inc();
            tracing::warn!(error = %e, "catalog: cannot read which nights to export; retrying later");
            return false;
        }
    };
    if nights.is_empty() {
        return true;
    }
    let mut ok = true;
    let mut cleaned = Vec::new();
    for night in nights {
        let started = std::time::Instant::now();
        let result = staging
            .export_snapshot(night)
            .map_err(|e| e.to_string())
            .and_then(|(rows, generation)| {
                let summary_rows = rows.clone();
                let bytes = arrow_file::write_night(&config.dir, night, rows, &config.collection)
                    .map_err(|e| e.to_string())?;
                summaries.insert(night, NightSummary::of(night, &summary_rows, bytes));
                Ok((generation, summary_rows.len()))
            });
        match result {
            Ok((generation, rows)) => {
                metrics.exports.inc();
                tracing::debug!(%night, rows, took = ?started.elapsed(), "catalog night written");
                cleaned.push((night, generation));
            }
            Err(e) => {
                ok = false;
                metrics.export_errors.inc();
                tracing::warn!(%night, error = %e, "catalog: cannot write the night file; retrying later");
            }
        }
    }
    let list: Vec<NightSummary> = summaries.values().cloned().collect();
    if let Err(e) = arrow_file::write_summary(&config.dir, &list) {
        metrics.export_errors.inc();
        tracing::warn!(error = %e, "catalog: cannot write nights.arrow; retrying later");
        return false;
    }
    // Only once the summary is in place are the nights clean: a crash before leaves
    // them marked, and they are written again.
    for (night, generation) in cleaned {
        if let Err(e) = staging.clean(night, generation) {
            tracing::warn!(%night, error = %e, "catalog: cannot clear the night's export mark");
        }
    }
    ok
}
