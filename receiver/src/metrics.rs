//! The receiver's metrics, defined in one place (`skyferry_receiver_*`, base units,
//! bounded labels: never a path or an agent-chosen string except the validated agent id).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::storage::ops::OpKind;

/// Upper bounds of the storage latency buckets, in seconds: 1 ms to 60 s (a write that
/// takes longer is a stall, and shows in the oldest-operation gauge before it ends).
pub const STORAGE_LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// [`OpKind::as_str`]: write, fsync, rename, catalog_commit.
    pub operation: &'static str,
}

fn storage_histogram() -> Histogram {
    Histogram::new(STORAGE_LATENCY_BUCKETS)
}

/// `skyferry_receiver_storage_operation_duration_seconds{operation}`: how long storage
/// operations took, filled by [`crate::storage::ops::Ops`]. Every operation's series exists
/// from the start.
#[derive(Clone)]
pub struct StorageLatency(Family<OperationLabels, Histogram, fn() -> Histogram>);

impl Default for StorageLatency {
    fn default() -> Self {
        let f = Family::new_with_constructor(storage_histogram as fn() -> Histogram);
        for kind in OpKind::ALL {
            drop(f.get_or_create(&OperationLabels {
                operation: kind.as_str(),
            }));
        }
        StorageLatency(f)
    }
}

impl StorageLatency {
    pub fn observe(&self, kind: OpKind, seconds: f64) {
        self.0
            .get_or_create(&OperationLabels {
                operation: kind.as_str(),
            })
            .observe(seconds);
    }

    /// How many operations of `kind` ended (read back from the encoded text: the
    /// histogram's own getter is private to prometheus-client).
    #[cfg(test)]
    pub fn count(&self, kind: OpKind) -> u64 {
        let mut r = Registry::default();
        r.register("op", "", self.0.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let key = format!("op_count{{operation=\"{}\"}} ", kind.as_str());
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}
use skyferry_common::protocol::StorageState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `ErrorCode::as_str()`: a fixed set.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// A fixed set: see [`Metrics::register`].
    pub reason: &'static str,
}

/// The catalog's counters (`skyferry_receiver_catalog_*`), cloned into the catalog.
#[derive(Clone, Default)]
pub struct CatalogMetrics {
    /// Rows added (new file versions).
    pub rows: Counter,
    /// Files catalogued without a usable header, by `data_format` (`not_fits`,
    /// `fits_truncated`, `fits_broken`: a fixed set).
    pub unreadable: Family<FormatLabels, Counter>,
    /// Rows that could not be written (the file was not acknowledged).
    pub errors: Counter,
    /// Night files written.
    pub exports: Counter,
    /// Night file writes that failed (retried at the next flush).
    pub export_errors: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FormatLabels {
    pub format: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    pub catalog: CatalogMetrics,
    pub files_stored: Counter,
    pub files_already_stored: Counter,
    pub bytes_stored: Counter,
    pub chunks_received: Counter,
    pub bytes_received: Counter,
    pub files_rejected: Family<RejectLabels, Counter>,
    pub handshakes_failed: Counter,
    pub protocol_errors: Counter,
    pub connections: Gauge,
    pub files_in_progress: Gauge,
    /// Stripe streams open (more chunks of a file session from another lane).
    pub stripes: Gauge,
    /// Chunks that arrived on stripe streams (also counted in `chunks_received`).
    pub stripe_chunks: Counter,
    pub partials_removed: Counter,
    pub streams_refused: Family<RefusalLabels, Counter>,
    pub connections_refused: Family<RefusalLabels, Counter>,
    pub connections_superseded: Family<AgentLabels, Counter>,
    /// When each agent's last heartbeat arrived (seconds since the epoch).
    pub agent_heartbeat_received: Family<AgentLabels, Gauge<f64, AtomicU64>>,
    /// Sampled every second from [`crate::storage::ops::Ops`] and `statvfs`.
    pub storage: StorageMetrics,
    pub health: HealthMetrics,
}

// ---- Storage health and node load (stall watchdog, health/) ----

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `ok`, `stalled` or `full`.
    pub state: &'static str,
}

/// `skyferry_receiver_storage_state{state}` (one of them 1), the current stall's start,
/// and the node-load set (`skyferry_receiver_node_*`).
#[derive(Default)]
pub struct HealthMetrics {
    pub storage_state: Family<StateLabels, Gauge>,
    pub stalled_since: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub node: skyferry_common::node_load::metrics::NodeLoadMetrics,
}

impl HealthMetrics {
    fn register(&self, r: &mut Registry) {
        self.state(StorageState::Ok);
        r.register(
            "storage_state",
            "Storage state reported to agents: 1 for the current one of ok, stalled, full",
            self.storage_state.clone(),
        );
        r.register(
            "storage_stalled_since_timestamp_seconds",
            "When the operation behind the current storage stall began; 0 when not stalled",
            self.stalled_since.clone(),
        );
        self.node.register(r);
    }

    /// Sets the storage state gauges (one series per state, known in advance).
    pub fn state(&self, state: StorageState) {
        for (s, label) in [
            (StorageState::Ok, "ok"),
            (StorageState::Stalled, "stalled"),
            (StorageState::Full, "full"),
        ] {
            self.storage_state
                .get_or_create(&StateLabels { state: label })
                .set(i64::from(s == state));
        }
    }

    /// A stall began (`Some(since)`) or ended (`None`).
    pub fn stalled(&self, since: Option<std::time::SystemTime>) {
        let secs = since
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.stalled_since.set(secs);
        if since.is_some() {
            self.state(StorageState::Stalled);
        }
    }
}

/// The storage's operations and space, sampled (see `lib.rs`, `sample_storage`); the
/// latency histogram is filled by the operations themselves.
#[derive(Default)]
pub struct StorageMetrics {
    pub latency: StorageLatency,
    /// Start of the oldest storage operation still in progress, 0 when none.
    pub oldest_operation_start: Gauge<f64, AtomicU64>,
    pub operations_in_progress: Gauge,
    pub free_bytes: Gauge,
}

/// The `reason` values of `streams_refused` and `connections_refused`.
pub const STREAM_REFUSALS: [&str; 5] = [
    "agent_files",
    "agent_bytes",
    "receiver_busy",
    "offer_timeout",
    "idle_timeout",
];
pub const CONNECTION_REFUSALS: [&str; 2] = ["max_connections", "agent_connections"];

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("skyferry_receiver");
        r.register(
            "files_stored",
            "Files verified and published",
            self.files_stored.clone(),
        );
        r.register(
            "files_already_stored",
            "Offers acknowledged without transfer because the same content was stored",
            self.files_already_stored.clone(),
        );
        r.register(
            "stored_bytes",
            "Bytes of files published",
            self.bytes_stored.clone(),
        );
        r.register(
            "chunks_received",
            "Chunks verified and written",
            self.chunks_received.clone(),
        );
        r.register(
            "received_bytes",
            "Chunk bytes verified and written (after decompression)",
            self.bytes_received.clone(),
        );
        r.register(
            "files_rejected",
            "File offers or transfers rejected, by reason",
            self.files_rejected.clone(),
        );
        r.register(
            "handshakes_failed",
            "Connections that failed the TLS handshake or the hello (e.g. unknown agent certificate)",
            self.handshakes_failed.clone(),
        );
        r.register(
            "protocol_errors",
            "Streams closed because the peer sent malformed frames",
            self.protocol_errors.clone(),
        );
        r.register(
            "connections",
            "Agent connections open",
            self.connections.clone(),
        );
        r.register(
            "files_in_progress",
            "File sessions being received",
            self.files_in_progress.clone(),
        );
        r.register(
            "stripe_streams",
            "Stripe streams open: chunks of a file session carried by another stream of its agent",
            self.stripes.clone(),
        );
        r.register(
            "stripe_chunks",
            "Chunks received on stripe streams (also in chunks_received)",
            self.stripe_chunks.clone(),
        );
        r.register(
            "partials_removed",
            "Abandoned partial files removed after limits.partial_max_age",
            self.partials_removed.clone(),
        );
        r.register(
            "streams_refused",
            "File streams refused or closed by a limit, by reason: agent_files \
             (limits.max_files_per_agent), agent_bytes (limits.max_bytes_in_flight_per_agent), \
             receiver_busy (no global file slot in time), offer_timeout, idle_timeout",
            self.streams_refused.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused by a limit, by reason: max_connections, \
             agent_connections (limits.max_connections_per_agent)",
            self.connections_refused.clone(),
        );
        r.register(
            "connections_superseded",
            "Connections closed because a newer one of the same agent id arrived (after an \
             agent crash; a steady rise means two agents run with one id)",
            self.connections_superseded.clone(),
        );
        r.register(
            "agent_heartbeat_last_received_timestamp_seconds",
            "When the last heartbeat of each connected agent arrived (seconds since the epoch; \
             time() minus this is its age)",
            self.agent_heartbeat_received.clone(),
        );
        let st = &self.storage;
        r.register(
            "storage_operation_duration_seconds",
            "Duration of storage operations that ended, by operation (write, fsync, rename, \
             catalog_commit)",
            st.latency.0.clone(),
        );
        r.register(
            "storage_oldest_operation_start_timestamp_seconds",
            "Start (seconds since the epoch) of the oldest storage operation still in \
             progress; 0 when none runs. time() minus this is how long the storage has been stuck",
            st.oldest_operation_start.clone(),
        );
        r.register(
            "storage_operations_in_progress",
            "Storage operations (write, fsync, rename, catalog commit) in progress",
            st.operations_in_progress.clone(),
        );
        r.register(
            "storage_free_bytes",
            "Free space of the storage filesystem available to the receiver (statvfs)",
            st.free_bytes.clone(),
        );
        r.register(
            "build_info",
            "Always 1, labelled with the version of the receiver binary",
            skyferry_common::metrics_http::build_info(env!("CARGO_PKG_VERSION")),
        );
        let c = &self.catalog;
        r.register(
            "catalog_rows",
            "Catalog rows added, one per new stored file version",
            c.rows.clone(),
        );
        r.register(
            "catalog_unreadable_files",
            "Files stored and catalogued without a usable FITS header, by data_format \
             (not_fits, fits_truncated, fits_broken)",
            c.unreadable.clone(),
        );
        r.register(
            "catalog_errors",
            "Catalog rows that could not be written (the file was not acknowledged; the \
             agent offers it again)",
            c.errors.clone(),
        );
        r.register(
            "catalog_exports",
            "Night files of the catalog written",
            c.exports.clone(),
        );
        r.register(
            "catalog_export_errors",
            "Night file writes that failed (retried at the next flush)",
            c.export_errors.clone(),
        );
        self.health.register(r);
    }

    /// Creates every series whose labels are known in advance, so that each is exported
    /// (as 0) from the start: a rate over a series that appears only at its first event
    /// misses that event.
    pub fn precreate(&self) {
        for n in 1..=11 {
            self.rejected_zero(skyferry_common::protocol::ErrorCode::from_u16(n));
        }
        for reason in STREAM_REFUSALS {
            drop(
                self.streams_refused
                    .get_or_create(&RefusalLabels { reason }),
            );
        }
        for reason in CONNECTION_REFUSALS {
            drop(
                self.connections_refused
                    .get_or_create(&RefusalLabels { reason }),
            );
        }
        for format in ["not_fits", "fits_truncated", "fits_broken"] {
            drop(
                self.catalog
                    .unreadable
                    .get_or_create(&FormatLabels { format }),
            );
        }
    }

    fn rejected_zero(&self, code: skyferry_common::protocol::ErrorCode) {
        drop(self.files_rejected.get_or_create(&RejectLabels {
            reason: code.as_str(),
        }));
    }

    /// An agent's heartbeat arrived now.
    pub fn agent_heartbeat(&self, agent: &str) {
        self.agent_heartbeat_received
            .get_or_create(&AgentLabels {
                agent: agent.to_owned(),
            })
            .set(skyferry_common::unix_time::now_ns() as f64 / 1e9);
    }

    pub fn stream_refused(&self, reason: &'static str) {
        self.streams_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    pub fn rejected(&self, code: skyferry_common::protocol::ErrorCode) {
        self.files_rejected
            .get_or_create(&RejectLabels {
                reason: code.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn storage_state_is_one_hot_and_the_stall_start_is_exported() {
        let m = Metrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let text = |reg: &Registry| {
            let mut t = String::new();
            prometheus_client::encoding::text::encode(&mut t, reg).unwrap();
            t
        };
        let t = text(&reg);
        assert!(
            t.contains("skyferry_receiver_storage_state{state=\"ok\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("skyferry_receiver_storage_state{state=\"stalled\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("skyferry_receiver_storage_stalled_since_timestamp_seconds 0.0\n"),
            "{t}"
        );
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        m.health.stalled(Some(since));
        let t = text(&reg);
        assert!(
            t.contains("skyferry_receiver_storage_state{state=\"stalled\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("skyferry_receiver_storage_state{state=\"ok\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("skyferry_receiver_storage_stalled_since_timestamp_seconds 1800000000.0\n"),
            "{t}"
        );
        m.health.stalled(None);
        m.health.state(StorageState::Ok);
        assert!(
            text(&reg).contains("skyferry_receiver_storage_stalled_since_timestamp_seconds 0.0\n")
        );
    }
}
