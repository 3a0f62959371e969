//! The checks that a config can run, beyond its syntax: the TLS files are PEM, key and
//! certificate match, the certificate chains to the CA and carries the configured name,
//! and the directories the daemon writes to exist and are writable. `check-config` does
//! them all (`load_checked`); `run` too (`load_for_run`), but an identity that loads and
//! that the other end would refuse (wrong CA, wrong name) is only a warning there: the
//! other end's refusal then says the same, and its own checks stay reachable. A SIGHUP
//! reload does none of them.

use std::path::Path;

use super::reader::Problems;
use crate::tls::{identity_findings, IdentityCheck, Role};

/// The agent's identity (`receiver.ca`, `cert`, `key`, named `agent.id`), the receiver's
/// certificate when the config names one (`receiver.server_cert`, carrying
/// `receiver.server_name`), and the journal's directory.
pub(crate) struct AgentFiles<'a> {
    pub id: Option<&'a str>,
    pub journal: Option<&'a Path>,
    pub ca: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    pub server_name: Option<&'a str>,
    pub server_cert: Option<&'a Path>,
}

/// Where an identity that loads but would be refused is reported: with the other
/// problems (`check-config`), or as warnings (`run`).
pub(crate) enum Refused<'a> {
    Problems,
    Warnings(&'a mut Problems),
}

impl Refused<'_> {
    fn report(&mut self, p: &mut Problems, found: crate::tls::IdentityFindings) {
        add_new(p, found.unusable);
        match self {
            Refused::Problems => add_new(p, found.refused),
            Refused::Warnings(w) => add_new(w, found.refused),
        }
    }
}

/// Appends what `p` does not hold yet (the CA is read for both certificates: say what
/// is wrong with it once).
fn add_new(p: &mut Problems, found: Vec<String>) {
    for f in found {
        if !p.contains(&f) {
            p.push(f);
        }
    }
}

pub(crate) fn agent(f: &AgentFiles<'_>, p: &mut Problems, mut refused: Refused<'_>) {
    identity(f, p, &mut refused);
    journal_dir(f.journal, p);
}

fn identity(f: &AgentFiles<'_>, p: &mut Problems, refused: &mut Refused<'_>) {
    if let (Some(ca), Some(cert), Some(key)) = (f.ca, f.cert, f.key) {
        // A missing file is already reported by the syntax pass.
        if ca.is_file() && cert.is_file() && key.is_file() {
            let found = identity_findings(&IdentityCheck {
                ca,
                cert,
                key: Some(key),
                role: Role::Agent,
                name: f.id.map(|id| (id, "agent.id")),
            });
            refused.report(p, found);
        }
        if let Some(server_cert) = f.server_cert.filter(|s| s.is_file()) {
            if ca.is_file() {
                let found = identity_findings(&IdentityCheck {
                    ca,
                    cert: server_cert,
                    key: None,
                    role: Role::Receiver,
                    name: f.server_name.map(|n| (n, "receiver.server_name")),
                });
                refused.report(p, found);
            }
        }
    }
}

fn journal_dir(journal: Option<&Path>, p: &mut Problems) {
    if let Some(journal) = journal {
        let dir = match journal.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match writable_dir(dir) {
            Err(e) => p.push(format!("agent.journal: directory {}: {e}", dir.display())),
            Ok(()) if journal.exists() => {
                if let Err(e) = std::fs::OpenOptions::new().write(true).open(journal) {
                    p.push(format!(
                        "agent.journal: {} is not writable: {e}",
                        journal.display()
                    ));
                }
            }
            Ok(()) => {}
        }
    }
}

/// The receiver's identity (`ca`, `cert`, `key`) and its storage root.
pub(crate) fn receiver(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    storage_root: Option<&Path>,
    p: &mut Problems,
    mut refused: Refused<'_>,
) {
    if let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) {
        if ca.is_file() && cert.is_file() && key.is_file() {
            let found = identity_findings(&IdentityCheck {
                ca,
                cert,
                key: Some(key),
                role: Role::Receiver,
                name: None,
            });
            refused.report(p, found);
        }
    }
    // A missing root is already reported by the syntax pass.
    if let Some(root) = storage_root.filter(|r| r.is_dir()) {
        if let Err(e) = writable_dir(root) {
            p.push(format!(
                "receiver.storage_root: {} is not writable: {e}",
                root.display()
            ));
        }
    }
}

/// Whether a file can be created in `dir`: creates and removes a probe file, which is
/// what the daemon will do (permissions, read-only mounts and full inode tables all
/// show up here; a plain permission check would miss the last two).
fn writable_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(
            "does not exist or is not a directory (create it, owned by the daemon's user)".into(),
        );
    }
    let probe = dir.join(format!(".skyferry-check-config-{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(format!("cannot create a file in it ({e})")),
    }
}
