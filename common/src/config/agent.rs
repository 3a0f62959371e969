//! The agent's configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::rate::RateSchedule;
use super::reader::{unknown_tables, Problems, Section};
use super::{read_table, validate_agent_id, ConfigError, Depth};
use crate::protocol::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
    pub journal: PathBuf,
    pub receiver: Endpoint,
    pub transfer: TransferConfig,
    pub watches: Vec<WatchConfig>,
    /// Redis notification sources (`[[redis]]`), possibly none.
    pub redis: Vec<RedisConfig>,
    /// `agent.blocklist`: the file, and what it held when the config was loaded.
    pub blocklist: Option<(PathBuf, Blocklist)>,
    /// `[metrics] listen`: where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `agent.timezone`: the observatory's timezone, for `replay --night` and the times
    /// of day in rate schedules (IANA name, default Asia/Tokyo).
    pub timezone: chrono_tz::Tz,
}

/// One `[[redis]]` source.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis[<i>]`, for messages and logs.
    pub name: String,
    /// `redis://` or `rediss://` (TLS) URL, possibly with a password. Never log it whole:
    /// use [`RedisConfig::redacted_url`].
    pub url: String,
    /// For `rediss://`: the CA that signed the server's certificate (PEM), instead of the
    /// system's roots.
    pub ca: Option<PathBuf>,
    pub mode: RedisMode,
    pub format: MessageFormat,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// `SUBSCRIBE channel` or `PSUBSCRIBE pattern`. Messages published while the agent is
    /// not connected are lost: every reconnect triggers a rescan of the roots.
    PubSub { channel: String, pattern: bool },
    /// `XREADGROUP` on `stream` in consumer group `group` as `consumer`; an entry is
    /// acknowledged once the journal holds its file. Entries pending for longer than
    /// `claim_idle` (e.g. left by a crash) are claimed at startup.
    Stream {
        stream: String,
        group: String,
        consumer: String,
        claim_idle: Duration,
    },
}

/// How a message names its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFormat {
    /// Pub/sub: the whole payload is the path. Streams: the entry field `field`.
    Path { field: String },
    /// Pub/sub only: the payload is a JSON object, the path is the string at key `field`
    /// (stream entries are key/value already: use `Path`).
    Json { field: String },
}

impl MessageFormat {
    /// The field that holds the path (stream entry field or JSON key).
    pub fn field(&self) -> &str {
        match self {
            MessageFormat::Path { field } | MessageFormat::Json { field } => field,
        }
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Replaces the user-info part of a URL (`user:password@`) by `***@`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Paths and globs never to ship, one per line of the blocklist file. A line that starts
/// with `/` is matched against the file's absolute path, any other line against its path
/// relative to its watch root. `#` starts a comment line; blank lines are ignored.
#[derive(Debug, Clone, Default)]
pub struct Blocklist {
    absolute: Option<GlobSet>,
    relative: Option<GlobSet>,
    entries: usize,
}

impl Blocklist {
    /// Reads and compiles the file; every bad line is reported (`<file> line <n>: ...`).
    pub fn load(file: &Path) -> Result<Blocklist, Vec<String>> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| vec![format!("blocklist {}: cannot read: {e}", file.display())])?;
        Blocklist::parse(&text).map_err(|errs| {
            errs.into_iter()
                .map(|(line, e)| format!("blocklist {} line {line}: {e}", file.display()))
                .collect()
        })
    }

    /// Compiles blocklist text; errors carry 1-based line numbers.
    pub fn parse(text: &str) -> Result<Blocklist, Vec<(usize, String)>> {
        let (mut abs, mut rel) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        let (mut n_abs, mut n_rel) = (0, 0);
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match GlobBuilder::new(line).literal_separator(true).build() {
                Ok(g) if line.starts_with('/') => {
                    abs.add(g);
                    n_abs += 1;
                }
                Ok(g) => {
                    rel.add(g);
                    n_rel += 1;
                }
                Err(e) => problems.push((i + 1, format!("bad glob {line:?}: {}", e.kind()))),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let build = |b: GlobSetBuilder, n: usize| (n > 0).then(|| b.build().ok()).flatten();
        Ok(Blocklist {
            absolute: build(abs, n_abs),
            relative: build(rel, n_rel),
            entries: n_abs + n_rel,
        })
    }

    /// Whether the file at `absolute` (`relative` to its root) is blocked.
    pub fn blocks(&self, absolute: &Path, relative: &Path) -> bool {
        self.absolute.as_ref().is_some_and(|s| s.is_match(absolute))
            || self.relative.as_ref().is_some_and(|s| s.is_match(relative))
    }

    /// How many patterns it holds.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

/// Where and how to reach the receiver.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`, resolved at each connection attempt.
    pub address: String,
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `receiver.server_cert`: the receiver's certificate, when the agent host has a
    /// copy; only `check-config` reads it.
    pub server_cert: Option<PathBuf>,
}

/// Default per-file window: one file fills 10 Gbit/s at 15 ms RTT (a bandwidth-delay
/// product of 19 MB) with headroom.
pub const DEFAULT_WINDOW: u64 = 24 << 20;

/// Largest per-file window accepted.
pub const MAX_WINDOW: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct TransferConfig {
    pub chunk_size: u32,
    pub parallel_files: usize,
    /// QUIC connections (lanes) files are striped over (`transfer.connections`); a file
    /// stays on one of them. Each adds a congestion window (what a lossy long link
    /// needs) and a driver task (what lets one agent use several cores).
    pub connections: u16,
    pub compression_level: i32,
    /// `transfer.compression`: off, zstd (always tried), or auto (while the link is the
    /// bottleneck). `compression_level = 0` also means off.
    pub compression: crate::compress::Mode,
    /// Bytes per file sent ahead of the receiver's acknowledgement (`transfer.window`):
    /// what lets one file fill a long fat link, and what an interruption may send twice.
    pub window: u64,
    /// Upper bound of path MTU discovery (`transfer.max_udp_payload`); `None` for auto:
    /// jumbo-sized datagrams to a loopback receiver, 1500-byte-MTU-safe ones otherwise.
    pub max_udp_payload: Option<u16>,
    /// Files whose source mtime is within this window are live: shipped before the
    /// backlog, newest first.
    pub live_window: Duration,
    /// After SIGTERM, how long files in flight may take to finish.
    pub shutdown_grace: Duration,
    pub heartbeat_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// `transfer.max_rate`: a cap on all traffic, possibly by time of day.
    pub max_rate: RateSchedule,
    /// `[transfer.rates]`: caps per class.
    pub rates: ClassRates,
    /// `transfer.live_slots`: of `parallel_files`, how many only live files may use
    /// (backlog and replays use at most `parallel_files - live_slots`).
    pub live_slots: usize,
    /// `transfer.bulk_in_flight`: bytes of backlog and replay chunks sent and not yet
    /// acknowledged, over all their files together: what bounds the queue a live chunk
    /// can find ahead of it in the connection (docs/operations.md, "Live first").
    pub bulk_in_flight: u64,
}

/// `[transfer.rates]`: a cap per class, each a [`RateSchedule`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassRates {
    pub live: RateSchedule,
    pub backlog: RateSchedule,
    pub replay: RateSchedule,
}

impl TransferConfig {
    /// Chunks per file sent ahead of the acknowledgement: as many whole chunks as fit in
    /// the window, at least one.
    pub fn chunks_in_flight(&self) -> u32 {
        let n = self.window / u64::from(self.chunk_size.max(1));
        u32::try_from(n).unwrap_or(u32::MAX).max(1)
    }
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub root: PathBuf,
    pub filter: PathFilter,
    /// A file found by a rescan is ready once its size and mtime held still this long.
    pub settle: Duration,
    /// A file the watch saw closed after writing, or renamed into place, is ready once
    /// no further change was seen for this long (a writer that re-opens it and appends
    /// within the period yields one version, not one per close).
    pub quiet_period: Duration,
    pub rescan_interval: Duration,
    /// Rescan interval while the filesystem watch is down (it could not start, e.g. the
    /// inotify watch limit): rescans are then the only source of the root's files.
    pub fallback_rescan_interval: Duration,
}

/// Excluded when a `[[watch]]` sets no `exclude`: the temporary names writers use
/// before renaming a finished file into place, editor leftovers, and rsync's
/// `.<name>.XXXXXX` temporaries. An explicit `exclude` replaces the whole list
/// (`exclude = []` excludes nothing).
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "**/*.tmp",
    "**/*.temp",
    "**/*.part",
    "**/*.partial",
    "**/*.filepart",
    "**/*.crdownload",
    "**/*~",
    "**/.*.sw?",
    "**/.#*",
    "**/#*#",
    "**/.*.??????",
];

/// Include/exclude globs, matched against paths relative to the watch root.
#[derive(Debug, Clone)]
pub struct PathFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl PathFilter {
    /// Compiles the globs; every bad glob is reported.
    pub fn new(include: &[String], exclude: &[String]) -> Result<PathFilter, Vec<String>> {
        let mut problems = Vec::new();
        let mut build = |globs: &[String]| {
            let mut set = GlobSetBuilder::new();
            for g in globs {
                match GlobBuilder::new(g).literal_separator(true).build() {
                    Ok(glob) => {
                        set.add(glob);
                    }
                    Err(e) => problems.push(format!("bad glob {g:?}: {}", e.kind())),
                }
            }
            set.build().unwrap_or_else(|_| GlobSet::empty())
        };
        let include_set = build(include);
        let exclude_set = build(exclude);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PathFilter {
            include: (!include.is_empty()).then_some(include_set),
            exclude: exclude_set,
        })
    }

    pub fn matches(&self, rel: &Path) -> bool {
        self.include.as_ref().is_none_or(|i| i.is_match(rel)) && !self.exclude.is_match(rel)
    }
}

impl AgentConfig {
    /// Reads and validates the file's syntax and values (used by a SIGHUP reload).
    pub fn load(file: &Path) -> Result<AgentConfig, ConfigError> {
        Self::load_with(file, Depth::Syntax)
    }

    /// [`AgentConfig::load`], and also checks that the config can run (the TLS identity,
    /// the journal directory: see `check.rs`); every problem of both kinds is listed.
    /// What `check-config` and `run` use.
    pub fn load_checked(file: &Path) -> Result<AgentConfig, ConfigError> {
        Self::load_with(file, Depth::Check)
    }

    /// What `run` uses: [`AgentConfig::load_checked`], except that an identity the other end
    /// would refuse (it loads, but does not chain to the CA or lacks the name) is
    /// returned as warnings, not refused: see `check.rs`.
    pub fn load_for_run(file: &Path) -> Result<(AgentConfig, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let config = Self::load_with(file, Depth::Run(&mut warnings))?;
        Ok((config, warnings))
    }

    fn load_with(file: &Path, depth: Depth<'_>) -> Result<AgentConfig, ConfigError> {
        let root = read_table(file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        Self::from_table_with(&root, base, depth).map_err(|problems| ConfigError {
            file: file.to_owned(),
            problems,
        })
    }

    /// Validates a parsed TOML table. Relative paths are taken relative to `base` (the
    /// config file's directory).
    pub fn from_table(root: &toml::Table, base: &Path) -> Result<AgentConfig, Problems> {
        Self::from_table_with(root, base, Depth::Syntax)
    }

    fn from_table_with(
        root: &toml::Table,
        base: &Path,
        depth: Depth<'_>,
    ) -> Result<AgentConfig, Problems> {
        let p = &mut Problems::new();
        unknown_tables(
            root,
            &["agent", "receiver", "transfer", "watch", "redis", "metrics"],
            p,
        );

        let mut s = Section::of(root, "agent", p);
        let id = s.required_string("id", p);
        if let Some(Err(e)) = id.as_deref().map(validate_agent_id) {
            p.push(format!("agent.id: {e}"));
        }
        let journal = s.required_path("journal", p).map(|j| base.join(j));
        let timezone = match s.string("timezone", p) {
            None => chrono_tz::Asia::Tokyo,
            Some(tz) => tz.parse::<chrono_tz::Tz>().unwrap_or_else(|_| {
                p.push(format!(
                    "agent.timezone: {tz:?} is not an IANA timezone name (e.g. \"Asia/Tokyo\", \"UTC\")"
                ));
                chrono_tz::Asia::Tokyo
            }),
        };
        let blocklist = s.string("blocklist", p).and_then(|b| {
            let file = base.join(b);
            match Blocklist::load(&file) {
                Ok(list) => Some((file, list)),
                Err(errs) => {
                    p.extend(errs.into_iter().map(|e| format!("agent.blocklist: {e}")));
                    None
                }
            }
        });
        s.finish(p);

        let metrics_listen = super::read_metrics_listen(root, "127.0.0.1:9101", p);

        let mut s = Section::of(root, "receiver", p);
        let address = s.required_string("address", p);
        let host = address.as_deref().and_then(|a| match split_host_port(a) {
            Ok((host, _)) => Some(host.to_owned()),
            Err(e) => {
                p.push(format!("receiver.address: {e}"));
                None
            }
        });
        let server_name = s.string("server_name", p).or(host);
        let ca = existing_file(&mut s, "ca", base, p);
        let cert = existing_file(&mut s, "cert", base, p);
        let key = existing_file(&mut s, "key", base, p);
        // Optional, for check-config only: the receiver's certificate, to check that it
        // carries `server_name` and chains to `ca`.
        let server_cert = s.string("server_cert", p).map(|c| base.join(c));
        if let Some(c) = server_cert.as_ref().filter(|c| !c.is_file()) {
            p.push(format!(
                "receiver.server_cert: file {} does not exist",
                c.display()
            ));
        }
        s.finish(p);
        if let Some(refused) = depth.refused() {
            super::check::agent(
                &super::check::AgentFiles {
                    id: id.as_deref(),
                    journal: journal.as_deref(),
                    ca: ca.as_deref(),
                    cert: cert.as_deref(),
                    key: key.as_deref(),
                    server_name: server_name.as_deref(),
                    server_cert: server_cert.as_deref(),
                },
                p,
                refused,
            );
        }

        let mut s = Section::of(root, "transfer", p);
        let chunk_size = s.size("chunk_size", 4 << 20, p);
        if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size) {
            p.push(format!(
                "transfer.chunk_size = {chunk_size} bytes is out of range (64 KiB..=16 MiB)"
            ));
        } else if !chunk_size.is_power_of_two() {
            // Chunk values are subtrees of the file's BLAKE3 tree only for a power of two
            // (protocol §5); the receiver refuses any other chunk size in every offer.
            p.push(format!(
                "transfer.chunk_size = {chunk_size} bytes is not a power of two (e.g. 1 MiB, 4 MiB, 8 MiB)"
            ));
        }
        let transfer = TransferConfig {
            chunk_size: chunk_size as u32,
            parallel_files: s.integer_in("parallel_files", 8, (1, 256), p) as usize,
            connections: s.integer_in(
                "connections",
                1,
                (1, i64::from(crate::protocol::MAX_LANES)),
                p,
            ) as u16,
            compression_level: s.integer_in("compression_level", 1, (0, 19), p) as i32,
            compression: match s.string("compression", p).as_deref() {
                None | Some("auto") => crate::compress::Mode::Auto,
                Some("zstd") => crate::compress::Mode::Zstd,
                Some("off") => crate::compress::Mode::Off,
                Some(other) => {
                    p.push(format!(
                        "transfer.compression = {other:?} is not one of \"auto\", \"zstd\", \"off\""
                    ));
                    crate::compress::Mode::Auto
                }
            },
            window: s.size("window", DEFAULT_WINDOW, p),
            max_udp_payload: s.integer("max_udp_payload", p).and_then(|v| {
                let (min, max) = (crate::udp::MIN_UDP_PAYLOAD, crate::udp::MAX_UDP_PAYLOAD);
                match u16::try_from(v) {
                    Ok(v) if (min..=max).contains(&v) => Some(v),
                    _ => {
                        p.push(format!(
                            "transfer.max_udp_payload = {v} is out of range ({min}..={max} bytes; \
                             leave it out for auto: {} on a 1500-byte-MTU path, {max} to a loopback receiver)",
                            crate::udp::WAN_UDP_PAYLOAD
                        ));
                        None
                    }
                }
            }),
            live_window: s.duration("live_window", Duration::from_secs(12 * 3600), p),
            shutdown_grace: s.duration("shutdown_grace", Duration::from_secs(20), p),
            heartbeat_interval: s.duration("heartbeat_interval", Duration::from_secs(5), p),
            reconnect_min: s.duration("reconnect_min", Duration::from_millis(500), p),
            reconnect_max: s.duration("reconnect_max", Duration::from_secs(30), p),
            max_rate: schedule(&mut s, "max_rate", p),
            rates: ClassRates::default(),
            live_slots: 0,
            bulk_in_flight: s.size("bulk_in_flight", DEFAULT_BULK_IN_FLIGHT, p),
        };
        let mut transfer = transfer;
        transfer.live_slots = s.integer_in(
            "live_slots",
            (transfer.parallel_files / 4).max(1) as i64,
            (0, 255),
            p,
        ) as usize;
        if transfer.live_slots >= transfer.parallel_files && transfer.parallel_files > 1 {
            p.push(format!(
                "transfer.live_slots = {} leaves backlog and replays no slot of transfer.parallel_files = {}",
                transfer.live_slots, transfer.parallel_files
            ));
        }
        transfer.live_slots = transfer
            .live_slots
            .min(transfer.parallel_files.saturating_sub(1));
        if transfer.bulk_in_flight < chunk_size {
            p.push(format!(
                "transfer.bulk_in_flight = {} bytes is less than transfer.chunk_size = {chunk_size}",
                transfer.bulk_in_flight
            ));
        }
        s.known("rates");
        match root.get("transfer").and_then(|t| t.get("rates")) {
            None => {}
            Some(toml::Value::Table(t)) => {
                let mut r = Section::from_table("transfer.rates".into(), t);
                transfer.rates = ClassRates {
                    live: schedule(&mut r, "live", p),
                    backlog: schedule(&mut r, "backlog", p),
                    replay: schedule(&mut r, "replay", p),
                };
                r.finish(p);
            }
            Some(_) => p.push("[transfer.rates] must be a table".into()),
        }
        if s.integer("chunks_in_flight", p).is_some() {
            p.push(
                "transfer.chunks_in_flight was replaced by transfer.window, in bytes \
                 (default \"24 MiB\"): remove it"
                    .into(),
            );
        }
        if !(u64::from(chunk_size.min(u64::from(MAX_CHUNK_SIZE)) as u32)..=MAX_WINDOW)
            .contains(&transfer.window)
        {
            p.push(format!(
                "transfer.window = {} bytes is out of range (at least transfer.chunk_size, at most 1 GiB)",
                transfer.window
            ));
        }
        if usize::from(transfer.connections) > transfer.parallel_files {
            p.push(format!(
                "transfer.connections = {} is more than transfer.parallel_files = {}: a file \
                 stays on one connection, so the extra connections would carry nothing",
                transfer.connections, transfer.parallel_files
            ));
        }
        if transfer.heartbeat_interval < Duration::from_millis(100) {
            p.push("transfer.heartbeat_interval must be at least 100ms".into());
        }
        if transfer.reconnect_min > transfer.reconnect_max {
            p.push("transfer.reconnect_min must not exceed transfer.reconnect_max".into());
        }
        s.finish(p);

        let watches = watches(root, base, p);
        let redis = redis_sources(root, base, id.as_deref().unwrap_or("skyferry-agent"), p);

        match (id, journal, address, server_name, ca, cert, key) {
            (
                Some(id),
                Some(journal),
                Some(address),
                Some(server_name),
                Some(ca),
                Some(cert),
                Some(key),
            ) if p.is_empty() => Ok(AgentConfig {
                id,
                journal,
                receiver: Endpoint {
                    address,
                    server_name,
                    ca,
                    cert,
                    key,
                    server_cert,
                },
                transfer,
                watches,
                redis,
                blocklist,
                metrics_listen,
                timezone,
            }),
            _ => Err(std::mem::take(p)),
        }
    }
}

/// Default `transfer.bulk_in_flight`: 32 MiB, 27 ms of queue at 10 Gbit/s, enough for
/// a backfill to keep a long fat link busy.
pub const DEFAULT_BULK_IN_FLIGHT: u64 = 32 << 20;

/// A rate schedule key (absent: no cap).
fn schedule(s: &mut Section<'_>, key: &'static str, p: &mut Problems) -> RateSchedule {
    match s.string(key, p) {
        None => RateSchedule::off(),
        Some(text) => RateSchedule::parse(&text).unwrap_or_else(|e| {
            p.push(format!("{}: {e}", s.key(key)));
            RateSchedule::off()
        }),
    }
}

fn watches(root: &toml::Table, base: &Path, p: &mut Problems) -> Vec<WatchConfig> {
    let tables = table_array(root, "watch", p);
    if tables.is_empty() {
        p.push("at least one [[watch]] table with a root is required".into());
    }
    let mut out = Vec::new();
    for (i, t) in tables.into_iter().enumerate() {
        let mut s = Section::from_table(format!("watch[{i}]"), t);
        // Absolute and canonical: the watch reports absolute paths, and the journal keys
        // files by root, which must not change with the working directory.
        let root = s.required_path("root", p).and_then(|r| {
            let r = base.join(r);
            match r.canonicalize() {
                Ok(c) if c.is_dir() => Some(c),
                _ => {
                    p.push(format!(
                        "{}: {} is not a directory",
                        s.key("root"),
                        r.display()
                    ));
                    None
                }
            }
        });
        let include = s.strings("include", p);
        let exclude = if t.contains_key("exclude") {
            s.strings("exclude", p)
        } else {
            DEFAULT_EXCLUDES.iter().map(|g| (*g).to_owned()).collect()
        };
        let filter = PathFilter::new(&include, &exclude).map_err(|errs| {
            p.extend(
                errs.into_iter()
                    .map(|e| format!("{}: {e}", s.key("include/exclude"))),
            );
        });
        let settle = s.duration("settle", Duration::from_secs(2), p);
        let quiet_period = s.duration("quiet_period", Duration::from_secs(1), p);
        let rescan_interval = s.duration("rescan_interval", Duration::from_secs(300), p);
        let fallback_rescan_interval =
            s.duration("fallback_rescan_interval", Duration::from_secs(30), p);
        for (key, d) in [
            ("rescan_interval", rescan_interval),
            ("fallback_rescan_interval", fallback_rescan_interval),
        ] {
            if d < Duration::from_millis(100) {
                p.push(format!(
                    "{} = {d:?} is too short: use at least 100ms",
                    s.key(key)
                ));
            }
        }
        s.finish(p);
        if let (Some(root), Ok(filter)) = (root, filter) {
            out.push(WatchConfig {
                root,
                filter,
                settle,
                quiet_period,
                rescan_interval,
                fallback_rescan_interval,
            });
        }
    }
    out
}

/// The `[[...]]` array of tables `key`, each table with its index.
fn table_array<'a>(root: &'a toml::Table, key: &str, p: &mut Problems) -> Vec<&'a toml::Table> {
    match root.get(key) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .filter_map(|v| {
                let t = v.as_table();
                if t.is_none() {
                    p.push(format!("[[{key}]] entries must be tables"));
                }
                t
            })
            .collect(),
        Some(_) => {
            p.push(format!("{key} must be an array of tables: write [[{key}]]"));
            Vec::new()
        }
    }
}

fn redis_sources(
    root: &toml::Table,
    base: &Path,
    agent_id: &str,
    p: &mut Problems,
) -> Vec<RedisConfig> {
    let mut out = Vec::new();
    for (i, t) in table_array(root, "redis", p).into_iter().enumerate() {
        let name = format!("redis[{i}]");
        let mut s = Section::from_table(name.clone(), t);
        let url = s.required_string("url", p);
        if let Some(u) = &url {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                p.push(format!(
                    "{}: {:?} is not a redis:// or rediss:// URL, e.g. \"redis://:password@host:6379/0\"",
                    s.key("url"),
                    redact_url(u)
                ));
            }
        }
        let ca = s.string("ca", p).map(|c| base.join(c));
        if let Some(ca) = &ca {
            if !ca.is_file() {
                p.push(format!(
                    "{}: file {} does not exist",
                    s.key("ca"),
                    ca.display()
                ));
            }
            if url.as_deref().is_some_and(|u| !u.starts_with("rediss://")) {
                p.push(format!(
                    "{}: a CA only applies to TLS: use a rediss:// URL",
                    s.key("ca")
                ));
            }
        }
        let channel = s.string("channel", p);
        let pattern = s.string("pattern", p);
        let stream = s.string("stream", p);
        let group = s.string("group", p);
        let consumer = s.string("consumer", p);
        let claim_idle = s.duration("claim_idle", Duration::from_secs(60), p);
        let mode = match (channel, pattern, stream) {
            (Some(c), None, None) => Some(RedisMode::PubSub {
                channel: c,
                pattern: false,
            }),
            (None, Some(c), None) => Some(RedisMode::PubSub {
                channel: c,
                pattern: true,
            }),
            (None, None, Some(stream)) => Some(RedisMode::Stream {
                stream,
                group: group.clone().unwrap_or_else(|| "skyferry".into()),
                consumer: consumer.clone().unwrap_or_else(|| agent_id.to_owned()),
                claim_idle,
            }),
            _ => {
                p.push(format!(
                    "{name}: set exactly one of channel, pattern (pub/sub) or stream (Redis Streams)"
                ));
                None
            }
        };
        if matches!(mode, Some(RedisMode::PubSub { .. })) && (group.is_some() || consumer.is_some())
        {
            p.push(format!(
                "{name}: group and consumer apply to streams only (set stream = \"...\")"
            ));
        }
        let field = s.string("path_field", p).unwrap_or_else(|| "path".into());
        let format = match s.string("format", p).as_deref() {
            None | Some("path") => MessageFormat::Path { field },
            Some("json") => MessageFormat::Json { field },
            Some(other) => {
                p.push(format!(
                    "{}: {other:?} is not a message format (use \"path\" or \"json\")",
                    s.key("format")
                ));
                MessageFormat::Path { field }
            }
        };
        if matches!(mode, Some(RedisMode::Stream { .. }))
            && matches!(format, MessageFormat::Json { .. })
        {
            p.push(format!(
                "{}: stream entries are key/value already: drop format = \"json\" and set path_field to the entry field that holds the path",
                s.key("format")
            ));
        }
        let reconnect_min = s.duration("reconnect_min", Duration::from_millis(500), p);
        let reconnect_max = s.duration("reconnect_max", Duration::from_secs(30), p);
        if reconnect_min > reconnect_max || reconnect_min.is_zero() {
            p.push(format!(
                "{name}: reconnect_min must be positive and not exceed reconnect_max"
            ));
        }
        s.finish(p);
        if let (Some(url), Some(mode)) = (url, mode) {
            out.push(RedisConfig {
                name,
                url,
                ca,
                mode,
                format,
                reconnect_min,
                reconnect_max,
            });
        }
    }
    out
}

fn existing_file(
    s: &mut Section<'_>,
    key: &'static str,
    base: &Path,
    p: &mut Problems,
) -> Option<PathBuf> {
    let path = base.join(s.required_path(key, p)?);
    if !path.is_file() {
        p.push(format!(
            "{}: file {} does not exist",
            s.key(key),
            path.display()
        ));
    }
    Some(path)
}

pub(crate) fn existing_file_in(
    s: &mut Section<'_>,
    key: &'static str,
    base: &Path,
    p: &mut Problems,
) -> Option<PathBuf> {
    existing_file(s, key, base, p)
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals).
pub fn split_host_port(addr: &str) -> Result<(&str, u16), String> {
    let bad = || format!("{addr:?} is not a host:port address, e.g. \"archive.example.org:7443\"");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The problems listed for a config whose only variable is `transfer.chunk_size`.
    fn chunk_size_problems(chunk_size: &str) -> Vec<String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "[agent]\nid = \"kiso-01\"\njournal = \"j.sqlite\"\n\
             [receiver]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\
             [transfer]\nchunk_size = {chunk_size:?}\n"
        );
        let table: toml::Table = text.parse().expect("toml");
        match AgentConfig::from_table(&table, dir.path()) {
            Ok(_) => Vec::new(),
            Err(problems) => problems
                .into_iter()
                .filter(|p| p.contains("chunk_size"))
                .collect(),
        }
    }

    #[test]
    fn chunk_size_must_be_a_power_of_two() {
        for ok in ["64 KiB", "1 MiB", "4 MiB", "16 MiB"] {
            assert_eq!(chunk_size_problems(ok), Vec::<String>::new(), "{ok}");
        }
        let problems = chunk_size_problems("5 MiB");
        assert_eq!(
            problems,
            ["transfer.chunk_size = 5242880 bytes is not a power of two (e.g. 1 MiB, 4 MiB, 8 MiB)"]
        );
        assert!(chunk_size_problems("32 MiB")[0].contains("out of range"));
    }

    /// The config of `[transfer]` lines `transfer`, or its problems.
    fn with_transfer(transfer: &str) -> Result<AgentConfig, Vec<String>> {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["ca.pem", "a.pem", "a.key"] {
            std::fs::write(dir.path().join(f), "x").expect("file");
        }
        std::fs::create_dir(dir.path().join("src")).expect("watch root");
        let text = format!(
            "[agent]\nid = \"kiso-01\"\njournal = \"j.sqlite\"\n\
             [receiver]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\
             [transfer]\n{transfer}\n[[watch]]\nroot = \"src\"\n"
        );
        let table: toml::Table = text.parse().expect("toml");
        AgentConfig::from_table(&table, dir.path()).map_err(|p| p.into_iter().collect())
    }

    #[test]
    fn connections_default_to_one_and_stay_within_lanes_and_parallel_files() {
        let c = with_transfer("").expect("defaults");
        assert_eq!(c.transfer.connections, 1);
        let c = with_transfer("connections = 4").expect("4 of 8 files");
        assert_eq!(c.transfer.connections, 4);
        for (bad, says) in [
            (
                "connections = 0",
                "transfer.connections = 0 is out of range (1..=16)",
            ),
            (
                "connections = 17",
                "transfer.connections = 17 is out of range (1..=16)",
            ),
            (
                "connections = 4\nparallel_files = 3",
                "transfer.connections = 4 is more than transfer.parallel_files = 3",
            ),
        ] {
            let problems = with_transfer(bad).err().unwrap_or_default();
            assert!(
                problems.iter().any(|p| p.starts_with(says)),
                "{bad}: {problems:?}"
            );
        }
    }
}
