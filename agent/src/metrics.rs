//! The agent's metrics, defined in one place (`skyferry_agent_*`, base units, bounded
//! labels).

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

#[derive(Default)]
pub struct Metrics {
    pub files_sent: Counter,
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
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("skyferry_agent");
        r.register(
            "files_sent",
            "Files acknowledged as stored by the receiver",
            self.files_sent.clone(),
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
            "1 while connected to the receiver",
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
