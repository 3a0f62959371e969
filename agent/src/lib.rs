//! skyferry-agent: the site side. Discovers finished files (filesystem watch and
//! rescans, Redis notifications), records each in the journal, and ships them to the
//! receiver over QUIC; a file is done only when the receiver acknowledges it as durably
//! stored.
//!
//! ```text
//! sources::fs ────┐
//! sources::redis ─┴─► journal (SQLite: the queue) ──► sender ──► upload (one stream per file)
//! ```
//! `main.rs` is only the command line; [`run`] is the daemon.

// Tests may unwrap: a panic there is a failed test, not a crash.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod journal;
pub mod metrics;
pub mod metrics_endpoint;
pub mod sender;
pub mod sources;
pub mod tally;
pub mod upload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use skyferry_common::config::AgentConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use journal::JournalError;

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

/// Runs the agent until `shutdown` is cancelled. With `config_path`, SIGHUP re-reads
/// it and applies the include/exclude globs and the blocklist without a restart.
pub async fn run(
    config: AgentConfig,
    config_path: Option<PathBuf>,
    journal: journal::Journal,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let journal = Arc::new(Mutex::new(journal));
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(metrics::Metrics::default());
    let sources_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(addr) = config.metrics_listen {
        let listener = metrics_endpoint::bind(addr).await?;
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        tasks.spawn(metrics_endpoint::serve(
            listener,
            Arc::new(registry),
            shutdown.clone(),
        ));
    }
    let ctx = Arc::new(sources::Context::new(
        &config,
        journal.clone(),
        wake.clone(),
        metrics.clone(),
    ));
    for (index, watch) in config.watches.iter().enumerate() {
        tasks.spawn(sources::fs::watch_root(
            watch.clone(),
            index,
            ctx.clone(),
            sources_stop.clone(),
        ));
    }
    for source in &config.redis {
        tasks.spawn(sources::redis::run(
            source.clone(),
            ctx.clone(),
            sources_stop.clone(),
        ));
    }
    if let Some(path) = config_path {
        tasks.spawn(reload_on_sighup(path, ctx.clone(), sources_stop.clone()));
    }
    let tally = Arc::new(
        tally::Tally::open(&config.journal).context("opening the tally file beside the journal")?,
    );
    let sender = sender::Sender {
        grace: config.transfer.shutdown_grace,
        config,
        journal,
        wake,
        metrics,
        tally,
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

/// On SIGHUP: re-reads the config and swaps in its include/exclude globs and blocklist,
/// then rescans (newly included files are found; newly excluded ones are no longer
/// queued). A config with problems is refused and the rules in force are kept. Other
/// settings (receiver, Redis sources, roots) need a restart.
async fn reload_on_sighup(path: PathBuf, ctx: Arc<sources::Context>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hup.recv() => {}
        }
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || AgentConfig::load(&p)).await;
        match loaded {
            Ok(Ok(config)) => {
                let rules = sources::Rules::from_config(&config);
                tracing::info!(
                    config = %path.display(),
                    blocklist_patterns = rules.blocklist_len(),
                    "SIGHUP: reloaded include/exclude globs and the blocklist"
                );
                ctx.rules.replace(rules);
                ctx.request_rescan("rules reloaded");
            }
            Ok(Err(e)) => {
                tracing::warn!("SIGHUP: {e}; keeping the rules in force");
                // A SIGHUP always rescans, with the rules in force.
                ctx.request_rescan("SIGHUP");
            }
            Err(e) => tracing::warn!(error = %e, "SIGHUP: reload task failed"),
        }
    }
}
