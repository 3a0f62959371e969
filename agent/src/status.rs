//! The running agent's state for `skyferry-agent status`: every second a JSON file
//! beside the journal (`<journal>.state.json`, see `skyferry_common::state_file`) with
//! the connection state, the queue, throughput, lag and ETA, the receiver's storage
//! state and node load from its last heartbeat, and this node's load.
//!
//! The queue is reported per class (`live`, `backlog`, `replay`, as the sender's claim
//! sees them, with the same live cutoff) and for `all` of them: files pending and in
//! flight, their bytes, the lag (how long the oldest has waited), the class's
//! throughput (bytes sent per class, from the metrics) and its ETA (bytes / throughput).
//! Replays not over are listed with their progress ([`crate::replay_show::Line`]).
//! The same readings feed the queue and replay gauges of the metrics.
//!
//! The queue is read on a read-only connection of its own, so that the sender never
//! waits for it (the backlog's part reads every pending backlog row: ~0.3 s for a
//! million); the replays on the shared one, which records replays that are through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skyferry_common::protocol::ReceiverHeartbeat;
use tokio_util::sync::CancellationToken;

use crate::journal::{Class, ClassQueue, Journal, Queue};
use crate::metrics::Metrics;
use crate::progress::{eta_seconds, RateWindow};
use crate::replay::Replay;
use crate::replay_show::{Line, RATE_WINDOW};

const PERIOD: Duration = Duration::from_secs(1);
/// The window of the throughputs reported (the agent's and each class's).
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(10);

/// `<journal>.state.json`.
pub fn state_path(journal: &Path) -> PathBuf {
    let mut name = journal.file_name().unwrap_or_default().to_os_string();
    name.push(".state.json");
    journal.with_file_name(name)
}

fn receiver_json(last: Option<&(ReceiverHeartbeat, std::time::SystemTime)>) -> Value {
    let Some((hb, at)) = last else {
        return Value::Null;
    };
    let node = hb.node;
    json!({
        "heartbeat_at_unix_s": skyferry_common::state_file::unix_s(*at),
        "storage": skyferry_common::state_file::storage_name(hb.storage),
        "free_bytes": hb.free_bytes,
        "stalled_since_unix_s": node.map(|n| n.stalled_since_s).filter(|s| *s > 0),
        "node_load": node.map(|n| skyferry_common::state_file::node_load_json(&n.load)),
    })
}

/// One class of the queue in the state file.
fn class_json(q: &ClassQueue, rate: Option<f64>, now_ns: i64) -> Value {
    json!({
        "pending_files": q.pending_files,
        "inflight_files": q.inflight_files,
        "pending_bytes": q.bytes,
        "lag_seconds": q.oldest_ns.map(|o| ((now_ns - o).max(0) as f64 / 1e8).round() / 10.0),
        "throughput_bytes_per_second": rate.map(f64::round),
        "eta_seconds": eta_seconds(q.bytes, rate),
    })
}

/// The throughputs of the agent and of each class, from the metrics' byte counters.
struct Throughputs {
    started: Instant,
    all: RateWindow,
    classes: [RateWindow; 3],
    /// Bytes through (done or failed) of each replay not over.
    replays: HashMap<i64, RateWindow>,
}

impl Throughputs {
    fn new() -> Throughputs {
        let window = || RateWindow::new(THROUGHPUT_WINDOW, 32);
        Throughputs {
            started: Instant::now(),
            all: window(),
            classes: [window(), window(), window()],
            replays: HashMap::new(),
        }
    }

    fn observe_sent(&mut self, metrics: &Metrics) {
        let at = self.started.elapsed().as_secs_f64();
        self.all.push(at, metrics.bytes_sent.get());
        for (w, class) in self.classes.iter_mut().zip(Class::ALL) {
            w.push(at, metrics.class_sent(class));
        }
    }

    fn class(&self, class: Class) -> Option<f64> {
        let i = Class::ALL.iter().position(|c| *c == class)?;
        self.classes[i].rate()
    }

    /// Each open replay's line, with its rate.
    fn replay_lines(&mut self, open: &[Replay]) -> Vec<Line> {
        let at = self.started.elapsed().as_secs_f64();
        self.replays
            .retain(|id, _| open.iter().any(|r| r.id == *id));
        open.iter()
            .map(|r| {
                let w = self
                    .replays
                    .entry(r.id)
                    .or_insert_with(|| RateWindow::new(RATE_WINDOW, 64));
                w.push(at, r.progress.done_bytes + r.progress.failed_bytes);
                Line::of(r, w.rate())
            })
            .collect()
    }
}

/// What one tick reads from the journal.
struct Reading {
    queue: Queue,
    open: Vec<Replay>,
}

/// Reads the queue on `reader` (opened on first use; the shared journal when it cannot
/// be) and the open replays on the shared journal.
fn read(
    journal: &Mutex<Journal>,
    reader: &mut Option<Journal>,
    journal_path: &Path,
    live_since_ns: i64,
) -> Result<Reading, crate::journal::JournalError> {
    let lock = || {
        journal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if reader.is_none() {
        *reader = Journal::open_read_only(journal_path).ok();
    }
    let queue = match reader {
        Some(r) => r.queue(live_since_ns)?,
        None => lock().queue(live_since_ns)?,
    };
    let open = lock().open_replays()?;
    Ok(Reading { queue, open })
}

/// Rewrites the state file and the queue and replay gauges every second until
/// `shutdown`. `live_window`: the sender's (`transfer.live_window`).
pub async fn publish(
    journal: Arc<Mutex<Journal>>,
    journal_path: PathBuf,
    metrics: Arc<Metrics>,
    live_window: Duration,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rates = Throughputs::new();
    let reader: Arc<Mutex<Option<Journal>>> = Arc::new(Mutex::new(None));
    let (mut failing, mut read_failing) = (false, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        rates.observe_sent(&metrics);
        let (j, r, jp) = (journal.clone(), reader.clone(), journal_path.clone());
        let since = crate::sender::live_since_ns(live_window);
        let reading = tokio::task::spawn_blocking(move || {
            let mut r = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            read(&j, &mut r, &jp, since)
        })
        .await;
        let reading = match reading {
            Ok(Ok(r)) => {
                read_failing = false;
                r
            }
            Ok(Err(e)) => {
                if !std::mem::replace(&mut read_failing, true) {
                    tracing::warn!(error = %e, "cannot read the queue for status and metrics");
                }
                continue;
            }
            Err(_) => return,
        };
        metrics.observe_queue(&reading.queue);
        metrics.observe_replays(&reading.open);
        let now_ns = skyferry_common::unix_time::now_ns();
        let q = &reading.queue;
        let mut queues = serde_json::Map::new();
        queues.insert("all".into(), class_json(&q.all(), rates.all.rate(), now_ns));
        for class in Class::ALL {
            queues.insert(
                class.name().into(),
                class_json(q.class(class), rates.class(class), now_ns),
            );
        }
        let receiver = receiver_json(
            metrics
                .health
                .last_receiver
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref(),
        );
        let state = json!({
            "connection": if metrics.connected.get() > 0 { "connected" } else { "disconnected" },
            "throughput_bytes_per_second": rates.all.rate().unwrap_or(0.0).round(),
            "queues": queues,
            "replays": rates.replay_lines(&reading.open),
            "receiver": receiver,
            "node_load": skyferry_common::state_file::node_load_json(&metrics.health.node_summary()),
        });
        let p = path.clone();
        let written =
            tokio::task::spawn_blocking(move || skyferry_common::state_file::write(&p, state))
                .await;
        match written {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the status state file");
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_reports_its_lag_throughput_and_eta() {
        let q = ClassQueue {
            pending_files: 3,
            inflight_files: 1,
            bytes: 4_000_000,
            oldest_ns: Some(1_000_000_000),
        };
        let v = class_json(&q, Some(1_000_000.0), 91_250_000_000);
        assert_eq!(v["pending_files"], 3);
        assert_eq!(v["inflight_files"], 1);
        assert_eq!(v["pending_bytes"], 4_000_000);
        assert_eq!(v["lag_seconds"], 90.3);
        assert_eq!(v["eta_seconds"], 4);
        let idle = class_json(&ClassQueue::default(), None, 5);
        assert_eq!(
            idle["eta_seconds"], 0,
            "nothing queued: nothing to wait for"
        );
        assert!(idle["lag_seconds"].is_null());
        let stuck = class_json(&q, None, 5);
        assert!(stuck["eta_seconds"].is_null(), "nothing moves: no ETA");
    }
}
