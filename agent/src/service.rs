//! What the agent tells systemd (`Type=notify`, see docs/operations.md): `READY=1` once
//! the journal is open and the tasks run, a `STATUS=` line with the connection and the
//! backlog every few seconds, `STOPPING=1` at shutdown, and watchdog pings while the
//! runtime, the blocking pool and the journal's lock all make progress. Without
//! `NOTIFY_SOCKET` nothing is sent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skyferry_common::daemon::systemd::{self, Notifier};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::journal::{Counts, Journal, State};
use crate::metrics::Metrics;
use crate::sender::lock_journal;

/// How often the `STATUS=` line is refreshed (each refresh counts the journal).
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// The status line: connection, backlog and send rate. `counts` is `None` when the
/// journal could not be counted.
pub fn status_line(
    address: &str,
    connections: i64,
    counts: Option<&Counts>,
    sent_bytes: u64,
    over: Duration,
) -> String {
    let link = if connections > 0 {
        format!("connected to {address}")
    } else {
        format!("not connected to {address}")
    };
    let backlog = match counts {
        Some(c) => {
            let files = c.get(State::Pending) + c.get(State::Inflight);
            format!(
                "{files} files ({}) pending, {} in flight",
                systemd::size(c.pending_bytes),
                c.get(State::Inflight)
            )
        }
        None => "journal not readable".to_owned(),
    };
    format!("{link}; {backlog}; {}", systemd::rate(sent_bytes, over))
}

/// Spawns the status refresher, the watchdog (when systemd asks for one) and the task that
/// says `STOPPING=1` when `shutdown` is cancelled. All end at shutdown.
pub fn spawn(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    notifier: &Notifier,
    journal: Arc<Mutex<Journal>>,
    metrics: Arc<Metrics>,
    address: String,
    shutdown: CancellationToken,
) {
    if let Some(period) = systemd::watchdog_period() {
        tracing::info!(ping_every = ?period, "systemd watchdog enabled");
        let (n, j, stop) = (notifier.clone(), journal.clone(), shutdown.clone());
        tasks.spawn(async move {
            // The probe goes through the blocking pool and takes the journal's lock: a
            // wedged runtime, a full blocking pool or a journal stuck in SQLite stops
            // the pings.
            let probe = move || {
                let j = j.clone();
                async move {
                    let _ = tokio::task::spawn_blocking(move || drop(lock_journal(&j))).await;
                }
            };
            systemd::run_watchdog(period, probe, move || n.watchdog(), stop).await;
            Ok(())
        });
    }
    let (n, stop) = (notifier.clone(), shutdown.clone());
    let mut last = (Instant::now(), metrics.bytes_sent.get());
    tasks.spawn(async move {
        let status = move || {
            let (j, m, address) = (journal.clone(), metrics.clone(), address.clone());
            let (then, sent_then) = last;
            let now = (Instant::now(), m.bytes_sent.get());
            last = now;
            async move {
                let counts = tokio::task::spawn_blocking(move || lock_journal(&j).counts())
                    .await
                    .ok()
                    .and_then(Result::ok);
                status_line(
                    &address,
                    m.connected.get(),
                    counts.as_ref(),
                    now.1.saturating_sub(sent_then),
                    now.0.duration_since(then),
                )
            }
        };
        systemd::refresh_status(n, STATUS_PERIOD, status, stop).await;
        Ok(())
    });
    let n = notifier.clone();
    tasks.spawn(async move {
        shutdown.cancelled().await;
        n.stopping("stopping: finishing the files in flight");
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_names_the_link_the_backlog_and_the_rate() {
        let mut c = Counts::default();
        c.by_state[State::Pending as usize] = 10;
        c.by_state[State::Inflight as usize] = 2;
        c.pending_bytes = 3_400_000_000;
        assert_eq!(
            status_line(
                "archive:7443",
                1,
                Some(&c),
                240_000_000,
                Duration::from_secs(2)
            ),
            "connected to archive:7443; 12 files (3.4 GB) pending, 2 in flight; 120 MB/s"
        );
        assert_eq!(
            status_line("archive:7443", 0, None, 0, Duration::from_secs(5)),
            "not connected to archive:7443; journal not readable; 0 B/s"
        );
    }
}
