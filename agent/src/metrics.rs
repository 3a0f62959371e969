//! The agent's metrics, defined in one place (`skyferry_agent_*`, base units, bounded
//! labels).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A source's messages by outcome (`source`: redis_pubsub, redis_stream; `outcome`:
/// recorded, malformed, outside_roots, not_found, not_a_file, filtered, blocked, bad_name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceKindLabels {
    pub source: &'static str,
}

/// One `[[watch]]` root, by its index in the config (`watch="0"`): bounded by the config,
/// never a path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: String,
}

/// Filesystem source errors by kind (`read_dir`: a directory could not be listed;
/// `watch_dir`: one directory could not be watched; `watch_limit`: the inotify watch
/// limit was reached; `watch_start`: the watch could not start at all).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FsErrorLabels {
    pub kind: &'static str,
}

/// The queue's class (`live`: source mtime within `transfer.live_window`; `backlog`:
/// older; `replay`: queued by `skyferry-agent replay`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

/// The state of replays (`replays`: active, paused) or of their files (`replay_files`,
/// `replay_bytes`: queued, done, present, failed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplayStateLabels {
    pub state: &'static str,
}

/// The `state` values of `replay_files` and `replay_bytes`.
pub const REPLAY_FILE_STATES: [&str; 4] = ["queued", "done", "present", "failed"];

/// The `reason` values of `files_abandoned`.
pub const ABANDON_REASONS: [&str; 4] = ["deleted", "moved", "replaced", "modified"];

#[derive(Default)]
pub struct Metrics {
    pub health: HealthMetrics,
    pub files_sent: Counter,
    /// Files the journal durably records as done (after `files_sent`).
    pub files_done: Counter,
    pub chunks_sent: Counter,
    pub bytes_sent: Counter,
    pub files_rejected: Family<ReasonLabels, Counter>,
    pub connects: Counter,
    pub disconnects: Counter,
    pub connected: Gauge,
    pub files_in_flight: Gauge,
    pub source_messages: Family<SourceLabels, Counter>,
    pub source_reconnects: Family<SourceKindLabels, Counter>,
    pub fs_overflows: Counter,
    pub rescans: Counter,
    /// 1 while the root's filesystem watch runs, 0 while only rescans find its files.
    pub fs_watch_active: Family<WatchLabels, Gauge>,
    /// Directories under the root that the last rescan could not read.
    pub fs_unreadable_dirs: Family<WatchLabels, Gauge>,
    pub fs_errors: Family<FsErrorLabels, Counter>,
    /// Files whose stream was abandoned before the commit because the source changed
    /// under it (`reason`: deleted, moved, replaced, modified).
    pub files_abandoned: Family<ReasonLabels, Counter>,
    /// Quinn's statistics of the connection to the receiver.
    pub quic: QuicMetrics,
    /// Chunks sent for a file whose earlier attempt failed (its retry).
    pub chunks_resent: Counter,
    /// Files and bytes queued (pending or in flight), by class; sampled from the journal.
    pub queue_files: Family<ClassLabels, Gauge>,
    pub queue_bytes: Family<ClassLabels, Gauge>,
    /// Raw chunk bytes sent, by class (their sum is `bytes_sent`).
    pub class_sent_bytes: Family<ClassLabels, Counter>,
    /// Replays not over, by state (active, paused); sampled from the journal.
    pub replays: Family<ReplayStateLabels, Gauge>,
    /// Of the replays not over: files and bytes they queued, and of those the ones done
    /// (acknowledged), present (done without data: the receiver held them) and failed.
    pub replay_files: Family<ReplayStateLabels, Gauge>,
    pub replay_bytes: Family<ReplayStateLabels, Gauge>,
    /// Discovery time of the oldest queued file (seconds since the epoch), 0 when none.
    pub oldest_pending_discovered: Gauge<f64, AtomicU64>,
    /// When the receiver's last heartbeat arrived (seconds since the epoch).
    pub heartbeat_received: Gauge<f64, AtomicU64>,
}

/// Quinn's view of the connection to the receiver (`quinn::Connection::stats`), copied
/// every second by the sender. The gauges describe the current (or last) connection; the
/// counters add up every connection's, so they never go backwards across reconnects.
#[derive(Default)]
pub struct QuicMetrics {
    pub rtt: Gauge<f64, AtomicU64>,
    pub congestion_window: Gauge,
    pub mtu: Gauge,
    pub lost_packets: Counter,
    pub sent_packets: Counter,
    pub udp_tx_datagrams: Counter,
    pub udp_tx_bytes: Counter,
    pub congestion_events: Counter,
}

/// One reading of a connection's statistics: what [`QuicMetrics::observe`] needs of
/// `quinn::ConnectionStats`, as plain numbers (the counters are totals since the
/// connection started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicSample {
    pub rtt: Duration,
    pub congestion_window: u64,
    pub mtu: u16,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub udp_tx_datagrams: u64,
    pub udp_tx_bytes: u64,
    pub congestion_events: u64,
}

impl From<&quinn::ConnectionStats> for QuicSample {
    fn from(s: &quinn::ConnectionStats) -> QuicSample {
        QuicSample {
            rtt: s.path.rtt,
            congestion_window: s.path.cwnd,
            mtu: s.path.current_mtu,
            lost_packets: s.path.lost_packets,
            sent_packets: s.path.sent_packets,
            udp_tx_datagrams: s.udp_tx.datagrams,
            udp_tx_bytes: s.udp_tx.bytes,
            congestion_events: s.path.congestion_events,
        }
    }
}

impl QuicMetrics {
    /// Sets the gauges from `now` and adds to each counter what the connection counted
    /// since `last`, its previous reading (the default, all zeros, for a new connection);
    /// `now` becomes `last`.
    pub fn observe(&self, last: &mut QuicSample, now: QuicSample, gauges: bool) {
        if gauges {
            self.rtt.set(now.rtt.as_secs_f64());
            self.congestion_window
                .set(i64::try_from(now.congestion_window).unwrap_or(i64::MAX));
            self.mtu.set(i64::from(now.mtu));
        }
        // quinn's counters only grow within a connection; saturating in case one did not.
        let add = |c: &Counter, was: u64, is: u64| {
            c.inc_by(is.saturating_sub(was));
        };
        add(&self.lost_packets, last.lost_packets, now.lost_packets);
        add(&self.sent_packets, last.sent_packets, now.sent_packets);
        add(
            &self.udp_tx_datagrams,
            last.udp_tx_datagrams,
            now.udp_tx_datagrams,
        );
        add(&self.udp_tx_bytes, last.udp_tx_bytes, now.udp_tx_bytes);
        add(
            &self.congestion_events,
            last.congestion_events,
            now.congestion_events,
        );
        *last = now;
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "quic_rtt_seconds",
            "Smoothed round-trip time of the connection to the receiver (quinn)",
            self.rtt.clone(),
        );
        r.register(
            "quic_congestion_window_bytes",
            "Congestion window of the connection to the receiver (quinn)",
            self.congestion_window.clone(),
        );
        r.register(
            "quic_mtu_bytes",
            "Path MTU (UDP payload) in use on the connection to the receiver (quinn)",
            self.mtu.clone(),
        );
        r.register(
            "quic_lost_packets",
            "Packets quinn declared lost, over all connections",
            self.lost_packets.clone(),
        );
        r.register(
            "quic_sent_packets",
            "Packets sent, over all connections",
            self.sent_packets.clone(),
        );
        r.register(
            "quic_udp_tx_datagrams",
            "UDP datagrams sent, over all connections",
            self.udp_tx_datagrams.clone(),
        );
        r.register(
            "quic_udp_tx_bytes",
            "UDP payload bytes sent, over all connections",
            self.udp_tx_bytes.clone(),
        );
        r.register(
            "quic_congestion_events",
            "Congestion events (window reductions after loss), over all connections",
            self.congestion_events.clone(),
        );
    }
}

// ---- Node load and the receiver's storage health (from its heartbeats) ----

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `ok`, `stalled` or `full`.
    pub state: &'static str,
}

/// `skyferry_agent_node_*`, and the receiver's storage as its last heartbeat said:
/// `skyferry_agent_receiver_storage_state{state}` (one of them 1) and
/// `skyferry_agent_receiver_storage_stalled_since_timestamp_seconds` (0 when not).
#[derive(Default)]
pub struct HealthMetrics {
    pub node: skyferry_common::node_load::metrics::NodeLoadMetrics,
    /// The latest node-load sample, for heartbeats.
    pub node_latest: skyferry_common::node_load::sampler::Latest,
    pub receiver_storage_state: Family<StateLabels, Gauge>,
    pub receiver_stalled_since: Gauge,
    /// The receiver's last heartbeat and when it came, for `status`.
    pub last_receiver: std::sync::Mutex<
        Option<(
            skyferry_common::protocol::ReceiverHeartbeat,
            std::time::SystemTime,
        )>,
    >,
}

impl HealthMetrics {
    fn register(&self, r: &mut Registry) {
        self.node.register(r);
        self.receiver_state(skyferry_common::protocol::StorageState::Ok, 0);
        r.register(
            "receiver_storage_state",
            "The receiver's storage state in its last heartbeat: 1 for the current one of ok, stalled, full",
            self.receiver_storage_state.clone(),
        );
        r.register(
            "receiver_storage_stalled_since_timestamp_seconds",
            "When the receiver's current storage stall began (its last heartbeat); 0 when not stalled",
            self.receiver_stalled_since.clone(),
        );
    }

    /// What a receiver heartbeat said.
    pub fn receiver_state(
        &self,
        state: skyferry_common::protocol::StorageState,
        stalled_since_s: u64,
    ) {
        use skyferry_common::protocol::StorageState as S;
        for (s, label) in [(S::Ok, "ok"), (S::Stalled, "stalled"), (S::Full, "full")] {
            self.receiver_storage_state
                .get_or_create(&StateLabels { state: label })
                .set(i64::from(s == state));
        }
        self.receiver_stalled_since
            .set(i64::try_from(stalled_since_s).unwrap_or(0));
    }

    /// The heartbeat's node-load summary of the latest sample.
    pub fn node_summary(&self) -> skyferry_common::protocol::NodeLoadSummary {
        self.node_latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|s| s.summary())
            .unwrap_or_default()
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("skyferry_agent");
        self.health.register(r);
        r.register(
            "files_sent",
            "Files acknowledged as stored by the receiver",
            self.files_sent.clone(),
        );
        r.register(
            "files_done",
            "Files durably recorded as done in the journal (acknowledged by the receiver, then fsynced)",
            self.files_done.clone(),
        );
        r.register(
            "chunks_sent",
            "Chunks sent (re-sends after a resume included)",
            self.chunks_sent.clone(),
        );
        r.register(
            "sent_bytes",
            "Raw chunk bytes sent (before compression)",
            self.bytes_sent.clone(),
        );
        r.register(
            "files_rejected",
            "Files the receiver rejected, by reason",
            self.files_rejected.clone(),
        );
        r.register(
            "connects",
            "Successful connections to the receiver",
            self.connects.clone(),
        );
        r.register(
            "disconnects",
            "Connections to the receiver lost",
            self.disconnects.clone(),
        );
        r.register(
            "connected",
            "Connections (lanes) open to the receiver: 0 to transfer.connections",
            self.connected.clone(),
        );
        r.register(
            "files_in_flight",
            "Files being sent",
            self.files_in_flight.clone(),
        );
        r.register(
            "source_messages",
            "Messages from Redis sources, by source kind and outcome",
            self.source_messages.clone(),
        );
        r.register(
            "source_reconnects",
            "Reconnection attempts to a source (Redis), by source kind",
            self.source_reconnects.clone(),
        );
        r.register(
            "fs_overflows",
            "Filesystem event queue overflows or watch errors (each triggers a rescan)",
            self.fs_overflows.clone(),
        );
        r.register(
            "rescans",
            "Full rescans of a watch root",
            self.rescans.clone(),
        );
        r.register(
            "fs_watch_active",
            "1 while the filesystem watch of a root runs; 0 while the root is only rescanned (every fallback_rescan_interval)",
            self.fs_watch_active.clone(),
        );
        r.register(
            "fs_unreadable_dirs",
            "Directories under a root that the last rescan could not read (their files are not shipped)",
            self.fs_unreadable_dirs.clone(),
        );
        r.register(
            "fs_errors",
            "Filesystem source errors, by kind (read_dir, watch_dir, watch_limit, watch_start)",
            self.fs_errors.clone(),
        );
        r.register(
            "files_abandoned",
            "Transfers abandoned before the commit because the source was deleted, moved, replaced or modified meanwhile",
            self.files_abandoned.clone(),
        );
        r.register(
            "chunks_resent",
            "Chunks sent again for a file whose earlier attempt failed",
            self.chunks_resent.clone(),
        );
        r.register(
            "queue_files",
            "Files queued (pending or in flight), by class: live (source mtime within \
             transfer.live_window), backlog (older) or replay (queued by `replay`, paused ones too)",
            self.queue_files.clone(),
        );
        r.register(
            "queue_bytes",
            "Bytes of the files queued (pending or in flight), by class: live, backlog or replay",
            self.queue_bytes.clone(),
        );
        r.register(
            "class_sent_bytes",
            "Raw chunk bytes sent, by class: live, backlog or replay (their sum is sent_bytes)",
            self.class_sent_bytes.clone(),
        );
        r.register(
            "replays",
            "Replays not over (neither done nor cancelled), by state: active or paused",
            self.replays.clone(),
        );
        r.register(
            "replay_files",
            "Files of the replays not over: queued by them, and of those done, present (done \
             without data, the receiver held them) and failed",
            self.replay_files.clone(),
        );
        r.register(
            "replay_bytes",
            "Bytes of the replays not over: queued, done, present and failed (as replay_files)",
            self.replay_bytes.clone(),
        );
        r.register(
            "oldest_pending_discovered_timestamp_seconds",
            "When the oldest file still queued was discovered (seconds since the epoch; 0 when \
             the queue is empty). time() minus this is the lag",
            self.oldest_pending_discovered.clone(),
        );
        r.register(
            "heartbeat_last_received_timestamp_seconds",
            "When the receiver's last heartbeat arrived (seconds since the epoch; 0 before the first)",
            self.heartbeat_received.clone(),
        );
        r.register(
            "build_info",
            "Always 1, labelled with the version of the agent binary",
            skyferry_common::metrics_http::build_info(env!("CARGO_PKG_VERSION")),
        );
        self.quic.register(r);
    }

    /// Creates every series whose labels are known in advance, so that each is exported
    /// (as 0) from the start.
    pub fn precreate(&self) {
        for n in 1..=11 {
            let code = skyferry_common::protocol::ErrorCode::from_u16(n);
            drop(self.files_rejected.get_or_create(&ReasonLabels {
                reason: code.as_str(),
            }));
        }
        for reason in ABANDON_REASONS {
            drop(self.files_abandoned.get_or_create(&ReasonLabels { reason }));
        }
        for class in crate::journal::Class::ALL.map(crate::journal::Class::name) {
            drop(self.queue_files.get_or_create(&ClassLabels { class }));
            drop(self.queue_bytes.get_or_create(&ClassLabels { class }));
            drop(self.class_sent_bytes.get_or_create(&ClassLabels { class }));
        }
        self.observe_replays(&[]);
    }

    /// Counts raw chunk bytes sent for a file of `class`.
    pub fn sent(&self, class: crate::journal::Class, bytes: u64) {
        self.bytes_sent.inc_by(bytes);
        self.class_sent_bytes
            .get_or_create(&ClassLabels {
                class: class.name(),
            })
            .inc_by(bytes);
    }

    /// Bytes sent so far in `class`.
    pub fn class_sent(&self, class: crate::journal::Class) -> u64 {
        self.class_sent_bytes
            .get_or_create(&ClassLabels {
                class: class.name(),
            })
            .get()
    }

    /// Copies the replays not over (active or paused) into the replay gauges.
    pub fn observe_replays(&self, open: &[crate::replay::Replay]) {
        use crate::replay::ReplayState;
        let gauge = |f: &Family<ReplayStateLabels, Gauge>, state, v: u64| {
            f.get_or_create(&ReplayStateLabels { state })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        for s in [ReplayState::Active, ReplayState::Paused] {
            let n = open.iter().filter(|r| r.state == s).count() as u64;
            gauge(&self.replays, s.name(), n);
        }
        let sum = |f: fn(&crate::replay::Replay) -> (u64, u64)| {
            open.iter()
                .map(f)
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let totals = [
            sum(|r| (r.queued_files, r.queued_bytes)),
            sum(|r| (r.progress.done_files, r.progress.done_bytes)),
            sum(|r| (r.progress.present_files, r.progress.present_bytes)),
            sum(|r| (r.progress.failed_files, r.progress.failed_bytes)),
        ];
        for (state, (files, bytes)) in REPLAY_FILE_STATES.into_iter().zip(totals) {
            gauge(&self.replay_files, state, files);
            gauge(&self.replay_bytes, state, bytes);
        }
    }

    /// Copies a reading of the journal's queue into the gauges.
    pub fn observe_queue(&self, q: &crate::journal::Queue) {
        let set = |f: &Family<ClassLabels, Gauge>, class, v: u64| {
            f.get_or_create(&ClassLabels { class })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        for class in crate::journal::Class::ALL {
            let c = q.class(class);
            set(&self.queue_files, class.name(), c.files());
            set(&self.queue_bytes, class.name(), c.bytes);
        }
        // Live and backlog: the discovery of the oldest file (a replay's files wait since
        // the replay was created, which is not a transfer lag).
        let oldest = [q.live.oldest_ns, q.backlog.oldest_ns]
            .into_iter()
            .flatten()
            .min();
        self.oldest_pending_discovered
            .set(oldest.map_or(0.0, |ns| ns as f64 / 1e9));
    }

    /// Counts one filesystem source error of `kind`.
    pub fn fs_error(&self, kind: &'static str) {
        self.fs_errors.get_or_create(&FsErrorLabels { kind }).inc();
    }

    /// Counts one message of a source with its outcome.
    pub fn source_message(&self, source: &'static str, outcome: &'static str) {
        self.source_messages
            .get_or_create(&SourceLabels { source, outcome })
            .inc();
    }

    pub fn rejected(&self, code: skyferry_common::protocol::ErrorCode) {
        self.files_rejected
            .get_or_create(&ReasonLabels {
                reason: code.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_packets: u64, lost_packets: u64, udp_tx_bytes: u64) -> QuicSample {
        QuicSample {
            rtt: Duration::from_millis(15),
            congestion_window: 64_000,
            mtu: 1452,
            lost_packets,
            sent_packets,
            udp_tx_datagrams: sent_packets,
            udp_tx_bytes,
            congestion_events: lost_packets / 2,
        }
    }

    #[test]
    fn quic_counters_add_up_every_connection_and_never_go_backwards() {
        let m = QuicMetrics::default();
        // First connection: two readings, then it ends.
        let mut last = QuicSample::default();
        m.observe(&mut last, sample(100, 4, 140_000), true);
        m.observe(&mut last, sample(250, 10, 350_000), true);
        assert_eq!(m.sent_packets.get(), 250);
        // A reconnect: the new connection counts from zero again.
        let mut last = QuicSample::default();
        m.observe(&mut last, sample(30, 1, 42_000), true);
        assert_eq!(m.sent_packets.get(), 280, "not back to 30");
        assert_eq!(m.lost_packets.get(), 11);
        assert_eq!(m.udp_tx_bytes.get(), 392_000);
        assert_eq!(m.udp_tx_datagrams.get(), 280);
        assert_eq!(m.congestion_events.get(), 5);
        // The same reading twice adds nothing.
        m.observe(&mut last, sample(30, 1, 42_000), true);
        assert_eq!(m.sent_packets.get(), 280);
        assert_eq!(m.mtu.get(), 1452);
        assert_eq!(m.congestion_window.get(), 64_000);
        assert!((m.rtt.get() - 0.015).abs() < 1e-9);
    }
}
