//! The running agent's state for `skyferry-agent status`: every second a JSON file
//! beside the journal (`<journal>.state.json`, see `skyferry_common::state_file`) with
//! the connection state, the queue, throughput, lag and ETA, the receiver's storage
//! state and node load from its last heartbeat, and this node's load.
//!
//! The queue has one class today (the journal's pending files); live and backlog
//! classes are reported per class when the journal has them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skyferry_common::protocol::ReceiverHeartbeat;
use tokio_util::sync::CancellationToken;

use crate::journal::{Journal, State};
use crate::metrics::Metrics;

const PERIOD: Duration = Duration::from_secs(1);

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

/// Rewrites the state file every second until `shutdown`.
pub async fn publish(
    journal: Arc<Mutex<Journal>>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut sent_before, mut at_before) = (metrics.bytes_sent.get(), Instant::now());
    let mut rate = 0.0f64;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Bytes per second, smoothed over a few seconds.
        let sent = metrics.bytes_sent.get();
        let secs = at_before.elapsed().as_secs_f64().max(0.001);
        let now_rate = sent.saturating_sub(sent_before) as f64 / secs;
        rate = if rate == 0.0 {
            now_rate
        } else {
            0.6 * rate + 0.4 * now_rate
        };
        (sent_before, at_before) = (sent, Instant::now());
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
            "throughput_bytes_per_second": rate.round(),
            "receiver": receiver,
            "node_load": skyferry_common::state_file::node_load_json(&metrics.health.node_summary()),
        });
        let (j, p) = (journal.clone(), path.clone());
        let written = tokio::task::spawn_blocking(move || {
            let counts = j
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .counts()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut state = state;
            let now_ns = skyferry_common::unix_time::now_ns();
            let lag = counts
                .oldest_pending_ns
                .map(|o| (now_ns - o).max(0) as f64 / 1e9);
            let eta = (rate > 0.0).then(|| (counts.pending_bytes as f64 / rate).round());
            state["queues"] = json!({
                "all": {
                    "pending_files": counts.get(State::Pending),
                    "inflight_files": counts.get(State::Inflight),
                    "pending_bytes": counts.pending_bytes,
                    "lag_seconds": lag,
                    "eta_seconds": eta,
                }
            });
            skyferry_common::state_file::write(&p, state)
        })
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
