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

pub mod buffers;
pub mod journal;
pub mod link;
pub mod metrics;
pub mod pace;
pub mod progress;
pub mod replay;
pub mod replay_cli;
pub mod replay_show;
pub mod sender;
pub mod service;
pub mod sources;
pub mod status;
pub mod stripes;
pub mod tally;
pub mod upload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use skyferry_common::config::AgentConfig;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use journal::JournalError;

/// How often node load is sampled (PSI's shortest average is 10 s).
const NODE_LOAD_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the agent could not start; [`StartError::exit_code`] is what `main` exits with.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS identity cannot be loaded: a configuration problem (exit 64).
    #[error("agent TLS identity: {0}")]
    Identity(skyferry_common::tls::TlsError),
    /// The journal is corrupt (exit 65), locked by another agent or unusable (exit 1).
    #[error("{0}")]
    Journal(JournalError),
    /// The tally beside the journal cannot be opened (exit 1).
    #[error("cannot open the tally file {path}: {error}")]
    Tally { path: String, error: std::io::Error },
}

impl StartError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Identity(_) => skyferry_common::daemon::EXIT_USAGE as u8,
            StartError::Journal(JournalError::Corrupt { .. }) => journal::EXIT_JOURNAL_CORRUPT,
            StartError::Journal(_) | StartError::Tally { .. } => {
                skyferry_common::daemon::EXIT_FAILURE as u8
            }
        }
    }
}

/// Everything the daemon needs that can fail for reasons an operator must fix, loaded
/// before any task starts: the TLS identity, the journal (locked for this process, checked,
/// interrupted transfers requeued) and the tally.
pub struct Prepared {
    pub config: AgentConfig,
    pub journal: journal::Journal,
    pub tally: Arc<tally::Tally>,
    pub client: quinn::ClientConfig,
}

/// Loads the TLS identity, opens the journal and the tally; see [`Prepared`].
pub fn prepare(config: AgentConfig) -> Result<Prepared, StartError> {
    let r = &config.receiver;
    let client = skyferry_common::tls::client_config(
        &r.ca,
        &r.cert,
        &r.key,
        config.transfer.heartbeat_interval,
    )
    .map_err(StartError::Identity)?;
    let journal = open_journal(&config).map_err(StartError::Journal)?;
    let tally = tally::Tally::open(&config.journal).map_err(|error| StartError::Tally {
        path: tally::path_for(&config.journal).display().to_string(),
        error,
    })?;
    Ok(Prepared {
        config,
        journal,
        tally: Arc::new(tally),
        client,
    })
}

/// Opens the journal (refusing a corrupt one or one another agent holds) and returns
/// interrupted transfers to the queue.
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

/// Runs the agent until `shutdown` (the root token) is cancelled, or until a component
/// fails: then every task is stopped at once and the error is returned, so that the
/// process exits with it instead of sitting "running" while shipping nothing. With
/// `config_path`, SIGHUP re-reads it and applies the include/exclude globs and the
/// blocklist and the rate caps without a restart.
pub async fn run(
    prepared: Prepared,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Prepared {
        config,
        journal,
        tally,
        client,
    } = prepared;
    let journal_path = config.journal.clone();
    let journal = Arc::new(Mutex::new(journal));
    let notifier = skyferry_common::daemon::systemd::Notifier::from_env();
    let wake = Arc::new(Notify::new());
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.precreate();
    // Every task is in this set and awaited below: a task whose failure is fatal returns
    // an error, which ends the daemon. Sources and the reload task end only at shutdown
    // or when they give up on their own (they log why; the rest keeps running).
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let sampler = skyferry_common::node_load::sampler::start(
        None,
        &metrics.health.node,
        &metrics.health.node_latest,
    );
    {
        let (m, stop) = (metrics.health.node.clone(), shutdown.clone());
        let latest = metrics.health.node_latest.clone();
        tasks.spawn(async move {
            skyferry_common::node_load::sampler::run(sampler, m, latest, NODE_LOAD_PERIOD, stop)
                .await;
            Ok(())
        });
    }
    {
        let path = status::state_path(&journal_path);
        let (j, jp, m, stop) = (
            journal.clone(),
            journal_path.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        let live_window = config.transfer.live_window;
        tasks.spawn(async move {
            status::publish(j, jp, m, live_window, path, stop).await;
            Ok(())
        });
    }
    if let Some(addr) = config.metrics_listen {
        let listener = skyferry_common::metrics_http::bind(addr).await?;
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let (registry, stop) = (Arc::new(registry), shutdown.clone());
        tasks.spawn(async move {
            skyferry_common::metrics_http::serve(listener, registry, stop).await;
            Ok(())
        });
    }
    let pace = Arc::new(pace::Pacer::new(&config));
    let ctx = Arc::new(sources::Context::new(
        &config,
        journal.clone(),
        wake.clone(),
        metrics.clone(),
    ));
    let sources_stop = shutdown.child_token();
    for (index, watch) in config.watches.iter().enumerate() {
        let source =
            sources::fs::watch_root(watch.clone(), index, ctx.clone(), sources_stop.clone());
        tasks.spawn(async move {
            source.await;
            Ok(())
        });
    }
    for source in &config.redis {
        let source = sources::redis::run(source.clone(), ctx.clone(), sources_stop.clone());
        tasks.spawn(async move {
            source.await;
            Ok(())
        });
    }
    if let Some(path) = config_path {
        let reload = reload_on_sighup(
            path,
            ctx.clone(),
            pace.clone(),
            notifier.clone(),
            sources_stop.clone(),
        );
        tasks.spawn(async move {
            reload.await;
            Ok(())
        });
    }
    service::spawn(
        &mut tasks,
        &notifier,
        journal.clone(),
        metrics.clone(),
        config.receiver.address.clone(),
        shutdown.clone(),
    );
    let sender = sender::Sender {
        grace: config.transfer.shutdown_grace,
        lanes: Arc::new(stripes::LaneTable::new(config.transfer.connections.max(1))),
        config,
        client,
        journal,
        wake,
        metrics,
        tally,
        pace,
    };
    let stop = shutdown.clone();
    tasks.spawn(async move { sender.run(stop).await.context("sender failed") });
    // The full check takes minutes on a large journal: run it while the agent works.
    // Damage ends the daemon (exit 65); a rescan meanwhile re-checks what it relies on.
    let path = journal_path;
    tasks.spawn(async move {
        let started = std::time::Instant::now();
        let p = path.clone();
        tokio::task::spawn_blocking(move || journal::check_integrity(&p))
            .await
            .context("journal check task failed")??;
        tracing::info!(journal = %path.display(), took = ?started.elapsed(), "journal integrity check passed");
        Ok(())
    });
    // The identity and the journal are loaded (prepare), the metrics port is bound, the
    // sources and the sender run: systemd may consider the agent started.
    notifier.ready("running");
    tracing::info!("agent started");

    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let error = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => anyhow!("an agent task panicked: {e}"),
            Err(_) => continue, // aborted: only after a failure, below
        };
        failure = Some(error);
        break;
    }
    let Some(error) = failure else {
        return Ok(());
    };
    // A fatal error: stop everything now. Files in flight stay `inflight` in the journal
    // and are requeued at the next start, as after a kill -9.
    shutdown.cancel();
    tasks.shutdown().await;
    Err(error)
}

/// On SIGHUP: re-reads the config and swaps in its include/exclude globs, blocklist and
/// rate caps (`transfer.max_rate`, `[transfer.rates]`),
/// then rescans (newly included files are found; newly excluded ones are no longer
/// queued). A config with problems is refused and the rules in force are kept. Other
/// settings (receiver, Redis sources, roots) need a restart. systemd is told
/// `RELOADING=1` at the signal and `READY=1` once the new rules are in force (or refused).
///
/// The handler is installed before this returns (before `READY=1`): a SIGHUP from then on
/// reloads and never kills the agent.
fn reload_on_sighup(
    path: PathBuf,
    ctx: Arc<sources::Context>,
    pace: Arc<pace::Pacer>,
    notifier: skyferry_common::daemon::systemd::Notifier,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup());
    async move {
        let Ok(mut hup) = hup else {
            tracing::error!("cannot install the SIGHUP handler; reload needs a restart");
            return;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup.recv() => {}
            }
            notifier.reloading();
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
                    pace.configure(&config);
                    tracing::info!("SIGHUP: reloaded transfer.max_rate and [transfer.rates]");
                    ctx.request_rescan("rules reloaded");
                }
                Ok(Err(e)) => {
                    tracing::warn!("SIGHUP: {e}; keeping the rules in force");
                    // A SIGHUP always rescans, with the rules in force.
                    ctx.request_rescan("SIGHUP");
                }
                Err(e) => tracing::warn!(error = %e, "SIGHUP: reload task failed"),
            }
            notifier.ready("running (reloaded)");
        }
    }
}
