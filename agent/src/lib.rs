//! skyferry-agent: the site side. Discovers finished files (filesystem watch and
//! rescans), records each in the journal, and ships them to the receiver over QUIC; a
//! file is done only when the receiver acknowledges it as durably stored.
//!
//! ```text
//! sources::fs ──► journal (SQLite: the queue) ──► sender ──► upload (one stream per file)
//! ```
//! `main.rs` is only the command line; [`run`] is the daemon.

pub mod journal;
pub mod metrics;
pub mod sender;
pub mod sources;
pub mod upload;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use skyferry_common::config::AgentConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use journal::JournalError;

/// How long files in flight may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Opens the journal (refusing a corrupt one) and returns interrupted transfers to the
/// queue.
pub fn open_journal(config: &AgentConfig) -> Result<journal::Journal, JournalError> {
    let mut j = journal::Journal::open(&config.journal)?;
    let requeued = j.requeue_inflight()?;
    if requeued > 0 {
        tracing::info!(
            files = requeued,
            "resuming transfers interrupted by the last stop"
        );
    }
    Ok(j)
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(
    config: AgentConfig,
    journal: journal::Journal,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let journal = Arc::new(Mutex::new(journal));
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(metrics::Metrics::default());
    let sources_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    for watch in &config.watches {
        tasks.spawn(sources::fs::watch_root(
            watch.clone(),
            journal.clone(),
            wake.clone(),
            sources_stop.clone(),
        ));
    }
    let sender = sender::Sender {
        config,
        journal,
        wake,
        metrics,
        grace: SHUTDOWN_GRACE,
    };
    // Stop the sources first so that nothing new is claimed while draining.
    let stop = shutdown.clone();
    let stopper = sources_stop.clone();
    tasks.spawn(async move {
        stop.cancelled().await;
        stopper.cancel();
    });
    let result = sender.run(shutdown).await.context("sender failed");
    sources_stop.cancel();
    tasks.close();
    tasks.wait().await;
    result
}
