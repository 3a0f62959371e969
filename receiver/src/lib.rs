//! skyferry-receiver: the cloud side. Accepts agents over QUIC with mutual TLS, verifies
//! every chunk and every whole file, stores files durably and atomically, and reports
//! its health.
//!
//! `main.rs` is only the command line; [`run`] is the daemon.

// Tests may unwrap: a panic there is a failed test, not a crash.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod catalog;
pub mod health;
pub mod inventory;
pub mod lanes;
pub mod metrics;
pub mod server;
pub mod service;
pub mod session;
pub mod shared;
pub mod status;
pub mod storage;
pub mod stripe;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skyferry_common::config::ReceiverConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs the receiver until `shutdown` is cancelled. `ready` is called once it listens and
/// storage, inventory and catalog are open; systemd is told `READY=1` then (see
/// [`service`]).
pub async fn run(
    config: ReceiverConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let (root, direct_io) = (config.storage_root.clone(), config.direct_io);
    let storage = tokio::task::spawn_blocking(move || {
        storage::Storage::open(&root).map(|s| s.with_direct_io(direct_io))
    })
    .await?
    .with_context(|| format!("opening storage at {}", config.storage_root.display()))?;
    let mut server_config = skyferry_common::tls::server_config(
        &config.ca,
        &config.cert,
        &config.key,
        config.heartbeat_interval,
    )
    .context("loading TLS identity")?;
    // Windows and stream limit from `[limits]`: what peers can make us buffer is bounded.
    server_config.transport_config(Arc::new(skyferry_common::tls::receiver_transport(
        config.heartbeat_interval,
        &config.peer_limits,
    )));
    // Stateless resets keyed by the TLS key file: agents of a previous process of this
    // receiver learn at their next packet that their connection is gone.
    let bound = skyferry_common::tls::server_endpoint(config.listen, server_config, &config.key)?;
    bound.buffers.log();
    let endpoint = bound.endpoint;
    // Bound before `ready`: a taken metrics port is a failure at start, not later.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(skyferry_common::metrics_http::bind(addr).await?),
        None => None,
    };
    let addr = endpoint.local_addr()?;
    tracing::info!(%addr, storage = %config.storage_root.display(), "listening");
    if let Some(dir) = config.state_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the directory of receiver.state_file {}",
                config.state_file.display()
            )
        })?;
    }
    let mut shared = shared::Shared::new(config, storage);
    if shared.config.catalog.enabled {
        let (c, root, metrics, ops) = (
            shared.config.catalog.clone(),
            shared.config.storage_root.clone(),
            shared.metrics.catalog.clone(),
            shared.storage.ops().clone(),
        );
        let catalog =
            tokio::task::spawn_blocking(move || catalog::Catalog::open(&c, &root, metrics, ops))
                .await?
                .context("opening the catalog")?;
        shared = shared.with_catalog(Arc::new(catalog));
    }
    let sampler = skyferry_common::node_load::sampler::start(
        Some(&shared.config.storage_root),
        &shared.metrics.health.node,
        &shared.node_load,
    );
    let shared = Arc::new(shared);
    let background = TaskTracker::new();
    background.spawn(sweep_partials(shared.clone(), shutdown.clone()));
    background.spawn(sample_storage(shared.clone(), shutdown.clone()));
    if let Some(listener) = metrics_listener {
        let mut registry = prometheus_client::registry::Registry::default();
        shared.metrics.register(&mut registry);
        background.spawn(skyferry_common::metrics_http::serve(
            listener,
            Arc::new(registry),
            shutdown.clone(),
        ));
    }
    let notifier = skyferry_common::daemon::systemd::Notifier::from_env();
    service::spawn(&background, &notifier, shared.clone(), shutdown.clone());
    ready(addr);
    notifier.ready(&format!("listening on {addr}"));
    background.spawn(health::stall::watchdog(shared.clone(), shutdown.clone()));
    background.spawn(health::stall::probe(shared.clone(), shutdown.clone()));
    background.spawn(status::publish(shared.clone(), shutdown.clone()));
    background.spawn(skyferry_common::node_load::sampler::run(
        sampler,
        shared.metrics.health.node.clone(),
        shared.node_load.clone(),
        NODE_LOAD_PERIOD,
        shutdown.clone(),
    ));
    let grace = shared.config.shutdown_grace;
    let catalog = shared.catalog.clone();
    server::serve(endpoint, shared, shutdown, grace).await;
    background.close();
    background.wait().await;
    if let Some(catalog) = catalog {
        // Night files still out of date are written now (they would be at the next start
        // otherwise: which nights are out of date is durable).
        let _ = tokio::task::spawn_blocking(move || catalog.close()).await;
    }
    Ok(())
}

/// How often the storage gauges are sampled.
const STORAGE_SAMPLE_PERIOD: Duration = Duration::from_secs(1);
/// How long one sample waits for `statvfs`.
const STATVFS_WAIT: Duration = Duration::from_millis(200);

/// Copies the oldest storage operation in progress and the free space into the metrics,
/// every [`STORAGE_SAMPLE_PERIOD`]. `statvfs` can block on a stalled filesystem: it runs
/// on the blocking pool, and a sample still running when the next is due is not doubled
/// (the in-progress gauges, read from memory, are updated regardless).
async fn sample_storage(shared: Arc<shared::Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(STORAGE_SAMPLE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut statvfs: Option<tokio::task::JoinHandle<Option<u64>>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = &shared.metrics.storage;
        let ops = shared.storage.ops();
        m.oldest_operation_start.set(
            ops.oldest()
                .and_then(|(_, at)| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        m.operations_in_progress
            .set(i64::try_from(ops.in_progress()).unwrap_or(i64::MAX));
        let h = statvfs.get_or_insert_with(|| {
            let s = shared.clone();
            tokio::task::spawn_blocking(move || s.storage.free_bytes())
        });
        // Waits a little for it (a healthy statvfs takes microseconds); one that blocks is
        // looked at again at the next tick, without starting another.
        if let Ok(joined) = tokio::time::timeout(STATVFS_WAIT, h).await {
            statvfs = None;
            if let Ok(Some(free)) = joined {
                m.free_bytes.set(i64::try_from(free).unwrap_or(i64::MAX));
            }
        }
    }
}
/// How often node load is sampled (PSI's shortest average is 10 s).
const NODE_LOAD_PERIOD: Duration = Duration::from_secs(5);

/// How often abandoned partials are looked for: a quarter of their maximum age, between
/// one second and one hour.
fn sweep_period(max_age: Duration) -> Duration {
    (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Removes partial files older than `limits.partial_max_age`, periodically, on the
/// blocking pool (it walks directories and deletes files).
async fn sweep_partials(shared: Arc<shared::Shared>, shutdown: CancellationToken) {
    let max_age = shared.config.partial_max_age;
    let mut tick = tokio::time::interval(sweep_period(max_age));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            s.storage
                .sweep_partials(max_age, std::time::SystemTime::now(), |agent, path| {
                    s.claim(&Arc::from(agent), path)
                })
        })
        .await;
        match swept {
            Ok(sweep) if sweep.removed > 0 => {
                shared.metrics.partials_removed.inc_by(sweep.removed);
                tracing::info!(
                    files = sweep.removed,
                    bytes = sweep.bytes,
                    "swept abandoned partial files"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "partial sweep failed; trying again later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_run_often_enough_for_short_ages_and_hourly_for_long_ones() {
        assert_eq!(sweep_period(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(
            sweep_period(Duration::from_secs(40)),
            Duration::from_secs(10)
        );
        assert_eq!(
            sweep_period(Duration::from_secs(7 * 86400)),
            Duration::from_secs(3600)
        );
    }
}
