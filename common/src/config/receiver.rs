//! The receiver's configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::existing_file_in;
use super::reader::{unknown_tables, Problems, Section};
use super::{read_table, ConfigError, Depth};

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub id: String,
    pub listen: SocketAddr,
    pub storage_root: PathBuf,
    /// `receiver.state_file`: the JSON file the running receiver rewrites every second for
    /// `skyferry-receiver status`. Default `<storage_root>/.skyferry/state.json`; put it
    /// off the storage (e.g. `/run/skyferry-receiver/state.json`) so that `status` stays
    /// current while the storage is stalled.
    pub state_file: PathBuf,
    /// Write received data with `O_DIRECT` where the filesystem supports it (default):
    /// no copy into the page cache. Off for filesystems where direct I/O is slow.
    pub direct_io: bool,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub max_file_size: u64,
    pub max_concurrent_files: usize,
    pub heartbeat_interval: Duration,
    /// Partial files untouched for this long (their agent never came back to finish
    /// them) are removed by a periodic sweep.
    pub partial_max_age: Duration,
    /// After SIGTERM, how long file sessions in progress may take to finish.
    pub shutdown_grace: Duration,
    /// What one agent, and all of them together, may hold of the receiver.
    pub peer_limits: PeerLimits,
    /// `[catalog]`: FITS headers into rows and Arrow files (docs/catalog.md).
    pub catalog: super::CatalogConfig,
    /// `[metrics] listen`: where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// `[health]`: storage-stall detection.
    pub health: HealthConfig,
}

/// `[health]`: when a storage operation in progress counts as a stall, and how often an
/// idle receiver probes its storage (docs/operations.md, "Storage stalls").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// `health.stall_after`: a write, fsync, rename or catalog commit in progress for
    /// longer than this is a stall (agents are told to pause).
    pub stall_after: Duration,
    /// `health.probe_interval`: how often a small file under `.skyferry/` is written and
    /// fsynced, so that an idle receiver notices a stall too.
    pub probe_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> HealthConfig {
        HealthConfig {
            stall_after: Duration::from_secs(10),
            probe_interval: Duration::from_secs(5),
        }
    }
}

impl HealthConfig {
    fn read(root: &toml::Table, p: &mut Problems) -> HealthConfig {
        let d = HealthConfig::default();
        let mut s = Section::of(root, "health", p);
        let h = HealthConfig {
            stall_after: s.duration("stall_after", d.stall_after, p),
            probe_interval: s.duration("probe_interval", d.probe_interval, p),
        };
        s.finish(p);
        if h.stall_after < Duration::from_secs(1) {
            p.push(format!(
                "health.stall_after: {:?} is too short (at least \"1s\"; the default is \"10s\")",
                h.stall_after
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&h.probe_interval) {
            p.push(format!(
                "health.probe_interval: {:?} is out of range (100ms ..= 1h; the default is \"5s\")",
                h.probe_interval
            ));
        }
        h
    }
}

/// Per-agent and total limits on connections, streams, file slots, buffered bytes and
/// time (the `[limits]` keys below; docs/protocol.md, "Limits and timeouts", states
/// them and the memory bound they give).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLimits {
    /// `limits.max_connections`: QUIC connections at once over all agents, counted from
    /// the first packet (handshakes included); more are refused at once.
    pub max_connections: usize,
    /// `limits.max_connections_per_agent`: connections at once with one agent
    /// certificate (hello pending, live, or being superseded).
    pub max_connections_per_agent: usize,
    /// `limits.max_streams_per_connection`: bidirectional streams a connection may have
    /// open at once (QUIC stream limit; the control stream is one of them).
    pub max_streams_per_connection: u32,
    /// `limits.receive_window`: QUIC connection receive window, i.e. the most a
    /// connection can make the receiver buffer of data it has not read yet.
    pub receive_window: u64,
    /// `limits.max_files_per_agent`: file sessions one agent may hold at once (of the
    /// `max_concurrent_files` shared by all).
    pub max_files_per_agent: usize,
    /// `limits.max_bytes_in_flight_per_agent`: frame memory one agent's file sessions
    /// may hold at once (each session reserves room for one chunk frame and its
    /// decompressed chunk).
    pub max_bytes_in_flight_per_agent: u64,
    /// `limits.offer_timeout`: a file stream's first frame must arrive within this.
    pub offer_timeout: Duration,
    /// `limits.stream_idle_timeout`: each later frame must arrive whole, and each reply
    /// be taken by the agent, within this; otherwise the stream is closed.
    pub stream_idle_timeout: Duration,
}

impl Default for PeerLimits {
    fn default() -> PeerLimits {
        PeerLimits {
            max_connections: 64,
            max_connections_per_agent: 4,
            max_streams_per_connection: 256,
            receive_window: 32 << 20,
            max_files_per_agent: 32,
            max_bytes_in_flight_per_agent: 256 << 20,
            offer_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Smallest `limits.max_bytes_in_flight_per_agent`: one session with the largest chunk
/// size must fit (a 16 MiB chunk frame plus its 16 MiB decompressed chunk).
pub const MIN_BYTES_IN_FLIGHT_PER_AGENT: u64 = 65 << 20;

impl PeerLimits {
    /// Reads the keys of `[limits]` that belong to peer limits.
    fn read(s: &mut Section<'_>, p: &mut Problems) -> PeerLimits {
        let d = PeerLimits::default();
        let count = |s: &mut Section<'_>, key, default: usize, max, p: &mut Problems| {
            s.integer_in(key, default as i64, (1, max), p) as usize
        };
        let limits = PeerLimits {
            max_connections: count(s, "max_connections", d.max_connections, 65_536, p),
            max_connections_per_agent: count(
                s,
                "max_connections_per_agent",
                d.max_connections_per_agent,
                1024,
                p,
            ),
            max_streams_per_connection: count(
                s,
                "max_streams_per_connection",
                d.max_streams_per_connection as usize,
                4096,
                p,
            ) as u32,
            receive_window: s.size("receive_window", d.receive_window, p),
            max_files_per_agent: count(s, "max_files_per_agent", d.max_files_per_agent, 4096, p),
            max_bytes_in_flight_per_agent: s.size(
                "max_bytes_in_flight_per_agent",
                d.max_bytes_in_flight_per_agent,
                p,
            ),
            offer_timeout: s.duration("offer_timeout", d.offer_timeout, p),
            stream_idle_timeout: s.duration("stream_idle_timeout", d.stream_idle_timeout, p),
        };
        if !(1 << 20..=1 << 30).contains(&limits.receive_window) {
            p.push(format!(
                "limits.receive_window: {} bytes is out of range (1 MiB ..= 1 GiB; the default is \"32 MiB\")",
                limits.receive_window
            ));
        }
        if limits.max_bytes_in_flight_per_agent < MIN_BYTES_IN_FLIGHT_PER_AGENT {
            p.push(format!(
                "limits.max_bytes_in_flight_per_agent: {} bytes is too small (at least \"65 MiB\", one session with 16 MiB chunks; the default is \"256 MiB\")",
                limits.max_bytes_in_flight_per_agent
            ));
        }
        for (key, t) in [
            ("offer_timeout", limits.offer_timeout),
            ("stream_idle_timeout", limits.stream_idle_timeout),
        ] {
            if t < Duration::from_secs(1) {
                p.push(format!(
                    "limits.{key}: {t:?} is too short (at least \"1s\")"
                ));
            }
        }
        limits
    }
}

/// Default of `limits.partial_max_age`: a week covers any outage the agent's journal
/// would still resume from, and long weekends.
pub const DEFAULT_PARTIAL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

impl ReceiverConfig {
    /// Reads and validates the file's syntax and values.
    pub fn load(file: &Path) -> Result<ReceiverConfig, ConfigError> {
        Self::load_with(file, Depth::Syntax)
    }

    /// [`ReceiverConfig::load`], and also checks that the config can run (the TLS
    /// identity, a writable storage root: see `check.rs`); every problem of both kinds is
    /// listed. What `check-config` and `run` use.
    pub fn load_checked(file: &Path) -> Result<ReceiverConfig, ConfigError> {
        Self::load_with(file, Depth::Check)
    }

    /// What `run` uses: [`ReceiverConfig::load_checked`], except that an identity the other end
    /// would refuse (it loads, but does not chain to the CA or lacks the name) is
    /// returned as warnings, not refused: see `check.rs`.
    pub fn load_for_run(file: &Path) -> Result<(ReceiverConfig, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let config = Self::load_with(file, Depth::Run(&mut warnings))?;
        Ok((config, warnings))
    }

    fn load_with(file: &Path, depth: Depth<'_>) -> Result<ReceiverConfig, ConfigError> {
        let root = read_table(file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        Self::from_table_with(&root, base, depth).map_err(|problems| ConfigError {
            file: file.to_owned(),
            problems,
        })
    }

    pub fn from_table(root: &toml::Table, base: &Path) -> Result<ReceiverConfig, Problems> {
        Self::from_table_with(root, base, Depth::Syntax)
    }

    fn from_table_with(
        root: &toml::Table,
        base: &Path,
        depth: Depth<'_>,
    ) -> Result<ReceiverConfig, Problems> {
        let p = &mut Problems::new();
        unknown_tables(
            root,
            &["receiver", "limits", "catalog", "metrics", "health"],
            p,
        );

        let mut s = Section::of(root, "receiver", p);
        let id = s
            .string("id", p)
            .unwrap_or_else(|| "skyferry-receiver".into());
        let listen = s.required_string("listen", p).and_then(|l| {
            l.parse::<SocketAddr>()
                .map_err(|_| {
                    p.push(format!(
                        "receiver.listen: {l:?} is not an ip:port address, e.g. \"0.0.0.0:7443\""
                    ))
                })
                .ok()
        });
        let storage_root = s.required_path("storage_root", p).map(|r| base.join(r));
        if let Some(r) = &storage_root {
            if !r.is_dir() {
                p.push(format!(
                    "receiver.storage_root: {} is not a directory (create it and give the receiver write access)",
                    r.display()
                ));
            }
        }
        let direct_io = s.boolean("direct_io", true, p);
        let state_file = s.string("state_file", p).map(|f| base.join(f));
        let ca = existing_file_in(&mut s, "ca", base, p);
        let cert = existing_file_in(&mut s, "cert", base, p);
        let key = existing_file_in(&mut s, "key", base, p);
        s.finish(p);
        if let Some(refused) = depth.refused() {
            super::check::receiver(
                ca.as_deref(),
                cert.as_deref(),
                key.as_deref(),
                storage_root.as_deref(),
                p,
                refused,
            );
        }

        let mut s = Section::of(root, "limits", p);
        let max_file_size = s.size("max_file_size", 1 << 40, p);
        let max_concurrent_files = s.integer_in("max_concurrent_files", 64, (1, 4096), p) as usize;
        let heartbeat_interval = s.duration("heartbeat_interval", Duration::from_secs(5), p);
        let partial_max_age = s.duration("partial_max_age", DEFAULT_PARTIAL_MAX_AGE, p);
        let shutdown_grace = s.duration("shutdown_grace", Duration::from_secs(20), p);
        let peer_limits = PeerLimits::read(&mut s, p);
        if partial_max_age < Duration::from_secs(1) {
            p.push(format!(
                "limits.partial_max_age: {partial_max_age:?} is too short (at least \"1s\"; the default is \"7d\")"
            ));
        }
        s.finish(p);
        let catalog = super::CatalogConfig::read(root, base, storage_root.as_deref(), p);
        let metrics_listen = super::read_metrics_listen(root, "127.0.0.1:9102", p);
        let health = HealthConfig::read(root, p);

        match (listen, storage_root, ca, cert, key) {
            (Some(listen), Some(storage_root), Some(ca), Some(cert), Some(key)) if p.is_empty() => {
                Ok(ReceiverConfig {
                    id,
                    listen,
                    state_file: state_file
                        .unwrap_or_else(|| storage_root.join(".skyferry").join("state.json")),
                    storage_root,
                    direct_io,
                    ca,
                    cert,
                    key,
                    max_file_size,
                    max_concurrent_files,
                    heartbeat_interval,
                    partial_max_age,
                    shutdown_grace,
                    peer_limits,
                    catalog,
                    metrics_listen,
                    health,
                })
            }
            _ => Err(std::mem::take(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
            [receiver]
            listen = "not-an-address"
            colour = "blue"
            ca = "ca.pem"
            cert = "receiver.pem"
            key = "receiver.key"
        "#;
        let problems = ReceiverConfig::from_table(&text.parse().unwrap(), dir.path()).unwrap_err();
        let all = problems.join("\n");
        assert!(all.contains("unknown key receiver.colour"), "{all}");
        assert!(all.contains("receiver.storage_root is required"), "{all}");
        assert!(
            all.contains("\"not-an-address\" is not an ip:port address"),
            "{all}"
        );
        assert!(all.contains("ca.pem does not exist"), "{all}");
    }

    /// A directory with placeholder TLS files and the smallest config that names them.
    fn minimal() -> (tempfile::TempDir, &'static str) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let base = "[receiver]\nlisten = \"127.0.0.1:7443\"\nstorage_root = \".\"\n\
                    ca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n";
        (dir, base)
    }

    #[test]
    fn the_state_file_defaults_to_the_storage_and_can_move_off_it() {
        let (dir, base) = minimal();
        let c = ReceiverConfig::from_table(&base.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(
            c.state_file,
            dir.path().join(".").join(".skyferry/state.json")
        );
        let moved = format!("{base}state_file = \"/run/skyferry-receiver/state.json\"\n");
        let c = ReceiverConfig::from_table(&moved.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.state_file, Path::new("/run/skyferry-receiver/state.json"));
    }

    #[test]
    fn health_defaults_and_bounds() {
        let (dir, base) = minimal();
        let c = ReceiverConfig::from_table(&base.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.health, HealthConfig::default());
        assert_eq!(c.health.stall_after, Duration::from_secs(10));
        let short = format!("{base}[health]\nstall_after = \"3s\"\nprobe_interval = \"1s\"\n");
        let c = ReceiverConfig::from_table(&short.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.health.stall_after, Duration::from_secs(3));
        assert_eq!(c.health.probe_interval, Duration::from_secs(1));
        let bad = format!("{base}[health]\nstall_after = \"0s\"\nprobe_interval = \"2h\"\nx = 1\n");
        let all = ReceiverConfig::from_table(&bad.parse().unwrap(), dir.path())
            .unwrap_err()
            .join("\n");
        assert!(
            all.contains("health.stall_after: 0ns is too short"),
            "{all}"
        );
        assert!(all.contains("health.probe_interval"), "{all}");
        assert!(all.contains("unknown key health.x"), "{all}");
    }

    #[test]
    fn partial_max_age_defaults_to_a_week_and_rejects_zero() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "r.pem", "r.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let base = r#"
            [receiver]
            listen = "127.0.0.1:7443"
            storage_root = "."
            ca = "ca.pem"
            cert = "r.pem"
            key = "r.key"
        "#;
        let c = ReceiverConfig::from_table(&base.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.partial_max_age, DEFAULT_PARTIAL_MAX_AGE);
        assert!(c.direct_io, "direct I/O is the default");
        let off = base.replace("storage_root", "direct_io = false\nstorage_root");
        let c = ReceiverConfig::from_table(&off.parse().unwrap(), dir.path()).unwrap();
        assert!(!c.direct_io);
        let wrong = base.replace("storage_root", "direct_io = \"yes\"\nstorage_root");
        let problems = ReceiverConfig::from_table(&wrong.parse().unwrap(), dir.path()).unwrap_err();
        assert!(
            problems
                .join("\n")
                .contains("receiver.direct_io must be true or false, found string"),
            "{problems:?}"
        );
        assert_eq!(c.metrics_listen, None, "no metrics endpoint unless asked");
        let m = format!("{base}\n[metrics]\nlisten = \"127.0.0.1:9102\"\n");
        let c = ReceiverConfig::from_table(&m.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9102".parse().unwrap()));
        let m = format!("{base}\n[metrics]\nlisten = \"localhost\"\n");
        let problems = ReceiverConfig::from_table(&m.parse().unwrap(), dir.path()).unwrap_err();
        assert!(
            problems
                .join("\n")
                .contains("metrics.listen: \"localhost\" is not an ip:port"),
            "{problems:?}"
        );
        let two_days = format!("{base}\n[limits]\npartial_max_age = \"2d\"\n");
        let c = ReceiverConfig::from_table(&two_days.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.partial_max_age, Duration::from_secs(2 * 86400));
        let zero = format!("{base}\n[limits]\npartial_max_age = \"0s\"\n");
        let problems = ReceiverConfig::from_table(&zero.parse().unwrap(), dir.path()).unwrap_err();
        assert!(
            problems.join("\n").contains("partial_max_age"),
            "{problems:?}"
        );
    }

    #[test]
    fn peer_limits_have_documented_defaults_and_bad_values_are_all_reported() {
        let (dir, base) = minimal();
        let c = ReceiverConfig::from_table(&base.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.peer_limits, PeerLimits::default());
        assert_eq!(c.peer_limits.max_files_per_agent, 32);
        assert_eq!(c.peer_limits.offer_timeout, Duration::from_secs(10));
        let set = format!(
            "{base}[limits]\nmax_connections = 8\nmax_files_per_agent = 3\n\
             receive_window = \"8 MiB\"\nstream_idle_timeout = \"30s\"\n"
        );
        let c = ReceiverConfig::from_table(&set.parse().unwrap(), dir.path()).unwrap();
        assert_eq!(c.peer_limits.max_connections, 8);
        assert_eq!(c.peer_limits.max_files_per_agent, 3);
        assert_eq!(c.peer_limits.receive_window, 8 << 20);
        assert_eq!(c.peer_limits.stream_idle_timeout, Duration::from_secs(30));
        let bad = format!(
            "{base}[limits]\nmax_connections = 0\nreceive_window = \"64 KiB\"\n\
             max_bytes_in_flight_per_agent = \"1 MiB\"\noffer_timeout = \"0s\"\n"
        );
        let all = ReceiverConfig::from_table(&bad.parse().unwrap(), dir.path())
            .unwrap_err()
            .join("\n");
        for key in [
            "max_connections = 0 is out of range",
            "limits.receive_window",
            "limits.max_bytes_in_flight_per_agent",
            "limits.offer_timeout",
        ] {
            assert!(all.contains(key), "{key} not in: {all}");
        }
    }

    #[test]
    fn the_shipped_example_sets_every_limit_to_its_default() {
        let text = include_str!("../../../systemd/receiver.toml.example");
        let table: toml::Table = text.parse().unwrap();
        let mut p = Problems::new();
        let mut s = Section::of(&table, "limits", &mut p);
        let limits = PeerLimits::read(&mut s, &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(limits, PeerLimits::default());
    }
}
