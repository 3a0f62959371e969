//! Storage-stall detection: a stall is a storage operation (write, fsync, rename,
//! catalog commit, or the probe) in progress for longer than `health.stall_after`.
//!
//! [`StallWatch`] is the pure decision (operations in, transitions out); [`watchdog`]
//! feeds it from [`Ops::oldest`] and never touches the storage itself, so it keeps
//! deciding while every storage thread is blocked. [`probe`] writes and fsyncs a small
//! file under `.skyferry/` every `health.probe_interval`, so that an idle receiver
//! notices a stall too.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::shared::Shared;
use crate::storage::ops::{InProgress, OpKind, Ops};

/// Stalls kept for `status`.
pub const HISTORY: usize = 16;

/// A stall, over or still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// The operation that was in progress for too long.
    pub kind: OpKind,
    /// When that operation began (the storage has not answered since).
    pub since: SystemTime,
    started: Instant,
    /// How long it lasted, once over.
    pub lasted: Option<Duration>,
}

/// A change of the stall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Began(Stall),
    Ended(Stall),
}

#[derive(Debug, Default)]
struct State {
    current: Option<Stall>,
    /// When the last stall ended.
    ended: Option<Instant>,
    history: VecDeque<Stall>,
}

#[derive(Debug)]
pub struct StallWatch {
    stall_after: Duration,
    state: Mutex<State>,
}

impl StallWatch {
    pub fn new(stall_after: Duration) -> StallWatch {
        StallWatch {
            stall_after,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Plain values: a panicking holder cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Judges the oldest operation in progress at `now`. A stall begins when it has run
    /// longer than `stall_after`, and ends when no operation has (it began when the
    /// operation that first ran too long began).
    pub fn observe(&self, oldest: Option<InProgress>, now: Instant) -> Option<Change> {
        let too_long =
            oldest.filter(|o| now.saturating_duration_since(o.started) > self.stall_after);
        let mut s = self.state();
        match (s.current, too_long) {
            (None, Some(o)) => {
                let stall = Stall {
                    kind: o.kind,
                    since: o.started_at,
                    started: o.started,
                    lasted: None,
                };
                s.current = Some(stall);
                Some(Change::Began(stall))
            }
            (Some(mut stall), None) => {
                stall.lasted = Some(now.saturating_duration_since(stall.started));
                s.current = None;
                s.ended = Some(now);
                if s.history.len() == HISTORY {
                    s.history.pop_front();
                }
                s.history.push_back(stall);
                Some(Change::Ended(stall))
            }
            _ => None,
        }
    }

    /// Whether the storage is stalled, or was within `window` before `now`. An agent
    /// can go silent because of a stall: its file streams fill the connection's flow
    /// control window while the sessions wait on the storage, and its heartbeats wait
    /// behind them.
    pub fn stalled_within(&self, window: Duration, now: Instant) -> bool {
        let s = self.state();
        s.current.is_some()
            || s.ended
                .is_some_and(|e| now.saturating_duration_since(e) < window)
    }

    /// The stall going on, if any.
    pub fn current(&self) -> Option<Stall> {
        self.state().current
    }

    /// The last [`HISTORY`] stalls, oldest first, the current one last.
    pub fn history(&self) -> Vec<Stall> {
        let s = self.state();
        s.history.iter().copied().chain(s.current).collect()
    }
}

/// How often the watchdog looks: often enough that a stall is seen well within a
/// heartbeat of `stall_after`.
fn watch_period(stall_after: Duration) -> Duration {
    (stall_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Decides the stall state from [`Ops::oldest`] until `shutdown`; logs and exports each
/// change. Touches no storage.
pub async fn watchdog(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(watch_period(shared.config.health.stall_after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ops = shared.storage.ops();
        match shared
            .stall
            .observe(ops.oldest_in_progress(), Instant::now())
        {
            Some(Change::Began(s)) => {
                tracing::warn!(
                    operation = s.kind.as_str(),
                    since = %rfc3339(s.since),
                    in_progress = ops.in_progress(),
                    stall_after = ?shared.config.health.stall_after,
                    "storage stalled: an operation has not returned; heartbeats tell agents to pause"
                );
                shared.metrics.health.stalled(Some(s.since));
            }
            Some(Change::Ended(s)) => {
                tracing::info!(
                    operation = s.kind.as_str(),
                    since = %rfc3339(s.since),
                    lasted = ?s.lasted.unwrap_or_default(),
                    "storage stall ended; heartbeats tell agents to resume"
                );
                shared.metrics.health.stalled(None);
            }
            None => {}
        }
    }
}

/// Writes and fsyncs `<storage root>/.skyferry/probe` every `health.probe_interval` on
/// a blocking thread, tracked as a [`OpKind::Probe`] operation; one probe at a time (a
/// probe that hangs is the stall, and the next waits for it).
pub async fn probe(shared: Arc<Shared>, shutdown: CancellationToken) {
    let path = shared.config.storage_root.join(".skyferry").join("probe");
    let mut tick = tokio::time::interval(shared.config.health.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (ops, p) = (shared.storage.ops().clone(), path.clone());
        let done = tokio::task::spawn_blocking(move || write_probe(&ops, p));
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = done => r,
        };
        match result {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(path = %path.display(), "storage probe succeeds again");
                }
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(path = %path.display(), error = %e, "storage probe failed");
                }
            }
            Err(_) => return, // The runtime is shutting down.
        }
    }
}

/// A wall-clock time for logs, e.g. `2026-12-02T14:08:25Z`.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn write_probe(ops: &Ops, path: PathBuf) -> std::io::Result<()> {
    let _op = ops.begin(OpKind::Probe);
    let mut f = std::fs::File::create(&path)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    f.write_all(&now.as_nanos().to_be_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, started: Instant) -> InProgress {
        InProgress {
            kind,
            started,
            started_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_stall_begins_after_stall_after_and_ends_when_nothing_is_too_old() {
        let w = StallWatch::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let write = Some(op(OpKind::Write, t0));
        assert_eq!(
            w.observe(write, t0 + Duration::from_secs(10)),
            None,
            "not longer yet"
        );
        let Some(Change::Began(s)) = w.observe(write, t0 + Duration::from_secs(11)) else {
            panic!("expected a stall");
        };
        assert_eq!(s.kind, OpKind::Write);
        assert_eq!(
            w.observe(write, t0 + Duration::from_secs(12)),
            None,
            "still the same stall"
        );
        // The write returned; a newer fsync is in progress, but not for long: over.
        let fsync = Some(op(OpKind::Fsync, t0 + Duration::from_secs(15)));
        let Some(Change::Ended(s)) = w.observe(fsync, t0 + Duration::from_secs(16)) else {
            panic!("expected the end");
        };
        assert_eq!(s.lasted, Some(Duration::from_secs(16)));
        let ended = t0 + Duration::from_secs(16);
        assert!(w.stalled_within(Duration::from_secs(5), ended + Duration::from_secs(4)));
        assert!(!w.stalled_within(Duration::from_secs(5), ended + Duration::from_secs(5)));
        assert_eq!(w.current(), None);
        assert_eq!(w.history().len(), 1);
    }

    #[test]
    fn an_idle_storage_is_never_stalled_and_history_is_bounded() {
        let w = StallWatch::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(w.observe(None, t0 + Duration::from_secs(100)), None);
        for i in 0..(HISTORY as u64 + 3) {
            let t = t0 + Duration::from_secs(10 * i);
            w.observe(Some(op(OpKind::Probe, t)), t + Duration::from_secs(2));
            w.observe(None, t + Duration::from_secs(3));
        }
        assert_eq!(w.history().len(), HISTORY);
    }

    #[test]
    fn watchdog_looks_often_enough() {
        assert_eq!(
            watch_period(Duration::from_secs(3)),
            Duration::from_millis(300)
        );
        assert_eq!(
            watch_period(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
