//! The pair's two config files, rendered from [`PairOptions`] in the syntax of
//! `systemd/agent.toml.example` and `systemd/receiver.toml.example`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::Pair;

/// DNS name in the receiver's certificate (the `certs init` default).
const RECEIVER_NAME: &str = "skyferry-receiver";

/// Settings rendered into both configs. Sizes and durations use the configs' own syntax
/// ("64 KiB", "200ms").
#[derive(Clone, Debug)]
pub struct PairOptions {
    pub agent_id: String,
    pub chunk_size: String,
    /// `[transfer] window`: bytes per file in flight before an acknowledgement.
    pub window: String,
    pub parallel_files: u32,
    /// `[transfer] connections`: lanes the agent stripes files over.
    pub connections: u32,
    /// Receiver `limits.max_connections_per_agent`; the receiver's default when `None`.
    pub max_connections_per_agent: Option<u32>,
    pub compression_level: u32,
    pub settle: String,
    /// `[[watch]] quiet_period`; the agent's default when `None`.
    pub quiet_period: Option<String>,
    pub rescan_interval: String,
    pub heartbeat_interval: String,
    pub reconnect_min: String,
    pub reconnect_max: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub max_file_size: String,
    pub max_concurrent_files: u32,
    /// Receiver: age after which partial files of an agent that never came back are
    /// removed (`limits.partial_max_age`); the receiver's default when `None`.
    pub partial_max_age: Option<String>,
    /// Route the agent through a fault-injecting UDP relay ([`crate::relay::Relay`],
    /// reached with [`Pair::relay`]) instead of straight to the receiver.
    pub via_relay: bool,
    /// Seed of the relay's loss and duplication draws.
    pub relay_seed: u64,
    /// A command the agent is started through, which must `exec` it (e.g. `setpriv` to
    /// drop capabilities, `unshare` for its own inotify limits); empty for none.
    pub agent_wrapper: Vec<String>,
}

impl Default for PairOptions {
    /// Small chunks and short timers, so that tests exercise many chunks and run quickly.
    fn default() -> PairOptions {
        PairOptions {
            agent_id: "kiso-01".into(),
            chunk_size: "64 KiB".into(),
            window: "24 MiB".into(),
            parallel_files: 4,
            connections: 1,
            max_connections_per_agent: None,
            compression_level: 1,
            settle: "200ms".into(),
            quiet_period: Some("200ms".into()),
            rescan_interval: "10s".into(),
            heartbeat_interval: "5s".into(),
            reconnect_min: "100ms".into(),
            reconnect_max: "2s".into(),
            include: vec!["**/*.fits".into()],
            exclude: vec!["**/*.tmp".into(), "**/.*".into()],
            max_file_size: "1 TiB".into(),
            max_concurrent_files: 64,
            partial_max_age: None,
            via_relay: false,
            relay_seed: 1,
            agent_wrapper: Vec::new(),
        }
    }
}

impl Pair {
    /// The agent config as rendered from the options.
    pub fn agent_config(&self) -> String {
        let o = &self.opts;
        let mut text = format!(
            "[agent]\nid = {}\njournal = {}\n\n\
             [receiver]\naddress = {}\nserver_name = {}\nca = {}\ncert = {}\nkey = {}\n\n\
             [transfer]\nchunk_size = {}\nwindow = {}\nparallel_files = {}\nconnections = {}\ncompression_level = {}\n\
             heartbeat_interval = {}\nreconnect_min = {}\nreconnect_max = {}\n\n\
             [[watch]]\nroot = {}\ninclude = {}\nexclude = {}\nsettle = {}\nrescan_interval = {}\n",
            quote(&o.agent_id),
            quote_path(&self.journal()),
            quote(&self.agent_target().to_string()),
            quote(RECEIVER_NAME),
            quote_path(&self.certs_dir().join("ca.pem")),
            quote_path(&self.agent_identity.cert),
            quote_path(&self.agent_identity.key),
            quote(&o.chunk_size),
            quote(&o.window),
            o.parallel_files,
            o.connections,
            o.compression_level,
            quote(&o.heartbeat_interval),
            quote(&o.reconnect_min),
            quote(&o.reconnect_max),
            quote_path(&self.source()),
            quote_list(&o.include),
            quote_list(&o.exclude),
            quote(&o.settle),
            quote(&o.rescan_interval),
        );
        if let Some(q) = &o.quiet_period {
            text.push_str(&format!("quiet_period = {}\n", quote(q)));
        }
        text
    }

    /// The receiver config as rendered from the options.
    pub fn receiver_config(&self) -> String {
        let o = &self.opts;
        let certs = self.certs_dir();
        let mut text = format!(
            "[receiver]\nid = \"mdx-test\"\nlisten = {}\nstorage_root = {}\n\
             ca = {}\ncert = {}\nkey = {}\n\n\
             [limits]\nmax_file_size = {}\nmax_concurrent_files = {}\nheartbeat_interval = {}\n",
            quote(&format!("127.0.0.1:{}", self.port)),
            quote_path(&self.storage()),
            quote_path(&certs.join("ca.pem")),
            quote_path(&certs.join("receiver.pem")),
            quote_path(&certs.join("receiver.key")),
            quote(&o.max_file_size),
            o.max_concurrent_files,
            quote(&o.heartbeat_interval),
        );
        if let Some(age) = &o.partial_max_age {
            text.push_str(&format!("partial_max_age = {}\n", quote(age)));
        }
        if let Some(n) = o.max_connections_per_agent {
            text.push_str(&format!("max_connections_per_agent = {n}\n"));
        }
        text
    }

    /// Writes the rendered agent config after `tweak` edited its text. Takes effect at the
    /// next agent start.
    pub fn write_agent_config(&self, tweak: impl FnOnce(&mut String)) -> Result<()> {
        let mut text = self.agent_config();
        tweak(&mut text);
        write_file(&self.agent_config_path(), &text)
    }

    /// Writes the rendered receiver config after `tweak` edited its text.
    pub fn write_receiver_config(&self, tweak: impl FnOnce(&mut String)) -> Result<()> {
        let mut text = self.receiver_config();
        tweak(&mut text);
        write_file(&self.receiver_config_path(), &text)
    }

    /// Changes the options and rewrites both configs (untweaked).
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut PairOptions)) -> Result<()> {
        change(&mut self.opts);
        self.write_receiver_config(|_| {})?;
        self.write_agent_config(|_| {})
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML basic string (JSON string escapes are valid TOML).
fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

fn quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}
