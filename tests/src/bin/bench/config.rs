//! The configuration skyferry runs with in the benchmark: the `[transfer]` table of
//! `systemd/agent.toml.example` and the `[limits]` table of
//! `systemd/receiver.toml.example`, exactly as shipped, unless a flag overrides a key
//! (`--compression`, `--connections`, `--transfer KEY=VALUE`). The harness's pair renders
//! everything else (paths, certificates, the watch); the bench swaps these two tables in.
//! The agent also gets a `[metrics]` endpoint, which the bench reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use skyferry_tests::redis::free_tcp_port;
use skyferry_tests::Pair;

/// The shipped example configs, next to the workspace's `tests/` crate.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name)
}

/// The skyferry settings of one bench run.
#[derive(Clone, Debug)]
pub struct Skyferry {
    /// The agent's `[transfer]` table, overrides applied.
    pub transfer: toml::Table,
    /// The receiver's `[limits]` table.
    pub limits: toml::Table,
    /// `[[watch]] quiet_period`, `settle` and `rescan_interval` of the agent example (the
    /// latency mode uses them; the throughput modes start the agent after the files are
    /// written, so only `settle` could matter there, and the harness's short one is kept).
    pub quiet_period: String,
    pub settle: String,
    pub rescan_interval: String,
    /// Keys set by a flag, for the report.
    pub overridden: Vec<String>,
}

impl Skyferry {
    /// Reads both examples.
    pub fn from_examples() -> Result<Skyferry> {
        let agent = read_toml(&example("agent.toml.example"))?;
        let receiver = read_toml(&example("receiver.toml.example"))?;
        let table = |doc: &toml::Table, key: &str, file: &str| -> Result<toml::Table> {
            doc.get(key)
                .and_then(toml::Value::as_table)
                .cloned()
                .with_context(|| format!("{file} has no [{key}] table"))
        };
        let watch = agent
            .get("watch")
            .and_then(toml::Value::as_array)
            .and_then(|a| a.first())
            .and_then(toml::Value::as_table)
            .context("agent.toml.example has no [[watch]] table")?;
        let text = |key: &str| -> Result<String> {
            watch
                .get(key)
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
                .with_context(|| format!("agent.toml.example [[watch]] has no {key}"))
        };
        Ok(Skyferry {
            transfer: table(&agent, "transfer", "agent.toml.example")?,
            limits: table(&receiver, "limits", "receiver.toml.example")?,
            quiet_period: text("quiet_period")?,
            settle: text("settle")?,
            rescan_interval: text("rescan_interval")?,
            overridden: Vec::new(),
        })
    }

    /// Sets `[transfer] key = value` (an integer if it parses as one, else a string).
    pub fn set(&mut self, key: &str, value: &str) {
        let value = match value.parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => toml::Value::String(value.to_owned()),
        };
        self.overridden.push(format!("{key} = {value}"));
        self.transfer.insert(key.to_owned(), value);
    }

    /// A `[transfer]` value as text, for the report ("4 MiB", "8").
    pub fn value(&self, key: &str) -> String {
        match self.transfer.get(key) {
            Some(toml::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "-".into(),
        }
    }

    /// `[transfer] chunk_size` in bytes (the agent's default, 4 MiB, when not set).
    pub fn chunk_size(&self) -> Result<usize> {
        match self.transfer.get("chunk_size") {
            None => Ok(4 << 20),
            Some(toml::Value::Integer(n)) => Ok(*n as usize),
            Some(toml::Value::String(s)) => skyferry_common::config::parse_size(s)
                .map(|n| n as usize)
                .map_err(|e| anyhow::anyhow!("chunk_size {s:?}: {e}")),
            Some(v) => bail!("chunk_size {v} is not a size"),
        }
    }

    /// `[transfer] compression_level` (the agent's default, 1, when not set).
    pub fn compression_level(&self) -> Result<i32> {
        match self.transfer.get("compression_level") {
            None => Ok(1),
            Some(toml::Value::Integer(n)) => Ok(*n as i32),
            Some(v) => bail!("compression_level {v} is not a number"),
        }
    }

    /// One line for the report: the settings that shape throughput.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "chunk_size {}, parallel_files {}, window {}, compression {} (level {})",
            self.value("chunk_size"),
            self.value("parallel_files"),
            self.value("window"),
            self.value("compression"),
            self.value("compression_level"),
        );
        if self.transfer.contains_key("connections") {
            line.push_str(&format!(", connections {}", self.value("connections")));
        }
        if self.overridden.is_empty() {
            line.push_str(" (systemd/agent.toml.example as shipped)");
        } else {
            line.push_str(&format!(
                " (agent.toml.example; set by flags: {})",
                self.overridden.join(", ")
            ));
        }
        line
    }

    /// Writes both configs of `pair` with these tables, the agent's `[metrics]` on a free
    /// port and `extra` appended to the agent's config (e.g. a `[[redis]]` table).
    /// Returns the metrics address (`host:port`).
    pub fn apply(&self, pair: &Pair, extra: &str) -> Result<String> {
        let metrics = format!("127.0.0.1:{}", free_tcp_port()?);
        let transfer = section("transfer", &self.transfer)?;
        let mut failure = None;
        pair.write_agent_config(|text| {
            match replace_section(text, "transfer", &transfer) {
                Ok(t) => *text = t,
                Err(e) => failure = Some(e),
            }
            text.push_str(&format!("\n[metrics]\nlisten = \"{metrics}\"\n\n{extra}"));
        })?;
        let limits = section("limits", &self.limits)?;
        pair.write_receiver_config(|text| match replace_section(text, "limits", &limits) {
            Ok(t) => *text = t,
            Err(e) => failure = Some(e),
        })?;
        match failure {
            Some(e) => Err(e),
            None => Ok(metrics),
        }
    }

    /// Whether the agent accepts `[transfer] key` (by `check-config` on `pair`'s config
    /// with it): `Err` with check-config's words if not.
    pub fn accepted(&self, pair: &Pair, key: &str) -> Result<std::result::Result<(), String>> {
        self.apply(pair, "")?;
        let out = Command::new(pair.agent_bin())
            .args(["check-config", "--config"])
            .arg(pair.agent_config_path())
            .output()
            .context("cannot run skyferry-agent check-config")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok(Ok(()));
        }
        let about_key = text
            .lines()
            .filter(|l| l.contains(&format!("transfer.{key}")) || l.contains(key))
            .collect::<Vec<_>>()
            .join("; ");
        if about_key.is_empty() {
            bail!("the bench's agent config fails check-config: {text}");
        }
        Ok(Err(about_key))
    }
}

/// A humantime duration from a config ("1s", "200ms").
pub fn duration(text: &str) -> Result<Duration> {
    humantime::parse_duration(text).with_context(|| format!("bad duration {text:?}"))
}

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.parse::<toml::Table>()
        .with_context(|| format!("{} is not valid TOML", path.display()))
}

/// `[name]` and its keys, as TOML text.
fn section(name: &str, table: &toml::Table) -> Result<String> {
    let body = toml::to_string(table).with_context(|| format!("cannot render [{name}]"))?;
    Ok(format!("[{name}]\n{body}"))
}

/// `text` with its `[name]` table (up to the next table header or the end) replaced.
fn replace_section(text: &str, name: &str, with: &str) -> Result<String> {
    let header = format!("[{name}]\n");
    let start = text
        .find(&header)
        .with_context(|| format!("the pair's config has no [{name}] table:\n{text}"))?;
    let rest = &text[start + header.len()..];
    let end = rest
        .find("\n[")
        .map_or(text.len(), |i| start + header.len() + i + 1);
    Ok(format!("{}{with}\n{}", &text[..start], &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_up_to_the_next_table() {
        let text = "[a]\nx = 1\n\n[transfer]\nchunk_size = \"64 KiB\"\n\n[[watch]]\nroot = \"/\"\n";
        let out = replace_section(text, "transfer", "[transfer]\nchunk_size = \"4 MiB\"\n")
            .expect("replaced");
        assert_eq!(
            out,
            "[a]\nx = 1\n\n[transfer]\nchunk_size = \"4 MiB\"\n\n[[watch]]\nroot = \"/\"\n"
        );
        let last = replace_section("[limits]\na = 1\n", "limits", "[limits]\nb = 2\n")
            .expect("last table");
        assert_eq!(last, "[limits]\nb = 2\n\n");
    }

    #[test]
    fn the_examples_parse_and_durations_read() {
        let s = Skyferry::from_examples().expect("examples");
        assert!(s.transfer.contains_key("chunk_size"));
        assert!(s.limits.contains_key("max_file_size"));
        assert_eq!(duration("1s").expect("1s"), Duration::from_secs(1));
        assert_eq!(duration("200ms").expect("ms"), Duration::from_millis(200));
    }
}
