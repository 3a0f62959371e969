//! What the receiver tells systemd (`Type=notify`, see docs/operations.md): `READY=1`
//! once storage, inventory and catalog are open and the QUIC port is bound, a `STATUS=`
//! line with agents, storage state and files in progress every few seconds,
//! `STOPPING=1` at shutdown, and watchdog pings while the runtime and its blocking pool
//! make progress. Without `NOTIFY_SOCKET` nothing is sent. SIGHUP is logged and ignored:
//! the receiver has nothing to reload (a stray SIGHUP must not kill it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use skyferry_common::daemon::systemd::{self, Notifier};
use skyferry_common::protocol::StorageState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::shared::Shared;

/// How often the `STATUS=` line is refreshed.
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// The status line. `storage` is `None` when its state could not be read.
pub fn status_line(
    agents: usize,
    storage: Option<(StorageState, u64)>,
    files_in_progress: i64,
    received_bytes: u64,
    over: Duration,
) -> String {
    let storage = match storage {
        Some((state, free)) => {
            let state = match state {
                StorageState::Ok => "ok",
                StorageState::Stalled => "STALLED",
                StorageState::Full => "FULL",
            };
            format!("storage {state} ({} free)", systemd::size(free))
        }
        None => "storage state unknown".to_owned(),
    };
    let plural = if agents == 1 { "" } else { "s" };
    format!(
        "{agents} agent{plural} connected; {storage}; {files_in_progress} files in progress; {}",
        systemd::rate(received_bytes, over)
    )
}

/// Spawns (on `tasks`) the status refresher, the watchdog when systemd asks for one, the
/// SIGHUP handler, and the task that says `STOPPING=1` when `shutdown` is cancelled. All
/// end at shutdown. The SIGHUP handler is installed before this returns.
pub fn spawn(
    tasks: &TaskTracker,
    notifier: &Notifier,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    if let Some(period) = systemd::watchdog_period() {
        tracing::info!(ping_every = ?period, "systemd watchdog enabled");
        let (n, stop) = (notifier.clone(), shutdown.clone());
        // A round trip through the blocking pool: a wedged runtime or a blocking pool
        // whose every thread hangs stops the pings.
        let probe = || async {
            let _ = tokio::task::spawn_blocking(|| ()).await;
        };
        tasks.spawn(systemd::run_watchdog(
            period,
            probe,
            move || n.watchdog(),
            stop,
        ));
    }
    let (n, s, stop) = (notifier.clone(), shared.clone(), shutdown.clone());
    let mut last = (Instant::now(), shared.metrics.bytes_received.get());
    let status = move || {
        let s = s.clone();
        let (then, received_then) = last;
        let now = (Instant::now(), s.metrics.bytes_received.get());
        last = now;
        async move {
            // statvfs can block on stalled storage: keep it off the runtime.
            let s2 = s.clone();
            let storage = tokio::task::spawn_blocking(move || s2.storage_state())
                .await
                .ok();
            status_line(
                s.agents_connected(),
                storage,
                s.metrics.files_in_progress.get(),
                now.1.saturating_sub(received_then),
                now.0.duration_since(then),
            )
        }
    };
    tasks.spawn(systemd::refresh_status(n, STATUS_PERIOD, status, stop));
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            let stop = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = hup.recv() => tracing::warn!(
                            "SIGHUP ignored: the receiver has nothing to reload; restart it to apply config changes"
                        ),
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGHUP handler; a SIGHUP will end the receiver")
        }
    }
    let n = notifier.clone();
    tasks.spawn(async move {
        shutdown.cancelled().await;
        n.stopping("stopping: finishing the files in progress");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_agents_storage_files_and_rate() {
        assert_eq!(
            status_line(
                3,
                Some((StorageState::Ok, 2_500_000_000_000)),
                2,
                50_000_000,
                Duration::from_secs(1)
            ),
            "3 agents connected; storage ok (2.5 TB free); 2 files in progress; 50 MB/s"
        );
        assert_eq!(
            status_line(1, None, 0, 0, Duration::from_secs(5)),
            "1 agent connected; storage state unknown; 0 files in progress; 0 B/s"
        );
        assert!(
            status_line(0, Some((StorageState::Stalled, 0)), 0, 0, Duration::ZERO)
                .contains("storage STALLED")
        );
    }
}
