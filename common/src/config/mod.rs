//! Configuration: TOML files read into validated, typed configs.
//!
//! Validation reports every problem in one go (unknown keys, missing keys, values of the
//! wrong type or out of range, unparsable addresses, missing files) so that an operator
//! fixes a config in one edit, not one error per restart. The reader walks the TOML table
//! itself rather than going through serde, because serde stops at the first error.

mod agent;
mod catalog;
mod check;
mod rate;
mod reader;
mod receiver;

pub use agent::{
    AgentConfig, Blocklist, ClassRates, Endpoint, MessageFormat, PathFilter, RedisConfig,
    RedisMode, TransferConfig, WatchConfig, DEFAULT_EXCLUDES,
};
pub use catalog::{CatalogConfig, HeaderKeys};
pub use rate::{parse_rate, RateSchedule};
pub use reader::{parse_duration, parse_size};
pub use receiver::{HealthConfig, PeerLimits, ReceiverConfig, MIN_BYTES_IN_FLIGHT_PER_AGENT};

use std::path::{Path, PathBuf};

/// A config that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "config {}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// How far loading a config goes beyond its syntax (see `check.rs`).
enum Depth<'a> {
    Syntax,
    /// For `run`: identity findings the other end would refuse go to the warnings.
    Run(&'a mut Vec<String>),
    /// For `check-config`: everything is a problem.
    Check,
}

impl<'a> Depth<'a> {
    fn refused(self) -> Option<check::Refused<'a>> {
        match self {
            Depth::Syntax => None,
            Depth::Run(w) => Some(check::Refused::Warnings(w)),
            Depth::Check => Some(check::Refused::Problems),
        }
    }
}

fn read_table(file: &Path) -> Result<toml::Table, ConfigError> {
    let fail = |p: String| ConfigError {
        file: file.to_owned(),
        problems: vec![p],
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot read: {e}")))?;
    text.parse::<toml::Table>()
        .map_err(|e| fail(format!("not valid TOML: {}", e.to_string().trim_end())))
}

/// Agent ids become directory names on the receiver and DNS names in certificates:
/// one DNS label, lowercase.
pub fn validate_agent_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent id {id:?} is not valid: use 1-63 lowercase letters, digits and '-' (a DNS label), e.g. \"kiso-01\""
        ))
    }
}

/// `[metrics] listen` (both daemons): where to serve `GET /metrics`, if anywhere.
/// `example` is the address the error message suggests.
pub(crate) fn read_metrics_listen(
    root: &toml::Table,
    example: &str,
    p: &mut reader::Problems,
) -> Option<std::net::SocketAddr> {
    let mut s = reader::Section::of(root, "metrics", p);
    let listen = s.string("listen", p).and_then(|l| match l.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(format!(
                "metrics.listen: {l:?} is not an ip:port address, e.g. \"{example}\""
            ));
            None
        }
    });
    s.finish(p);
    listen
}
