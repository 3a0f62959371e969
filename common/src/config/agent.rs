//! The agent's configuration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::reader::{unknown_tables, Problems, Section};
use super::{read_table, validate_agent_id, ConfigError};
use crate::protocol::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub id: String,
    pub journal: PathBuf,
    pub receiver: Endpoint,
    pub transfer: TransferConfig,
    pub watches: Vec<WatchConfig>,
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
}

#[derive(Debug, Clone)]
pub struct TransferConfig {
    pub chunk_size: u32,
    pub parallel_files: usize,
    pub compression_level: i32,
    pub heartbeat_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub root: PathBuf,
    pub filter: PathFilter,
    pub settle: Duration,
    pub rescan_interval: Duration,
}

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
    pub fn load(file: &Path) -> Result<AgentConfig, ConfigError> {
        let root = read_table(file)?;
        Self::from_table(&root, file.parent().unwrap_or(Path::new("."))).map_err(|problems| {
            ConfigError {
                file: file.to_owned(),
                problems,
            }
        })
    }

    /// Validates a parsed TOML table. Relative paths are taken relative to `base` (the
    /// config file's directory).
    pub fn from_table(root: &toml::Table, base: &Path) -> Result<AgentConfig, Problems> {
        let p = &mut Problems::new();
        unknown_tables(root, &["agent", "receiver", "transfer", "watch"], p);

        let mut s = Section::of(root, "agent", p);
        let id = s.required_string("id", p);
        if let Some(Err(e)) = id.as_deref().map(validate_agent_id) {
            p.push(format!("agent.id: {e}"));
        }
        let journal = s.required_path("journal", p).map(|j| base.join(j));
        s.finish(p);

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
        s.finish(p);

        let mut s = Section::of(root, "transfer", p);
        let chunk_size = s.size("chunk_size", 4 << 20, p);
        if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size) {
            p.push(format!(
                "transfer.chunk_size = {chunk_size} bytes is out of range (64 KiB..=16 MiB)"
            ));
        }
        let transfer = TransferConfig {
            chunk_size: chunk_size as u32,
            parallel_files: s.integer_in("parallel_files", 8, (1, 256), p) as usize,
            compression_level: s.integer_in("compression_level", 1, (0, 19), p) as i32,
            heartbeat_interval: s.duration("heartbeat_interval", Duration::from_secs(5), p),
            reconnect_min: s.duration("reconnect_min", Duration::from_millis(500), p),
            reconnect_max: s.duration("reconnect_max", Duration::from_secs(30), p),
        };
        if transfer.heartbeat_interval < Duration::from_millis(100) {
            p.push("transfer.heartbeat_interval must be at least 100ms".into());
        }
        if transfer.reconnect_min > transfer.reconnect_max {
            p.push("transfer.reconnect_min must not exceed transfer.reconnect_max".into());
        }
        s.finish(p);

        let watches = watches(root, base, p);

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
                },
                transfer,
                watches,
            }),
            _ => Err(std::mem::take(p)),
        }
    }
}

fn watches(root: &toml::Table, base: &Path, p: &mut Problems) -> Vec<WatchConfig> {
    let tables: Vec<&toml::Table> = match root.get("watch") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .filter_map(|v| {
                let t = v.as_table();
                if t.is_none() {
                    p.push("[[watch]] entries must be tables".into());
                }
                t
            })
            .collect(),
        Some(_) => {
            p.push("watch must be an array of tables: write [[watch]]".into());
            Vec::new()
        }
    };
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
        let exclude = s.strings("exclude", p);
        let filter = PathFilter::new(&include, &exclude).map_err(|errs| {
            p.extend(
                errs.into_iter()
                    .map(|e| format!("{}: {e}", s.key("include/exclude"))),
            );
        });
        let settle = s.duration("settle", Duration::from_secs(2), p);
        let rescan_interval = s.duration("rescan_interval", Duration::from_secs(300), p);
        s.finish(p);
        if let (Some(root), Ok(filter)) = (root, filter) {
            out.push(WatchConfig {
                root,
                filter,
                settle,
                rescan_interval,
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
