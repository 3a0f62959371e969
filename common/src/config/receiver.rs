//! The receiver's configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::existing_file_in;
use super::reader::{unknown_tables, Problems, Section};
use super::{read_table, ConfigError};

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
}

impl ReceiverConfig {
    pub fn load(file: &Path) -> Result<ReceiverConfig, ConfigError> {
        let root = read_table(file)?;
        Self::from_table(&root, file.parent().unwrap_or(Path::new("."))).map_err(|problems| {
            ConfigError {
                file: file.to_owned(),
                problems,
            }
        })
    }

    pub fn from_table(root: &toml::Table, base: &Path) -> Result<ReceiverConfig, Problems> {
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

        let mut s = Section::of(root, "limits", p);
        let max_file_size = s.size("max_file_size", 1 << 40, p);
        let max_concurrent_files = s.integer_in("max_concurrent_files", 64, (1, 4096), p) as usize;
        let heartbeat_interval = s.duration("heartbeat_interval", Duration::from_secs(5), p);
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
}
