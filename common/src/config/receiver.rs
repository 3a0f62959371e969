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
        unknown_tables(root, &["receiver", "limits"], p);

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
        if partial_max_age < Duration::from_secs(1) {
            p.push(format!(
                "limits.partial_max_age: {partial_max_age:?} is too short (at least \"1s\"; the default is \"7d\")"
            ));
        }
        s.finish(p);

        match (listen, storage_root, ca, cert, key) {
            (Some(listen), Some(storage_root), Some(ca), Some(cert), Some(key)) if p.is_empty() => {
                Ok(ReceiverConfig {
                    id,
                    listen,
                    storage_root,
                    ca,
                    cert,
                    key,
                    max_file_size,
                    max_concurrent_files,
                    heartbeat_interval,
                    partial_max_age,
                    shutdown_grace,
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
}
